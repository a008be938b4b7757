//! The engine-independent metadata implementation over [`KvEngine`]: [`KvMeta`], one file
//! per role of [`crate::Meta`], each holding that role's `impl` and the helpers only it uses.
//!
//! - `volume.rs`: format, settings, statfs and the capacity check, the engine's clock, sync.
//! - `sessions.rs`: a mount's session — start, heartbeat, close — and where dead sessions
//!   are reaped; a lost session's EIO.
//! - `attrs.rs`: getattr, setattr, access, and the permission checks all roles use.
//! - `namespace.rs`: lookup, create, link, unlink, rmdir, rename, readdir.
//! - `files.rs`: open, close, truncate, fallocate; where an inode is freed.
//! - `chunks.rs`: slice lists (read, write, compact), the trash, chunk scans for gc.
//! - `follow.rs`: the slice-list cache, and following other clients' changes.
//! - `ids.rs`: inode, slice and trash ids in batches; a session's record of slice ids.
//! - `xattrs.rs`, `locks.rs` (where a lock is taken), `journal.rs`, `load.rs`.
//! - `txn.rs`: the one way every operation reaches the engine (guesses, lanes).
//!
//! This file: the struct, its constructor and the small key helpers every role shares.

use crate::encoding as key;
use crate::error::{Errno, Result};
use crate::kv::{KvEngine, KvTxn};
use crate::lanes;
use crate::types::*;
use crate::Meta;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod attrs;
mod chunks;
#[cfg(test)]
mod failover_tests;
mod files;
mod follow;
mod ids;
mod journal;
mod load;
mod locks;
mod namespace;
mod sessions;
mod txn;
mod volume;
mod xattrs;

use ids::{IdBatch, SliceIds};
use txn::{remember, Hints};

const INO_BATCH: u64 = 256;
const SLICE_BATCH: u64 = 1024;
const TRASH_BATCH: u64 = 256;
/// Shards of the open-file table: first opens and last closes of inodes in different shards
/// register with the engine in parallel.
const OPEN_SHARDS: usize = 64;
/// Values remembered as guesses for transactions, at most (then the memory starts over).
const HINTS_MAX: usize = 65536;
/// The longest value remembered as a guess.
const HINT_VALUE_MAX: usize = 4096;
/// A session whose heartbeat is older than this is dead, unless told otherwise.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(60);

const C_NEXT_INODE: &str = "nextInode";
const C_NEXT_SLICE: &str = "nextSlice";
const C_NEXT_TRASH: &str = "nextTrash";
const C_NEXT_SESSION: &str = "nextSession";
const C_USED_SPACE: &str = "usedSpace";
const C_USED_INODES: &str = "totalInodes";

/// Metadata over any transactional key-value engine.
///
/// Open files are recorded in the engine (`O` sid ino and `o` ino sid) at an inode's first
/// open by this client and removed at its last close, so an unlink by any client of the
/// volume keeps a file some session still has open; the last of them to close it frees it.
pub struct KvMeta<E: KvEngine> {
    kv: E,
    sid: AtomicU64,
    /// This client's open counts per inode. A shard is held while its first open or last
    /// close registers with the engine, so the two cannot cross.
    open: Vec<Mutex<HashMap<Ino, u32>>>,
    inos: Mutex<IdBatch>,
    slices: Mutex<SliceIds>,
    trash_ids: Mutex<IdBatch>,
    limits: Mutex<Option<(u64, u64)>>,
    session_timeout: Duration,
    session: Mutex<Option<SessionInfo>>,
    /// The session's record as last written here: the guess for the liveness check of
    /// the transactions that record something for the session ([`KvMeta::check_session`]).
    session_record: Mutex<Option<Vec<u8>>>,
    /// Another client took this session for dead and released what it held: every
    /// operation fails with EIO until a new session starts (see `kvmeta/sessions.rs`).
    lost: AtomicBool,
    /// When this client last knew its session alive (its last heartbeat that reached the
    /// engine), in milliseconds since `born`: past the timeout, operations check first.
    beat_ms: AtomicU64,
    born: std::time::Instant,
    /// Slice lists read on a shared engine, so a read of an open file costs no round trip
    /// (`follow.rs`).
    chunks: Arc<follow::ChunkCache>,
    /// Whether the change feed is followed and up to date (`follow.rs`).
    following: Arc<follow::Following>,
    /// On an exclusive engine: inodes this client has open that lost their last link and
    /// are recorded in the engine as held (`files.rs`), released at their last close.
    recorded: Mutex<std::collections::HashSet<Ino>>,
    /// Inodes this client holds locks on: a close elsewhere costs no engine round trip.
    locked: Mutex<std::collections::HashSet<Ino>>,
    /// Unix time of the last look for dead sessions, on the engine's clock.
    last_reap: AtomicU64,
    /// On a shared engine, the last value this client read or committed for some keys (an
    /// inode's attributes, a chunk's slice list), given to transactions as guesses
    /// ([`KvTxn::guess`]): an engine that checks reads at commit then skips the read — a
    /// create, a first open, a last close or a write becomes one round trip on Redis. Never
    /// answers a caller by itself: a guess is checked at commit, and a wrong one only costs
    /// the transaction a second run with real reads.
    hints: Mutex<Hints>,
    /// Lanes that let a commit whose answer was lost be recognised (`lanes.rs`).
    lanes: lanes::Lanes,
    /// The engine's epoch ([`KvEngine::epoch`]) when this client last found its lanes on
    /// the server as it left them.
    lanes_checked: AtomicU64,
    /// The server lost changes it had acknowledged to this client (a failover to a
    /// replica that lacked them): fsync and close can no longer vouch for anything.
    diverged: std::sync::atomic::AtomicBool,
    /// The engine's epoch as last seen by the reaper, and when it changed.
    epoch_seen: Mutex<(u64, Option<std::time::Instant>)>,
    /// The engine's clock as last read, and when on this host's monotonic clock.
    clock_base: Mutex<Option<(Time, Instant)>>,
}

fn now() -> Time {
    Time::now()
}

fn get_attr(t: &mut dyn KvTxn, ino: Ino) -> Result<Attr> {
    match t.get(&key::attr(ino))? {
        Some(v) => key::decode_attr(ino, &v),
        None => Err(Errno::ENOENT.into()),
    }
}

fn put_attr(t: &mut dyn KvTxn, ino: Ino, a: &Attr) {
    t.set(&key::attr(ino), key::encode_attr(a));
}

fn get_dentry(t: &mut dyn KvTxn, parent: Ino, name: &[u8]) -> Result<Option<(FileType, Ino)>> {
    let k = key::dentry(parent, name);
    match t.get(&k)? {
        Some(v) => Ok(Some(key::decode_dentry(&k, &v)?)),
        None => Ok(None),
    }
}

/// Change a usage counter when the transaction commits (never a conflict).
fn add(t: &mut dyn KvTxn, name: &str, delta: i64) {
    if delta != 0 {
        t.add(&key::counter(name), delta);
    }
}

/// Every role, each implemented in its file: what the filesystem above holds as `dyn Meta`.
impl<E: KvEngine> Meta for KvMeta<E> {}

impl<E: KvEngine> KvMeta<E> {
    pub fn new(kv: E) -> Self {
        KvMeta {
            kv,
            sid: AtomicU64::new(0),
            open: (0..OPEN_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            inos: Mutex::new(IdBatch::default()),
            slices: Mutex::new(SliceIds::default()),
            trash_ids: Mutex::new(IdBatch::default()),
            limits: Mutex::new(None),
            session_timeout: DEFAULT_SESSION_TIMEOUT,
            session: Mutex::new(None),
            session_record: Mutex::new(None),
            lost: AtomicBool::new(false),
            beat_ms: AtomicU64::new(0),
            born: std::time::Instant::now(),
            chunks: Default::default(),
            following: Default::default(),
            recorded: Mutex::new(Default::default()),
            locked: Mutex::new(Default::default()),
            last_reap: AtomicU64::new(0),
            hints: Mutex::new(HashMap::new()),
            lanes: lanes::Lanes::new(),
            lanes_checked: AtomicU64::new(0),
            diverged: Default::default(),
            epoch_seen: Mutex::new((0, None)),
            clock_base: Mutex::new(None),
        }
    }

    /// Remember `value` as what `key` holds now (see [`KvMeta::hints`]).
    fn hint(&self, key: Vec<u8>, value: Option<Vec<u8>>) {
        if !self.kv.exclusive() {
            remember(&mut self.hints.lock().unwrap(), key, Some(value));
        }
    }

    /// How long a transaction whose answer was lost keeps trying to learn whether it
    /// applied (1 min by default), for tests of an engine that stays away.
    pub fn with_fence_deadline(mut self, deadline: Duration) -> Self {
        self.lanes.fence_deadline = deadline;
        self
    }

    /// How long a session may go without a heartbeat before other clients clean up after
    /// it (its locks released, its open-but-unlinked files freed).
    pub fn with_session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout.max(Duration::from_secs(1));
        self
    }

    fn sid(&self) -> u64 {
        self.sid.load(Ordering::Relaxed)
    }

    fn open_shard(&self, ino: Ino) -> std::sync::MutexGuard<'_, HashMap<Ino, u32>> {
        self.open[(ino as usize) % OPEN_SHARDS].lock().unwrap()
    }

    fn counter(&self, name: &str) -> Result<i64> {
        Ok(crate::kv::counter_value(
            self.kv.get(&key::counter(name))?.as_deref(),
        ))
    }

    pub fn engine_ref(&self) -> &E {
        &self.kv
    }
}
