//! Blocks brought into, checked in or dropped from the cache on request (`aquifer warmup`),
//! and whole-file copies on a cache disk for FUSE passthrough.

use super::layout;
use crate::store::keys::block_key;
use crate::{ChunkStore, Result};
use aquifer_meta::{Ino, CHUNK_SIZE};
use std::collections::HashSet;

/// What [`ChunkStore::cache_range`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOp {
    Warm,
    Check,
    Evict,
}

/// Bytes of the blocks under a range: all, cached before, fetched or evicted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheCounts {
    pub total: u64,
    pub cached: u64,
    pub done: u64,
}

/// Largest file copied whole at its open for passthrough; a larger one is copied in the
/// background (one at a time) and read through the data path until its copy is there. The
/// copy is made from cached blocks at disk speed.
pub const WHOLE_SYNC_MAX: u64 = 256 << 20;

/// Copies made in the background at once, at most.
const WHOLE_BACKGROUND: usize = 1;

/// Files being copied in the background (`files/INO` keys).
pub(crate) type WholeBuilds = std::sync::Mutex<HashSet<String>>;

/// A file at least this large read at random offsets is fetched whole, in parallel
/// ([`ChunkStore::random_read`]): a model loaded through mmap touches its tensors in any
/// order, one fault at a time, and would wait for one block after the other.
pub(crate) const FILL_MIN: u64 = 64 << 20;
/// Random reads of such a file before it is filled (a few: a lookup in a large file is
/// not a model load).
pub(crate) const FILL_AFTER: u32 = 8;
/// Files filled at once, at most.
const FILL_FILES: usize = 2;

/// Random reads counted per large file, and the files being filled.
#[derive(Default)]
pub(crate) struct Fills {
    random: std::collections::HashMap<Ino, u32>,
    running: HashSet<Ino>,
    done: HashSet<Ino>,
}

impl ChunkStore {
    /// A whole-file copy of `ino` (`file_len` bytes, as `stamp` describes it) on a cache
    /// disk, for the kernel to read directly (FUSE passthrough). An existing copy is checked
    /// against the stamp and its checksum; a file whose blocks are all on the cache disk is
    /// copied from those blocks: now when it is up to [`WHOLE_SYNC_MAX`], else in the
    /// background for a later open. None when there is no copy now: the caller reads
    /// through the data path as usual.
    pub fn whole_copy(
        self: &std::sync::Arc<Self>,
        ino: Ino,
        stamp: &[u8],
        file_len: u64,
    ) -> Option<std::fs::File> {
        // A copy is made from a local disk tier's blocks: RAM and a peer group's do not do.
        if file_len == 0 || self.cache.tiers().iter().filter(|t| !t.remote()).count() < 2 {
            return None;
        }
        let key = format!("files/{ino}");
        if let Some(f) = self.cache.whole_open(&key, stamp) {
            return Some(f);
        }
        if file_len > WHOLE_SYNC_MAX {
            self.whole_copy_later(key, ino, stamp, file_len);
            return None;
        }
        self.make_whole(&key, ino, stamp, file_len)
            .then(|| self.cache.whole_open(&key, stamp))
            .flatten()
    }

    /// Copy a large file in the background (unless it is being copied, or as many copies
    /// as allowed are on their way: a later open asks again).
    fn whole_copy_later(
        self: &std::sync::Arc<Self>,
        key: String,
        ino: Ino,
        stamp: &[u8],
        len: u64,
    ) {
        {
            let mut b = self.whole_builds.lock().unwrap();
            if b.len() >= WHOLE_BACKGROUND || !b.insert(key.clone()) {
                return;
            }
        }
        let (cs, stamp, k) = (self.clone(), stamp.to_vec(), key.clone());
        let run = move || {
            let t0 = std::time::Instant::now();
            let ok = cs.make_whole(&key, ino, &stamp, len);
            let secs = t0.elapsed().as_secs_f64();
            if ok {
                tracing::info!(ino, len, secs, "whole-file copy made in the background");
            } else {
                tracing::info!(
                    ino,
                    len,
                    secs,
                    "whole-file copy not made (blocks not all cached, or no room)"
                );
            }
            cs.whole_builds.lock().unwrap().remove(&key);
        };

        if std::thread::Builder::new()
            .name("whole-copy".into())
            .spawn(run)
            .is_err()
        {
            self.whole_builds.lock().unwrap().remove(&k);
        }
    }

    /// A read of `ino` (`file_len` bytes) that was not sequential: after [`FILL_AFTER`] of
    /// them in a file of at least [`FILL_MIN`], fetch the whole file into the cache in the
    /// background, `prefetch_threads` ranges at once, if it fits in half the slowest local
    /// tier. Reads meanwhile share the fetches (single-flight).
    pub(crate) fn random_read(self: &std::sync::Arc<Self>, ino: Ino, file_len: u64) {
        if file_len < FILL_MIN {
            return;
        }
        {
            let mut f = self.fills.lock().unwrap();
            if f.done.contains(&ino) || f.running.contains(&ino) {
                return;
            }
            if f.random.len() > 4096 {
                f.random.clear();
            }
            let n = f.random.entry(ino).or_insert(0);
            *n += 1;
            if *n < FILL_AFTER || f.running.len() >= FILL_FILES {
                return;
            }
            f.random.remove(&ino);
            // Asked only now, not at every random read: a disk tier's usage takes its lock.
            let room = self.last_local_tier().map_or(0, |t| t.usage().capacity / 2);
            if file_len > room {
                return;
            }
            f.running.insert(ino);
        }
        let cs = self.clone();
        let run = move || {
            let t0 = std::time::Instant::now();
            let parts = cs.cfg.prefetch_threads.clamp(1, 32) as u64;
            let bs = cs.cfg.block_size as u64;
            let step = file_len.div_ceil(parts).div_ceil(bs) * bs;
            let ok = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..parts)
                    .map(|i| {
                        let cs = &cs;
                        sc.spawn(move || {
                            let off = i * step;
                            off >= file_len
                                || cs
                                    .cache_range(ino, CacheOp::Warm, off, step, file_len)
                                    .is_ok()
                        })
                    })
                    .collect();
                hs.into_iter().all(|h| h.join().unwrap_or(false))
            });
            tracing::debug!(
                ino,
                file_len,
                ok,
                secs = t0.elapsed().as_secs_f64(),
                "file read at random fetched whole"
            );
            let mut f = cs.fills.lock().unwrap();
            f.running.remove(&ino);
            if f.done.len() > 4096 {
                f.done.clear();
            }
            if ok {
                f.done.insert(ino);
            }
        };
        if std::thread::Builder::new()
            .name("fill".into())
            .spawn(run)
            .is_err()
        {
            self.fills.lock().unwrap().running.remove(&ino);
        }
    }

    /// Make the copy of `ino` under `key` from the blocks on the cache disk, if all are
    /// there; whether it was made.
    fn make_whole(&self, key: &str, ino: Ino, stamp: &[u8], file_len: u64) -> bool {
        // Blocks held here, not at their owners in a group: an open must not ask the network.
        let Ok(c) = self.cache_range_in(ino, CacheOp::Check, 0, file_len, file_len, None) else {
            return false;
        };
        if c.cached < c.total {
            return false;
        }
        let mut fill = |w: &mut dyn std::io::Write| -> std::io::Result<()> {
            // One block at a time: memory stays bounded however many opens copy at once.
            let piece = self.cfg.block_size as u64;
            let mut buf = vec![0u8; file_len.min(piece) as usize];
            let mut pos = 0u64;
            while pos < file_len {
                let idx = (pos / CHUNK_SIZE) as u32;
                let cpos = pos % CHUNK_SIZE;
                let n = (file_len - pos).min(piece).min(CHUNK_SIZE - cpos) as usize;
                self.read_chunk(ino, idx, cpos as u32, &mut buf[..n], None)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                w.write_all(&buf[..n])?;
                pos += n as u64;
            }
            Ok(())
        };
        self.cache.whole_put(key, stamp, file_len, &mut fill)
    }

    /// Warm, check or evict the cached blocks under `[off, off+len)` of a file whose
    /// length is `file_len`. "Cached" means held by the last local tier (the disk, when
    /// there is one): what survives a restart and RAM pressure. Warming waits for the disk
    /// to take the blocks, so a check or a read right after finds them.
    ///
    /// In a peer group, a block another member owns is warmed and checked at that member
    /// (the group reads it from the store once; a member that cannot be reached leaves the
    /// block to be warmed here); evicting is local.
    pub fn cache_range(
        &self,
        ino: Ino,
        op: CacheOp,
        off: u64,
        len: u64,
        file_len: u64,
    ) -> Result<CacheCounts> {
        let group = self.cfg.group.as_ref();
        self.cache_range_in(ino, op, off, len, file_len, group)
    }

    /// [`ChunkStore::cache_range`] with the group to warm and check at (`None`: this node's
    /// cache only).
    fn cache_range_in(
        &self,
        ino: Ino,
        op: CacheOp,
        off: u64,
        len: u64,
        file_len: u64,
        group: Option<&std::sync::Arc<aquifer_group::Group>>,
    ) -> Result<CacheCounts> {
        let end = off.saturating_add(len).min(file_len);
        let bs = self.cfg.block_size;
        let mut c = CacheCounts::default();
        let Some(last) = self.last_local_tier() else {
            return Ok(c);
        };
        let group = group.filter(|_| op != CacheOp::Evict);
        let mut seen = HashSet::new();
        let mut pos = off;
        while pos < end {
            let idx = (pos / CHUNK_SIZE) as u32;
            let cstart = idx as u64 * CHUNK_SIZE;
            let (a, b) = ((pos - cstart) as u32, (end - cstart).min(CHUNK_SIZE) as u32);
            let slices = self.meta.read_chunk(ino, idx)?;
            for s in layout::visible(&slices) {
                let (x, y) = (s.pos.max(a), s.end().min(b));
                if x >= y || s.id == 0 {
                    continue;
                }
                let (so, se) = (s.off + (x - s.pos), s.off + (y - s.pos));
                for bidx in so / bs..=(se - 1) / bs {
                    let blen = (s.size - bidx * bs).min(bs);
                    let key = block_key(s.id, bidx, blen);
                    if !seen.insert(key.clone()) {
                        continue;
                    }
                    let n = blen as u64;
                    c.total += n;
                    // None: this member is the one to hold it.
                    let at_owner = group.and_then(|g| g.held_at_owner(&key));
                    let cached = at_owner.unwrap_or_else(|| last.contains(&key));
                    if cached {
                        c.cached += n;
                    }
                    if op == CacheOp::Warm && !cached && at_owner.is_some() {
                        if let Some(Ok(true)) = group.map(|g| g.warm_at_owner(&key)) {
                            c.done += n;
                            continue;
                        }
                    }
                    match op {
                        CacheOp::Check => {}
                        CacheOp::Evict => {
                            if self.cache.contains(&key) {
                                self.cache.remove(&key);
                                c.done += n;
                            }
                        }
                        CacheOp::Warm if !cached => {
                            let block = self.cached_block(&key, blen)?;
                            // Offered again, waiting for room this time: a busy disk
                            // drops what readers offer, but a warm-up must land.
                            self.cache.admit(&key, &block);
                            c.done += n;
                        }
                        CacheOp::Warm => {}
                    }
                }
            }
            pos = cstart + CHUNK_SIZE;
        }
        if op == CacheOp::Warm {
            self.cache.flush();
        }
        Ok(c)
    }
}
