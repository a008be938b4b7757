//! Read-ahead for sequential readers. Blocks are immutable and their keys never reused, so a
//! cached block can never be stale: the cache needs no invalidation, only a size bound.
//!
//! A read that continues where the previous read of the same file ended is sequential: its
//! block is fetched whole (checksums verified) into the cache, and the next blocks of the
//! same slice are fetched in the background, so the following requests are served from
//! memory while the store works ahead. Random reads bypass all this and fetch only the
//! segments they touch.

use crate::codec::{self, Compression};
use aquifer_meta::Ino;
use aquifer_object::ObjectStore;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Whole, verified blocks by key; first in, first out, bounded in bytes.
pub struct BlockCache {
    inner: Mutex<CacheState>,
    cap: usize,
}

#[derive(Default)]
struct CacheState {
    map: HashMap<String, Arc<Vec<u8>>>,
    order: VecDeque<String>,
    bytes: usize,
}

impl BlockCache {
    pub fn new(cap: usize) -> BlockCache {
        BlockCache {
            inner: Mutex::new(CacheState::default()),
            cap,
        }
    }

    pub fn get(&self, key: &str) -> Option<Arc<Vec<u8>>> {
        self.inner.lock().unwrap().map.get(key).cloned()
    }

    pub fn insert(&self, key: String, data: Arc<Vec<u8>>) {
        if data.len() > self.cap {
            return;
        }
        let mut s = self.inner.lock().unwrap();
        if s.map.contains_key(&key) {
            return;
        }
        s.bytes += data.len();
        s.order.push_back(key.clone());
        s.map.insert(key, data);
        while s.bytes > self.cap {
            let Some(old) = s.order.pop_front() else {
                break;
            };
            if let Some(d) = s.map.remove(&old) {
                s.bytes -= d.len();
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap().bytes
    }
}

/// Fetch a whole block, verified, in one request.
pub fn fetch_block(
    store: &dyn ObjectStore,
    c: Compression,
    key: &str,
    len: usize,
) -> crate::Result<Arc<Vec<u8>>> {
    Ok(Arc::new(codec::read_whole(store, c, key, len)?))
}

pub struct Prefetcher {
    tx: Mutex<Option<SyncSender<(String, usize)>>>,
    inflight: Arc<Mutex<HashSet<String>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// End offset of the last read, per inode: the next read starting there is sequential.
    last_end: Mutex<HashMap<Ino, u64>>,
}

impl Prefetcher {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        cache: Arc<BlockCache>,
        threads: usize,
        c: Compression,
    ) -> Prefetcher {
        let (tx, rx) = sync_channel::<(String, usize)>(threads.max(1) * 2);
        let rx: Arc<Mutex<Receiver<(String, usize)>>> = Arc::new(Mutex::new(rx));
        let inflight = Arc::new(Mutex::new(HashSet::new()));
        let handles = (0..threads.max(1))
            .map(|i| {
                let (rx, store, cache, inflight) =
                    (rx.clone(), store.clone(), cache.clone(), inflight.clone());
                std::thread::Builder::new()
                    .name(format!("prefetch-{i}"))
                    .spawn(move || loop {
                        let job = rx.lock().unwrap().recv();
                        let Ok((key, len)) = job else { return };
                        if cache.get(&key).is_none() {
                            match fetch_block(&*store, c, &key, len) {
                                Ok(data) => cache.insert(key.clone(), data),
                                // The reader fetches it again and reports the error itself.
                                Err(e) => tracing::debug!(key, error = %e, "prefetch failed"),
                            }
                        }
                        inflight.lock().unwrap().remove(&key);
                    })
                    .expect("spawn prefetch thread")
            })
            .collect();
        Prefetcher {
            tx: Mutex::new(Some(tx)),
            inflight,
            threads: Mutex::new(handles),
            last_end: Mutex::new(HashMap::new()),
        }
    }

    /// Record a read of `[off, off+len)` of `ino`; true when it continues the previous one.
    pub fn observe(&self, ino: Ino, off: u64, len: u64) -> bool {
        let mut m = self.last_end.lock().unwrap();
        if m.len() > 65536 {
            m.clear();
        }
        let seq = off == 0 || m.get(&ino) == Some(&off);
        m.insert(ino, off + len);
        seq
    }

    /// Fetch `key` in the background unless it is already on its way; never blocks.
    pub fn request(&self, key: String, len: usize) {
        if !self.inflight.lock().unwrap().insert(key.clone()) {
            return;
        }
        let sent = match self.tx.lock().unwrap().as_ref() {
            Some(tx) => tx.try_send((key.clone(), len)).is_ok(),
            None => false,
        };
        if !sent {
            self.inflight.lock().unwrap().remove(&key);
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.tx.lock().unwrap().take();
        for t in std::mem::take(&mut *self.threads.lock().unwrap()) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_is_bounded_first_in_first_out() {
        let c = BlockCache::new(10);
        c.insert("a".into(), Arc::new(vec![0; 4]));
        c.insert("b".into(), Arc::new(vec![0; 4]));
        c.insert("c".into(), Arc::new(vec![0; 4]));
        assert!(c.get("a").is_none());
        assert!(c.get("b").is_some() && c.get("c").is_some());
        assert_eq!(c.bytes(), 8);
        c.insert("huge".into(), Arc::new(vec![0; 11]));
        assert!(c.get("huge").is_none());
    }
}
