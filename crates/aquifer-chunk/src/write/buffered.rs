//! What a writer still holds in memory, and the operations that deal with it without
//! committing it: a truncate cuts it, a discard drops it, a reader overlays it.

use super::FileWriter;
use crate::store::codec;
use crate::{DataError, Result};
use aquifer_meta::CHUNK_SIZE;
use std::sync::atomic::Ordering;

impl FileWriter {
    /// Truncate the file to `len` without committing what is buffered, when all of it is
    /// still in memory (nothing uploaded yet: small files, the common case of a program that
    /// rewrites and truncates one file, as fsx does): `truncate` changes the metadata under
    /// the writer's lock, then the buffered slices are cut to match. Committing first would
    /// store a block only for the truncate to free it again. Returns `None` without doing
    /// anything when some buffered block is already uploaded; the caller then commits and
    /// truncates the metadata alone.
    pub fn truncate_buffered<T>(
        &self,
        len: u64,
        truncate: impl FnOnce() -> Result<T>,
    ) -> Result<Option<T>> {
        let mut st = self.state.lock();
        if st.chunks.values().flatten().any(|s| s.sent > 0) {
            return Ok(None);
        }
        let r = truncate()?;
        let keep = len.div_ceil(CHUNK_SIZE) as u32;
        // The chunk holding the new end (none when it falls on a chunk boundary).
        let last = (len / CHUNK_SIZE) as u32;
        let mut dropped: Vec<u64> = st
            .chunks
            .iter()
            .filter(|(&idx, _)| idx >= keep)
            .flat_map(|(_, l)| l.iter().map(|s| s.id))
            .collect();
        st.chunks.retain(|&idx, _| idx < keep);
        if let Some(list) = st.chunks.get_mut(&last) {
            let cut = (len % CHUNK_SIZE) as u32;
            dropped.extend(list.iter().filter(|s| s.pos >= cut).map(|s| s.id));
            list.retain(|s| s.pos < cut);
            for s in list.iter_mut().filter(|s| s.end() > cut) {
                s.len = cut - s.pos;
                s.tail.truncate(s.len as usize);
            }
            if list.is_empty() {
                st.chunks.remove(&last);
            }
        }
        // Never committed now: gc need not spare their ids.
        self.cs.meta().abandon_slice_ids(&dropped);
        st.end = st.end.min(len);
        self.pending.store(st.end, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.settled(&mut st);
        Ok(Some(r))
    }

    /// Forget uncommitted data (the file is gone or truncated, or its last handle closed
    /// after a failure).
    pub fn discard(&self) {
        let mut st = self.state.lock();
        let ids: Vec<u64> = st.chunks.values().flatten().map(|s| s.id).collect();
        self.cs.meta().abandon_slice_ids(&ids);
        st.chunks.clear();
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.settled(&mut st);
    }

    /// Copy the buffered bytes of `[off, off + buf.len())` over `buf`, which holds what the
    /// metadata describes. Returns false (leaving `buf` as it was) when a commit or discard
    /// happened since [`generation`](FileWriter::generation) returned `generation`: `buf`
    /// may then miss bytes that moved from here to the metadata, and the caller reads again.
    pub fn overlay(&self, off: u64, buf: &mut [u8], generation: u64) -> Result<bool> {
        let st = self.state.lock();
        if self.generation() != generation {
            return Ok(false);
        }
        if buf.is_empty() {
            // A read at or past the end; and at a chunk boundary `last` would precede
            // `first` below, which BTreeMap::range rejects with a panic.
            return Ok(true);
        }
        let end = off + buf.len() as u64;
        let bs = self.cs.block_size();
        let first = (off / CHUNK_SIZE) as u32;
        let last = (end.saturating_sub(1) / CHUNK_SIZE) as u32;
        for (&idx, list) in st.chunks.range(first..=last) {
            let base = idx as u64 * CHUNK_SIZE;
            // Oldest first, so newer slices overwrite older ones.
            for s in list {
                let a = (base + s.pos as u64).max(off);
                let b = (base + s.end() as u64).min(end);
                let mut p = a;
                while p < b {
                    let soff = (p - base - s.pos as u64) as u32;
                    let dst = &mut buf[(p - off) as usize..(b - off) as usize];
                    let n = if soff >= s.sent {
                        let t = (soff - s.sent) as usize;
                        let n = dst.len().min(s.tail.len() - t);
                        dst[..n].copy_from_slice(&s.tail[t..t + n]);
                        n
                    } else {
                        let bidx = (soff / bs) as usize;
                        let boff = soff % bs;
                        let block = s.block(bidx, bs);
                        let (key, blen) = (block.name(), block.len);
                        let n = dst.len().min((blen - boff) as usize);
                        let u = &s.uploads[bidx];
                        let part = &mut dst[..n];
                        match u.wait() {
                            Ok(()) => self.cs.read_block(&key, blen, boff, part, false)?,
                            Err(e) => {
                                // Not stored yet: read it back from the object kept for a retry.
                                let obj = u.failed_object().ok_or(DataError::Poisoned(e))?;
                                let plain = codec::decode(&key, blen as usize, &obj)?;
                                part.copy_from_slice(&plain[boff as usize..boff as usize + n]);
                            }
                        }
                        n
                    };
                    p += n as u64;
                }
            }
        }
        Ok(true)
    }
}
