//! The read path: a read of a file becomes reads of its chunks, each chunk's slice list
//! becomes the visible pieces ([`layout`]), and each piece is read from its blocks — from the
//! block cache, whole from the store, or only the segments a small random read touches.
//!
//! * here: [`ChunkStore::read`] down to one block;
//! * [`layout`]: how a chunk's slice list becomes its content;
//! * [`prefetch`]: read-ahead for sequential readers;
//! * `warm`: warm-up, check and eviction of cached ranges; whole-file copies for
//!   passthrough.

pub mod layout;
mod peers;
pub mod prefetch;
#[cfg(test)]
mod tests;
pub(crate) mod warm;

pub use warm::{CacheCounts, CacheOp, WHOLE_SYNC_MAX};

use crate::store::codec::{self, Compression};
use crate::store::keys::block_key;
use crate::{ChunkStore, DataError, Result};
use aquifer_cache::Cache;
use aquifer_meta::{Ino, Slice, CHUNK_SIZE};
use aquifer_object::ObjectStore;
use std::sync::Arc;

/// Fetch a whole block, verified, in one request: for a reader that finds it in no cache,
/// and for the prefetcher working ahead of one.
pub(crate) fn fetch_block(
    store: &dyn ObjectStore,
    cache: &Cache,
    c: Compression,
    key: &str,
    len: usize,
) -> Result<Arc<Vec<u8>>> {
    let buf = cache.buffer(codec::stored_len(len));
    Ok(Arc::new(codec::read_whole(store, c, key, len, buf)?))
}

impl ChunkStore {
    /// Read up to `len` bytes at `off` of a file whose length is `file_len`.
    pub fn read(
        self: &Arc<Self>,
        ino: Ino,
        off: u64,
        len: usize,
        file_len: u64,
    ) -> Result<Vec<u8>> {
        if off >= file_len || len == 0 {
            return Ok(Vec::new());
        }
        let end = (off + len as u64).min(file_len);
        let seq = self.prefetch.observe(ino, off, end - off);
        if !seq {
            self.random_read(ino, file_len);
        }
        let mut out = vec![0u8; (end - off) as usize];
        let mut pos = off;
        while pos < end {
            let idx = (pos / CHUNK_SIZE) as u32;
            let cpos = pos % CHUNK_SIZE;
            let n = (CHUNK_SIZE - cpos).min(end - pos) as usize;
            let dst_off = (pos - off) as usize;
            let ahead = seq.then_some(ino);
            self.read_chunk(ino, idx, cpos as u32, &mut out[dst_off..dst_off + n], ahead)?;
            pos += n as u64;
        }
        if seq {
            self.read_ahead_into_next_chunk(ino, end, file_len);
        }
        Ok(out)
    }

    /// `read_slice` reads ahead only inside the slice it reads. When the read-ahead window
    /// of a sequential reader reaches past the end of the chunk, the first blocks of the
    /// next chunk are requested as well, so the reader crossing a 64 MiB boundary finds them
    /// in flight instead of waiting for one GET with nothing else queued behind it.
    fn read_ahead_into_next_chunk(&self, ino: Ino, end: u64, file_len: u64) {
        let bs = self.cfg.block_size as u64;
        let to = (end + self.cfg.readahead_blocks as u64 * bs).min(file_len);
        let next = end.div_ceil(CHUNK_SIZE);
        if next * CHUNK_SIZE >= to {
            return;
        }
        let idx = next as u32;
        let Some(visible) = self.prefetch.slices_ahead(ino, idx, || {
            // Only a hint: a failed lookup means no read-ahead, the read itself will report.
            self.meta
                .read_chunk(ino, idx)
                .ok()
                .map(|s| layout::visible(&s))
        }) else {
            return;
        };
        // A stale list (the file changed since) only fetches blocks nobody reads: blocks
        // are immutable and reads always consult the current slice list.
        let lim = (to - next * CHUNK_SIZE) as u32;
        for s in visible.iter().filter(|s| s.id != 0 && s.pos < lim) {
            let (a, b) = (s.off, s.off + (s.end().min(lim) - s.pos));
            let bs = bs as u32;
            for bidx in a / bs..b.div_ceil(bs) {
                let len = (s.size - bidx * bs).min(bs);
                self.prefetch
                    .request(ino, block_key(s.id, bidx, len), len as usize);
            }
        }
    }

    /// `ahead`: the file whose sequential reader this is, to read ahead for.
    fn read_chunk(
        &self,
        ino: Ino,
        idx: u32,
        cpos: u32,
        dst: &mut [u8],
        ahead: Option<Ino>,
    ) -> Result<()> {
        let mut attempt = 0;
        loop {
            let slices = if attempt == 0 {
                self.meta.read_chunk(ino, idx)?
            } else {
                self.meta.read_chunk_fresh(ino, idx)?
            };
            match self.read_slices(&slices, cpos, dst, ahead) {
                // A compaction (here or on another mount) may have freed the blocks we were
                // about to read: the slice list has changed, so read it again, fresh.
                Err(DataError::Object(e)) if e.is_not_found() && attempt < 3 => attempt += 1,
                r => return r,
            }
        }
    }

    /// Fill `dst` with chunk bytes `[cpos, cpos + dst.len())` as described by `slices`,
    /// reading ahead for the sequential reader of file `ahead` if there is one.
    pub(crate) fn read_slices(
        &self,
        slices: &[Slice],
        cpos: u32,
        dst: &mut [u8],
        ahead: Option<Ino>,
    ) -> Result<()> {
        dst.fill(0);
        let end = cpos + dst.len() as u32;
        for s in layout::visible(slices) {
            let (a, b) = (s.pos.max(cpos), s.end().min(end));
            if a >= b || s.id == 0 {
                continue;
            }
            let d = &mut dst[(a - cpos) as usize..(b - cpos) as usize];
            self.read_slice(s.id, s.size, s.off + (a - s.pos), d, ahead)?;
        }
        Ok(())
    }

    /// Read `dst.len()` bytes of slice `id` from offset `soff` in the slice. Sequential
    /// readers get whole blocks through the cache and the next blocks fetched ahead.
    fn read_slice(
        &self,
        id: u64,
        size: u32,
        mut soff: u32,
        dst: &mut [u8],
        ahead: Option<Ino>,
    ) -> Result<()> {
        let bs = self.cfg.block_size;
        let mut done = 0usize;
        while done < dst.len() {
            let bidx = soff / bs;
            let boff = soff % bs;
            let blen = (size - bidx * bs).min(bs);
            let n = ((blen - boff) as usize).min(dst.len() - done);
            let key = block_key(id, bidx, blen);
            self.read_block(&key, blen, boff, &mut dst[done..done + n], ahead.is_some())?;
            if let Some(reader) = ahead {
                self.prefetch.cancel(&key);
                for next in bidx + 1..=bidx + self.cfg.readahead_blocks {
                    if next * bs < size {
                        let len = (size - next * bs).min(bs);
                        self.prefetch
                            .request(reader, block_key(id, next, len), len as usize);
                    }
                }
            }
            done += n;
            soff += n as u32;
        }
        Ok(())
    }

    /// Fill `part` from offset `boff` of block `key` (whose payload is `blen` bytes): from
    /// the cache, else the whole block through the cache (`whole`, compressed volumes, small
    /// blocks), else only the segments it touches.
    pub(crate) fn read_block(
        &self,
        key: &str,
        blen: u32,
        boff: u32,
        part: &mut [u8],
        whole: bool,
    ) -> Result<()> {
        let c = self.cfg.compression;
        // A compressed block is fetched whole anyway, so keep it for the next read; so are
        // small blocks (small files), where one request beats a trailer and a range. With a
        // disk tier, every block is: the next epoch's random reads find it on disk. In a
        // group too: blocks travel between members whole, and the owner keeps them.
        let whole = whole
            || c != codec::Compression::None
            || !self.cfg.lower_tiers.0.is_empty()
            || self.cfg.group.is_some();
        let range = boff as usize..(boff as usize + part.len());
        if let Some(block) = self.cache.get(key) {
            part.copy_from_slice(&block[range]);
        } else if whole || blen as usize <= 4 * codec::SEGMENT {
            part.copy_from_slice(&self.cached_block(key, blen)?[range]);
        } else {
            codec::read(
                &*self.store,
                Some(&self.trailers),
                key,
                blen as usize,
                boff as usize,
                part,
            )?;
        }
        Ok(())
    }

    /// Block `key` (of `blen` payload bytes) from the cache, or fetched whole from the store
    /// into it (once, however many ask at the same time).
    pub(crate) fn cached_block(&self, key: &str, blen: u32) -> Result<aquifer_cache::Block> {
        let c = self.cfg.compression;
        self.cache.get_or_fetch(key, || {
            fetch_block(&*self.store, &self.cache, c, key, blen as usize)
        })
    }
}
