//! What a volume's blocks are stored in, and as what.
//!
//! The object store a volume's blocks go through is stacked in one place, [`build`], for
//! mounts, gc and fsck, and objbench (only format's probe talks to the bare backend):
//!
//! ```text
//! Staging (--writeback only)            stage puts on the cache disk, upload them later
//!   Retrying                            transient errors retried, with backoff
//!     Counting                          every attempt counted for the figures
//!       RateLimited                     every attempt takes its share of the bandwidth
//!         backend                       file, memory or S3, as the volume's spec says
//! ```
//!
//! A mount's data path puts one more layer on top, the object [`journal`]
//! ([`ChunkStore::new`](crate::ChunkStore::new) makes it: it needs the metadata engine and
//! is how [`ChunkStore::sync`](crate::ChunkStore::sync) makes blocks durable). The block
//! cache is not a layer: the read path asks it first (`cache` wires its tiers).
//!
//! * [`keys`]: the object key of every block, built and parsed here only;
//! * [`codec`]: a block's stored form (checksums, compression);
//! * [`journal`]: the layer that makes a small fsync one metadata log flush;
//! * [`staging`]: the writeback layer (`--writeback`);
//! * `marker`: the object that says which volume owns a store prefix;
//! * `cache`: the block cache's tiers as the data path wires them (RAM, then the caller's
//!   disks; written blocks enter them).

pub(crate) mod cache;
pub mod codec;
pub mod journal;
pub mod keys;
mod marker;
pub mod staging;

pub use marker::{check_volume, claim_volume, MARKER};

use aquifer_meta::Format;
use aquifer_object::{
    object_retry_policy, Counting, ObjectError, ObjectStore, RateLimited, Retrying, StoreCounters,
    StoreSpec, TokenBucket,
};
use staging::Staging;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// What [`build`] stacks on the backend a [`StoreSpec`] names, beyond what every stack has.
#[derive(Default)]
pub struct StackOptions<'a> {
    /// Upload and download bandwidth in MiB/s; 0 for no limit.
    pub upload_mib: u64,
    pub download_mib: u64,
    /// The volume whose marker the store must hold (one from before markers is given one).
    /// Checked before anything is staged, since staging uploads what an earlier run left as
    /// soon as it opens. `None` for a store that is no volume's (objbench's scratch prefix).
    pub volume: Option<&'a Format>,
    /// Stage puts on a cache disk (`--writeback`).
    pub staging: Option<StagingOptions>,
}

/// Where and how `--writeback` stages blocks (see [`Staging::open`]).
pub struct StagingOptions {
    pub dir: PathBuf,
    /// Kept equal to the staged bytes: the cache disk counts them in its quota.
    pub pinned: Arc<AtomicU64>,
    /// Staged bytes past which puts wait for uploads.
    pub limit: u64,
    /// Threads uploading staged blocks.
    pub threads: usize,
}

/// A volume's object store, as [`build`] stacked it.
pub struct Stack {
    /// The top of the stack: what blocks are put into and read from.
    pub store: Arc<dyn ObjectStore>,
    /// The attempts the backend saw, for the figures.
    pub counters: Arc<StoreCounters>,
    /// The writeback layer, when there is one: its backlog for the figures, and its
    /// shutdown.
    pub staging: Option<Arc<Staging>>,
}

/// Why [`build`] failed; each says what to tell the user, as it is.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("{0}")]
    Store(ObjectError),
    #[error("{0}")]
    Volume(String),
    #[error("cannot stage blocks in {}: {error}", dir.display())]
    Staging { dir: PathBuf, error: std::io::Error },
}

/// The object store a volume's blocks go through: the backend `spec` names, with the layers
/// of the stack above ([`store`](self)) as `opts` asks.
pub fn build(spec: &StoreSpec, opts: StackOptions) -> Result<Stack, StackError> {
    let backend = aquifer_object::create(spec).map_err(StackError::Store)?;
    let bucket_of = |mib: u64| (mib > 0).then(|| TokenBucket::new(mib << 20));
    let limited = RateLimited::new(
        backend,
        bucket_of(opts.upload_mib),
        bucket_of(opts.download_mib),
    );
    let counted = Counting::new(limited);
    let counters = counted.counters();
    let store: Arc<dyn ObjectStore> = Arc::new(Retrying::new(counted, object_retry_policy()));
    if let Some(f) = opts.volume {
        marker::check_marker(&*store, f).map_err(StackError::Volume)?;
    }
    let staging = match opts.staging {
        None => None,
        Some(s) => {
            let staged = Staging::open(&s.dir, store.clone(), s.threads, s.limit, s.pinned)
                .map_err(|error| StackError::Staging {
                    dir: s.dir.clone(),
                    error,
                })?;
            tracing::info!(dir = %s.dir.display(), "writeback: blocks are staged here and uploaded in the background");
            Some(staged)
        }
    };
    let store: Arc<dyn ObjectStore> = match &staging {
        Some(s) => s.clone(),
        None => store,
    };
    Ok(Stack {
        store,
        counters,
        staging,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aquifer_meta::conformance::test_format;
    use bytes::Bytes;

    fn memory() -> StoreSpec {
        StoreSpec {
            storage: "memory".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_stack_checks_the_marker_before_it_stages() {
        // A volume from before markers is given one.
        let old = test_format(4096);
        let volume = Some(&old);
        let s = build(
            &memory(),
            StackOptions {
                volume,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(check_volume(&*s.store, &old.name, &old.uuid), Ok(true));
        assert!(s.staging.is_none());
        // A volume with a prefix of its own must find its marker there.
        let new = Format {
            prefix: Some("test/".into()),
            ..test_format(4096)
        };
        let d = tempfile::tempdir().unwrap();
        let staging = || StagingOptions {
            dir: d.path().join("staging"),
            pinned: Arc::new(AtomicU64::new(0)),
            limit: 1 << 20,
            threads: 1,
        };
        let opts = StackOptions {
            volume: Some(&new),
            staging: Some(staging()),
            ..Default::default()
        };
        let e = build(&memory(), opts).err().expect("no marker");
        assert!(e.to_string().contains("its marker is missing"), "{e}");
        assert!(
            !d.path().join("staging").exists(),
            "staged before the check"
        );
        // With writeback, the top of the stack is the staging layer.
        let opts = StackOptions {
            staging: Some(staging()),
            ..Default::default()
        };
        let s = build(&memory(), opts).unwrap();
        assert!(s.store.describe().ends_with("(writeback)"));
        s.store.put("k", Bytes::from_static(b"v")).unwrap();
        assert_eq!(s.store.get("k", 0, None).unwrap(), &b"v"[..]);
        s.staging
            .unwrap()
            .shutdown(std::time::Duration::from_secs(5));
    }
}
