//! Serving the other members of a peer cache group: the blocks this mount's cache holds,
//! or fetches from the store for them — once, however many members and local readers ask
//! at the same time (one single-flight map for all), and never from another member.

use super::fetch_block;
use crate::store::keys::BlockKey;
use crate::ChunkStore;
use aquifer_cache::{Block, Tier};
use std::sync::Arc;

impl ChunkStore {
    /// The slowest tier on this node (the disk, when there is one).
    pub(crate) fn last_local_tier(&self) -> Option<Arc<dyn Tier>> {
        self.cache
            .tiers()
            .iter()
            .rev()
            .find(|t| !t.remote())
            .cloned()
    }
}

impl aquifer_group::Source for ChunkStore {
    fn fetch(&self, key: &str) -> Result<Block, String> {
        let k = BlockKey::parse(key).ok_or_else(|| format!("{key:?} is not a block key"))?;
        let c = self.cfg.compression;
        self.cache
            .get_or_fetch_local(key, || {
                fetch_block(&*self.store, &self.cache, c, key, k.len as usize)
            })
            .map_err(|e| e.to_string())
    }

    fn warm(&self, key: &str) -> Result<(), String> {
        let block = self.fetch(key)?;
        // As a local warm-up does (`cache_range`): a busy disk drops what readers offer,
        // but a warm-up must land before the asker counts the block as cached.
        if let Some(last) = self.last_local_tier() {
            if !last.contains(key) {
                last.admit(key, &block);
                last.flush();
            }
        }
        Ok(())
    }

    fn holds(&self, key: &str) -> bool {
        self.last_local_tier().is_some_and(|t| t.contains(key))
    }

    fn drop_block(&self, key: &str) {
        self.cache.remove(key);
    }
}
