//! The metadata conformance suite: every engine runs every case.
//!
//! An engine crate calls [`meta_conformance!`](crate::meta_conformance) with an expression that
//! builds a fresh, empty engine; each case becomes its own `#[test]`. An engine many clients
//! share also runs [`meta_conformance_shared!`](crate::meta_conformance_shared), one that
//! only one process can open [`meta_conformance_exclusive!`](crate::meta_conformance_exclusive),
//! and [`meta_conformance_lossy!`](crate::meta_conformance_lossy) runs the lost-answer cases.
//!
//! The cases live in files by the role of [`Meta`] they test, as `kvmeta/` does: `volume.rs`,
//! `sessions.rs`, `attrs.rs`, `namespace.rs`, `files.rs`, `chunks.rs`, `xattrs.rs`,
//! `locks.rs`, `journal.rs`; `shared.rs` holds two-client cases that span roles and
//! `lossy.rs` those of lost answers. This file: the macros that list the cases, and the
//! helpers the cases share.

use crate::*;

// Every `pub fn` of these files is a case, named in one of the macros below.
mod attrs;
mod chunks;
mod files;
mod journal;
mod locks;
mod lossy;
mod namespace;
mod sessions;
mod shared;
mod volume;
mod xattrs;

pub use attrs::*;
pub use chunks::*;
pub use files::*;
pub use journal::*;
pub use locks::*;
pub use lossy::*;
pub use namespace::*;
pub use sessions::*;
pub use shared::*;
pub use volume::*;
pub use xattrs::*;

/// Settings of a throwaway test volume on the memory store.
pub fn test_format(block_size: u32) -> Format {
    Format {
        name: "test".into(),
        uuid: "00000000-0000-0000-0000-000000000000".into(),
        storage: "memory".into(),
        bucket: String::new(),
        block_size,
        capacity: 0,
        inodes: 0,
        compression: String::new(),
        region: String::new(),
        endpoint: String::new(),
        access_key: String::new(),
        secret_key: Default::default(),
        prefix: None,
        meta_version: 1,
        group_secret: Default::default(),
    }
}

/// A session record for tests.
pub fn test_session(hostname: &str) -> SessionInfo {
    SessionInfo {
        sid: 0,
        hostname: hostname.into(),
        mount_point: "/m".into(),
        pid: 1,
        version: "t".into(),
        ..Default::default()
    }
}

fn fmt() -> Format {
    test_format(4 << 20)
}

fn ready(m: &dyn Meta) -> Context {
    m.format(&fmt(), false).unwrap();
    m.new_session(test_session("h")).unwrap();
    Context::root()
}

fn errno<T: std::fmt::Debug>(r: Result<T>) -> Errno {
    r.expect_err("expected an error").errno()
}

fn mkfile(m: &dyn Meta, ctx: &Context, parent: Ino, name: &str) -> Ino {
    m.mknod(ctx, parent, name.as_bytes(), FileType::File, 0o644, 0, 0)
        .unwrap()
        .0
}

fn mkdir(m: &dyn Meta, ctx: &Context, parent: Ino, name: &str) -> Ino {
    m.mknod(
        ctx,
        parent,
        name.as_bytes(),
        FileType::Directory,
        0o755,
        0,
        0,
    )
    .unwrap()
    .0
}

fn chmod(m: &dyn Meta, ctx: &Context, ino: Ino, mode: u32) {
    m.setattr(
        ctx,
        ino,
        &SetAttr {
            mode: Some(mode),
            ..Default::default()
        },
    )
    .unwrap();
}

/// The hostnames of the sessions on record, sorted.
pub(crate) fn hosts(m: &dyn Meta) -> Vec<String> {
    let mut h: Vec<String> = m
        .list_sessions()
        .unwrap()
        .into_iter()
        .map(|s| s.hostname)
        .collect();
    h.sort();
    h
}

/// A caller of uid and gid `id` whose permissions the engine checks itself.
fn unprivileged(id: u32) -> Context {
    Context {
        uid: id,
        gid: id,
        check_permission: true,
        ..Default::default()
    }
}

fn names(m: &dyn Meta, ctx: &Context, dir: Ino) -> Vec<String> {
    m.readdir(ctx, dir, false)
        .unwrap()
        .into_iter()
        .map(|e| String::from_utf8(e.name).unwrap())
        .collect()
}

/// Expand to one `#[test]` per conformance case, each on a fresh engine from `$make`, an
/// expression giving `(meta, guard)`; the guard (a temp dir, a server) lives for the case.
#[macro_export]
macro_rules! meta_conformance {
    ($make:expr) => {
        $crate::meta_conformance!(@cases $make;
            format_and_load, create_lookup_readdir, readdir_in_pages,
            readdir_pages_under_concurrent_change, unlink_and_rmdir, hard_links,
            open_unlinked_kept_until_close, rename_cases, symlinks, xattrs,
            slices_and_truncate, chunk_and_trash_paging, setattr_rules, permissions,
            statfs_counts, posix_and_bsd_locks, object_journal, create_open_counts_an_open,
            slice_ids_spared_until_committed, trash_records_carry_engine_time);
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                let (m, _guard) = $make;
                $crate::conformance::$case(&m);
            }
        )*
    };
}

/// The case of [`lost_answers`]: `$make` gives `(meta, guard)` where `meta` is a
/// [`KvMeta`] over a [`crate::fault::LossyKv`].
#[macro_export]
macro_rules! meta_conformance_lossy {
    ($make:expr) => {
        #[test]
        fn lost_answers() {
            let (m, _guard) = $make;
            $crate::conformance::lost_answers(&m);
        }

        #[test]
        fn lost_answer_across_a_failover() {
            let (m, _guard) = $make;
            $crate::conformance::lost_answer_across_a_failover(&m);
        }
    };
}

/// The seed of the fault schedule of the suite's lossy runs: `AQUIFER_FAULT_SEED`, or 1.
pub fn fault_seed() -> u64 {
    std::env::var("AQUIFER_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// The cases of engines only one process can open: a new session knows every older one is
/// dead.
#[macro_export]
macro_rules! meta_conformance_exclusive {
    ($make:expr) => {
        $crate::meta_conformance!(@cases $make; sessions_clean_up_after_dead_clients);
    };
}

/// The cases of engines many clients share: `$make` gives `(a, b, guard)`, two clients of
/// one fresh volume whose sessions time out after [`SHARED_SESSION_TIMEOUT`].
#[macro_export]
macro_rules! meta_conformance_shared {
    ($make:expr) => {
        $crate::meta_conformance_shared!(@cases $make;
            two_clients_one_tree, unlink_elsewhere_keeps_open_file, locks_across_clients,
            dead_session_is_cleaned_up, concurrent_creates_and_counters,
            rename_races_keep_tree_consistent, slice_lists_fresh_at_open,
            stale_guesses_are_caught, live_sessions_slice_ids_seen_by_all,
            changes_are_followed);
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                let (a, b, _guard) = $make;
                $crate::conformance::$case(&a, &b);
            }
        )*
    };
}

/// The session timeout the shared cases expect their clients to have.
pub const SHARED_SESSION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Format the volume through `a` and open a session on each client.
fn ready2(a: &dyn Meta, b: &dyn Meta) -> Context {
    a.format(&fmt(), false).unwrap();
    a.new_session(test_session("a")).unwrap();
    b.new_session(test_session("b")).unwrap();
    Context::root()
}

fn data_slice(m: &dyn Meta, len: u32) -> Slice {
    Slice {
        pos: 0,
        id: m.new_slice_id().unwrap(),
        size: len,
        off: 0,
        len,
    }
}

/// A new file `name` in the root through `m`, with one committed slice of `len` bytes at
/// the start of chunk 0: the file and the slice.
fn file_with_slice(m: &dyn Meta, ctx: &Context, name: &str, len: u32) -> (Ino, Slice) {
    let f = mkfile(m, ctx, ROOT_INO, name);
    let s = data_slice(m, len);
    m.write_slice(f, 0, s).unwrap();
    (f, s)
}

/// A lock of `typ` on bytes `start..=end` taken by process `pid`.
fn plock(typ: i32, start: u64, end: u64, pid: u32) -> PLock {
    PLock {
        typ,
        start,
        end,
        pid,
    }
}

#[cfg(test)]
mod memory {
    crate::meta_conformance!((crate::KvMeta::new(crate::MemKv::new()), ()));
    crate::meta_conformance_exclusive!((crate::KvMeta::new(crate::MemKv::new()), ()));

    fn pair() -> (
        crate::KvMeta<std::sync::Arc<crate::MemKv>>,
        crate::KvMeta<std::sync::Arc<crate::MemKv>>,
        (),
    ) {
        let kv = std::sync::Arc::new(crate::MemKv::shared());
        let t = super::SHARED_SESSION_TIMEOUT;
        (
            crate::KvMeta::new(kv.clone()).with_session_timeout(t),
            crate::KvMeta::new(kv).with_session_timeout(t),
            (),
        )
    }
    crate::meta_conformance_shared!(pair());

    /// Every case again with one commit in three losing its answer.
    mod lossy {
        use crate::fault::LossyKv;
        use crate::{KvMeta, MemKv};
        use std::sync::Arc;

        fn fresh() -> (KvMeta<LossyKv<MemKv>>, ()) {
            let seed = crate::conformance::fault_seed();
            (KvMeta::new(LossyKv::new(MemKv::new(), seed, 3)), ())
        }
        crate::meta_conformance!(fresh());
        crate::meta_conformance_exclusive!(fresh());
        crate::meta_conformance_lossy!((KvMeta::new(LossyKv::new(MemKv::new(), 0, 0)), ()));

        type Lossy = KvMeta<LossyKv<Arc<MemKv>>>;
        fn pair() -> (Lossy, Lossy, ()) {
            let kv = Arc::new(MemKv::shared());
            let t = crate::conformance::SHARED_SESSION_TIMEOUT;
            let seed = crate::conformance::fault_seed();
            (
                KvMeta::new(LossyKv::new(kv.clone(), seed, 3)).with_session_timeout(t),
                KvMeta::new(LossyKv::new(kv, seed + 1, 3)).with_session_timeout(t),
                (),
            )
        }
        crate::meta_conformance_shared!(pair());
    }
}
