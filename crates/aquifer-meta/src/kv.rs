//! The transactional key-value model every metadata engine provides.
//!
//! The namespace logic lives once, in [`crate::KvMeta`], over this small interface; an engine
//! (RocksDB here, Redis later) only has to offer serialisable transactions over ordered keys.
//! Engines that cannot run a closure inside the server use [`BufferedTxn`]: reads go to the
//! engine's committed state, writes collect in a buffer and are committed as one atomic batch.
//!
//! Two operations exist so that shared engines (Redis) need not make every change depend on
//! keys every change touches: [`KvTxn::add`] adds to a counter at commit without reading it
//! (used space and inode counts change in every create and write; as reads they would make
//! all clients conflict), and [`KvEngine::incr_by`] allocates ids outside any transaction.

use crate::error::Result;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, RwLock};

pub type KvPair = (Vec<u8>, Vec<u8>);
/// A directory entry's value and the attributes of the inode it names, each if found.
pub type EntryAttr = (Option<Vec<u8>>, Option<Vec<u8>>);

/// Reads of committed state.
pub trait KvRead {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Several independent reads; an engine over a network does them in one round trip.
    fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        keys.iter().map(|k| self.get(k)).collect()
    }
    /// A directory entry and the attributes of the inode it names, read together: one
    /// round trip on an engine that can follow the entry itself (a lookup).
    fn get_entry_attr(&self, entry_key: &[u8]) -> Result<EntryAttr> {
        let Some(d) = self.get(entry_key)? else {
            return Ok((None, None));
        };
        let attr = match d.get(1..9) {
            Some(ino) if d.len() == 9 => {
                let ino = u64::from_be_bytes(ino.try_into().unwrap_or_default());
                self.get(&crate::encoding::attr(ino))?
            }
            _ => None,
        };
        Ok((Some(d), attr))
    }
    /// Keys in `[start, end)`, in order, at most `limit` of them; fewer only when there are
    /// no more (directory listings rely on it to know their last page).
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KvPair>>;
}

/// Operations inside one transaction. Writes are visible to later reads of the same transaction.
pub trait KvTxn {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Several independent reads at once (one round trip on Redis).
    fn get_many(&mut self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        keys.iter().map(|k| self.get(k)).collect()
    }
    fn scan(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KvPair>>;
    fn set(&mut self, key: &[u8], value: Vec<u8>);
    fn delete(&mut self, key: &[u8]);
    /// Add `delta` to the counter at `key` (an i64, big-endian, absent = 0) when the
    /// transaction commits. The transaction does not depend on the counter's value: two
    /// transactions adding to one counter never conflict.
    fn add(&mut self, key: &[u8], delta: i64);
    /// Say what `key` probably holds (`None`: absent), from what this client saw or wrote
    /// last, before reading it. An engine that checks its reads at commit may take the guess
    /// as the read, saving a round trip, and runs the transaction again with real reads when
    /// the guess turns out wrong (so a wrong guess costs time, never correctness); other
    /// engines ignore it. Returns whether later reads of `key` see the guess.
    fn guess(&mut self, _key: &[u8], _value: Option<Vec<u8>>) -> bool {
        false
    }
}

/// A transactional, ordered key-value engine.
pub trait KvEngine: KvRead + Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Run `f` as one serialisable transaction: all of its writes commit atomically, or none
    /// do when `f` returns an error. The engine may run `f` more than once on conflict.
    fn txn(&self, f: &mut dyn FnMut(&mut dyn KvTxn) -> Result<()>) -> Result<()>;
    /// Make every committed transaction durable on the engine's storage.
    fn sync(&self) -> Result<()>;
    /// What close(2) of a written file waits for once its changes are committed. An
    /// embedded engine's commit survives the daemon's death already (power cuts are
    /// fsync's business); a server's may not survive the server's crash or a failover.
    fn sync_on_close(&self) -> Result<()> {
        Ok(())
    }
    /// True when no other process can use the same store at the same time (an embedded
    /// engine that locks its files): sessions other than ours are then known to be dead.
    fn exclusive(&self) -> bool;
    /// Add `delta` to the counter at `key` at once, outside any transaction, and return the
    /// new value: for id allocation. May be called from inside a transaction's closure; the
    /// increment stands even if that transaction fails or runs again.
    fn incr_by(&self, key: &[u8], delta: i64) -> Result<i64>;
    /// The engine's clock. On an engine other clients share it is the server's, so that
    /// times compared across clients (heartbeats, the age of freed blocks) do not depend on
    /// each client's own clock, which may be minutes off.
    fn clock(&self) -> Result<crate::Time> {
        Ok(crate::Time::now())
    }
    /// True when a commit's answer can be lost after the engine applied it (an engine over
    /// a network: a timeout, a reset connection, a failover). Such an engine answers
    /// [`crate::MetaError::Ambiguous`] for a commit it sent but heard nothing back of, and
    /// never runs the transaction again by itself then; [`crate::KvMeta`] finds out what
    /// happened (a lane key each commit writes) before it runs it again.
    fn may_lose_replies(&self) -> bool {
        false
    }
    /// A number that changes whenever the engine may have moved to another server (a
    /// failover): changes acknowledged before it may be gone, and a sync after it checks.
    fn epoch(&self) -> u64 {
        0
    }
    /// The engine's change feed, on an engine other clients share: the followed keys
    /// ([`crate::encoding::FOLLOWED`]) every commit wrote, in commit order, so that a client
    /// can keep caches true by being told instead of asking. None: the engine keeps no feed
    /// (an exclusive engine needs none: nobody else changes it).
    fn feed(&self) -> Option<Box<dyn KvFeed>> {
        None
    }
}

/// What [`KvFeed::next`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum FeedBatch {
    /// The followed keys of each commit since the last batch, in commit order (possibly
    /// none: the wait ended first).
    Commits(Vec<Vec<Vec<u8>>>),
    /// Continuity is lost — the feed started, reconnected, fell behind what the engine
    /// keeps, or the server changed — so commits may have been missed: a follower trusts
    /// nothing it cached before.
    Gap,
}

/// A reader of an engine's change feed ([`KvEngine::feed`]).
pub trait KvFeed: Send {
    /// Wait up to `wait` for commits after those already returned. An error is the engine
    /// unreachable; the next call starts again with a [`FeedBatch::Gap`].
    fn next(&mut self, wait: std::time::Duration) -> Result<FeedBatch>;
}

/// The keys of one commit a feed carries, packed into one value (each key after its
/// length, a big-endian u16).
pub fn pack_keys<'a>(keys: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for k in keys {
        let n = k.len().min(u16::MAX as usize);
        out.extend_from_slice(&(n as u16).to_be_bytes());
        out.extend_from_slice(&k[..n]);
    }
    out
}

/// The keys [`pack_keys`] packed; a damaged tail is dropped.
pub fn unpack_keys(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while b.len() >= 2 {
        let n = u16::from_be_bytes([b[0], b[1]]) as usize;
        let Some(k) = b.get(2..2 + n) else { break };
        out.push(k.to_vec());
        b = &b[2 + n..];
    }
    out
}

/// The i64 a counter key holds (big-endian; absent or malformed = 0).
pub fn counter_value(v: Option<&[u8]>) -> i64 {
    v.and_then(|v| v.try_into().ok())
        .map(i64::from_be_bytes)
        .unwrap_or(0)
}

impl<E: KvEngine> KvRead for std::sync::Arc<E> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        (**self).get(key)
    }
    fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        (**self).get_many(keys)
    }
    fn get_entry_attr(&self, entry_key: &[u8]) -> Result<EntryAttr> {
        (**self).get_entry_attr(entry_key)
    }
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KvPair>> {
        (**self).scan(start, end, limit)
    }
}

/// One engine shared by several metadata clients (tests of many mounts on one volume).
impl<E: KvEngine> KvEngine for std::sync::Arc<E> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn txn(&self, f: &mut dyn FnMut(&mut dyn KvTxn) -> Result<()>) -> Result<()> {
        (**self).txn(f)
    }
    fn sync(&self) -> Result<()> {
        (**self).sync()
    }
    fn sync_on_close(&self) -> Result<()> {
        (**self).sync_on_close()
    }
    fn exclusive(&self) -> bool {
        (**self).exclusive()
    }
    fn incr_by(&self, key: &[u8], delta: i64) -> Result<i64> {
        (**self).incr_by(key, delta)
    }
    fn clock(&self) -> Result<crate::Time> {
        (**self).clock()
    }
    fn may_lose_replies(&self) -> bool {
        (**self).may_lose_replies()
    }
    fn epoch(&self) -> u64 {
        (**self).epoch()
    }
    fn feed(&self) -> Option<Box<dyn KvFeed>> {
        (**self).feed()
    }
}

/// What a [`BufferedTxn`] leaves to commit.
#[derive(Default)]
pub struct TxnWrites {
    /// Values to store; `None` is a delete.
    pub writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Blind counter additions ([`KvTxn::add`]).
    pub adds: BTreeMap<Vec<u8>, i64>,
    /// Values the transaction took on trust ([`KvTxn::guess`]): the engine must check them at
    /// commit, and run the transaction again without guesses if one is wrong.
    pub guesses: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl TxnWrites {
    /// No writes and no additions (guesses do not count: a transaction that only read has
    /// nothing to commit).
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.adds.is_empty()
    }

    /// True when every guess matches the committed state in `base`.
    pub fn guesses_hold(&self, base: &dyn KvRead) -> Result<bool> {
        for (k, v) in &self.guesses {
            if base.get(k)? != *v {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// For engines whose commits are serialised: the writes with the additions folded in,
    /// reading the counters' committed values from `base` (under the engine's commit lock).
    pub fn folded(mut self, base: &dyn KvRead) -> Result<BTreeMap<Vec<u8>, Option<Vec<u8>>>> {
        for (k, d) in std::mem::take(&mut self.adds) {
            let cur = counter_value(base.get(&k)?.as_deref());
            self.writes
                .insert(k, Some(cur.wrapping_add(d).to_be_bytes().to_vec()));
        }
        Ok(self.writes)
    }
}

/// A transaction that buffers writes over a committed view.
pub struct BufferedTxn<'a> {
    base: &'a dyn KvRead,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    adds: BTreeMap<Vec<u8>, i64>,
    /// `Some` when the engine takes guesses (it checks them at commit).
    guesses: Option<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl<'a> BufferedTxn<'a> {
    pub fn new(base: &'a dyn KvRead) -> Self {
        BufferedTxn {
            base,
            writes: BTreeMap::new(),
            adds: BTreeMap::new(),
            guesses: None,
        }
    }

    /// A transaction that, when `guessing`, takes [`KvTxn::guess`]es; the engine checks
    /// them at commit ([`TxnWrites::guesses`]). Engines run a transaction again without
    /// guesses when one was wrong.
    pub fn with_guesses(base: &'a dyn KvRead, guessing: bool) -> Self {
        BufferedTxn {
            guesses: guessing.then(BTreeMap::new),
            ..Self::new(base)
        }
    }

    /// The buffered writes, counter additions and the guesses taken.
    pub fn into_writes(self) -> TxnWrites {
        TxnWrites {
            writes: self.writes,
            adds: self.adds,
            guesses: self.guesses.unwrap_or_default(),
        }
    }

    /// What this transaction wrote or guessed for `key`, if either.
    fn known(&self, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        self.writes
            .get(key)
            .or_else(|| self.guesses.as_ref().and_then(|g| g.get(key)))
    }
}

impl KvTxn for BufferedTxn<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.known(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(key),
        }
    }

    fn get_many(&mut self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        let missing: Vec<&[u8]> = keys
            .iter()
            .copied()
            .filter(|k| self.known(k).is_none())
            .collect();
        let mut fetched = self.base.get_many(&missing)?.into_iter();
        keys.iter()
            .map(|k| match self.known(k) {
                Some(v) => Ok(v.clone()),
                None => Ok(fetched.next().flatten()),
            })
            .collect()
    }

    fn scan(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KvPair>> {
        let range = (
            Bound::Included(start.to_vec()),
            Bound::Excluded(end.to_vec()),
        );
        let overlay: Vec<_> = self.writes.range(range).collect();
        let deletes = overlay.iter().filter(|(_, v)| v.is_none()).count();
        // Buffered deletes may hide base keys, so ask the base for that many more.
        let base = self.base.scan(start, end, limit.saturating_add(deletes))?;
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> =
            base.into_iter().map(|(k, v)| (k, Some(v))).collect();
        for (k, v) in overlay {
            merged.insert(k.clone(), v.clone());
        }
        Ok(merged
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .take(limit)
            .collect())
    }

    fn set(&mut self, key: &[u8], value: Vec<u8>) {
        self.writes.insert(key.to_vec(), Some(value));
    }

    fn delete(&mut self, key: &[u8]) {
        self.writes.insert(key.to_vec(), None);
    }

    fn add(&mut self, key: &[u8], delta: i64) {
        match self.writes.get_mut(key) {
            // A counter written in this transaction: add to the written value.
            Some(Some(v)) => {
                let cur = counter_value(Some(v));
                *v = cur.wrapping_add(delta).to_be_bytes().to_vec();
            }
            _ => *self.adds.entry(key.to_vec()).or_insert(0) += delta,
        }
    }

    fn guess(&mut self, key: &[u8], value: Option<Vec<u8>>) -> bool {
        if self.writes.contains_key(key) {
            return false;
        }
        match &mut self.guesses {
            Some(g) => {
                g.entry(key.to_vec()).or_insert(value);
                true
            }
            None => false,
        }
    }
}

/// In-memory engine for tests: a BTreeMap, transactions serialised by one lock.
#[derive(Default)]
pub struct MemKv {
    map: RwLock<BTreeMap<Vec<u8>, Vec<u8>>>,
    commit: Mutex<()>,
    shared: bool,
    /// A shared engine's change feed: the followed keys of recent commits.
    log: std::sync::Arc<MemLog>,
}

/// The last [`MEM_LOG_MAX`] commits of a shared [`MemKv`], numbered from 1.
#[derive(Default)]
struct MemLog {
    entries: Mutex<(u64, std::collections::VecDeque<Vec<Vec<u8>>>)>,
    cv: std::sync::Condvar,
}

const MEM_LOG_MAX: usize = 4096;

struct MemFeed {
    log: std::sync::Arc<MemLog>,
    /// The number of the last commit returned; None before the first call.
    seen: Option<u64>,
}

impl KvFeed for MemFeed {
    fn next(&mut self, wait: std::time::Duration) -> Result<FeedBatch> {
        let mut g = self.log.entries.lock().unwrap();
        let Some(seen) = self.seen else {
            self.seen = Some(g.0);
            return Ok(FeedBatch::Gap);
        };
        if g.0 == seen {
            g = self.log.cv.wait_timeout(g, wait).unwrap().0;
        }
        let (last, q) = (&g.0, &g.1);
        let first = last - q.len() as u64 + 1;
        if *last > seen && seen + 1 < first {
            self.seen = Some(*last);
            return Ok(FeedBatch::Gap);
        }
        let skip = (seen + 1 - first) as usize;
        let out: Vec<_> = q.iter().skip(skip).cloned().collect();
        self.seen = Some(*last);
        Ok(FeedBatch::Commits(out))
    }
}

impl MemKv {
    pub fn new() -> Self {
        Self::default()
    }

    /// An engine that says it may be shared ([`KvEngine::exclusive`] false): put in an `Arc`
    /// and given to several [`crate::KvMeta`] clients, it stands for one volume mounted many
    /// times, so the many-clients conformance cases run without a server.
    pub fn shared() -> Self {
        MemKv {
            shared: true,
            ..Self::default()
        }
    }
}

struct MemView<'a>(&'a RwLock<BTreeMap<Vec<u8>, Vec<u8>>>);

impl KvRead for MemView<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.0.read().unwrap().get(key).cloned())
    }
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KvPair>> {
        if start >= end {
            return Ok(Vec::new());
        }
        let map = self.0.read().unwrap();
        Ok(map
            .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

impl KvRead for MemKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        MemView(&self.map).get(key)
    }
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KvPair>> {
        MemView(&self.map).scan(start, end, limit)
    }
}

impl KvEngine for MemKv {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn txn(&self, f: &mut dyn FnMut(&mut dyn KvTxn) -> Result<()>) -> Result<()> {
        let _serial = self.commit.lock().unwrap();
        let view = MemView(&self.map);
        // A shared engine takes guesses as a networked one does, so that the conformance
        // cases see wrong guesses (stale caches of other clients' changes) being caught.
        let mut guessing = self.shared;
        let writes = loop {
            let mut txn = BufferedTxn::with_guesses(&view, guessing);
            let r = f(&mut txn);
            let w = txn.into_writes();
            // A result (or an error) built on a wrong guess is not the transaction's.
            if !w.guesses_hold(&view)? {
                guessing = false;
                continue;
            }
            r?;
            break w;
        };
        let writes = writes.folded(&view)?;
        let followed: Vec<Vec<u8>> = writes
            .keys()
            .filter(|k| crate::encoding::followed(k))
            .cloned()
            .collect();
        let mut map = self.map.write().unwrap();
        for (k, v) in writes {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        if self.shared && followed.iter().any(|k| !crate::encoding::is_lane(k)) {
            let mut g = self.log.entries.lock().unwrap();
            g.0 += 1;
            g.1.push_back(followed);
            if g.1.len() > MEM_LOG_MAX {
                g.1.pop_front();
            }
            drop(g);
            self.log.cv.notify_all();
        }
        Ok(())
    }

    fn feed(&self) -> Option<Box<dyn KvFeed>> {
        self.shared.then(|| {
            Box::new(MemFeed {
                log: self.log.clone(),
                seen: None,
            }) as Box<dyn KvFeed>
        })
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn exclusive(&self) -> bool {
        !self.shared
    }

    fn incr_by(&self, key: &[u8], delta: i64) -> Result<i64> {
        let mut map = self.map.write().unwrap();
        let new = counter_value(map.get(key).map(|v| v.as_slice())).wrapping_add(delta);
        map.insert(key.to_vec(), new.to_be_bytes().to_vec());
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffered_scan_merges_overlay() {
        let kv = MemKv::new();
        kv.txn(&mut |t| {
            for k in [b"a1", b"a2", b"a3", b"b1"] {
                t.set(k, b"x".to_vec());
            }
            Ok(())
        })
        .unwrap();
        kv.txn(&mut |t| {
            t.delete(b"a1");
            t.set(b"a25", b"y".to_vec());
            let got = t.scan(b"a", b"b", 2)?;
            assert_eq!(got[0].0, b"a2".to_vec());
            assert_eq!(got[1].0, b"a25".to_vec());
            assert_eq!(got.len(), 2);
            Err(crate::MetaError::Sys(crate::Errno::EIO))
        })
        .unwrap_err();
        // The failed transaction left nothing behind.
        assert!(kv.get(b"a1").unwrap().is_some());
        assert!(kv.get(b"a25").unwrap().is_none());
    }
}
