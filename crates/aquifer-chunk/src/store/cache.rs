//! The block cache as the data path wires it: RAM first, then the caller's tiers (local
//! disks); evicted blocks give their buffers back to the pool uploads and fetches draw from,
//! and written blocks enter the disk tiers as `--cache-writes` says ([`CacheWrites`]).

use super::codec;
use super::keys::BlockKey;
use crate::write::{BufferPool, OnStored};
use crate::{CacheWrites, Compression, DataConfig};
use aquifer_cache::{Cache, MemTier, Recycle, Tier};
use bytes::Bytes;
use std::sync::Arc;

/// Narrow the read-ahead window to what the cache can hold.
pub(crate) fn fit_readahead(cfg: &mut DataConfig) {
    // Blocks fetched ahead must still be cached when the reader reaches them: a window
    // wider than the cache evicts them first and every block is fetched twice.
    // The cache counts what a block pins: its stored size (checksums included).
    let fit = cfg.cache_bytes / 2 / codec::stored_len(cfg.block_size.max(1) as usize);
    cfg.readahead_blocks = cfg.readahead_blocks.min(fit.max(1) as u32);
}

/// The block cache: the RAM tier, then the caller's (`cfg.lower_tiers`), then the peer
/// group's (`cfg.group`).
pub(crate) fn block_cache(cfg: &DataConfig, buffers: &Arc<BufferPool>) -> Arc<Cache> {
    // The RAM tier, then the caller's; evicted blocks give their buffers back to the
    // pool uploads and fetches draw from.
    let recycle: Arc<dyn Recycle> = buffers.clone();
    let window =
        (cfg.readahead_blocks as usize + 1) * codec::stored_len(cfg.block_size.max(1) as usize);
    let ram = MemTier::new(cfg.cache_bytes)
        .with_small(window)
        .with_recycler(recycle.clone());
    let mut tiers: Vec<Arc<dyn Tier>> = vec![Arc::new(ram)];
    tiers.extend(cfg.lower_tiers.0.iter().cloned());
    // Last, the group: asked only by the thread fetching a block, once every local tier
    // missed ([`Tier::remote`]); what it returns enters the local tiers.
    if let Some(g) = &cfg.group {
        tiers.push(Arc::new(aquifer_group::PeerTier::new(g.clone())));
    }
    Arc::new(Cache::new(tiers).with_recycler(recycle))
}

/// The upload pool's hook that puts written blocks into the disk tiers, when that is done
/// at all.
pub(crate) fn write_through(cfg: &DataConfig, cache: &Arc<Cache>) -> Option<OnStored> {
    // A compressed block's payload is not at hand once sealed, and a compressed volume
    // trades reads for space anyway.
    // Which blocks are offered is the writer's to say (`ChunkStore::upload_sealed`).
    (cfg.compression == Compression::None
        && cfg.cache_writes != CacheWrites::None
        && cache.keeps_writes())
    .then(|| {
        let cache = cache.clone();
        Arc::new(move |key: &BlockKey, name: &str, obj: &Bytes| {
            if let Some(payload) = obj.get(..key.len as usize) {
                cache.write_through(name, &Arc::new(payload.to_vec()));
            }
        }) as OnStored
    })
}
