//! Several disks as one tier: each block lives on the disk its key hashes to, so a node's
//! NVMe drives share the load and the quota, and a failed disk costs only its share.

use crate::{disk::key_hash, Block, Fill, Tier, Usage};
use std::fs::File;
use std::sync::Arc;

pub struct Spread {
    parts: Vec<Arc<dyn Tier>>,
}

impl Spread {
    /// At least one part.
    pub fn new(parts: Vec<Arc<dyn Tier>>) -> Spread {
        assert!(!parts.is_empty(), "a spread of no tiers");
        Spread { parts }
    }

    pub fn parts(&self) -> &[Arc<dyn Tier>] {
        &self.parts
    }

    fn part(&self, key: &str) -> &Arc<dyn Tier> {
        // The high bits: the low ones choose the directory inside a disk.
        let h = (key_hash(key) >> 8) as usize;
        &self.parts[h % self.parts.len()]
    }
}

impl Tier for Spread {
    fn name(&self) -> String {
        let names: Vec<String> = self.parts.iter().map(|p| p.name()).collect();
        names.join(", ")
    }

    fn get(&self, key: &str) -> Option<Block> {
        self.part(key).get(key)
    }

    fn contains(&self, key: &str) -> bool {
        self.part(key).contains(key)
    }

    fn insert(&self, key: &str, block: &Block) {
        self.part(key).insert(key, block)
    }

    fn remove(&self, key: &str) {
        self.part(key).remove(key)
    }

    fn admit(&self, key: &str, block: &Block) {
        self.part(key).admit(key, block)
    }

    fn usage(&self) -> Usage {
        let mut u = Usage::default();
        for p in &self.parts {
            let x = p.usage();
            u.bytes += x.bytes;
            u.entries += x.entries;
            u.capacity += x.capacity;
            u.evicted += x.evicted;
        }
        u
    }

    fn writes_through(&self) -> bool {
        self.parts.iter().any(|p| p.writes_through())
    }

    fn flush(&self) {
        for p in &self.parts {
            p.flush();
        }
    }

    fn whole_open(&self, key: &str, stamp: &[u8]) -> Option<File> {
        self.part(key).whole_open(key, stamp)
    }

    fn whole_put(&self, key: &str, stamp: &[u8], len: u64, fill: &mut Fill<'_>) -> bool {
        self.part(key).whole_put(key, stamp, len, fill)
    }
}
