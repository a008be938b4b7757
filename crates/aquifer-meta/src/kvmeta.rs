//! The engine-independent metadata implementation over [`KvEngine`].

use crate::encoding as key;
use crate::error::{Errno, MetaError, Result};
use crate::kv::{KvEngine, KvTxn};
use crate::lanes;
use crate::locks::{self, PLock, F_UNLCK};
use crate::types::*;
use crate::{
    Attrs, Chunks, Files, Load, Locks, Meta, Namespace, ObjectJournal, Sessions, Volume, Xattrs,
    MODE_R, MODE_W, MODE_X,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[cfg(test)]
mod failover_tests;
mod ids;
mod sessions;
mod txn;

use ids::{IdBatch, SliceIds};
use txn::{remember, Hints};

const MAX_LINKS: u32 = 65000;
const INO_BATCH: u64 = 256;
const SLICE_BATCH: u64 = 1024;
const TRASH_BATCH: u64 = 256;
/// Shards of the open-file table: first opens and last closes of inodes in different shards
/// register with the engine in parallel.
const OPEN_SHARDS: usize = 64;
/// Inodes whose slice lists are cached at most (then the cache starts over).
const CHUNK_CACHE_INODES: usize = 16384;
/// Values remembered as guesses for transactions, at most (then the memory starts over).
const HINTS_MAX: usize = 65536;
/// The longest value remembered as a guess.
const HINT_VALUE_MAX: usize = 4096;
/// A session whose heartbeat is older than this is dead, unless told otherwise.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a reading of a shared engine's clock is extrapolated with this host's
/// monotonic clock before it is read again.
const CLOCK_RESAMPLE: Duration = Duration::from_secs(60);
/// Free space reported when the volume has no capacity limit (1 PiB).
const UNLIMITED_SPACE: u64 = 1 << 50;
const UNLIMITED_INODES: u64 = 10 << 20;

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
    /// Slice lists read on a shared engine, so a read of an open file costs no round trip:
    /// dropped for an inode at each open of it (close-to-open) and at each change of its
    /// chunks made here; a change by another client shows at the next open here.
    chunks: Mutex<HashMap<Ino, HashMap<u32, Vec<Slice>>>>,
    /// Bumped by every drop, so a read that raced with a change does not cache.
    chunk_gen: AtomicU64,
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

fn later(t: Time, d: Duration) -> Time {
    let ns = t.nsec as u128 + d.subsec_nanos() as u128;
    Time {
        sec: t.sec + d.as_secs() as i64 + (ns / 1_000_000_000) as i64,
        nsec: (ns % 1_000_000_000) as u32,
    }
}

fn now() -> Time {
    Time::now()
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > MAX_NAME {
        return Err(Errno::ENAMETOOLONG.into());
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(Errno::EINVAL.into());
    }
    Ok(())
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

/// POSIX permission check of `mask` (MODE_R|W|X) on `attr` for `ctx`.
fn access_ok(ctx: &Context, attr: &Attr, mask: u32) -> Result<()> {
    if !ctx.check_permission || mask == 0 {
        return Ok(());
    }
    if ctx.uid == 0 {
        // Root may execute only when some execute bit is set (or on directories).
        if mask & MODE_X != 0 && !attr.is_dir() && attr.mode & 0o111 == 0 {
            return Err(Errno::EACCES.into());
        }
        return Ok(());
    }
    let mode = attr.mode as u32;
    let perm = if ctx.uid == attr.uid {
        (mode >> 6) & 7
    } else if ctx.in_group(attr.gid) {
        (mode >> 3) & 7
    } else {
        mode & 7
    };
    if perm & mask == mask {
        Ok(())
    } else {
        Err(Errno::EACCES.into())
    }
}

/// The sticky-bit rule for removing or renaming `victim` out of `dir`.
fn sticky_ok(ctx: &Context, dir: &Attr, victim: &Attr) -> Result<()> {
    if ctx.check_permission
        && ctx.uid != 0
        && dir.mode & libc::S_ISVTX as u16 != 0
        && ctx.uid != dir.uid
        && ctx.uid != victim.uid
    {
        return Err(Errno::EPERM.into());
    }
    Ok(())
}

/// On a shared engine a directory's times are not rewritten by a change of an entry made
/// within this long of the last rewrite: every create, unlink and rename in a directory
/// would otherwise write the directory's attributes, and concurrent changes in one
/// directory from many clients would all conflict on that one key. JuiceFS skips 100 ms;
/// 5 ms keeps most of the gain and stays below what programs that sleep between a change
/// and a look at the directory's times (pjdfstest naps 10 ms) can see.
const DIR_TIME_SLACK_NS: i128 = 5_000_000;

fn ns(t: Time) -> i128 {
    t.sec as i128 * 1_000_000_000 + t.nsec as i128
}

fn touch_dir(a: &mut Attr, t: Time) {
    a.mtime = t;
    a.ctime = t;
}

impl<E: KvEngine> KvMeta<E> {
    /// Set a directory's mtime and ctime to `ts` for a change of its entries alone, and
    /// write its attributes — unless, on a shared engine, its times are less than
    /// [`DIR_TIME_SLACK_NS`] old (see there).
    fn touch_parent(&self, t: &mut dyn KvTxn, ino: Ino, p: &mut Attr, ts: Time) {
        let age = ns(ts) - ns(p.mtime).max(ns(p.ctime));
        if !self.kv.exclusive() && (0..DIR_TIME_SLACK_NS).contains(&age) {
            return;
        }
        touch_dir(p, ts);
        put_attr(t, ino, p);
    }

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
            chunks: Mutex::new(HashMap::new()),
            chunk_gen: AtomicU64::new(0),
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

    /// The engine's clock without a round trip each time: a shared engine's is read once a
    /// minute and extrapolated with this host's monotonic clock in between (off by half a
    /// round trip, whatever this host's wall clock says).
    fn engine_now(&self) -> Result<Time> {
        if self.kv.exclusive() {
            return self.kv.clock();
        }
        let mut base = self.clock_base.lock().unwrap();
        if let Some((t, at)) = *base {
            let age = at.elapsed();
            if age < CLOCK_RESAMPLE {
                return Ok(later(t, age));
            }
        }
        let t = self.kv.clock()?;
        *base = Some((t, Instant::now()));
        Ok(t)
    }

    /// Write the session's record of slice ids it may still commit, when it changed (or
    /// always, with `force`: the record was removed by a client that took us for dead).
    fn record_slice_ids(&self, s: &mut SliceIds, force: bool) -> Result<()> {
        let sid = self.sid();
        if sid == 0 || s.sid != sid {
            return Ok(());
        }
        let ranges = s.ranges();
        if ranges == s.recorded && !force {
            return Ok(());
        }
        let v = key::encode_ranges(&ranges);
        self.txn(|t| {
            // Not over another mount's record, should a failover have given it this id.
            self.check_session(t)?;
            t.set(&key::reserved_slices(sid), v.clone());
            Ok(())
        })?;
        s.recorded = ranges;
        Ok(())
    }

    /// Ids committed or given up: no longer to be spared by gc (recorded lazily).
    fn settle_slice_ids(&self, ids: impl IntoIterator<Item = u64>) {
        let mut s = self.slices.lock().unwrap();
        for id in ids {
            s.open.remove(&id);
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

    fn forget_chunks(&self, ino: Ino) {
        if self.kv.exclusive() {
            return;
        }
        let mut c = self.chunks.lock().unwrap();
        self.chunk_gen.fetch_add(1, Ordering::AcqRel);
        c.remove(&ino);
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

    fn limits(&self) -> (u64, u64) {
        let mut l = self.limits.lock().unwrap();
        if l.is_none() {
            if let Ok(f) = self.load_format() {
                *l = Some((f.capacity, f.inodes));
            }
        }
        l.unwrap_or((0, 0))
    }

    /// Remove an inode whose last link is gone: its data goes to the trash in this transaction.
    fn destroy_inode(&self, t: &mut dyn KvTxn, ino: Ino, attr: &Attr) -> Result<()> {
        if attr.typ == FileType::File {
            let prefix = key::chunk_prefix(ino);
            let chunks = t.scan(&prefix, &key::prefix_end(&prefix), usize::MAX)?;
            let mut dead = Vec::new();
            for (k, v) in chunks {
                let slices = Slice::decode_list(&v).ok_or_else(|| MetaError::Corrupt {
                    key: format!("C{ino}"),
                    msg: "bad slice list".into(),
                })?;
                dead.extend(slices.into_iter().filter(|s| s.id != 0));
                t.delete(&k);
            }
            self.trash_slices(t, &dead)?;
            add(t, C_USED_SPACE, -(align4k(attr.length) as i64));
        }
        if attr.typ == FileType::Symlink {
            t.delete(&key::symlink(ino));
        }
        let xp = key::xattr_prefix(ino);
        for (k, _) in t.scan(&xp, &key::prefix_end(&xp), usize::MAX)? {
            t.delete(&k);
        }
        t.delete(&key::attr(ino));
        t.delete(&key::flocks(ino));
        t.delete(&key::plocks(ino));
        add(t, C_USED_INODES, -1);
        Ok(())
    }

    fn trash_slices(&self, t: &mut dyn KvTxn, slices: &[Slice]) -> Result<()> {
        if slices.is_empty() {
            return Ok(());
        }
        // Ids come from a batch outside the transaction: a shared counter read and written
        // in every delete would make concurrent deletes of all clients conflict.
        let seq = self.alloc(&self.trash_ids, C_NEXT_TRASH, TRASH_BATCH, 1)?;
        // Stamped with the engine's time: the grace before the blocks go is measured on one
        // clock, whichever client frees them.
        t.set(
            &key::trash(seq),
            key::encode_trash(slices, self.engine_now()?),
        );
        Ok(())
    }

    /// True when some session (this one included) has `ino` open.
    fn has_holders(t: &mut dyn KvTxn, ino: Ino) -> Result<bool> {
        let p = key::holder_prefix(ino);
        Ok(!t.scan(&p, &key::prefix_end(&p), 1)?.is_empty())
    }

    /// Drop one link of `ino` (its dentry is already removed). Deletes the inode at zero links
    /// unless a session has it open, in which case the last close frees it.
    fn drop_link(&self, t: &mut dyn KvTxn, ino: Ino, mut a: Attr, ts: Time) -> Result<()> {
        a.nlink = a.nlink.saturating_sub(1);
        a.ctime = ts;
        if a.nlink > 0 || Self::has_holders(t, ino)? {
            put_attr(t, ino, &a);
        } else {
            self.destroy_inode(t, ino, &a)?;
        }
        Ok(())
    }

    /// Zero `[off, off+len)` by appending hole slices to each chunk it covers.
    fn zero_range(t: &mut dyn KvTxn, ino: Ino, off: u64, len: u64) -> Result<()> {
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let idx = (pos / CHUNK_SIZE) as u32;
            let cpos = pos % CHUNK_SIZE;
            let n = (CHUNK_SIZE - cpos).min(end - pos);
            let k = key::chunk(ino, idx);
            if let Some(mut v) = t.get(&k)? {
                Slice::zero(cpos as u32, n as u32).encode(&mut v);
                t.set(&k, v);
            }
            pos += n;
        }
        Ok(())
    }

    fn set_length(&self, t: &mut dyn KvTxn, ino: Ino, a: &mut Attr, length: u64) -> Result<()> {
        if length < a.length {
            // Chunks wholly past the new end go to the trash.
            let first_gone = length.div_ceil(CHUNK_SIZE) as u32;
            let start = key::chunk(ino, first_gone);
            let end = key::prefix_end(&key::chunk_prefix(ino));
            let mut dead = Vec::new();
            for (k, v) in t.scan(&start, &end, usize::MAX)? {
                if let Some(sl) = Slice::decode_list(&v) {
                    dead.extend(sl.into_iter().filter(|s| s.id != 0));
                }
                t.delete(&k);
            }
            self.trash_slices(t, &dead)?;
            if !length.is_multiple_of(CHUNK_SIZE) {
                // Clamp the chunk that holds the new end, so bytes past it read as zeros
                // when the file grows again.
                let idx = (length / CHUNK_SIZE) as u32;
                let cut = (length % CHUNK_SIZE) as u32;
                let k = key::chunk(ino, idx);
                if let Some(v) = t.get(&k)? {
                    let list = Slice::decode_list(&v).ok_or_else(|| MetaError::Corrupt {
                        key: format!("C{ino}/{idx}"),
                        msg: "bad slice list".into(),
                    })?;
                    let mut kept = Vec::with_capacity(list.len());
                    let mut dead = Vec::new();
                    for mut s in list {
                        if s.pos >= cut {
                            if s.id != 0 {
                                dead.push(s);
                            }
                            continue;
                        }
                        s.len = s.len.min(cut - s.pos);
                        kept.push(s);
                    }
                    self.trash_slices(t, &dead)?;
                    if kept.is_empty() {
                        t.delete(&k);
                    } else {
                        t.set(&k, Slice::encode_list(&kept));
                    }
                }
            }
        }
        let delta = align4k(length) as i64 - align4k(a.length) as i64;
        add(t, C_USED_SPACE, delta);
        a.length = length;
        Ok(())
    }

    /// The capacity check. Reads the committed counter outside the transaction: a limit
    /// shared by many clients is checked, not made a point of conflict (it may be overshot
    /// by what clients add at the same moment).
    fn check_space(&self, grow: u64) -> Result<()> {
        let (cap, _) = self.limits();
        if cap > 0 && grow > 0 && self.counter(C_USED_SPACE)?.max(0) as u64 + grow > cap {
            return Err(Errno::ENOSPC.into());
        }
        Ok(())
    }

    /// Session `sid` no longer has `ino` open; free the inode if it was the last holder of a
    /// file without links.
    fn release_holder(&self, t: &mut dyn KvTxn, sid: u64, ino: Ino) -> Result<()> {
        t.delete(&key::sustained(sid, ino));
        t.delete(&key::holder(ino, sid));
        if let Ok(a) = get_attr(t, ino) {
            if a.nlink == 0 && !Self::has_holders(t, ino)? {
                self.destroy_inode(t, ino, &a)?;
            }
        }
        Ok(())
    }

    /// Change the lock tables of `ino` within a transaction (both read in one round trip),
    /// keeping session `sid`'s lock index true. Returns whether `sid` still holds a lock.
    fn edit_locks(t: &mut dyn KvTxn, ino: Ino, sid: u64, f: &mut LockEdit<'_>) -> Result<bool> {
        let (fk, pk) = (key::flocks(ino), key::plocks(ino));
        let got = t.get_many(&[&fk, &pk])?;
        let mut fl = locks::decode_flocks(got[0].as_deref().unwrap_or_default());
        let mut pl = locks::decode_plocks(got[1].as_deref().unwrap_or_default());
        f(&mut fl, &mut pl)?;
        Self::put_flocks(t, ino, &fl);
        Self::put_plocks(t, ino, &pl);
        Self::index_locks(t, sid, ino, &fl, &pl);
        Ok(fl.iter().any(|r| r.0 == sid) || pl.iter().any(|r| r.sid == sid))
    }

    /// Drop every lock record of `sid` on `ino`.
    fn drop_session_locks(t: &mut dyn KvTxn, sid: u64, ino: Ino) -> Result<()> {
        Self::edit_locks(t, ino, sid, &mut |fl, pl| {
            fl.retain(|r| r.0 != sid);
            pl.retain(|r| r.sid != sid);
            Ok(())
        })
        .map(|_| ())
    }

    fn put_flocks(t: &mut dyn KvTxn, ino: Ino, recs: &[(u64, u64, i32)]) {
        if recs.is_empty() {
            t.delete(&key::flocks(ino));
        } else {
            t.set(&key::flocks(ino), locks::encode_flocks(recs));
        }
    }

    fn put_plocks(t: &mut dyn KvTxn, ino: Ino, recs: &[locks::PRecord]) {
        if recs.is_empty() {
            t.delete(&key::plocks(ino));
        } else {
            t.set(&key::plocks(ino), locks::encode_plocks(recs));
        }
    }

    /// Change the lock tables of `ino` in one transaction, keeping the session's lock index
    /// and this client's set of locked inodes true. `taking`: the change may add a lock (the
    /// inode must exist).
    fn lock_txn(
        &self,
        ino: Ino,
        taking: bool,
        mut f: impl FnMut(&mut Vec<(u64, u64, i32)>, &mut Vec<locks::PRecord>) -> Result<()>,
    ) -> Result<()> {
        let sid = self.sid();
        let mut locked = self.locked.lock().unwrap();
        let holds = self.txn(|t| {
            if taking {
                get_attr(t, ino)?;
            }
            // A lock recorded for a session another client reaped would never be released.
            self.check_session(t)?;
            Self::edit_locks(t, ino, sid, &mut f)
        })?;
        if holds {
            locked.insert(ino);
        } else {
            locked.remove(&ino);
        }
        Ok(())
    }

    /// Keep the per-session lock index true: `K sid ino` exists while `sid` holds a lock on
    /// `ino`, so a dead session's locks are found without scanning every lock.
    fn index_locks(
        t: &mut dyn KvTxn,
        sid: u64,
        ino: Ino,
        flocks: &[(u64, u64, i32)],
        plocks: &[locks::PRecord],
    ) {
        if flocks.iter().any(|r| r.0 == sid) || plocks.iter().any(|r| r.sid == sid) {
            t.set(&key::lock_index(sid, ino), Vec::new());
        } else {
            t.delete(&key::lock_index(sid, ino));
        }
    }

    /// What a session leaves behind, removed: its open files (freed when unlinked and no
    /// other session has them open), its locks, its record.
    fn clean_session(&self, sid: u64) -> Result<()> {
        for (prefix, locks) in [
            (key::sustained_prefix(sid), false),
            (key::lock_index_prefix(sid), true),
        ] {
            loop {
                let page = self.kv.scan(&prefix, &key::prefix_end(&prefix), 256)?;
                if page.is_empty() {
                    break;
                }
                for (k, _) in page {
                    let ino = key::u64_at(&k, 9);
                    if locks {
                        self.txn(|t| Self::drop_session_locks(t, sid, ino))?;
                    } else {
                        self.txn(|t| self.release_holder(t, sid, ino))?;
                    }
                }
            }
        }
        let client = self
            .kv
            .get(&key::session(sid))?
            .and_then(|v| serde_json::from_slice::<SessionInfo>(&v).ok())
            .map_or(0, |s| s.client);
        self.txn(|t| {
            t.delete(&key::session(sid));
            t.delete(&key::reserved_slices(sid));
            Ok(())
        })?;
        // The session's transaction lanes: nothing of it commits any more (this client's
        // own go when it closes its session: it may have had an older one).
        if client != 0 && client != self.lanes.client() {
            self.delete_lanes(client)?;
        }
        Ok(())
    }

    /// Delete the lanes of `client`, outside any lane: a delete run twice does no harm.
    fn delete_lanes(&self, client: u64) -> Result<()> {
        let p = key::lane_prefix(client);
        for (k, _) in self.kv.scan(&p, &key::prefix_end(&p), usize::MAX)? {
            let del = || {
                self.kv.txn(&mut |t| {
                    t.delete(&k);
                    Ok(())
                })
            };
            if let Err(e) = del() {
                if !e.is_ambiguous() {
                    return Err(e);
                }
                del()?;
            }
        }
        Ok(())
    }

    /// On engines other clients share: clean up after sessions whose heartbeat stopped.
    /// Times are the engine's (the server's clock, [`KvEngine::clock`]), never this
    /// client's: a mount whose clock is minutes off is judged by when its heartbeats
    /// reached the server. A session is only cleaned up after it was marked reaped in a
    /// transaction that found its heartbeat unchanged (see [`KvMeta::mark_reaped`]).
    fn reap_dead_sessions(&self, now: i64) -> Result<usize> {
        // Heartbeats were stamped by the server of the time; after a failover the new
        // master's clock may differ from the old one's. Wait one timeout after the engine
        // moved, so every live session has stamped a heartbeat on the new clock.
        {
            let epoch = self.kv.epoch();
            let mut seen = self.epoch_seen.lock().unwrap();
            if seen.0 != epoch {
                *seen = (epoch, Some(std::time::Instant::now()));
            }
            if seen.1.is_some_and(|t| t.elapsed() < self.session_timeout) {
                return Ok(0);
            }
        }
        let mine = self.session_timeout.as_secs() as i64;
        let mut reaped = 0;
        for s in self.list_sessions()? {
            if s.sid == self.sid() {
                continue;
            }
            // A session that runs with a longer timeout than ours gets its own.
            let timeout = mine.max(s.timeout.min(i64::MAX as u64) as i64);
            if s.reaped.is_none() && now - s.heartbeat <= timeout {
                continue;
            }
            if !self.mark_reaped(&s, now, timeout)? {
                continue;
            }
            tracing::warn!(
                sid = s.sid,
                host = %s.hostname,
                mount_point = %s.mount_point,
                last_heartbeat = s.heartbeat,
                server_time = now,
                "cleaning up after a session that stopped heartbeating"
            );
            self.clean_session(s.sid)?;
            reaped += 1;
        }
        Ok(reaped)
    }

    /// Look for dead sessions now, whatever the time since the last look (tests, `status`).
    pub fn reap_now(&self) -> Result<usize> {
        let now = self.kv.clock()?.sec;
        self.last_reap.store(now as u64, Ordering::Relaxed);
        self.reap_dead_sessions(now)
    }
}

/// Every role below: what the filesystem above holds as `dyn Meta`.
impl<E: KvEngine> Meta for KvMeta<E> {}

impl<E: KvEngine> Volume for KvMeta<E> {
    fn engine(&self) -> &'static str {
        self.kv.name()
    }

    fn format(&self, format: &Format, force: bool) -> Result<()> {
        let json = serde_json::to_vec(format).map_err(|e| MetaError::Config(e.to_string()))?;
        self.txn(|t| {
            if let Some(old) = t.get(key::SETTING)? {
                let old: Format = serde_json::from_slice(&old).map_err(|e| MetaError::Corrupt {
                    key: "setting".into(),
                    msg: e.to_string(),
                })?;
                if !force {
                    return Err(MetaError::Config(format!(
                        "volume {:?} is already formatted here (uuid {}); pass --force to update its settings",
                        old.name, old.uuid
                    )));
                }
                let codec = |c: &str| if c.is_empty() { "none".to_string() } else { c.to_string() };
                if old.block_size != format.block_size
                    || old.storage != format.storage
                    || codec(&old.compression) != codec(&format.compression)
                {
                    return Err(MetaError::Config(
                        "block size, storage and compression are fixed at format time and cannot change"
                            .into(),
                    ));
                }
                let mut keep = format.clone();
                keep.uuid = old.uuid;
                let json = serde_json::to_vec(&keep).map_err(|e| MetaError::Config(e.to_string()))?;
                t.set(key::SETTING, json);
                return Ok(());
            }
            t.set(key::SETTING, json.clone());
            let mut root = Attr::new(FileType::Directory, 0o777, 0, 0);
            root.parent = ROOT_INO;
            put_attr(t, ROOT_INO, &root);
            t.set(&key::counter(C_NEXT_INODE), 2i64.to_be_bytes().to_vec());
            t.set(&key::counter(C_NEXT_SLICE), 1i64.to_be_bytes().to_vec());
            t.set(&key::counter(C_USED_INODES), 1i64.to_be_bytes().to_vec());
            Ok(())
        })?;
        *self.limits.lock().unwrap() = None;
        Ok(())
    }

    fn load_format(&self) -> Result<Format> {
        match self.kv.get(key::SETTING)? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| MetaError::Corrupt {
                key: "setting".into(),
                msg: e.to_string(),
            }),
            None => Err(MetaError::NotFormatted),
        }
    }

    fn clock(&self) -> Result<Time> {
        self.engine_now()
    }

    fn statfs(&self) -> Result<StatFs> {
        self.alive()?;
        let (used, inodes) = self.usage()?;
        let (cap, max_inodes) = self.limits();
        let total = if cap > 0 {
            cap
        } else {
            UNLIMITED_SPACE.max(used * 2)
        };
        let total_inodes = if max_inodes > 0 {
            max_inodes
        } else {
            (inodes * 2).max(UNLIMITED_INODES)
        };
        Ok(StatFs {
            total_space: total,
            avail_space: total.saturating_sub(used),
            used_inodes: inodes,
            avail_inodes: total_inodes.saturating_sub(inodes),
        })
    }

    fn usage(&self) -> Result<(u64, u64)> {
        let get = |name: &str| -> Result<u64> {
            Ok(match self.kv.get(&key::counter(name))? {
                Some(v) if v.len() == 8 => {
                    i64::from_be_bytes(v[..8].try_into().unwrap()).max(0) as u64
                }
                _ => 0,
            })
        };
        Ok((get(C_USED_SPACE)?, get(C_USED_INODES)?))
    }

    fn sync(&self) -> Result<()> {
        self.kv.sync()?;
        self.check_lanes()
    }

    fn sync_on_close(&self) -> Result<()> {
        self.kv.sync_on_close()?;
        self.check_lanes()
    }
}

impl<E: KvEngine> Sessions for KvMeta<E> {
    fn new_session(&self, mut info: SessionInfo) -> Result<u64> {
        self.load_format()?;
        if self.kv.exclusive() {
            // Nobody else can hold this store open: every recorded session is dead.
            let p = [b'S'];
            for (k, _) in self.kv.scan(&p, &key::prefix_end(&p), usize::MAX)? {
                self.clean_session(key::u64_at(&k, 1))?;
            }
            // Locks of dead sessions are void.
            for tag in [b'F', b'P'] {
                let p = [tag];
                for (k, _) in self.kv.scan(&p, &key::prefix_end(&p), usize::MAX)? {
                    self.txn(|t| {
                        t.delete(&k);
                        Ok(())
                    })?;
                }
            }
            // Sessions that died before registering may still have left open inodes.
            let p = [b'O'];
            for (k, _) in self.kv.scan(&p, &key::prefix_end(&p), usize::MAX)? {
                let (sid, ino) = (key::u64_at(&k, 1), key::u64_at(&k, 9));
                self.txn(|t| self.release_holder(t, sid, ino))?;
            }
        }
        let (sid, json) = loop {
            let sid = self.kv.incr_by(&key::counter(C_NEXT_SESSION), 1)? as u64;
            info.sid = sid;
            info.client = self.lanes.client();
            info.started = self.kv.clock()?.sec;
            info.heartbeat = info.started;
            info.timeout = self.session_timeout.as_secs();
            info.reaped = None;
            let json = serde_json::to_vec(&info).map_err(|e| MetaError::Config(e.to_string()))?;
            let k = key::session(sid);
            let fresh = self.txn(|t| {
                // A failover that lost an earlier increment hands its id out again: an id
                // with a record is another mount's.
                t.guess(&k, None);
                if t.get(&k)?.is_some() {
                    return Ok(false);
                }
                t.set(&k, json.clone());
                Ok(true)
            })?;
            if fresh {
                break (sid, json);
            }
            tracing::warn!(
                sid,
                "session id in use (a failover set the counter back): taking another"
            );
        };
        self.sid.store(sid, Ordering::Relaxed);
        *self.session.lock().unwrap() = Some(info);
        *self.session_record.lock().unwrap() = Some(json);
        self.lost.store(false, Ordering::Release);
        self.beat_seen();
        if !self.kv.exclusive() {
            self.reap_now()?;
        }
        Ok(sid)
    }

    fn heartbeat(&self) -> Result<()> {
        let Some(mut info) = self.session.lock().unwrap().clone() else {
            return Ok(());
        };
        if self.lost.load(Ordering::Acquire) {
            // Said once when found; nothing is kept alive any more.
            return Ok(());
        }
        // The server's time, read before the transaction: a reaper compares it with its
        // own reading of the same clock.
        let now = self.kv.clock()?.sec;
        info.heartbeat = now;
        let json = serde_json::to_vec(&info).map_err(|e| MetaError::Config(e.to_string()))?;
        let sid = info.sid;
        let alive = self.txn(|t| {
            // A record gone or marked reaped stays so: a heartbeat never brings back a
            // session whose locks and open files another client already released.
            if !self.record_alive(t.get(&key::session(sid))?.as_deref()) {
                return Ok(false);
            }
            t.set(&key::session(sid), json.clone());
            Ok(true)
        })?;
        if !alive {
            self.mark_lost(sid);
            return Ok(());
        }
        self.session.lock().unwrap().replace(info);
        *self.session_record.lock().unwrap() = Some(json);
        self.beat_seen();
        self.record_slice_ids(&mut self.slices.lock().unwrap(), false)?;
        let last = self.last_reap.load(Ordering::Relaxed) as i64;
        if !self.kv.exclusive() && now - last >= self.session_timeout.as_secs() as i64 / 2 {
            self.last_reap.store(now as u64, Ordering::Relaxed);
            self.reap_dead_sessions(now)?;
        }
        Ok(())
    }

    fn heartbeat_interval(&self) -> Duration {
        (self.session_timeout / 6).clamp(Duration::from_millis(200), Duration::from_secs(10))
    }

    fn close_session(&self) -> Result<()> {
        let sid = self.sid();
        // A record that names another client: a failover lost this session's id and
        // record, and another mount took the id since. What is recorded under the id is
        // that mount's, not to clean; only this client's lanes go.
        let theirs = sid != 0
            && !self.kv.exclusive()
            && self
                .kv
                .get(&key::session(sid))?
                .and_then(|v| serde_json::from_slice::<SessionInfo>(&v).ok())
                .is_some_and(|s| s.client != 0 && s.client != self.lanes.client());
        if theirs {
            tracing::warn!(sid, "this mount's session id belongs to another mount now (a failover lost it): leaving what is recorded under it");
        }
        if sid != 0 {
            if !theirs {
                self.clean_session(sid)?;
            }
            if self.kv.may_lose_replies() {
                self.delete_lanes(self.lanes.client())?;
                self.lanes.forget();
            }
        }
        self.kv.sync()
    }

    fn list_sessions(&self) -> Result<Vec<SessionInfo>> {
        let p = [b'S'];
        let mut out = Vec::new();
        for (_, v) in self.kv.scan(&p, &key::prefix_end(&p), usize::MAX)? {
            if let Ok(s) = serde_json::from_slice(&v) {
                out.push(s);
            }
        }
        Ok(out)
    }
}

impl<E: KvEngine> Attrs for KvMeta<E> {
    fn access(&self, ctx: &Context, ino: Ino, mask: u32) -> Result<()> {
        self.alive()?;
        let a = self.getattr(ino)?;
        let ctx = Context {
            check_permission: true,
            ..ctx.clone()
        };
        access_ok(&ctx, &a, mask)
    }

    fn getattr(&self, ino: Ino) -> Result<Attr> {
        self.alive()?;
        let k = key::attr(ino);
        match self.kv.get(&k)? {
            Some(v) => {
                let a = key::decode_attr(ino, &v)?;
                self.hint(k, Some(v));
                Ok(a)
            }
            None => Err(Errno::ENOENT.into()),
        }
    }

    fn setattr(&self, ctx: &Context, ino: Ino, set: &SetAttr) -> Result<Attr> {
        self.alive()?;
        self.txn(|t| {
            let mut a = get_attr(t, ino)?;
            let ts = now();
            let owner = !ctx.check_permission || ctx.uid == 0 || ctx.uid == a.uid;
            if let Some(uid) = set.uid {
                if ctx.check_permission && ctx.uid != 0 && uid != a.uid {
                    return Err(Errno::EPERM.into());
                }
            }
            if let Some(gid) = set.gid {
                if ctx.check_permission
                    && ctx.uid != 0
                    && (ctx.uid != a.uid || (gid != a.gid && !ctx.in_group(gid)))
                {
                    return Err(Errno::EPERM.into());
                }
            }
            if set.uid.is_some() || set.gid.is_some() {
                if let Some(uid) = set.uid {
                    a.uid = uid;
                }
                if let Some(gid) = set.gid {
                    a.gid = gid;
                }
                // chown drops set-user-ID, and set-group-ID when group-executable.
                if !a.is_dir() && set.mode.is_none() {
                    a.mode &= !(libc::S_ISUID as u16);
                    if a.mode & 0o010 != 0 {
                        a.mode &= !(libc::S_ISGID as u16);
                    }
                }
            }
            if let Some(mode) = set.mode {
                if !owner {
                    return Err(Errno::EPERM.into());
                }
                let mut m = (mode & 0o7777) as u16;
                if ctx.check_permission && ctx.uid != 0 && !ctx.in_group(a.gid) {
                    m &= !(libc::S_ISGID as u16);
                }
                a.mode = m;
            }
            for (which, target) in [(set.atime, &mut a.atime), (set.mtime, &mut a.mtime)] {
                match which {
                    Some(SetTime::Now) => *target = ts,
                    Some(SetTime::At(tm)) => *target = tm,
                    None => {}
                }
            }
            if ctx.check_permission && ctx.uid != 0 && (set.atime.is_some() || set.mtime.is_some())
            {
                let explicit = matches!(set.atime, Some(SetTime::At(_)))
                    || matches!(set.mtime, Some(SetTime::At(_)));
                if ctx.uid != a.uid {
                    if explicit {
                        return Err(Errno::EPERM.into());
                    }
                    access_ok(ctx, &a, MODE_W)?;
                }
            }
            a.ctime = set.ctime.unwrap_or(ts);
            put_attr(t, ino, &a);
            Ok(a)
        })
    }
}

impl<E: KvEngine> Namespace for KvMeta<E> {
    fn lookup(&self, ctx: &Context, parent: Ino, name: &[u8]) -> Result<(Ino, Attr)> {
        self.alive()?;
        if name.len() > MAX_NAME {
            return Err(Errno::ENAMETOOLONG.into());
        }
        if !ctx.check_permission && !matches!(name, b"." | b"..") {
            // The kernel checked the search permission and only looks up in directories:
            // the entry and its inode decide, read together (one round trip on Redis).
            let k = key::dentry(parent, name);
            return match self.kv.get_entry_attr(&k)? {
                (Some(d), Some(a)) => {
                    let ino = key::decode_dentry(&k, &d)?.1;
                    let attr = key::decode_attr(ino, &a)?;
                    self.hint(key::attr(ino), Some(a));
                    self.hint(k, Some(d));
                    Ok((ino, attr))
                }
                // Unlinked between the two reads.
                (Some(_), None) => Err(Errno::ENOENT.into()),
                (None, _) => {
                    // ENOTDIR or ENOENT of the parent, as before.
                    let pattr = self.getattr(parent)?;
                    if !pattr.is_dir() {
                        return Err(Errno::ENOTDIR.into());
                    }
                    Err(Errno::ENOENT.into())
                }
            };
        }
        let pattr = self.getattr(parent)?;
        if !pattr.is_dir() {
            return Err(Errno::ENOTDIR.into());
        }
        access_ok(ctx, &pattr, MODE_X)?;
        let ino = match name {
            b"." => parent,
            b".." => {
                if parent == ROOT_INO {
                    ROOT_INO
                } else {
                    pattr.parent
                }
            }
            _ => {
                let k = key::dentry(parent, name);
                match self.kv.get(&k)? {
                    Some(v) => key::decode_dentry(&k, &v)?.1,
                    None => return Err(Errno::ENOENT.into()),
                }
            }
        };
        Ok((ino, self.getattr(ino)?))
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        typ: FileType,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Result<(Ino, Attr)> {
        self.alive()?;
        self.create_node(ctx, parent, name, typ, mode & !umask, rdev, None, false)
    }

    fn symlink(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        target: &[u8],
    ) -> Result<(Ino, Attr)> {
        self.alive()?;
        if target.is_empty() {
            return Err(Errno::ENOENT.into());
        }
        if target.len() >= MAX_SYMLINK {
            return Err(Errno::ENAMETOOLONG.into());
        }
        self.create_node(
            ctx,
            parent,
            name,
            FileType::Symlink,
            0o777,
            0,
            Some(target),
            false,
        )
    }

    fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        self.alive()?;
        match self.kv.get(&key::symlink(ino))? {
            Some(v) => Ok(v),
            None => {
                let a = self.getattr(ino)?;
                if a.typ != FileType::Symlink {
                    return Err(Errno::EINVAL.into());
                }
                Err(MetaError::Corrupt {
                    key: format!("L{ino}"),
                    msg: "symlink without target".into(),
                })
            }
        }
    }

    fn link(&self, ctx: &Context, ino: Ino, parent: Ino, name: &[u8]) -> Result<Attr> {
        self.alive()?;
        check_name(name)?;
        self.txn(|t| {
            let mut a = get_attr(t, ino)?;
            if a.is_dir() {
                return Err(Errno::EPERM.into());
            }
            if a.nlink >= MAX_LINKS {
                return Err(Errno::EMLINK.into());
            }
            if a.nlink == 0 {
                return Err(Errno::ENOENT.into());
            }
            let mut p = get_attr(t, parent)?;
            if !p.is_dir() {
                return Err(Errno::ENOTDIR.into());
            }
            if p.nlink == 0 {
                return Err(Errno::ENOENT.into());
            }
            access_ok(ctx, &p, MODE_W | MODE_X)?;
            if get_dentry(t, parent, name)?.is_some() {
                return Err(Errno::EEXIST.into());
            }
            let ts = now();
            t.set(&key::dentry(parent, name), key::encode_dentry(a.typ, ino));
            touch_dir(&mut p, ts);
            put_attr(t, parent, &p);
            a.nlink += 1;
            a.parent = 0;
            a.ctime = ts;
            put_attr(t, ino, &a);
            Ok(a)
        })
    }

    fn unlink(&self, ctx: &Context, parent: Ino, name: &[u8]) -> Result<()> {
        self.alive()?;
        if name.len() > MAX_NAME {
            return Err(Errno::ENAMETOOLONG.into());
        }
        let (pk, dk) = (key::attr(parent), key::dentry(parent, name));
        self.txn(|t| {
            let got = t.get_many(&[&pk, &dk])?;
            let mut p = match &got[0] {
                Some(v) => key::decode_attr(parent, v)?,
                None => return Err(Errno::ENOENT.into()),
            };
            if !p.is_dir() {
                return Err(Errno::ENOTDIR.into());
            }
            access_ok(ctx, &p, MODE_W | MODE_X)?;
            let (typ, ino) = match &got[1] {
                Some(v) => key::decode_dentry(&dk, v)?,
                None => return Err(Errno::ENOENT.into()),
            };
            if typ == FileType::Directory {
                return Err(Errno::EISDIR.into());
            }
            let a = get_attr(t, ino)?;
            sticky_ok(ctx, &p, &a)?;
            let ts = now();
            t.delete(&key::dentry(parent, name));
            self.touch_parent(t, parent, &mut p, ts);
            self.drop_link(t, ino, a, ts)
        })
    }

    fn rmdir(&self, ctx: &Context, parent: Ino, name: &[u8]) -> Result<()> {
        self.alive()?;
        match name {
            b"." => return Err(Errno::EINVAL.into()),
            b".." => return Err(Errno::ENOTEMPTY.into()),
            _ => {}
        }
        if name.len() > MAX_NAME {
            return Err(Errno::ENAMETOOLONG.into());
        }
        self.txn(|t| {
            let mut p = get_attr(t, parent)?;
            if !p.is_dir() {
                return Err(Errno::ENOTDIR.into());
            }
            access_ok(ctx, &p, MODE_W | MODE_X)?;
            let (typ, ino) = get_dentry(t, parent, name)?.ok_or(Errno::ENOENT)?;
            if typ != FileType::Directory {
                return Err(Errno::ENOTDIR.into());
            }
            let a = get_attr(t, ino)?;
            sticky_ok(ctx, &p, &a)?;
            let dp = key::dentry_prefix(ino);
            if !t.scan(&dp, &key::prefix_end(&dp), 1)?.is_empty() {
                return Err(Errno::ENOTEMPTY.into());
            }
            let ts = now();
            t.delete(&key::dentry(parent, name));
            p.nlink = p.nlink.saturating_sub(1);
            touch_dir(&mut p, ts);
            put_attr(t, parent, &p);
            self.destroy_inode(t, ino, &a)
        })
    }

    fn rename(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> Result<()> {
        self.alive()?;
        if flags & RENAME_WHITEOUT != 0 || flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0 {
            return Err(Errno::EINVAL.into());
        }
        if flags & RENAME_NOREPLACE != 0 && flags & RENAME_EXCHANGE != 0 {
            return Err(Errno::EINVAL.into());
        }
        if name.len() > MAX_NAME {
            return Err(Errno::ENAMETOOLONG.into());
        }
        check_name(new_name)?;
        if matches!(name, b"." | b"..") {
            return Err(Errno::EINVAL.into());
        }
        self.txn(|t| {
            let mut sp = get_attr(t, parent)?;
            if !sp.is_dir() {
                return Err(Errno::ENOTDIR.into());
            }
            let (styp, sino) = get_dentry(t, parent, name)?.ok_or(Errno::ENOENT)?;
            let mut sa = get_attr(t, sino)?;
            let mut dp = if new_parent == parent {
                sp.clone()
            } else {
                get_attr(t, new_parent)?
            };
            if !dp.is_dir() {
                return Err(Errno::ENOTDIR.into());
            }
            if dp.nlink == 0 {
                return Err(Errno::ENOENT.into());
            }
            let dp_links = dp.nlink;
            access_ok(ctx, &sp, MODE_W | MODE_X)?;
            access_ok(ctx, &dp, MODE_W | MODE_X)?;
            sticky_ok(ctx, &sp, &sa)?;
            let dst = get_dentry(t, new_parent, new_name)?;
            if parent == new_parent && name == new_name {
                return if flags & RENAME_NOREPLACE != 0 {
                    Err(Errno::EEXIST.into())
                } else {
                    Ok(())
                };
            }
            if let Some((_, dino)) = dst {
                if dino == sino {
                    // Two links to one inode: POSIX says do nothing.
                    return if flags & RENAME_NOREPLACE != 0 {
                        Err(Errno::EEXIST.into())
                    } else {
                        Ok(())
                    };
                }
            }
            if flags & RENAME_EXCHANGE != 0 && dst.is_none() {
                return Err(Errno::ENOENT.into());
            }
            if flags & RENAME_NOREPLACE != 0 && dst.is_some() {
                return Err(Errno::EEXIST.into());
            }
            // A directory may not move into its own subtree.
            let moves_dir = |t: &mut dyn KvTxn, dir: Ino, target_parent: Ino| -> Result<()> {
                let mut cur = target_parent;
                let mut depth = 0;
                while cur != ROOT_INO && depth < 100_000 {
                    if cur == dir {
                        return Err(Errno::EINVAL.into());
                    }
                    cur = get_attr(t, cur)?.parent;
                    depth += 1;
                }
                if cur == dir {
                    return Err(Errno::EINVAL.into());
                }
                Ok(())
            };
            if styp == FileType::Directory && parent != new_parent {
                moves_dir(t, sino, new_parent)?;
                // Moving a directory rewrites its "..": needs write permission on it.
                access_ok(ctx, &sa, MODE_W)?;
            }
            let ts = now();
            if flags & RENAME_EXCHANGE != 0 {
                let (dtyp, dino) = dst.ok_or(Errno::ENOENT)?;
                let mut da = get_attr(t, dino)?;
                sticky_ok(ctx, &dp, &da)?;
                if dtyp == FileType::Directory && parent != new_parent {
                    moves_dir(t, dino, parent)?;
                }
                t.set(&key::dentry(parent, name), key::encode_dentry(dtyp, dino));
                t.set(
                    &key::dentry(new_parent, new_name),
                    key::encode_dentry(styp, sino),
                );
                if parent != new_parent {
                    let sdir = (styp == FileType::Directory) as i64;
                    let ddir = (dtyp == FileType::Directory) as i64;
                    sp.nlink = (sp.nlink as i64 - sdir + ddir) as u32;
                    dp.nlink = (dp.nlink as i64 - ddir + sdir) as u32;
                    if sa.nlink == 1 || sa.is_dir() {
                        sa.parent = new_parent;
                    }
                    if da.nlink == 1 || da.is_dir() {
                        da.parent = parent;
                    }
                }
                sa.ctime = ts;
                da.ctime = ts;
                put_attr(t, dino, &da);
            } else {
                if let Some((dtyp, dino)) = dst {
                    let da = get_attr(t, dino)?;
                    sticky_ok(ctx, &dp, &da)?;
                    if styp == FileType::Directory {
                        if dtyp != FileType::Directory {
                            return Err(Errno::ENOTDIR.into());
                        }
                        let pfx = key::dentry_prefix(dino);
                        if !t.scan(&pfx, &key::prefix_end(&pfx), 1)?.is_empty() {
                            return Err(Errno::ENOTEMPTY.into());
                        }
                    } else if dtyp == FileType::Directory {
                        return Err(Errno::EISDIR.into());
                    }
                    if dtyp == FileType::Directory {
                        dp.nlink = dp.nlink.saturating_sub(1);
                        self.destroy_inode(t, dino, &da)?;
                    } else {
                        self.drop_link(t, dino, da, ts)?;
                    }
                }
                t.delete(&key::dentry(parent, name));
                t.set(
                    &key::dentry(new_parent, new_name),
                    key::encode_dentry(styp, sino),
                );
                if parent != new_parent {
                    if styp == FileType::Directory {
                        sp.nlink = sp.nlink.saturating_sub(1);
                        dp.nlink += 1;
                    }
                    if sa.nlink == 1 || sa.is_dir() {
                        sa.parent = new_parent;
                    }
                }
                sa.ctime = ts;
            }
            if parent == new_parent && dp.nlink == dp_links {
                // A rename within one directory changes only its times.
                self.touch_parent(t, parent, &mut dp, ts);
            } else if parent == new_parent {
                // One directory: nlink changed only through `dp` (a replaced subdirectory).
                touch_dir(&mut dp, ts);
                put_attr(t, parent, &dp);
            } else {
                touch_dir(&mut sp, ts);
                touch_dir(&mut dp, ts);
                put_attr(t, parent, &sp);
                put_attr(t, new_parent, &dp);
            }
            put_attr(t, sino, &sa);
            Ok(())
        })
    }

    fn readdir(&self, ctx: &Context, ino: Ino, plus: bool) -> Result<Vec<DirEntry>> {
        self.alive()?;
        Ok(self.readdir_page(ctx, ino, b"", usize::MAX, plus)?.entries)
    }

    fn readdir_page(
        &self,
        ctx: &Context,
        ino: Ino,
        after: &[u8],
        limit: usize,
        plus: bool,
    ) -> Result<DirPage> {
        self.alive()?;
        let a = self.getattr(ino)?;
        if !a.is_dir() {
            return Err(Errno::ENOTDIR.into());
        }
        access_ok(ctx, &a, MODE_R)?;
        if limit == 0 {
            return Ok(DirPage::default());
        }
        let p = key::dentry_prefix(ino);
        let start = if after.is_empty() {
            p.clone()
        } else {
            // The first key after `after` itself: the cursor is a name, not a count, so
            // entries removed or created before it do not shift the rest.
            let mut k = key::dentry(ino, after);
            k.push(0);
            k
        };
        // One row more than the page tells whether this page is the last one, without
        // trusting the page's length (and without a round trip for an empty last page).
        let mut rows = self
            .kv
            .scan(&start, &key::prefix_end(&p), limit.saturating_add(1))?;
        let end = rows.len() <= limit;
        rows.truncate(limit);
        let mut entries = Vec::with_capacity(rows.len());
        for (k, v) in &rows {
            let (typ, child) = key::decode_dentry(k, v)?;
            entries.push((k[p.len()..].to_vec(), typ, child));
        }
        // The attributes of a page in one read (one round trip on Redis), not one each.
        let attrs = if plus {
            let keys: Vec<Vec<u8>> = entries.iter().map(|e| key::attr(e.2)).collect();
            let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
            self.kv.get_many(&refs)?
        } else {
            Vec::new()
        };
        let mut out = Vec::with_capacity(entries.len());
        for (i, (name, typ, child)) in entries.into_iter().enumerate() {
            // `None`: removed since the entry was read. It stays in the page (without
            // attributes) so that the page still ends at the last name scanned: the caller
            // continues from there and decides what to show of it.
            let attr = match attrs.get(i) {
                Some(Some(v)) => Some(key::decode_attr(child, v)?),
                _ => None,
            };
            out.push(DirEntry {
                name,
                ino: child,
                typ,
                attr,
            });
        }
        Ok(DirPage { entries: out, end })
    }
}

impl<E: KvEngine> Files for KvMeta<E> {
    fn open(&self, ctx: &Context, ino: Ino, flags: i32) -> Result<Attr> {
        self.alive()?;
        let mask = match flags & libc::O_ACCMODE {
            libc::O_RDONLY => MODE_R,
            libc::O_WRONLY => MODE_W,
            _ => MODE_R | MODE_W,
        } | if flags & libc::O_TRUNC != 0 {
            MODE_W
        } else {
            0
        };
        // Close-to-open: what another client committed before this open is read fresh.
        self.forget_chunks(ino);
        let mut open = self.open_shard(ino);
        let n = open.get(&ino).copied().unwrap_or(0);
        let a = if n == 0 {
            // First open here: record it in the engine, so that an unlink by any client
            // keeps the file until this session closes it.
            let sid = self.sid();
            self.txn(|t| {
                let a = get_attr(t, ino)?;
                access_ok(ctx, &a, mask)?;
                self.check_session(t)?;
                t.set(&key::holder(ino, sid), Vec::new());
                t.set(&key::sustained(sid, ino), Vec::new());
                Ok(a)
            })?
        } else {
            let a = self.getattr(ino)?;
            access_ok(ctx, &a, mask)?;
            a
        };
        open.insert(ino, n + 1);
        Ok(a)
    }

    fn create_open(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> Result<(Ino, Attr)> {
        self.alive()?;
        self.create_node(
            ctx,
            parent,
            name,
            FileType::File,
            mode & !umask,
            0,
            None,
            true,
        )
    }

    fn close(&self, ino: Ino) -> Result<()> {
        let mut open = self.open_shard(ino);
        match open.get_mut(&ino) {
            Some(n) if *n > 1 => {
                *n -= 1;
                Ok(())
            }
            Some(_) => {
                let sid = self.sid();
                // Forgotten here even if the engine fails: a later cleanup of this session
                // (restart, or another client after the timeout) removes the record.
                open.remove(&ino);
                // A lost session holds nothing any more: the client that reaped it released
                // its open files.
                self.alive()?;
                self.txn(|t| self.release_holder(t, sid, ino))
            }
            None => Ok(()),
        }
    }

    fn truncate(&self, ctx: &Context, ino: Ino, length: u64) -> Result<Attr> {
        self.alive()?;
        if length > MAX_FILE_SIZE {
            return Err(Errno::EFBIG.into());
        }
        let _forget = ForgetChunks(self, ino);
        self.txn(|t| {
            let mut a = get_attr(t, ino)?;
            match a.typ {
                FileType::File => {}
                FileType::Directory => return Err(Errno::EISDIR.into()),
                _ => return Err(Errno::EINVAL.into()),
            }
            access_ok(ctx, &a, MODE_W)?;
            if length > a.length {
                self.check_space(align4k(length) - align4k(a.length))?;
            }
            self.set_length(t, ino, &mut a, length)?;
            let ts = now();
            a.mtime = ts;
            a.ctime = ts;
            put_attr(t, ino, &a);
            Ok(a)
        })
    }

    fn fallocate(&self, ctx: &Context, ino: Ino, mode: i32, off: u64, len: u64) -> Result<Attr> {
        self.alive()?;
        let known = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 {
            return Err(Errno::EOPNOTSUPP.into());
        }
        if mode & FALLOC_FL_PUNCH_HOLE != 0 && mode & FALLOC_FL_KEEP_SIZE == 0 {
            return Err(Errno::EOPNOTSUPP.into());
        }
        if len == 0 {
            return Err(Errno::EINVAL.into());
        }
        let end = off.checked_add(len).ok_or(Errno::EFBIG)?;
        if end > MAX_FILE_SIZE {
            return Err(Errno::EFBIG.into());
        }
        let _forget = ForgetChunks(self, ino);
        self.txn(|t| {
            let mut a = get_attr(t, ino)?;
            match a.typ {
                FileType::File => {}
                FileType::Directory => return Err(Errno::EISDIR.into()),
                _ => return Err(Errno::ENODEV.into()),
            }
            access_ok(ctx, &a, MODE_W)?;
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0 {
                let zend = if mode & FALLOC_FL_PUNCH_HOLE != 0 {
                    end.min(a.length)
                } else {
                    end
                };
                if zend > off {
                    Self::zero_range(t, ino, off, zend - off)?;
                }
            }
            if mode & FALLOC_FL_KEEP_SIZE == 0 && end > a.length {
                self.check_space(align4k(end) - align4k(a.length))?;
                self.set_length(t, ino, &mut a, end)?;
            }
            let ts = now();
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0 {
                a.mtime = ts;
            }
            a.ctime = ts;
            put_attr(t, ino, &a);
            Ok(a)
        })
    }
}

impl<E: KvEngine> Chunks for KvMeta<E> {
    fn new_slice_id(&self) -> Result<u64> {
        let sid = self.sid();
        let mut s = self.slices.lock().unwrap();
        let st = &mut *s;
        if self.fresh_batch(C_NEXT_SLICE, &mut st.epoch, st.high)? {
            // The ids handed out stay open (a writer may still commit them); the rest of
            // the batch goes unused.
            st.next = st.end;
        }
        if s.next >= s.end || s.sid != sid {
            let end = self
                .kv
                .incr_by(&key::counter(C_NEXT_SLICE), SLICE_BATCH as i64)?
                as u64;
            let start = end.saturating_sub(SLICE_BATCH).max(1);
            if start >= end {
                return Err(MetaError::Corrupt {
                    key: C_NEXT_SLICE.into(),
                    msg: "id counter went backwards".into(),
                });
            }
            (s.next, s.end, s.sid) = (start, start, sid);
            if sid != 0 {
                // Recorded before any id of the batch is used (gc reads the records after
                // listing objects, so it sees every batch whose objects it listed).
                s.batches.push((start, end));
                s.end = end;
                if let Err(e) = self.record_slice_ids(&mut s, false) {
                    s.end = start;
                    return Err(e);
                }
            }
            s.end = end;
        }
        let id = s.next;
        s.next += 1;
        s.high = s.high.max(s.next);
        if sid != 0 {
            s.open.insert(id);
        }
        Ok(id)
    }

    fn abandon_slice_ids(&self, ids: &[u64]) {
        self.settle_slice_ids(ids.iter().copied());
    }

    fn slice_id_limit(&self) -> Result<u64> {
        Ok(self.counter(C_NEXT_SLICE)?.max(0) as u64)
    }

    fn live_slice_ranges(&self) -> Result<Vec<std::ops::Range<u64>>> {
        let p = [b'R'];
        let records = self.kv.scan(&p, &key::prefix_end(&p), usize::MAX)?;
        let live: std::collections::HashSet<u64> = if self.kv.exclusive() {
            // Nobody else can have this store open: only this client's session is alive.
            [self.sid()].into_iter().filter(|&s| s != 0).collect()
        } else {
            // A session that was cleaned up is dead, whatever record is left of it.
            let p = [b'S'];
            self.kv
                .scan(&p, &key::prefix_end(&p), usize::MAX)?
                .iter()
                .map(|(k, _)| key::u64_at(k, 1))
                .collect()
        };
        let mut out = Vec::new();
        for (k, v) in records {
            if live.contains(&key::u64_at(&k, 1)) {
                out.extend(key::decode_ranges(&v).ok_or_else(|| MetaError::Corrupt {
                    key: format!("R{}", key::u64_at(&k, 1)),
                    msg: "reserved slice ranges are not pairs of u64".into(),
                })?);
            }
        }
        Ok(out)
    }

    fn read_chunk(&self, ino: Ino, idx: u32) -> Result<Vec<Slice>> {
        self.alive()?;
        let cached = !self.kv.exclusive();
        let generation = self.chunk_gen.load(Ordering::Acquire);
        if cached {
            let c = self.chunks.lock().unwrap();
            if let Some(list) = c.get(&ino).and_then(|m| m.get(&idx)) {
                return Ok(list.clone());
            }
        }
        let list = match self.kv.get(&key::chunk(ino, idx))? {
            Some(v) => Slice::decode_list(&v).ok_or_else(|| MetaError::Corrupt {
                key: format!("C{ino}/{idx}"),
                msg: "slice list length is not a multiple of 24".into(),
            })?,
            None => Vec::new(),
        };
        if cached {
            let mut c = self.chunks.lock().unwrap();
            // Not if a change of any chunk committed here meanwhile: it may be this one.
            if self.chunk_gen.load(Ordering::Acquire) == generation {
                if c.len() >= CHUNK_CACHE_INODES {
                    c.clear();
                }
                c.entry(ino).or_default().insert(idx, list.clone());
            }
        }
        Ok(list)
    }

    fn read_chunk_fresh(&self, ino: Ino, idx: u32) -> Result<Vec<Slice>> {
        self.alive()?;
        self.forget_chunks(ino);
        self.read_chunk(ino, idx)
    }

    fn write_slice(&self, ino: Ino, idx: u32, slice: Slice) -> Result<(Attr, usize)> {
        self.alive()?;
        let _forget = ForgetChunks(self, ino);
        let (ak, k) = (key::attr(ino), key::chunk(ino, idx));
        self.txn(|t| {
            let got = t.get_many(&[&ak, &k])?;
            let mut a = match &got[0] {
                Some(v) => key::decode_attr(ino, v)?,
                None => return Err(Errno::ENOENT.into()),
            };
            if a.typ != FileType::File {
                return Err(Errno::EBADF.into());
            }
            let mut v = got[1].clone().unwrap_or_default();
            // A slice id is used once: finding it listed means this is a writer's retry of
            // a commit that applied but whose outcome it could not learn (the engine went
            // away during the fence). Listed twice, the slice would overlay whatever was
            // written over it since, and its space would be counted twice.
            if slice.id != 0 && Slice::listed(&v, slice.id) {
                return Ok((a, v.len() / Slice::ENCODED_LEN));
            }
            slice.encode(&mut v);
            let count = v.len() / Slice::ENCODED_LEN;
            t.set(&k, v);
            let end = idx as u64 * CHUNK_SIZE + slice.end() as u64;
            if end > a.length {
                let grow = align4k(end) - align4k(a.length);
                self.check_space(grow)?;
                add(t, C_USED_SPACE, grow as i64);
                a.length = end;
            }
            let ts = now();
            a.mtime = ts;
            a.ctime = ts;
            put_attr(t, ino, &a);
            Ok((a, count))
        })
        .inspect(|_| self.settle_slice_ids([slice.id]))
    }

    fn compact_chunk(&self, ino: Ino, idx: u32, replaced: &[Slice], new: &[Slice]) -> Result<bool> {
        let _forget = ForgetChunks(self, ino);
        self.txn(|t| {
            let k = key::chunk(ino, idx);
            let Some(v) = t.get(&k)? else {
                return Ok(false);
            };
            let cur = Slice::decode_list(&v).unwrap_or_default();
            if cur.len() < replaced.len() || cur[..replaced.len()] != *replaced {
                return Ok(false);
            }
            let mut list = new.to_vec();
            list.extend_from_slice(&cur[replaced.len()..]);
            if list.is_empty() {
                t.delete(&k);
            } else {
                t.set(&k, Slice::encode_list(&list));
            }
            let dead: Vec<Slice> = replaced.iter().copied().filter(|s| s.id != 0).collect();
            self.trash_slices(t, &dead)?;
            Ok(true)
        })
        // Committed, or certainly not (the caller frees them): gc need not spare them.
        .inspect(|_| self.settle_slice_ids(new.iter().map(|s| s.id)))
    }

    fn trash_batch(&self, after: u64, limit: usize) -> Result<Vec<crate::TrashRecord>> {
        let p = [b'T'];
        Ok(self
            .kv
            .scan(
                &key::trash(after.saturating_add(1)),
                &key::prefix_end(&p),
                limit,
            )?
            .into_iter()
            .map(|(k, v)| {
                let (slices, at) = key::decode_trash(&v).unwrap_or_default();
                (key::u64_at(&k, 1), slices, at)
            })
            .collect())
    }

    fn trash_done(&self, id: u64) -> Result<()> {
        self.txn(|t| {
            t.delete(&key::trash(id));
            Ok(())
        })
    }

    fn scan_chunks(
        &self,
        after: Option<(Ino, u32)>,
        limit: usize,
    ) -> Result<Vec<(Ino, u32, Vec<Slice>)>> {
        let p = [b'C'];
        let start = match after {
            Some((ino, idx)) => {
                let mut k = key::chunk(ino, idx);
                k.push(0);
                k
            }
            None => p.to_vec(),
        };
        self.kv
            .scan(&start, &key::prefix_end(&p), limit)?
            .into_iter()
            .map(|(k, v)| {
                let ino = key::u64_at(&k, 1);
                let idx = k
                    .get(9..13)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_be_bytes)
                    .unwrap_or(0);
                let slices = Slice::decode_list(&v).ok_or_else(|| MetaError::Corrupt {
                    key: format!("C{ino}/{idx}"),
                    msg: "slice list length is not a multiple of 24".into(),
                })?;
                Ok((ino, idx, slices))
            })
            .collect()
    }
}

impl<E: KvEngine> Xattrs for KvMeta<E> {
    fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        self.alive()?;
        check_xattr_name(name)?;
        match self.kv.get(&key::xattr(ino, name))? {
            Some(v) => Ok(v),
            None => {
                self.getattr(ino)?;
                Err(Errno::ENODATA.into())
            }
        }
    }

    fn setxattr(
        &self,
        ctx: &Context,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        self.alive()?;
        check_xattr_name(name)?;
        if value.len() > MAX_XATTR_VALUE {
            return Err(Errno::E2BIG.into());
        }
        self.txn(|t| {
            let mut a = get_attr(t, ino)?;
            if name.starts_with(b"user.") {
                if !matches!(a.typ, FileType::File | FileType::Directory) {
                    return Err(Errno::EPERM.into());
                }
                access_ok(ctx, &a, MODE_W)?;
            } else if name.starts_with(b"trusted.") && ctx.check_permission && ctx.uid != 0 {
                return Err(Errno::EPERM.into());
            }
            let k = key::xattr(ino, name);
            let exists = t.get(&k)?.is_some();
            if flags & XATTR_CREATE != 0 && exists {
                return Err(Errno::EEXIST.into());
            }
            if flags & XATTR_REPLACE != 0 && !exists {
                return Err(Errno::ENODATA.into());
            }
            t.set(&k, value.to_vec());
            a.ctime = now();
            put_attr(t, ino, &a);
            Ok(())
        })
    }

    fn listxattr(&self, ino: Ino) -> Result<Vec<u8>> {
        self.alive()?;
        self.getattr(ino)?;
        let p = key::xattr_prefix(ino);
        let mut out = Vec::new();
        for (k, _) in self.kv.scan(&p, &key::prefix_end(&p), usize::MAX)? {
            out.extend_from_slice(&k[p.len()..]);
            out.push(0);
        }
        Ok(out)
    }

    fn removexattr(&self, ctx: &Context, ino: Ino, name: &[u8]) -> Result<()> {
        self.alive()?;
        check_xattr_name(name)?;
        self.txn(|t| {
            let mut a = get_attr(t, ino)?;
            if name.starts_with(b"user.") {
                access_ok(ctx, &a, MODE_W)?;
            }
            let k = key::xattr(ino, name);
            if t.get(&k)?.is_none() {
                return Err(Errno::ENODATA.into());
            }
            t.delete(&k);
            a.ctime = now();
            put_attr(t, ino, &a);
            Ok(())
        })
    }
}

impl<E: KvEngine> Locks for KvMeta<E> {
    fn flock(&self, ino: Ino, owner: u64, typ: i32) -> Result<()> {
        self.alive()?;
        let sid = self.sid();
        self.lock_txn(ino, typ != F_UNLCK, |fl, _| {
            *fl = locks::flock_apply(std::mem::take(fl), sid, owner, typ)?;
            Ok(())
        })
    }

    fn getlk(&self, ino: Ino, owner: u64, lock: &PLock) -> Result<Option<PLock>> {
        self.alive()?;
        locks::check_range(lock)?;
        let sid = self.sid();
        let recs = locks::decode_plocks(&self.kv.get(&key::plocks(ino))?.unwrap_or_default());
        Ok(locks::conflict(&recs, sid, owner, lock))
    }

    fn setlk(&self, ino: Ino, owner: u64, lock: &PLock) -> Result<()> {
        self.alive()?;
        locks::check_range(lock)?;
        let sid = self.sid();
        self.lock_txn(ino, lock.typ != F_UNLCK, |_, pl| {
            if lock.typ != F_UNLCK && locks::conflict(pl, sid, owner, lock).is_some() {
                return Err(Errno::EAGAIN.into());
            }
            *pl = locks::apply(std::mem::take(pl), sid, owner, *lock);
            Ok(())
        })
    }

    fn release_locks(&self, ino: Ino, owner: u64) -> Result<()> {
        if !self.locked.lock().unwrap().contains(&ino) {
            // No lock of this session on the inode: nothing to ask the engine.
            return Ok(());
        }
        // A lost session's locks were released by the client that reaped it.
        self.alive()?;
        let sid = self.sid();
        self.lock_txn(ino, false, |fl, pl| {
            fl.retain(|r| (r.0, r.1) != (sid, owner));
            pl.retain(|r| (r.sid, r.owner) != (sid, owner));
            Ok(())
        })
    }
}

impl<E: KvEngine> ObjectJournal for KvMeta<E> {
    fn journal_put(&self, records: &[(&str, &[u8])]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        self.txn(|t| {
            for (k, v) in records {
                t.set(&key::journal(k), v.to_vec());
            }
            Ok(())
        })
    }

    fn journal_list(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let p = [b'J'];
        let end = key::prefix_end(&p);
        let mut out = Vec::new();
        let mut start = p.to_vec();
        loop {
            let page = self.kv.scan(&start, &end, 256)?;
            let last = page.len() < 256;
            for (k, v) in page {
                start = k.clone();
                start.push(0);
                // Keys were written from &str: only a damaged record is not UTF-8.
                if let Ok(name) = String::from_utf8(k[1..].to_vec()) {
                    out.push((name, v));
                }
            }
            if last {
                return Ok(out);
            }
        }
    }

    fn journal_remove(&self, keys: &[String]) -> Result<()> {
        for part in keys.chunks(1024) {
            self.txn(|t| {
                for k in part {
                    t.delete(&key::journal(k));
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}

impl<E: KvEngine> Load for KvMeta<E> {
    fn load_inode(&self, ino: Ino, inode: &crate::LoadInode) -> Result<()> {
        let _forget = ForgetChunks(self, ino);
        self.load_inode_impl(ino, inode)
    }

    fn load_entries(&self, parent: Ino, entries: &[(Vec<u8>, Ino, FileType)]) -> Result<()> {
        for part in entries.chunks(512) {
            self.txn(|t| {
                for (name, ino, typ) in part {
                    check_name(name)?;
                    t.set(&key::dentry(parent, name), key::encode_dentry(*typ, *ino));
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    fn load_finish(
        &self,
        next_inode: Ino,
        next_slice: u64,
        used_space: u64,
        inodes: u64,
    ) -> Result<()> {
        self.txn(|t| {
            for (name, v) in [
                (C_NEXT_INODE, next_inode as i64),
                (C_NEXT_SLICE, next_slice as i64),
                (C_USED_SPACE, used_space as i64),
                (C_USED_INODES, inodes as i64),
            ] {
                t.set(&key::counter(name), v.to_be_bytes().to_vec());
            }
            Ok(())
        })?;
        // Ids handed out before the load came from the old counters.
        *self.inos.lock().unwrap() = IdBatch::default();
        let mut s = self.slices.lock().unwrap();
        (s.next, s.end, s.high) = (0, 0, 0);
        drop(s);
        self.kv.sync()
    }
}

/// A change of an inode's flock and fcntl lock tables.
type LockEdit<'a> =
    dyn FnMut(&mut Vec<(u64, u64, i32)>, &mut Vec<locks::PRecord>) -> Result<()> + 'a;

/// Drops an inode's cached slice lists when a change of them ends, committed or not (drop
/// runs after the transaction).
struct ForgetChunks<'a, E: KvEngine>(&'a KvMeta<E>, Ino);

impl<E: KvEngine> Drop for ForgetChunks<'_, E> {
    fn drop(&mut self) {
        self.0.forget_chunks(self.1);
    }
}

impl<E: KvEngine> KvMeta<E> {
    /// The load operations of [`Load`], written once here for every engine.
    fn load_inode_impl(&self, ino: Ino, inode: &crate::LoadInode) -> Result<()> {
        let attr = inode
            .attr
            .as_ref()
            .ok_or_else(|| MetaError::Config(format!("inode {ino} has no attributes")))?;
        self.txn(|t| {
            put_attr(t, ino, attr);
            if let Some(target) = &inode.symlink {
                t.set(&key::symlink(ino), target.clone());
            }
            for (name, value) in &inode.xattrs {
                t.set(&key::xattr(ino, name), value.clone());
            }
            for (idx, slices) in &inode.chunks {
                t.set(&key::chunk(ino, *idx), Slice::encode_list(slices));
            }
            Ok(())
        })
    }
}

fn check_xattr_name(name: &[u8]) -> Result<()> {
    if name.is_empty() {
        return Err(Errno::EINVAL.into());
    }
    if name.len() > MAX_XATTR_NAME {
        return Err(Errno::ERANGE.into());
    }
    let known = [&b"user."[..], b"trusted.", b"security.", b"system."];
    if !known
        .iter()
        .any(|p| name.starts_with(p) && name.len() > p.len())
    {
        return Err(Errno::EOPNOTSUPP.into());
    }
    // POSIX ACLs are not supported; saying so lets cp -a and tar carry on.
    if name.starts_with(b"system.") {
        return Err(Errno::EOPNOTSUPP.into());
    }
    Ok(())
}

impl<E: KvEngine> KvMeta<E> {
    #[allow(clippy::too_many_arguments)]
    fn create_node(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        typ: FileType,
        mode: u32,
        rdev: u32,
        target: Option<&[u8]>,
        open: bool,
    ) -> Result<(Ino, Attr)> {
        check_name(name)?;
        let sid = self.sid();
        let shared = !self.kv.exclusive();
        for _ in 0..8 {
            let ino = self.alloc_ino()?;
            let mut taken = false;
            // The new inode is opened in the creating transaction: no other client can know it
            // before, and the open costs no transaction of its own.
            let mut opened = open.then(|| self.open_shard(ino));
            let (_, max_inodes) = self.limits();
            let (pk, dk, ak) = (key::attr(parent), key::dentry(parent, name), key::attr(ino));
            let r = self
                .txn(|t| {
                    taken = false;
                    // The kernel looked the name up before asking to create it.
                    t.guess(&dk, None);
                    // The parent and the name in one read (one round trip on Redis). On a shared
                    // engine the new inode's attributes too, guessed absent (no round trip): an
                    // id counter a failover set back may hand out an inode in use.
                    let got = if shared {
                        t.guess(&ak, None);
                        let got = t.get_many(&[&pk, &dk, &ak])?;
                        if got[2].is_some() {
                            taken = true;
                            return Err(Errno::EEXIST.into());
                        }
                        got
                    } else {
                        t.get_many(&[&pk, &dk])?
                    };
                    let mut p = match &got[0] {
                        Some(v) => key::decode_attr(parent, v)?,
                        None => return Err(Errno::ENOENT.into()),
                    };
                    if !p.is_dir() {
                        return Err(Errno::ENOTDIR.into());
                    }
                    if p.nlink == 0 {
                        return Err(Errno::ENOENT.into());
                    }
                    access_ok(ctx, &p, MODE_W | MODE_X)?;
                    if got[1].is_some() {
                        return Err(Errno::EEXIST.into());
                    }
                    if typ == FileType::Directory && p.nlink >= MAX_LINKS {
                        return Err(Errno::EMLINK.into());
                    }
                    if max_inodes > 0 && self.counter(C_USED_INODES)?.max(0) as u64 >= max_inodes {
                        return Err(Errno::ENOSPC.into());
                    }
                    add(t, C_USED_INODES, 1);
                    let mut a = Attr::new(typ, mode as u16, ctx.uid, ctx.gid);
                    if p.mode & libc::S_ISGID as u16 != 0 {
                        // BSD group semantics in a set-group-ID directory.
                        a.gid = p.gid;
                        if typ == FileType::Directory {
                            a.mode |= libc::S_ISGID as u16;
                        }
                    }
                    if matches!(typ, FileType::BlockDev | FileType::CharDev) {
                        a.rdev = rdev;
                    }
                    a.parent = parent;
                    if let Some(target) = target {
                        a.length = target.len() as u64;
                        t.set(&key::symlink(ino), target.to_vec());
                    }
                    put_attr(t, ino, &a);
                    t.set(&key::dentry(parent, name), key::encode_dentry(typ, ino));
                    if typ == FileType::Directory {
                        p.nlink += 1;
                        touch_dir(&mut p, a.ctime);
                        put_attr(t, parent, &p);
                    } else {
                        self.touch_parent(t, parent, &mut p, a.ctime);
                    }
                    if open {
                        self.check_session(t)?;
                        t.set(&key::holder(ino, sid), Vec::new());
                        t.set(&key::sustained(sid, ino), Vec::new());
                    }
                    Ok((ino, a))
                })
                .inspect(|_| {
                    if let Some(o) = opened.as_mut() {
                        *o.entry(ino).or_insert(0) += 1;
                    }
                    // A new file has no slice list: its first write need not read one.
                    if typ == FileType::File {
                        self.hint(key::chunk(ino, 0), None);
                    }
                });
            if !(shared && taken) {
                return r;
            }
            // A failover undid the increment that handed `ino` out, and another client
            // took it again (see `fresh_batch`): move the counter past it and take another.
            let mut b = self.inos.lock().unwrap();
            b.high = b.high.max(ino + 1);
            b.epoch = u64::MAX;
        }
        Err(MetaError::engine(
            self.kv.name(),
            "the inode counter keeps handing out inodes in use",
        ))
    }
}
