//! Serving the other members of a peer cache group: the blocks this mount's cache holds,
//! or fetches from the store for them — once, however many members and local readers ask
//! at the same time (one single-flight map for all), and never from another member.

use super::fetch_block;
use crate::store::keys::BlockKey;
use crate::ChunkStore;
use aquifer_cache::Block;

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

    fn holds(&self, key: &str) -> bool {
        self.cache.contains(key)
    }

    fn drop_block(&self, key: &str) {
        self.cache.remove(key);
    }
}
