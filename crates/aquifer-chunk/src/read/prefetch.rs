//! Read-ahead for sequential readers. Blocks are immutable and their keys never reused, so a
//! cached block can never be stale: the cache needs no invalidation, only a size bound.
//!
//! A read that continues where the previous read of the same file ended is sequential: its
//! block is fetched whole (checksums verified) into the cache, and the next blocks of the
//! same slice are fetched in the background, so the following requests are served from
//! memory while the store works ahead. Random reads bypass all this and fetch only the
//! segments they touch.
//!
//! What is fetched ahead waits in the RAM tier's window for new blocks until its reader
//! comes; a block pushed out of it before then is fetched again. So the blocks fetched
//! ahead and not read yet are bounded for all readers together, not per reader: sixteen
//! shards restored at once each asking eight blocks ahead made 985 GETs for 256 blocks.

use super::fetch_block;
use crate::store::codec::Compression;
use crate::workers::Workers;
use aquifer_cache::Cache;
use aquifer_meta::{Ino, Slice};
use aquifer_object::ObjectStore;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a block fetched ahead keeps its room in the window waiting for its reader.
const UNREAD_FOR: Duration = Duration::from_secs(10);

/// How long a reader refused room in the window counts as one waiting for its share.
const WAITING_FOR: Duration = Duration::from_secs(1);

/// The blocks fetched ahead and not read yet, and the readers refused room lately.
#[derive(Default)]
struct Window {
    /// Block key -> when, and for which reader, it was asked for.
    unread: HashMap<String, (Instant, Ino)>,
    /// Reader -> when it was last refused room.
    waiting: HashMap<Ino, Instant>,
}

/// A chunk index and its visible slices.
type ChunkAhead = (u32, Arc<Vec<Slice>>);

pub struct Prefetcher {
    /// Fetch (key, payload length) into the cache.
    workers: Workers<(String, usize)>,
    cache: Arc<Cache>,
    inflight: Arc<Mutex<HashSet<String>>>,
    /// Blocks fetched (or being fetched) ahead whose reader has not come yet, at most
    /// `window` of them, with when and for which reader they were asked for.
    unread: Mutex<Window>,
    window: usize,
    /// [`UNREAD_FOR`]; shorter in tests.
    unread_for: Duration,
    /// End offset of the last read, per inode: the next read starting there is sequential.
    last_end: Mutex<HashMap<Ino, u64>>,
    /// The visible slices of the chunk ahead of each sequential reader, looked up once per
    /// chunk rather than once per read (a metadata round trip on Redis).
    ahead: Mutex<HashMap<Ino, ChunkAhead>>,
}

impl Prefetcher {
    /// `window`: blocks fetched ahead and not read yet, for all readers together (what the
    /// RAM tier keeps of new blocks until they are read).
    pub fn new(
        store: Arc<dyn ObjectStore>,
        cache: Arc<Cache>,
        threads: usize,
        window: usize,
        c: Compression,
    ) -> std::io::Result<Prefetcher> {
        let inflight = Arc::new(Mutex::new(HashSet::new()));
        let workers = {
            let (cache, inflight) = (cache.clone(), inflight.clone());
            Workers::spawn(
                "prefetch",
                threads,
                threads.max(1) * 2,
                move |(key, len): (String, usize)| {
                    // Cancelled while queued: the reader got there first.
                    if !inflight.lock().contains(&key) {
                        return;
                    }
                    let r = catch_unwind(AssertUnwindSafe(|| {
                        cache.get_or_fetch(&key, || {
                            // Checked again at the last moment: a reader that got the
                            // block while this job waited for a thread has moved on, and
                            // the block may be evicted by now; fetching it again would be
                            // a GET for nobody. `None` is that cancellation.
                            if !inflight.lock().contains(&key) {
                                return Err(None);
                            }
                            fetch_block(&*store, &cache, c, &key, len).map_err(Some)
                        })
                    }));
                    match r {
                        // The reader fetches it again and reports the error itself.
                        Ok(Err(Some(e))) => {
                            tracing::debug!(key, error = %e, "prefetch failed")
                        }
                        Err(_) => tracing::error!(key, "prefetch panicked"),
                        Ok(Err(None)) | Ok(Ok(_)) => {}
                    }
                    inflight.lock().remove(&key);
                },
            )?
        };
        Ok(Prefetcher {
            workers,
            cache,
            inflight,
            unread: Mutex::new(Window::default()),
            window,
            unread_for: UNREAD_FOR,
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

    /// Fetch `key` into RAM in the background (from a disk tier or the store) for the
    /// sequential reader of `reader`, unless it is there or already on its way, the window
    /// for blocks fetched ahead is full, or this reader holds its share of it; never blocks.
    ///
    /// The share is the window split between the readers holding room in it, so a stream
    /// that starts beside another gets read-ahead as the first one reads on, instead of
    /// the first taking back each slot it frees.
    pub fn request(&self, reader: Ino, key: String, len: usize) {
        let ram = self.cache.tiers().first();
        if ram.is_some_and(|t| t.contains(&key)) || self.inflight.lock().contains(&key) {
            return;
        }
        {
            let mut w = self.unread.lock();
            let now = Instant::now();
            if w.unread.len() >= self.window {
                // What is no longer on its way nor in RAM (evicted) holds no room any more,
                // nor what waits in RAM longer than a reader would (it read a file's head
                // and left: on an idle cache nothing would push its blocks out).
                let inflight = self.inflight.lock();
                w.unread.retain(|k, (asked, _)| {
                    inflight.contains(k)
                        || (now.duration_since(*asked) < self.unread_for
                            && ram.is_some_and(|t| t.contains(k)))
                });
            }
            w.waiting
                .retain(|_, at| now.duration_since(*at) < WAITING_FOR);
            // The readers sharing the window: those holding room in it, those refused room
            // lately, and this one.
            let mut readers: Vec<Ino> = w.unread.values().map(|(_, r)| *r).collect();
            let mine = readers.iter().filter(|r| **r == reader).count();
            readers.extend(w.waiting.keys().copied());
            readers.push(reader);
            readers.sort_unstable();
            readers.dedup();
            let share = (self.window / readers.len()).max(1);
            if w.unread.len() >= self.window || mine >= share {
                w.waiting.insert(reader, now);
                return;
            }
            if !self.inflight.lock().insert(key.clone()) {
                return;
            }
            w.waiting.remove(&reader);
            w.unread.insert(key.clone(), (now, reader));
        }
        if !self.workers.try_send((key.clone(), len)) {
            self.inflight.lock().remove(&key);
            self.unread.lock().unread.remove(&key);
        }
    }

    /// The reader has `key` (fetched it itself or found it cached): a request for it still
    /// queued is dropped. Run later, it would find the block evicted by then (the reader
    /// has moved on) and fetch it a second time for nobody. Its room in the window is free.
    pub fn cancel(&self, key: &str) {
        self.inflight.lock().remove(key);
        self.unread.lock().unread.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{codec, keys::block_key};

    #[test]
    fn reads_near_the_last_end_are_sequential() {
        let c = Arc::new(Cache::memory(1 << 20));
        let p = Prefetcher::new(
            Arc::new(aquifer_object::MemStore::new()),
            c,
            1,
            8,
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

    /// Payload bytes of each test block.
    const LEN: u32 = 1000;

    /// A prefetcher of `threads` threads and a window of `window` blocks over a store
    /// holding `keys` (blocks of `LEN` bytes), with a 1 MiB RAM cache (room to spare: only
    /// a test evicts).
    fn fixture(keys: &[String], threads: usize, window: usize) -> (Prefetcher, Arc<Cache>) {
        let store = Arc::new(aquifer_object::MemStore::new());
        for k in keys {
            let obj = codec::seal_with(Compression::None, vec![1; LEN as usize]);
            store.put(k, obj).unwrap();
        }
        let cache = Arc::new(Cache::memory(1 << 20));
        let p = Prefetcher::new(store, cache.clone(), threads, window, Compression::None).unwrap();
        (p, cache)
    }

    /// Wait until no fetch is on its way.
    fn settle(p: &Prefetcher) {
        while !p.inflight.lock().is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// `n` block keys of slice `id`.
    fn blocks(id: u64, n: u32) -> Vec<String> {
        (0..n).map(|i| block_key(id, i, LEN)).collect()
    }

    #[test]
    fn blocks_fetched_ahead_and_not_read_are_bounded_for_all_readers() {
        let keys = blocks(7, 6);
        let (p, cache) = fixture(&keys, 2, 2);
        let cached = || keys.iter().filter(|k| cache.contains(k)).count();
        let ask_all = || {
            for (r, k) in keys.iter().enumerate() {
                p.request(r as Ino, k.clone(), LEN as usize);
            }
            settle(&p);
        };
        // Six readers each ask for their next block: two are fetched, the rest wait for room.
        ask_all();
        assert_eq!(cached(), 2);
        // A reader takes its block: its room goes to the next request.
        p.cancel(&keys[0]);
        ask_all();
        assert_eq!(cached(), 3);
        // A block evicted before its reader came holds no room either: asked again, it is
        // fetched again, and the window is still full.
        cache.tiers()[0].remove(&keys[1]);
        ask_all();
        assert!(cache.contains(&keys[1]));
        assert_eq!(cached(), 3);
    }

    #[test]
    fn blocks_fetched_ahead_for_a_reader_that_left_free_their_room_in_time() {
        let keys = blocks(7, 4);
        let (mut p, cache) = fixture(&keys, 1, 2);
        p.unread_for = std::time::Duration::from_secs(1);
        p.request(1, keys[0].clone(), LEN as usize);
        p.request(1, keys[1].clone(), LEN as usize);
        settle(&p);
        // Their reader never comes: the window is full for now...
        p.request(1, keys[2].clone(), LEN as usize);
        settle(&p);
        assert!(!cache.contains(&keys[2]));
        // ...and free once they waited longer than a reader would.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        p.request(1, keys[2].clone(), LEN as usize);
        p.request(1, keys[3].clone(), LEN as usize);
        settle(&p);
        assert!(cache.contains(&keys[2]) && cache.contains(&keys[3]));
    }

    #[test]
    fn a_stream_that_starts_beside_another_gets_its_share_of_the_window() {
        let (a, b) = (blocks(100, 6), blocks(200, 6));
        let (p, cache) = fixture(&[a.clone(), b.clone()].concat(), 2, 4);
        // Reader 1 alone takes the whole window.
        for k in &a[..4] {
            p.request(1, k.clone(), LEN as usize);
        }
        settle(&p);
        p.request(2, b[0].clone(), LEN as usize);
        settle(&p);
        assert!(!cache.contains(&b[0]), "the window was full");
        // Reader 1 reads a block and asks for the next: it holds more than half of the
        // window now that reader 2 waits, so the freed room goes to reader 2.
        p.cancel(&a[0]);
        p.request(1, a[4].clone(), LEN as usize);
        p.request(2, b[0].clone(), LEN as usize);
        settle(&p);
        assert!(!cache.contains(&a[4]));
        assert!(cache.contains(&b[0]));
    }
}
