//! S3-FIFO eviction (Yang et al., SOSP 2023), shared by the RAM and disk tiers.
//!
//! A small FIFO (a tenth of the space, or the read-ahead window if larger) takes new
//! blocks, a main FIFO the blocks read again. A block that leaves the small queue unread
//! since it came in is dropped and only its key is remembered (the ghost queue); one that
//! was read again moves to main. A miss on a remembered key goes straight to main. So a
//! single pass over more data than the cache — a scan of a huge file, a burst of checkpoint
//! writes — flows through the small queue and leaves main, the blocks every epoch reads,
//! alone. Main evicts like CLOCK: a block read since it was last considered goes round again.
//!
//! The policy only orders keys and counts their weights; what an entry holds (a buffer, a
//! file's size) is the tier's business.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// Frequency saturates here: a block survives at most this many passes of main's hand.
const FREQ_MAX: u8 = 3;

pub(crate) struct Entry<V> {
    pub value: V,
    /// What it costs the medium: an allocation, a file's blocks.
    pub weight: u64,
    pub freq: u8,
    last: Instant,
    pub in_main: bool,
    /// Queue slots carry it; a slot whose generation differs is stale (removed since).
    gen: u64,
}

pub(crate) struct S3Fifo<V> {
    pub map: HashMap<String, Entry<V>>,
    small: VecDeque<(String, u64)>,
    main: VecDeque<(String, u64)>,
    pub small_bytes: u64,
    pub main_bytes: u64,
    ghost: HashSet<String>,
    ghost_order: VecDeque<String>,
    gen: u64,
    /// Entries evicted so far (kept by the tier: the policy only counts).
    pub evicted: u64,
}

impl<V> Default for S3Fifo<V> {
    fn default() -> Self {
        S3Fifo {
            map: HashMap::new(),
            small: VecDeque::new(),
            main: VecDeque::new(),
            small_bytes: 0,
            main_bytes: 0,
            ghost: HashSet::new(),
            ghost_order: VecDeque::new(),
            gen: 0,
            evicted: 0,
        }
    }
}

impl<V> S3Fifo<V> {
    pub fn bytes(&self) -> u64 {
        self.small_bytes + self.main_bytes
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// The entry, counting an access unless the previous one was less than `rehit` ago (the
    /// kernel reads one block as many requests, and one pass must not look like reuse);
    /// and whether it counted one.
    pub fn access(&mut self, key: &str, rehit: Duration) -> Option<(&V, bool)> {
        let e = self.map.get_mut(key)?;
        let now = Instant::now();
        let counted = now.duration_since(e.last) >= rehit;
        if counted {
            e.freq = (e.freq + 1).min(FREQ_MAX);
        }
        e.last = now;
        Some((&e.value, counted))
    }

    /// Add an entry (false if the key is held already). `reused` puts it straight into main:
    /// an entry found again when a disk tier's index is rebuilt was worth keeping before.
    pub fn insert(&mut self, key: &str, value: V, weight: u64, reused: bool) -> bool {
        if self.map.contains_key(key) {
            return false;
        }
        self.gen += 1;
        let gen = self.gen;
        let to_main = self.ghost.remove(key) || reused;
        let slot = (key.to_string(), gen);
        if to_main {
            self.main_bytes += weight;
            self.main.push_back(slot);
        } else {
            self.small_bytes += weight;
            self.small.push_back(slot);
        }
        self.map.insert(
            key.to_string(),
            Entry {
                value,
                weight,
                freq: 0,
                last: Instant::now(),
                in_main: to_main,
                gen,
            },
        );
        true
    }

    pub fn remove(&mut self, key: &str) -> Option<Entry<V>> {
        let e = self.map.remove(key)?;
        if e.in_main {
            self.main_bytes -= e.weight;
        } else {
            self.small_bytes -= e.weight;
        }
        self.compact_queues();
        Some(e)
    }

    /// Evict until at most `target` bytes are held, the small queue kept near `small_cap`;
    /// the evicted entries, with their keys.
    pub fn evict_to(&mut self, target: u64, small_cap: u64) -> Vec<(String, Entry<V>)> {
        let mut out = Vec::new();
        while self.bytes() > target {
            if !self.evict_one(small_cap, &mut out) {
                break;
            }
        }
        self.compact_queues();
        out
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

    fn live(&self, slot: &(String, u64)) -> bool {
        self.map.get(&slot.0).is_some_and(|e| e.gen == slot.1)
    }

    /// Evict one entry (or move one from small to main); false when both queues are empty.
    fn evict_one(&mut self, small_cap: u64, out: &mut Vec<(String, Entry<V>)>) -> bool {
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
                self.remember(slot.0.clone());
                out.push((slot.0, e));
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
            let e = self.map.remove(&slot.0).expect("live");
            out.push((slot.0, e));
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
