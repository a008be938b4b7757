//! The transactional key-value model every metadata engine provides.
//!
//! The namespace logic lives once, in [`crate::KvMeta`], over this small interface; an engine
//! (RocksDB here, Redis later) only has to offer serialisable transactions over ordered keys.
//! Engines that cannot run a closure inside the server use [`BufferedTxn`]: reads go to the
//! engine's committed state, writes collect in a buffer and are committed as one atomic batch.

use crate::error::Result;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, RwLock};

pub type KvPair = (Vec<u8>, Vec<u8>);

/// Reads of committed state.
pub trait KvRead {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Keys in `[start, end)`, in order, at most `limit` of them.
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KvPair>>;
}

/// Operations inside one transaction. Writes are visible to later reads of the same transaction.
pub trait KvTxn {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    fn scan(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KvPair>>;
    fn set(&mut self, key: &[u8], value: Vec<u8>);
    fn delete(&mut self, key: &[u8]);
}

/// A transactional, ordered key-value engine.
pub trait KvEngine: KvRead + Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Run `f` as one serialisable transaction: all of its writes commit atomically, or none
    /// do when `f` returns an error. The engine may run `f` more than once on conflict.
    fn txn(&self, f: &mut dyn FnMut(&mut dyn KvTxn) -> Result<()>) -> Result<()>;
    /// Make every committed transaction durable on the engine's storage.
    fn sync(&self) -> Result<()>;
    /// True when no other process can use the same store at the same time (an embedded
    /// engine that locks its files): sessions other than ours are then known to be dead.
    fn exclusive(&self) -> bool;
}

/// A transaction that buffers writes over a committed view.
pub struct BufferedTxn<'a> {
    base: &'a dyn KvRead,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> BufferedTxn<'a> {
    pub fn new(base: &'a dyn KvRead) -> Self {
        BufferedTxn {
            base,
            writes: BTreeMap::new(),
        }
    }

    /// The buffered writes: `None` is a delete.
    pub fn into_writes(self) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
        self.writes
    }
}

impl KvTxn for BufferedTxn<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(key),
        }
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
}

/// In-memory engine for tests: a BTreeMap, transactions serialised by one lock.
#[derive(Default)]
pub struct MemKv {
    map: RwLock<BTreeMap<Vec<u8>, Vec<u8>>>,
    commit: Mutex<()>,
}

impl MemKv {
    pub fn new() -> Self {
        Self::default()
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
        let mut txn = BufferedTxn::new(&view);
        f(&mut txn)?;
        let writes = txn.into_writes();
        let mut map = self.map.write().unwrap();
        for (k, v) in writes {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn exclusive(&self) -> bool {
        true
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
