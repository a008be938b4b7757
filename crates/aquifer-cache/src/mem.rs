//! The RAM tier: S3-FIFO eviction ([`crate::policy`]) over whole blocks, bounded by the
//! bytes they pin.
//!
//! The kernel reads a 4 MiB block as many 128 KiB requests, each a lookup here; lookups of a
//! block within `rehit` of the previous one count as the same access, so one sequential pass
//! never looks like reuse.

use crate::policy::{Entry, S3Fifo};
use crate::{Block, Recycle, Tier, Usage};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

/// Lookups closer together than this are one access.
pub(crate) const REHIT: Duration = Duration::from_secs(1);

pub struct MemTier {
    cap: usize,
    /// What the small queue may hold before it gives way (a tenth, or more: see
    /// [`MemTier::with_small`]).
    small_cap: usize,
    rehit: Duration,
    recycle: Option<Arc<dyn Recycle>>,
    st: Mutex<S3Fifo<Block>>,
}

impl MemTier {
    pub fn new(cap: usize) -> MemTier {
        MemTier {
            cap,
            small_cap: cap / 10,
            rehit: REHIT,
            recycle: None,
            st: Mutex::new(S3Fifo::default()),
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

    fn drop_entry(&self, e: Entry<Block>) {
        // Readers may still hold it; then it is simply freed when they are done.
        if let (Some(r), Ok(v)) = (&self.recycle, Arc::try_unwrap(e.value)) {
            r.give(v);
        }
    }
}

impl Tier for MemTier {
    fn name(&self) -> String {
        "memory".into()
    }

    fn get(&self, key: &str) -> Option<Block> {
        self.get_counted(key).map(|(b, _)| b)
    }

    fn get_counted(&self, key: &str) -> Option<(Block, bool)> {
        let mut st = self.st.lock();
        let (b, counted) = st.access(key, self.rehit)?;
        Some((b.clone(), counted))
    }

    fn contains(&self, key: &str) -> bool {
        self.st.lock().contains(key)
    }

    fn touch(&self, key: &str) {
        self.st.lock().access(key, self.rehit);
    }

    /// Written blocks stay out of RAM: the kernel's page cache holds what was just written,
    /// and their buffers go back to the writers.
    fn writes_through(&self) -> bool {
        false
    }

    fn insert(&self, key: &str, block: &Block) {
        let weight = block.capacity().max(block.len());
        if weight > self.cap {
            return;
        }
        let dropped = {
            let mut st = self.st.lock();
            if !st.insert(key, block.clone(), weight as u64, false) {
                return;
            }
            let out = st.evict_to(self.cap as u64, self.small_cap as u64);
            st.evicted += out.len() as u64;
            out
        };
        for (_, e) in dropped {
            self.drop_entry(e);
        }
    }

    fn remove(&self, key: &str) {
        let e = self.st.lock().remove(key);
        if let Some(e) = e {
            self.drop_entry(e);
        }
    }

    fn usage(&self) -> Usage {
        let st = self.st.lock();
        Usage {
            bytes: st.bytes(),
            entries: st.len() as u64,
            capacity: self.cap as u64,
            evicted: st.evicted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

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
                let counted: u64 = st.map.values().map(|e| e.weight).sum();
                prop_assert_eq!(counted, st.small_bytes + st.main_bytes);
            }
        }
    }
}
