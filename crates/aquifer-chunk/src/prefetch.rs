//! Read-ahead for sequential readers. Blocks are immutable and their keys never reused, so a
//! cached block can never be stale: the cache needs no invalidation, only a size bound.
//!
//! A read that continues where the previous read of the same file ended is sequential: its
//! block is fetched whole (checksums verified) into the cache, and the next blocks of the
//! same slice are fetched in the background, so the following requests are served from
//! memory while the store works ahead. Random reads bypass all this and fetch only the
//! segments they touch.

use crate::codec::{self, Compression};
use crate::pool::BufferPool;
use aquifer_meta::{Ino, Slice};
use aquifer_object::ObjectStore;
use parking_lot::{Condvar, Mutex};
use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Whole, verified blocks by key; first in, first out, bounded in bytes.
///
/// [`get_or_fetch`](BlockCache::get_or_fetch) lets one thread fetch a block while others
/// that want it wait: the kernel sends several read-ahead requests of one file at once, and
/// a prefetcher may be fetching the block a reader has just reached. Without it each of them
/// would GET the same block.
pub struct BlockCache {
    inner: Mutex<CacheState>,
    cap: usize,
    inflight: Mutex<HashMap<String, Arc<Flight>>>,
    /// Evicted blocks go back here and new fetches take their buffers from it, so reading
    /// does not map and fault in a fresh 4 MiB buffer per block.
    buffers: Option<Arc<BufferPool>>,
}

/// One fetch in progress; `done` holds its outcome (None: it failed) once finished.
#[derive(Default)]
struct Flight {
    done: Mutex<Option<Option<Arc<Vec<u8>>>>>,
    cv: Condvar,
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
            inflight: Mutex::new(HashMap::new()),
            buffers: None,
        }
    }

    /// A cache whose evicted blocks are recycled through `buffers`.
    pub fn with_buffers(cap: usize, buffers: Arc<BufferPool>) -> BlockCache {
        BlockCache {
            buffers: Some(buffers),
            ..BlockCache::new(cap)
        }
    }

    /// A buffer for the next fetch: a recycled one when there is one.
    pub fn buffer(&self) -> Vec<u8> {
        self.buffers.as_ref().map(|b| b.take()).unwrap_or_default()
    }

    /// The cached block `key`, or the result of `fetch` run by exactly one of the threads
    /// asking for it at the same time.
    pub fn get_or_fetch(
        &self,
        key: &str,
        fetch: impl FnOnce() -> crate::Result<Arc<Vec<u8>>>,
    ) -> crate::Result<Arc<Vec<u8>>> {
        if let Some(b) = self.get(key) {
            return Ok(b);
        }
        let (flight, leader) = {
            let mut m = self.inflight.lock();
            match m.get(key) {
                Some(f) => (f.clone(), false),
                None => {
                    // Checked again under the lock: a fetch may have finished meanwhile.
                    if let Some(b) = self.get(key) {
                        return Ok(b);
                    }
                    let f = Arc::new(Flight::default());
                    m.insert(key.to_string(), f.clone());
                    (f, true)
                }
            }
        };
        if !leader {
            let mut done = flight.done.lock();
            while done.is_none() {
                flight.cv.wait(&mut done);
            }
            if let Some(Some(b)) = done.as_ref() {
                return Ok(b.clone());
            }
            drop(done);
            // The leader failed: try once more ourselves, so the error is our own to report.
            return fetch();
        }
        // Whatever happens to the fetch, even a panic, the flight ends and its waiters wake.
        let landing = Landing {
            cache: self,
            key,
            flight: &flight,
        };
        let r = fetch();
        if let Ok(b) = &r {
            self.insert(key.to_string(), b.clone());
        }
        *flight.done.lock() = Some(r.as_ref().ok().cloned());
        drop(landing);
        r
    }

    pub fn contains(&self, key: &str) -> bool {
        self.inner.lock().map.contains_key(key)
    }

    pub fn get(&self, key: &str) -> Option<Arc<Vec<u8>>> {
        self.inner.lock().map.get(key).cloned()
    }

    pub fn insert(&self, key: String, data: Arc<Vec<u8>>) {
        if data.len() > self.cap {
            return;
        }
        let mut s = self.inner.lock();
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
                // Readers may still hold it; then it is simply freed when they are done.
                if let (Some(pool), Ok(v)) = (&self.buffers, Arc::try_unwrap(d)) {
                    pool.give(v);
                }
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.inner.lock().bytes
    }
}

/// Ends a flight when the leader is done with it: a leader that panicked leaves it failed
/// (`Some(None)`), so its waiters fetch for themselves instead of waiting for ever.
struct Landing<'a> {
    cache: &'a BlockCache,
    key: &'a str,
    flight: &'a Flight,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        let mut done = self.flight.done.lock();
        if done.is_none() {
            *done = Some(None);
        }
        drop(done);
        self.flight.cv.notify_all();
        self.cache.inflight.lock().remove(self.key);
    }
}

/// Fetch a whole block, verified, in one request.
pub fn fetch_block(
    store: &dyn ObjectStore,
    cache: &BlockCache,
    c: Compression,
    key: &str,
    len: usize,
) -> crate::Result<Arc<Vec<u8>>> {
    let buf = cache.buffer();
    Ok(Arc::new(codec::read_whole(store, c, key, len, buf)?))
}

/// A chunk index and its visible slices.
type ChunkAhead = (u32, Arc<Vec<Slice>>);

pub struct Prefetcher {
    cache: Arc<BlockCache>,
    tx: Mutex<Option<SyncSender<(String, usize)>>>,
    inflight: Arc<Mutex<HashSet<String>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// End offset of the last read, per inode: the next read starting there is sequential.
    last_end: Mutex<HashMap<Ino, u64>>,
    /// The visible slices of the chunk ahead of each sequential reader, looked up once per
    /// chunk rather than once per read (a metadata round trip on Redis).
    ahead: Mutex<HashMap<Ino, ChunkAhead>>,
}

impl Prefetcher {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        cache: Arc<BlockCache>,
        threads: usize,
        c: Compression,
    ) -> std::io::Result<Prefetcher> {
        let (tx, rx) = sync_channel::<(String, usize)>(threads.max(1) * 2);
        let rx: Arc<Mutex<Receiver<(String, usize)>>> = Arc::new(Mutex::new(rx));
        let inflight = Arc::new(Mutex::new(HashSet::new()));
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let (rx, store, cache, inflight) =
                (rx.clone(), store.clone(), cache.clone(), inflight.clone());
            handles.push(
                std::thread::Builder::new()
                    .name(format!("prefetch-{i}"))
                    .spawn(move || loop {
                        let job = rx.lock().recv();
                        let Ok((key, len)) = job else { return };
                        // Cancelled while queued: the reader got there first.
                        if !inflight.lock().contains(&key) {
                            continue;
                        }
                        let r = catch_unwind(AssertUnwindSafe(|| {
                            cache.get_or_fetch(&key, || fetch_block(&*store, &cache, c, &key, len))
                        }));
                        match r {
                            // The reader fetches it again and reports the error itself.
                            Ok(Err(e)) => tracing::debug!(key, error = %e, "prefetch failed"),
                            Err(_) => tracing::error!(key, "prefetch panicked"),
                            Ok(Ok(_)) => {}
                        }
                        inflight.lock().remove(&key);
                    })?,
            );
        }
        Ok(Prefetcher {
            cache,
            tx: Mutex::new(Some(tx)),
            inflight,
            threads: Mutex::new(handles),
            last_end: Mutex::new(HashMap::new()),
            ahead: Mutex::new(HashMap::new()),
        })
    }

    /// The visible slices of chunk `idx` of `ino`, from `load` the first time it is asked.
    pub fn slices_ahead(
        &self,
        ino: Ino,
        idx: u32,
        load: impl FnOnce() -> Option<Vec<Slice>>,
    ) -> Option<Arc<Vec<Slice>>> {
        if let Some((i, v)) = self.ahead.lock().get(&ino) {
            if *i == idx {
                return Some(v.clone());
            }
        }
        let v = Arc::new(load()?);
        let mut m = self.ahead.lock();
        if m.len() > 4096 {
            m.clear();
        }
        m.insert(ino, (idx, v.clone()));
        Some(v)
    }

    /// Record a read of `[off, off+len)` of `ino`; true when it continues the previous one.
    /// The kernel sends read-ahead requests of one file concurrently, so they arrive a
    /// little out of order: a read near where the last one ended still counts.
    pub fn observe(&self, ino: Ino, off: u64, len: u64) -> bool {
        const WINDOW: u64 = 4 << 20;
        let mut m = self.last_end.lock();
        if m.len() > 65536 {
            m.clear();
        }
        let last = m.get(&ino).copied();
        let seq = off == 0 || last.is_some_and(|l| off + WINDOW >= l && off <= l + WINDOW);
        let end = match last {
            Some(l) if seq => l.max(off + len),
            _ => off + len,
        };
        m.insert(ino, end);
        seq
    }

    /// Fetch `key` in the background unless it is cached or already on its way; never
    /// blocks.
    pub fn request(&self, key: String, len: usize) {
        if self.cache.contains(&key) || !self.inflight.lock().insert(key.clone()) {
            return;
        }
        let sent = match self.tx.lock().as_ref() {
            Some(tx) => tx.try_send((key.clone(), len)).is_ok(),
            None => false,
        };
        if !sent {
            self.inflight.lock().remove(&key);
        }
    }

    /// The reader has `key` (fetched it itself or found it cached): a request for it still
    /// queued is dropped. Run later, it would find the block evicted by then (the reader
    /// has moved on) and fetch it a second time for nobody.
    pub fn cancel(&self, key: &str) {
        self.inflight.lock().remove(key);
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.tx.lock().take();
        for t in std::mem::take(&mut *self.threads.lock()) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_requests_for_a_block_fetch_it_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let c = BlockCache::new(1 << 20);
        let fetches = AtomicUsize::new(0);
        std::thread::scope(|t| {
            for _ in 0..8 {
                t.spawn(|| {
                    let b = c
                        .get_or_fetch("k", || {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok(Arc::new(vec![7; 100]))
                        })
                        .unwrap();
                    assert_eq!(*b, vec![7; 100]);
                });
            }
        });
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        // A failed fetch is not cached; waiters fall back to fetching themselves.
        let e = c.get_or_fetch("bad", || Err(crate::DataError::Poisoned("x".into())));
        assert!(e.is_err());
        assert!(c.get("bad").is_none());
    }

    #[test]
    fn a_fetch_that_panics_releases_its_waiters() {
        let c = BlockCache::new(1 << 20);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        std::thread::scope(|t| {
            let leader = t.spawn(|| {
                let _ = catch_unwind(AssertUnwindSafe(|| {
                    c.get_or_fetch("k", || {
                        started_tx.send(()).unwrap();
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        panic!("fetch blew up")
                    })
                }));
            });
            started_rx.recv().unwrap();
            // Joins the leader's flight, which panics: this must not hang, and fetches itself.
            let b = c.get_or_fetch("k", || Ok(Arc::new(vec![1; 4]))).unwrap();
            assert_eq!(*b, vec![1; 4]);
            leader.join().unwrap();
        });
        // And the next caller is not stuck behind a dead flight either.
        assert!(c.get_or_fetch("k2", || Ok(Arc::new(vec![2]))).is_ok());
    }

    #[test]
    fn reads_near_the_last_end_are_sequential() {
        let c = Arc::new(BlockCache::new(1 << 20));
        let p = Prefetcher::new(
            Arc::new(aquifer_object::MemStore::new()),
            c,
            1,
            Compression::None,
        )
        .unwrap();
        assert!(p.observe(1, 0, 1 << 20));
        // Out of order, as concurrent kernel read-ahead delivers them.
        assert!(p.observe(1, 2 << 20, 1 << 20));
        assert!(p.observe(1, 1 << 20, 1 << 20));
        assert!(p.observe(1, 3 << 20, 1 << 20));
        // A jump far away is random, and so is the first read of another file mid-way.
        assert!(!p.observe(1, 100 << 20, 4096));
        assert!(!p.observe(2, 50 << 20, 4096));
    }

    #[test]
    fn evicted_blocks_are_recycled_unless_still_in_use() {
        let pool = Arc::new(BufferPool::new(100, 4));
        let c = BlockCache::with_buffers(250, pool.clone());
        c.insert("a".into(), Arc::new(Vec::with_capacity(100)));
        let held = c.get("a").unwrap();
        c.insert("b".into(), Arc::new(vec![1; 100]));
        c.insert("c".into(), Arc::new(vec![2; 100]));
        c.insert("d".into(), Arc::new(vec![3; 100]));
        // "a" (empty, still held by a reader) and "b" were evicted: only "b" came back.
        assert!(c.get("b").is_none());
        assert_eq!(pool.idle(), 1);
        let b = c.buffer();
        assert!(b.is_empty() && b.capacity() >= 100);
        drop(held);
    }

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
