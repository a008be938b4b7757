//! Block caches as composable tiers.
//!
//! A [`Cache`] is an ordered list of [`Tier`]s — RAM first, local disks next — in front of
//! the object store. A read asks each tier in turn and fills the faster tiers on the way
//! back; a block found nowhere is fetched from the store once, however many readers want it
//! at the same time ([`Cache::get_or_fetch`]), and enters every tier.
//!
//! Blocks are immutable and their keys are never reused (a rewrite makes a new slice with a
//! new id), so a cached block is never stale: tiers need no invalidation, only bounds. A
//! tier that fails is a miss, never an error: the store still has the block.

mod disk;
pub mod file;
mod mem;
mod policy;
mod spread;

pub use disk::{private_dir, DiskConfig, DiskTier};
pub use mem::MemTier;
pub use spread::Spread;

use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A whole, verified block.
pub type Block = Arc<Vec<u8>>;

/// One level of the cache.
pub trait Tier: Send + Sync {
    /// For logs and figures: "memory", "disk /path".
    fn name(&self) -> String;
    /// The block, counting as one access for eviction.
    fn get(&self, key: &str) -> Option<Block>;
    /// As [`Tier::get`], and whether the tier counted a new access (not one within the
    /// same pass over the block): only those are passed on to slower tiers
    /// ([`Tier::touch`]).
    fn get_counted(&self, key: &str) -> Option<(Block, bool)> {
        self.get(key).map(|b| (b, true))
    }
    /// Whether the block is held, without counting an access.
    fn contains(&self, key: &str) -> bool;
    /// Count an access to a block a faster tier answered: a block every epoch reads from
    /// RAM is still the hot set on disk, where it must outlast a scan once RAM lets it go.
    fn touch(&self, _key: &str) {}
    /// Offer a block; the tier may decline it (too large, full of blocks it must keep, out
    /// of use).
    fn insert(&self, key: &str, block: &Block);
    fn remove(&self, key: &str);
    fn usage(&self) -> Usage;
    /// Whether blocks just written to the store are offered to this tier (write-through).
    fn writes_through(&self) -> bool {
        true
    }
    /// Wait until blocks offered so far are stored (a tier that writes in the background).
    fn flush(&self) {}
    /// As [`Tier::insert`], but waiting for room where the tier would drop the block for
    /// being busy (a warm-up must land; a reader's offer need not).
    fn admit(&self, key: &str, block: &Block) {
        self.insert(key, block)
    }
    /// The whole-file copy kept under `key` if its stamp is `stamp` and its bytes check,
    /// opened read-only (for FUSE passthrough). Tiers that keep no copies have none.
    fn whole_open(&self, _key: &str, _stamp: &[u8]) -> Option<File> {
        None
    }
    /// Keep a whole-file copy of `len` bytes, written by `fill`, under `key` with `stamp`,
    /// replacing any older one. False when the tier keeps no copies or has no room for it
    /// without eviction (a copy must not push out the blocks it was built from).
    fn whole_put(&self, _key: &str, _stamp: &[u8], _len: u64, _fill: &mut Fill<'_>) -> bool {
        false
    }
    /// Whether the tier is on another machine: asked only by the thread that fetches a
    /// block for everyone, after the local tiers missed ([`Cache::get_or_fetch`]), never by
    /// [`Cache::get`] or [`Cache::contains`], and skipped by [`Cache::get_or_fetch_local`].
    fn remote(&self) -> bool {
        false
    }
}

/// Writes a whole file's bytes, in order, to the sink it is given.
pub type Fill<'a> = dyn FnMut(&mut dyn io::Write) -> io::Result<()> + 'a;

/// What a tier holds, counted as its medium holds it (allocations, not payload bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub entries: u64,
    pub capacity: u64,
    /// Blocks evicted since the tier started.
    pub evicted: u64,
}

/// Lookups answered by one tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hits {
    pub hits: u64,
    pub misses: u64,
}

/// Where evicted block buffers go, and fetches take their buffers from, so that reading does
/// not map and fault in a fresh 4 MiB buffer per block.
pub trait Recycle: Send + Sync {
    /// An empty buffer for a fetch of `want` bytes.
    fn take(&self, want: usize) -> Vec<u8>;
    fn give(&self, buf: Vec<u8>);
}

/// The tiers in order, with single-flight fetches from the store behind them.
pub struct Cache {
    tiers: Vec<Arc<dyn Tier>>,
    /// Per tier: lookups it answered, lookups that went past it.
    hits: Vec<(AtomicU64, AtomicU64)>,
    inflight: Mutex<HashMap<String, Arc<Flight>>>,
    recycle: Option<Arc<dyn Recycle>>,
}

/// One fetch in progress; `done` holds its outcome (None: it failed) once finished.
#[derive(Default)]
struct Flight {
    done: Mutex<Option<Option<Block>>>,
    cv: Condvar,
}

impl Cache {
    pub fn new(tiers: Vec<Arc<dyn Tier>>) -> Cache {
        Cache {
            hits: tiers.iter().map(|_| Default::default()).collect(),
            tiers,
            inflight: Mutex::new(HashMap::new()),
            recycle: None,
        }
    }

    /// One RAM tier of `cap` bytes.
    pub fn memory(cap: usize) -> Cache {
        Cache::new(vec![Arc::new(MemTier::new(cap))])
    }

    /// Fetches take their buffers from `r` ([`Cache::buffer`]).
    pub fn with_recycler(mut self, r: Arc<dyn Recycle>) -> Cache {
        self.recycle = Some(r);
        self
    }

    pub fn tiers(&self) -> &[Arc<dyn Tier>] {
        &self.tiers
    }

    /// A buffer for a fetch of `want` bytes: a recycled one when there is one.
    pub fn buffer(&self, want: usize) -> Vec<u8> {
        self.recycle
            .as_ref()
            .map(|r| r.take(want))
            .unwrap_or_default()
    }

    /// The block from the first local tier that has it; the tiers before it get a copy.
    pub fn get(&self, key: &str) -> Option<Block> {
        for (i, t) in self.tiers.iter().enumerate() {
            if t.remote() {
                continue;
            }
            if let Some((b, counted)) = t.get_counted(key) {
                self.hits[i].0.fetch_add(1, Ordering::Relaxed);
                for up in &self.tiers[..i] {
                    up.insert(key, &b);
                }
                // A kernel read of one block arrives as many requests: the tiers below
                // hear of a new access only, not of each request (one index lock each).
                for down in self.tiers[i + 1..].iter().filter(|_| counted) {
                    if !down.remote() {
                        down.touch(key);
                    }
                }
                return Some(b);
            }
            self.hits[i].1.fetch_add(1, Ordering::Relaxed);
        }
        None
    }

    /// Hits and misses of each tier, in order.
    pub fn hits(&self) -> Vec<Hits> {
        self.hits
            .iter()
            .map(|(h, m)| Hits {
                hits: h.load(Ordering::Relaxed),
                misses: m.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// A block just written to the store: offered to the tiers that keep writes. A single
    /// pass of written blocks enters their small queues, so a burst of checkpoint writes
    /// does not displace the blocks every epoch reads.
    pub fn write_through(&self, key: &str, block: &Block) {
        for t in &self.tiers {
            if t.writes_through() {
                t.insert(key, block);
            }
        }
    }

    /// Offer a block to every tier, waiting where a tier is busy ([`Tier::admit`]).
    pub fn admit(&self, key: &str, block: &Block) {
        for t in &self.tiers {
            t.admit(key, block);
        }
    }

    /// Whether any tier below RAM keeps written blocks.
    pub fn keeps_writes(&self) -> bool {
        self.tiers.iter().any(|t| t.writes_through())
    }

    /// Wait for every tier to store what it was offered.
    pub fn flush(&self) {
        for t in &self.tiers {
            t.flush();
        }
    }

    /// Whether a local tier holds the block.
    pub fn contains(&self, key: &str) -> bool {
        self.tiers.iter().any(|t| !t.remote() && t.contains(key))
    }

    /// Offer a block to every tier.
    pub fn insert(&self, key: &str, block: &Block) {
        for t in &self.tiers {
            t.insert(key, block);
        }
    }

    pub fn remove(&self, key: &str) {
        for t in &self.tiers {
            t.remove(key);
        }
    }

    /// The first whole-file copy a tier holds for `key` with `stamp` ([`Tier::whole_open`]).
    pub fn whole_open(&self, key: &str, stamp: &[u8]) -> Option<File> {
        self.tiers.iter().find_map(|t| t.whole_open(key, stamp))
    }

    /// Keep a whole-file copy in the first tier that takes it ([`Tier::whole_put`]).
    pub fn whole_put(&self, key: &str, stamp: &[u8], len: u64, fill: &mut Fill<'_>) -> bool {
        self.tiers
            .iter()
            .any(|t| t.whole_put(key, stamp, len, fill))
    }

    /// Bytes held by all tiers.
    pub fn bytes(&self) -> u64 {
        self.tiers.iter().map(|t| t.usage().bytes).sum()
    }

    /// The cached block `key`, or the result of `fetch` run by exactly one of the threads
    /// asking for it at the same time: the kernel sends several read-ahead requests of one
    /// file at once, and a prefetcher may be fetching the block a reader has just reached.
    /// A fetched block enters every tier. The thread that fetches asks the remote tiers
    /// first ([`Tier::remote`]).
    pub fn get_or_fetch<E>(
        &self,
        key: &str,
        fetch: impl FnOnce() -> Result<Block, E>,
    ) -> Result<Block, E> {
        self.fetch_once(key, true, fetch)
    }

    /// As [`Cache::get_or_fetch`], without asking the remote tiers: how a member of a peer
    /// group serves the others (a member never forwards a request, so two members whose
    /// views of the group differ cannot send one back and forth).
    pub fn get_or_fetch_local<E>(
        &self,
        key: &str,
        fetch: impl FnOnce() -> Result<Block, E>,
    ) -> Result<Block, E> {
        self.fetch_once(key, false, fetch)
    }

    /// The block from a remote tier that has it (counted as its hit); the local tiers get
    /// a copy.
    fn get_remote(&self, key: &str) -> Option<Block> {
        for (i, t) in self.tiers.iter().enumerate() {
            if !t.remote() {
                continue;
            }
            if let Some(b) = t.get(key) {
                self.hits[i].0.fetch_add(1, Ordering::Relaxed);
                return Some(b);
            }
            self.hits[i].1.fetch_add(1, Ordering::Relaxed);
        }
        None
    }

    fn fetch_once<E>(
        &self,
        key: &str,
        remote: bool,
        fetch: impl FnOnce() -> Result<Block, E>,
    ) -> Result<Block, E> {
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
        let r = match remote.then(|| self.get_remote(key)).flatten() {
            Some(b) => Ok(b),
            None => fetch(),
        };
        if let Ok(b) = &r {
            self.insert(key, b);
        }
        *flight.done.lock() = Some(r.as_ref().ok().cloned());
        drop(landing);
        r
    }
}

/// Ends a flight when the leader is done with it: a leader that panicked leaves it failed
/// (`Some(None)`), so its waiters fetch for themselves instead of waiting for ever.
struct Landing<'a> {
    cache: &'a Cache,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn block(n: usize, fill: u8) -> Block {
        Arc::new(vec![fill; n])
    }

    #[test]
    fn concurrent_requests_for_a_block_fetch_it_once() {
        let cache = Arc::new(Cache::memory(1 << 20));
        let fetches = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, fetches) = (cache.clone(), fetches.clone());
                std::thread::spawn(move || {
                    cache
                        .get_or_fetch::<()>("k", || {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok(block(1000, 7))
                        })
                        .unwrap()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap()[0], 7);
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_fetch_that_panics_releases_its_waiters() {
        let cache = Arc::new(Cache::memory(1 << 20));
        let leader = {
            let cache = cache.clone();
            std::thread::spawn(move || {
                let _ = cache.get_or_fetch::<()>("k", || {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    panic!("injected")
                });
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        // Waits on the leader's flight, then fetches for itself.
        let b = cache.get_or_fetch::<()>("k", || Ok(block(10, 1))).unwrap();
        assert_eq!(b[0], 1);
        assert!(leader.join().is_err());
    }

    #[test]
    fn a_hit_in_a_lower_tier_fills_the_upper_ones() {
        let ram = Arc::new(MemTier::new(1 << 20));
        let lower = Arc::new(MemTier::new(1 << 20));
        let cache = Cache::new(vec![ram.clone(), lower.clone()]);
        lower.insert("k", &block(100, 3));
        assert!(!ram.contains("k"));
        assert_eq!(cache.get("k").unwrap()[0], 3);
        assert!(ram.contains("k"));
        // A fetched block enters every tier.
        cache.get_or_fetch::<()>("f", || Ok(block(10, 4))).unwrap();
        assert!(ram.contains("f") && lower.contains("f"));
    }

    /// A tier that counts its lookups and answers from a map: another node's cache.
    #[derive(Default)]
    struct Remote {
        held: Mutex<HashMap<String, Block>>,
        asked: AtomicUsize,
    }

    impl Tier for Remote {
        fn name(&self) -> String {
            "remote".into()
        }
        fn get(&self, key: &str) -> Option<Block> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(30));
            self.held.lock().get(key).cloned()
        }
        fn contains(&self, _key: &str) -> bool {
            panic!("a remote tier is not asked whether it holds a block")
        }
        fn insert(&self, _key: &str, _block: &Block) {}
        fn remove(&self, _key: &str) {}
        fn usage(&self) -> Usage {
            Usage::default()
        }
        fn remote(&self) -> bool {
            true
        }
    }

    #[test]
    fn a_remote_tier_is_asked_once_per_fetch_and_fills_the_local_ones() {
        let ram = Arc::new(MemTier::new(1 << 20));
        let remote = Arc::new(Remote::default());
        remote.held.lock().insert("k".into(), block(10, 9));
        let cache = Arc::new(Cache::new(vec![ram.clone(), remote.clone()]));
        assert!(cache.get("k").is_none() && !cache.contains("k"));
        assert_eq!(remote.asked.load(Ordering::SeqCst), 0);
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let cache = cache.clone();
                std::thread::spawn(move || {
                    cache
                        .get_or_fetch::<()>("k", || panic!("the remote tier had it"))
                        .unwrap()[0]
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 9);
        }
        assert_eq!(remote.asked.load(Ordering::SeqCst), 1);
        assert!(ram.contains("k"));
        assert_eq!(cache.hits()[1], Hits { hits: 1, misses: 0 });
        // A remote miss falls to the fetch; the local variant never asks.
        assert_eq!(
            cache.get_or_fetch::<()>("m", || Ok(block(3, 2))).unwrap()[0],
            2
        );
        assert_eq!(remote.asked.load(Ordering::SeqCst), 2);
        cache
            .get_or_fetch_local::<()>("n", || Ok(block(3, 1)))
            .unwrap();
        assert_eq!(remote.asked.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_failed_fetch_is_the_callers_error_and_caches_nothing() {
        let cache = Cache::memory(1 << 20);
        assert_eq!(
            cache.get_or_fetch("k", || Err::<Block, _>("down")),
            Err("down")
        );
        assert!(!cache.contains("k"));
    }
}
