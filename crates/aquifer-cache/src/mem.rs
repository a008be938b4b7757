//! The RAM tier: S3-FIFO eviction over whole blocks, bounded by the bytes it pins.
//!
//! S3-FIFO (Yang et al., SOSP 2023) keeps a small FIFO (a tenth of the space) for new
//! blocks and a main FIFO for blocks read again. A block that leaves the small queue unread
//! since it came in is dropped and only its key is remembered (the ghost queue); one that
//! was read again moves to main. A miss on a remembered key goes straight to main. So a
//! single pass over more data than the cache — a scan of a huge file, a burst of checkpoint
//! writes — flows through the small queue and leaves main, the blocks every epoch reads,
//! alone. Main evicts like CLOCK: a block read since it was last considered goes round again.
//!
//! The kernel reads a 4 MiB block as many 128 KiB requests, each a lookup here; lookups of a
//! block within `rehit` of the previous one count as the same access, so one sequential pass
//! never looks like reuse.

use crate::{Block, Recycle, Tier, Usage};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Lookups closer together than this are one access.
const REHIT: Duration = Duration::from_secs(1);
/// Frequency saturates here: a block survives at most this many passes of main's hand.
const FREQ_MAX: u8 = 3;

pub struct MemTier {
    cap: usize,
    /// What the small queue may hold before it gives way (a tenth, or more: see
    /// [`MemTier::with_small`]).
    small_cap: usize,
    rehit: Duration,
    recycle: Option<Arc<dyn Recycle>>,
    st: Mutex<State>,
}

struct Entry {
    data: Block,
    /// What it pins: the allocation, not the payload.
    weight: usize,
    freq: u8,
    last: Instant,
    in_main: bool,
    /// Queue slots carry it; a slot whose generation differs is stale (removed since).
    gen: u64,
}

#[derive(Default)]
struct State {
    map: HashMap<String, Entry>,
    small: VecDeque<(String, u64)>,
    main: VecDeque<(String, u64)>,
    small_bytes: usize,
    main_bytes: usize,
    ghost: HashSet<String>,
    ghost_order: VecDeque<String>,
    gen: u64,
}

impl MemTier {
    pub fn new(cap: usize) -> MemTier {
        MemTier {
            cap,
            small_cap: cap / 10,
            rehit: REHIT,
            recycle: None,
            st: Mutex::new(State::default()),
        }
    }

    /// Evicted blocks nobody else holds are given back to `r`.
    pub fn with_recycler(mut self, r: Arc<dyn Recycle>) -> MemTier {
        self.recycle = Some(r);
        self
    }

    /// Let the small queue hold at least `bytes` (at most half the tier): blocks fetched
    /// ahead of a sequential reader wait there until it reaches them, and a small queue
    /// narrower than the read-ahead window would evict them first.
    pub fn with_small(mut self, bytes: usize) -> MemTier {
        self.small_cap = self.small_cap.max(bytes.min(self.cap / 2));
        self
    }

    /// Lookups closer together than `d` count as one access (tests use zero).
    pub fn with_rehit(mut self, d: Duration) -> MemTier {
        self.rehit = d;
        self
    }

    fn drop_entry(&self, e: Entry) {
        // Readers may still hold it; then it is simply freed when they are done.
        if let (Some(r), Ok(v)) = (&self.recycle, Arc::try_unwrap(e.data)) {
            r.give(v);
        }
    }
}

impl State {
    fn bytes(&self) -> usize {
        self.small_bytes + self.main_bytes
    }

    fn remember(&mut self, key: String) {
        // As many ghosts as there are live entries (at least a few): enough to recognise a
        // block coming back after one pass of the small queue.
        let cap = self.map.len().max(64);
        while self.ghost_order.len() >= cap {
            if let Some(k) = self.ghost_order.pop_front() {
                self.ghost.remove(&k);
            }
        }
        if self.ghost.insert(key.clone()) {
            self.ghost_order.push_back(key);
        }
    }

    /// Take the entry at the front of a queue if the slot is current.
    fn live(&self, slot: &(String, u64)) -> bool {
        self.map.get(&slot.0).is_some_and(|e| e.gen == slot.1)
    }

    /// Evict one block (or move one from small to main); false when both queues are empty.
    fn evict_one(&mut self, small_cap: usize, dropped: &mut Vec<Entry>) -> bool {
        let small_over = self.small_bytes > small_cap || self.main.is_empty();
        if small_over && !self.small.is_empty() {
            let Some(slot) = self.small.pop_front() else {
                return false;
            };
            if !self.live(&slot) {
                return true;
            }
            let e = self.map.get_mut(&slot.0).expect("live");
            self.small_bytes -= e.weight;
            if e.freq > 0 {
                e.freq = 0;
                e.in_main = true;
                self.main_bytes += e.weight;
                self.main.push_back(slot);
            } else {
                let e = self.map.remove(&slot.0).expect("live");
                dropped.push(e);
                self.remember(slot.0);
            }
            return true;
        }
        let Some(slot) = self.main.pop_front() else {
            return false;
        };
        if !self.live(&slot) {
            return true;
        }
        let e = self.map.get_mut(&slot.0).expect("live");
        if e.freq > 0 {
            e.freq -= 1;
            self.main.push_back(slot);
        } else {
            self.main_bytes -= e.weight;
            dropped.push(self.map.remove(&slot.0).expect("live"));
        }
        true
    }

    /// Stale slots of removed entries would otherwise pile up under a remove-heavy load.
    fn compact_queues(&mut self) {
        if self.small.len() + self.main.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            let live = |s: &(String, u64)| map.get(&s.0).is_some_and(|e| e.gen == s.1);
            self.small.retain(live);
            self.main.retain(live);
        }
    }
}

impl Tier for MemTier {
    fn name(&self) -> String {
        "memory".into()
    }

    fn get(&self, key: &str) -> Option<Block> {
        let mut st = self.st.lock();
        let e = st.map.get_mut(key)?;
        let now = Instant::now();
        if now.duration_since(e.last) >= self.rehit {
            e.freq = (e.freq + 1).min(FREQ_MAX);
        }
        e.last = now;
        Some(e.data.clone())
    }

    fn contains(&self, key: &str) -> bool {
        self.st.lock().map.contains_key(key)
    }

    fn insert(&self, key: &str, block: &Block) {
        let weight = block.capacity().max(block.len());
        if weight > self.cap {
            return;
        }
        let mut dropped = Vec::new();
        {
            let mut st = self.st.lock();
            if st.map.contains_key(key) {
                return;
            }
            st.gen += 1;
            let gen = st.gen;
            let to_main = st.ghost.remove(key);
            let slot = (key.to_string(), gen);
            if to_main {
                st.main_bytes += weight;
                st.main.push_back(slot);
            } else {
                st.small_bytes += weight;
                st.small.push_back(slot);
            }
            st.map.insert(
                key.to_string(),
                Entry {
                    data: block.clone(),
                    weight,
                    freq: 0,
                    last: Instant::now(),
                    in_main: to_main,
                    gen,
                },
            );
            while st.bytes() > self.cap {
                if !st.evict_one(self.small_cap, &mut dropped) {
                    break;
                }
            }
            st.compact_queues();
        }
        for e in dropped {
            self.drop_entry(e);
        }
    }

    fn remove(&self, key: &str) {
        let e = {
            let mut st = self.st.lock();
            let Some(e) = st.map.remove(key) else { return };
            if e.in_main {
                st.main_bytes -= e.weight;
            } else {
                st.small_bytes -= e.weight;
            }
            st.compact_queues();
            e
        };
        self.drop_entry(e);
    }

    fn usage(&self) -> Usage {
        let st = self.st.lock();
        Usage {
            bytes: st.bytes() as u64,
            entries: st.map.len() as u64,
            capacity: self.cap as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn block(n: usize) -> Block {
        Arc::new(vec![1u8; n])
    }

    fn tier(cap: usize) -> MemTier {
        MemTier::new(cap).with_rehit(Duration::ZERO)
    }

    #[test]
    fn usage_counts_the_allocation_not_the_payload() {
        let t = tier(1 << 20);
        let mut v = Vec::with_capacity(64 << 10);
        v.extend_from_slice(&[0u8; 100]);
        t.insert("k", &Arc::new(v));
        assert_eq!(t.usage().bytes, 64 << 10);
    }

    #[test]
    fn a_hot_set_survives_a_scan_of_three_times_the_cache() {
        let t = tier(100 * 1000);
        // The hot set: 50 blocks (half the cache), read three times each.
        for i in 0..50 {
            t.insert(&format!("hot{i}"), &block(1000));
        }
        for _ in 0..3 {
            for i in 0..50 {
                t.get(&format!("hot{i}"));
            }
        }
        // Fill the rest and push the hot blocks through the small queue into main.
        for i in 0..300 {
            t.insert(&format!("scan{i}"), &block(1000));
        }
        for i in 0..50 {
            t.get(&format!("hot{i}"));
        }
        // The scan: 3x the cache, each block read once (its fetch is its insert).
        for i in 300..600 {
            t.insert(&format!("scan{i}"), &block(1000));
        }
        let kept = (0..50).filter(|i| t.contains(&format!("hot{i}"))).count();
        assert!(kept >= 45, "only {kept} of 50 hot blocks survived the scan");
        assert!(t.usage().bytes <= 100 * 1000);
    }

    #[test]
    fn blocks_fetched_ahead_wait_in_the_small_queue_while_main_is_full() {
        let t = tier(100 * 1000).with_small(21 * 1000);
        // Main full of blocks read again.
        for i in 0..200 {
            let k = format!("hot{i}");
            t.insert(&k, &block(1000));
            t.get(&k);
        }
        assert!(t.st.lock().main_bytes >= 70 * 1000);
        // A reader's window of 20 blocks fetched ahead (twice the default small queue): all
        // still there when it arrives.
        for i in 0..20 {
            t.insert(&format!("ahead{i}"), &block(1000));
        }
        for i in 0..20 {
            assert!(
                t.contains(&format!("ahead{i}")),
                "ahead{i} was evicted unread"
            );
        }
    }

    #[test]
    fn a_block_back_soon_after_eviction_goes_to_main() {
        let t = tier(10 * 1000);
        t.insert("a", &block(1000));
        for i in 0..20 {
            t.insert(&format!("x{i}"), &block(1000));
        }
        assert!(!t.contains("a"), "evicted unread from the small queue");
        t.insert("a", &block(1000));
        assert!(t.st.lock().map["a"].in_main, "a remembered key enters main");
    }

    #[test]
    fn lookups_of_one_pass_count_once() {
        let t = MemTier::new(1 << 20).with_rehit(Duration::from_secs(3600));
        t.insert("k", &block(10));
        for _ in 0..32 {
            t.get("k");
        }
        assert_eq!(t.st.lock().map["k"].freq, 0);
    }

    struct Bin(Mutex<Vec<Vec<u8>>>);
    impl Recycle for Bin {
        fn take(&self, _want: usize) -> Vec<u8> {
            self.0.lock().pop().unwrap_or_default()
        }
        fn give(&self, buf: Vec<u8>) {
            self.0.lock().push(buf);
        }
    }

    #[test]
    fn evicted_blocks_are_recycled_unless_still_in_use() {
        let bin = Arc::new(Bin(Mutex::new(Vec::new())));
        let t = tier(2000).with_recycler(bin.clone());
        let held = block(1000);
        t.insert("held", &held);
        t.insert("free", &block(1000));
        t.insert("c", &block(1000));
        t.insert("d", &block(1000));
        assert!(!t.contains("held") && !t.contains("free"));
        assert_eq!(
            bin.0.lock().len(),
            1,
            "only the block nobody holds is recycled"
        );
    }

    proptest! {
        /// Against a model: never over the quota, every held key's bytes are the ones
        /// inserted, and a removed key is gone.
        #[test]
        fn matches_a_model(ops in prop::collection::vec((0u8..3, 0u16..40, 1usize..3000), 1..400)) {
            let t = tier(20_000);
            let mut model: HashMap<String, u8> = HashMap::new();
            for (op, k, n) in ops {
                let key = format!("k{k}");
                match op {
                    0 => {
                        let fill = (k % 251) as u8;
                        if !t.contains(&key) {
                            t.insert(&key, &Arc::new(vec![fill; n]));
                            model.insert(key.clone(), fill);
                        }
                    }
                    1 => {
                        if let Some(b) = t.get(&key) {
                            prop_assert_eq!(Some(&b[0]), model.get(&key));
                        }
                    }
                    _ => {
                        t.remove(&key);
                        model.remove(&key);
                        prop_assert!(!t.contains(&key));
                    }
                }
                let u = t.usage();
                prop_assert!(u.bytes <= 20_000);
                let st = t.st.lock();
                let counted: usize = st.map.values().map(|e| e.weight).sum();
                prop_assert_eq!(counted, st.small_bytes + st.main_bytes);
            }
        }
    }
}
