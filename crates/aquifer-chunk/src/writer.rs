//! Write buffering for one open file.
//!
//! Writes land in open slices, one list per chunk. A write extends the newest slice it
//! continues when no newer slice overlaps the extension (so "newest wins" still holds after
//! the commit); otherwise it opens a new slice. Full blocks are uploaded in the background as
//! soon as they fill. `flush` uploads the tails, waits for every block, then commits the
//! slices to the metadata in the order they were opened: only then is the data acknowledged.
//!
//! Failures stay with the file. A flush whose uploads or commit failed keeps the chunk's
//! slices (and the objects that failed, for a retry by the next flush) and counts the error;
//! every handle open on the file sees that count move on at its next fsync or close, however
//! the failed flush was started (another handle's close, a setattr, unmount). Data is only
//! dropped by [`discard`](FileWriter::discard) (unlink, truncate, the last close).
//!
//! Readers of a file being written see the buffered bytes through
//! [`overlay`](FileWriter::overlay) without committing them, and `getattr` reads the buffered
//! length from an atomic: neither waits for an upload.

use crate::pool::Held;
use crate::{block_key, codec, ChunkStore, Completion, DataError, Result};
use aquifer_meta::{Ino, Slice, CHUNK_SIZE};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Flush a chunk early when it has this many open slices (random small writes).
const MAX_OPEN_SLICES: usize = 16;

struct OpenSlice {
    pos: u32,
    id: u64,
    len: u32,
    /// Bytes after the last uploaded block, in a buffer with room for the block's checksum
    /// trailer, so a full block is sealed and uploaded without another copy.
    tail: Vec<u8>,
    /// The budget the tail's buffer holds (its capacity).
    held: Held,
    /// Bytes of the slice already handed to the uploader: whole blocks, then the partial
    /// last block once the slice is sealed.
    sent: u32,
    /// A partial block was uploaded: the slice cannot grow any more.
    sealed: bool,
    /// One per uploaded block, in block order.
    uploads: Vec<Arc<Completion>>,
}

impl OpenSlice {
    fn end(&self) -> u32 {
        self.pos + self.len
    }

    /// Key and length of uploaded block `b`.
    fn block(&self, b: usize, bs: u32) -> (String, u32) {
        let len = (self.sent - b as u32 * bs).min(bs);
        (block_key(self.id, b as u32, len), len)
    }
}

#[derive(Default)]
struct State {
    chunks: BTreeMap<u32, Vec<OpenSlice>>,
    /// End of the furthest byte written and not yet committed.
    end: u64,
}

/// What a write of one piece will do, decided with the budget it needs in hand.
struct Plan {
    target: Option<usize>,
    take: usize,
    held: Held,
}

pub struct FileWriter {
    ino: Ino,
    cs: Arc<ChunkStore>,
    state: Mutex<State>,
    /// End of uncommitted data, 0 when clean; read without the lock by getattr.
    pending: AtomicU64,
    dirty: AtomicBool,
    /// Bumped whenever buffered slices are committed or dropped, so a reader can tell that
    /// what it read from the metadata and what it overlays from here do not line up.
    generation: AtomicU64,
    /// Failed flushes so far, and the last failure.
    errors: AtomicU64,
    last_error: Mutex<String>,
    /// When this file was last written (a tick of the chunk store's clock), so the budget
    /// seals the tails of the writers idle longest first.
    pub(crate) last_write: AtomicU64,
}

impl FileWriter {
    pub fn new(cs: Arc<ChunkStore>, ino: Ino) -> Arc<FileWriter> {
        let w = Arc::new(FileWriter {
            ino,
            cs: cs.clone(),
            state: Mutex::new(State::default()),
            pending: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_error: Mutex::new(String::new()),
            last_write: AtomicU64::new(cs.tick()),
        });
        cs.register_writer(&w);
        w
    }

    pub fn ino(&self) -> Ino {
        self.ino
    }

    /// True when there is data not yet committed.
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::SeqCst)
    }

    /// End offset of uncommitted data (0 when clean). Never waits for the writer.
    pub fn pending_end(&self) -> u64 {
        self.pending.load(Ordering::SeqCst)
    }

    /// Failed flushes so far: a handle that saw `n` reports an error once this passes `n`.
    pub fn error_count(&self) -> u64 {
        self.errors.load(Ordering::SeqCst)
    }

    pub fn last_error(&self) -> String {
        self.last_error.lock().clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn failed(&self, e: DataError) -> DataError {
        *self.last_error.lock() = e.to_string();
        self.errors.fetch_add(1, Ordering::SeqCst);
        e
    }

    pub fn write(&self, off: u64, data: &[u8]) -> Result<()> {
        self.last_write.store(self.cs.tick(), Ordering::Relaxed);
        let mut pos = off;
        let mut rest = data;
        while !rest.is_empty() {
            let idx = (pos / CHUNK_SIZE) as u32;
            let cpos = (pos % CHUNK_SIZE) as u32;
            let want = ((CHUNK_SIZE - cpos as u64) as usize).min(rest.len());
            let (mut st, plan) = self.reserve(idx, cpos, want)?;
            let take = plan.take;
            let full = self.write_piece(&mut st, idx, cpos, &rest[..take], plan)?;
            st.end = st.end.max(pos + take as u64);
            self.pending.store(st.end, Ordering::SeqCst);
            self.dirty.store(true, Ordering::SeqCst);
            if full {
                // A slice reached the chunk's end: a sequential writer has moved on, so
                // commit this chunk now instead of holding it until close.
                self.flush_chunk(&mut st, idx)?;
                self.settled(&mut st);
            }
            pos += take as u64;
            rest = &rest[take..];
        }
        Ok(())
    }

    /// The slice a write at `cpos` of `n` bytes extends, if any.
    fn target(list: &[OpenSlice], cpos: u32, n: u32) -> Option<usize> {
        let ext = (cpos, cpos + n);
        list.iter()
            .rposition(|s| s.end() == cpos && !s.sealed)
            .filter(|&i| {
                list[i + 1..]
                    .iter()
                    .all(|newer| newer.end() <= ext.0 || newer.pos >= ext.1)
            })
    }

    /// Capacity the tail buffer needs to take `take` more bytes. Small files get what they
    /// need; a buffer on its way to a full block gets the whole block and its trailer at once
    /// (from the buffer pool, so it is not faulted in afresh).
    fn capacity_for(&self, len: usize, cap: usize, take: usize) -> usize {
        let need = len + take;
        if cap >= need {
            cap
        } else if need > self.cs.block_size() as usize / 4 {
            self.cs.block_buffer_size().max(need)
        } else {
            codec::stored_len(need.max(2 * cap))
        }
    }

    /// Lock the state with the budget for the next piece of a write in hand. Waits (with no
    /// lock held) while the budget is spent, having the idlest writers' tails uploaded.
    fn reserve(
        &self,
        idx: u32,
        cpos: u32,
        want: usize,
    ) -> Result<(parking_lot::MutexGuard<'_, State>, Plan)> {
        let bs = self.cs.block_size() as usize;
        loop {
            let mut st = self.state.lock();
            if st
                .chunks
                .get(&idx)
                .is_some_and(|l| l.len() >= MAX_OPEN_SLICES)
            {
                self.flush_chunk(&mut st, idx)?;
                self.settled(&mut st);
            }
            let list: &[OpenSlice] = st.chunks.get(&idx).map(|l| &l[..]).unwrap_or(&[]);
            let target = Self::target(list, cpos, want as u32);
            let (len, cap) = target
                .map(|i| (list[i].tail.len(), list[i].tail.capacity()))
                .unwrap_or((0, 0));
            let take = want.min(bs - len);
            let need = self.capacity_for(len, cap, take) - cap;
            if let Some(held) = self.cs.budget().try_acquire(need) {
                return Ok((st, Plan { target, take, held }));
            }
            // Our own failed uploads may be what fills the budget: the writer learns of it
            // now rather than waiting for a store that keeps refusing.
            if self.error_count() > 0 && Self::holds_failed(&st) {
                return Err(DataError::Poisoned(self.last_error()));
            }
            drop(st);
            self.cs.make_room(need);
        }
    }

    fn holds_failed(st: &State) -> bool {
        st.chunks
            .values()
            .flatten()
            .flat_map(|s| &s.uploads)
            .any(|u| u.failed_object().is_some())
    }

    fn write_piece(
        &self,
        st: &mut State,
        idx: u32,
        cpos: u32,
        data: &[u8],
        plan: Plan,
    ) -> Result<bool> {
        let bs = self.cs.block_size();
        let list = st.chunks.entry(idx).or_default();
        let i = match plan.target {
            Some(i) => i,
            None => {
                let id = self.cs.meta().new_slice_id()?;
                list.push(OpenSlice {
                    pos: cpos,
                    id,
                    len: 0,
                    tail: Vec::new(),
                    held: Held::default(),
                    sent: 0,
                    sealed: false,
                    uploads: Vec::new(),
                });
                list.len() - 1
            }
        };
        let s = &mut list[i];
        let want = self.capacity_for(s.tail.len(), s.tail.capacity(), data.len());
        if want > s.tail.capacity() {
            if want >= self.cs.block_buffer_size() {
                let mut b = self.cs.block_buffer();
                b.extend_from_slice(&s.tail);
                s.tail = b;
            } else {
                s.tail.reserve_exact(want - s.tail.len());
            }
        }
        // The hold follows the buffer's real capacity.
        let mut held = plan.held;
        let cap = s.tail.capacity();
        let have = s.held.bytes() + held.bytes();
        if cap > have {
            held.merge(self.cs.budget().force(cap - have));
        } else {
            drop(held.split(have - cap));
        }
        s.held.merge(held);
        s.tail.extend_from_slice(data);
        if s.tail.len() == bs as usize {
            let block = std::mem::take(&mut s.tail);
            let held = std::mem::take(&mut s.held);
            let key = block_key(s.id, s.sent / bs, bs);
            s.uploads
                .push(self.cs.upload_sealed(key, block, held, false));
            s.sent += bs;
        }
        s.len += data.len() as u32;
        Ok(s.end() as u64 == CHUNK_SIZE)
    }

    /// Upload a slice's partial last block (on this thread with `inline`); the slice is
    /// closed to extension from now on.
    fn seal(cs: &ChunkStore, s: &mut OpenSlice, inline: bool) -> usize {
        if s.tail.is_empty() {
            return 0;
        }
        let bs = cs.block_size();
        let len = s.tail.len() as u32;
        let key = block_key(s.id, s.sent / bs, len);
        let held = std::mem::take(&mut s.held);
        let bytes = held.bytes();
        s.uploads
            .push(cs.upload_sealed(key, std::mem::take(&mut s.tail), held, inline));
        s.sent += len;
        s.sealed = true;
        bytes
    }

    /// Upload again every block of `s` whose upload failed.
    fn retry_failed(cs: &ChunkStore, s: &mut OpenSlice) {
        let bs = cs.block_size();
        for b in 0..s.uploads.len() {
            if let Some((data, held)) = s.uploads[b].take_failed() {
                let (key, _) = s.block(b, bs);
                s.uploads[b] = cs.resubmit(key, data, held);
            }
        }
    }

    /// For the budget: upload the tails of this file now (and retry its failed uploads) if
    /// nobody is using it. Returns the bytes set in motion.
    pub(crate) fn spill(&self) -> usize {
        let Some(mut st) = self.state.try_lock() else {
            return 0;
        };
        let mut n = 0;
        for s in st.chunks.values_mut().flatten() {
            Self::retry_failed(&self.cs, s);
            n += Self::seal(&self.cs, s, false);
        }
        n
    }

    fn flush_chunk(&self, st: &mut State, idx: u32) -> Result<()> {
        let Some(list) = st.chunks.get_mut(&idx) else {
            return Ok(());
        };
        // One tail to store and then wait for: store it here rather than hand it to an
        // upload thread and sleep until it is done (a small file's close, an fsync).
        let inline = list.iter().filter(|s| !s.tail.is_empty()).count() == 1;
        for s in list.iter_mut() {
            Self::retry_failed(&self.cs, s);
            Self::seal(&self.cs, s, inline);
        }
        let mut failed = None;
        for u in list.iter().flat_map(|s| &s.uploads) {
            if let Err(e) = u.wait() {
                failed.get_or_insert(e);
            }
        }
        if let Some(e) = failed {
            // Nothing of the chunk is committed: its slices stay for the next flush.
            return Err(self.failed(DataError::Poisoned(e)));
        }
        while let Some(s) = list.first() {
            let slice = Slice {
                pos: s.pos,
                id: s.id,
                size: s.len,
                off: 0,
                len: s.len,
            };
            match self.cs.meta().write_slice(self.ino, idx, slice) {
                Ok((_, count)) => {
                    list.remove(0);
                    self.generation.fetch_add(1, Ordering::SeqCst);
                    self.cs.maybe_compact(self.ino, idx, count);
                }
                Err(e) if e.is_ambiguous() => {
                    // Whether the commit applied cannot be learnt (the engine stayed away,
                    // or a failover lost its history). Committing the slice again could
                    // bring it back after a compaction replaced it and freed its blocks
                    // (old bytes over newer ones, then reads of deleted blocks). So it is
                    // not retried: if it applied, its bytes are in the file; if not, this
                    // flush reports the loss. Its id stays open, so gc spares its blocks
                    // while the commit may still arrive.
                    list.remove(0);
                    self.generation.fetch_add(1, Ordering::SeqCst);
                    return Err(self.failed(e.into()));
                }
                Err(e) => return Err(self.failed(e.into())),
            }
        }
        st.chunks.remove(&idx);
        Ok(())
    }

    /// Once nothing is buffered, the file is clean again.
    fn settled(&self, st: &mut State) {
        if st.chunks.is_empty() {
            st.end = 0;
            self.dirty.store(false, Ordering::SeqCst);
            self.pending.store(0, Ordering::SeqCst);
        }
    }

    /// Upload and commit everything written so far. On failure the data stays buffered for
    /// the next flush and the error is counted for every handle.
    pub fn flush(&self) -> Result<()> {
        let mut st = self.state.lock();
        let idxs: Vec<u32> = st.chunks.keys().copied().collect();
        let mut first_err = None;
        for idx in idxs {
            if let Err(e) = self.flush_chunk(&mut st, idx) {
                first_err.get_or_insert(e);
            }
        }
        self.settled(&mut st);
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

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
                        let (key, blen) = s.block(bidx, bs);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Compression;
    use crate::DataConfig;
    use crate::{data_runs, layout};
    use aquifer_meta::conformance::test_format;
    use aquifer_meta::{Context, FileType, KvMeta, MemKv, Meta, ROOT_INO};
    use aquifer_object::MemStore;
    use proptest::prelude::*;

    /// A fresh file on a memory volume; background compaction off unless a test asks.
    fn setup(block_size: u32) -> (Arc<ChunkStore>, Arc<MemStore>, Ino) {
        setup_with(block_size, usize::MAX, Compression::None)
    }

    fn setup_with(
        block_size: u32,
        compact_threshold: usize,
        compression: Compression,
    ) -> (Arc<ChunkStore>, Arc<MemStore>, Ino) {
        let store = Arc::new(MemStore::new());
        let cfg = DataConfig {
            block_size,
            compact_threshold,
            compression,
            ..Default::default()
        };
        let (cs, ino) = setup_on(store.clone(), cfg);
        (cs, store, ino)
    }

    /// A fresh file on a volume whose blocks go to `store`.
    fn setup_on(
        store: Arc<dyn aquifer_object::ObjectStore>,
        cfg: DataConfig,
    ) -> (Arc<ChunkStore>, Ino) {
        let meta: Arc<dyn Meta> = Arc::new(KvMeta::new(MemKv::new()));
        meta.format(&test_format(cfg.block_size), false).unwrap();
        let ino = meta
            .mknod(
                &Context::root(),
                ROOT_INO,
                b"f",
                FileType::File,
                0o644,
                0,
                0,
            )
            .unwrap()
            .0;
        (ChunkStore::new(meta, store, cfg).unwrap(), ino)
    }

    fn read_all(cs: &ChunkStore, ino: Ino) -> Vec<u8> {
        let len = cs.meta().getattr(ino).unwrap().length;
        cs.read(ino, 0, len as usize, len).unwrap()
    }

    #[test]
    fn sequential_write_makes_one_slice_of_blocks() {
        let (cs, store, ino) = setup(1024);
        let w = FileWriter::new(cs.clone(), ino);
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        for part in data.chunks(700) {
            let off = w.pending_end();
            w.write(off, part).unwrap();
        }
        assert_eq!(w.pending_end(), 5000);
        w.flush().unwrap();
        assert_eq!(cs.meta().read_chunk(ino, 0).unwrap().len(), 1);
        assert_eq!(store.len(), 5, "four full blocks and a tail");
        assert_eq!(read_all(&cs, ino), data);
    }

    #[test]
    fn sequential_reads_fetch_ahead_into_the_next_chunk() {
        let bs = 1 << 20;
        let (cs, _, ino) = setup(bs);
        let w = FileWriter::new(cs.clone(), ino);
        // Data at the end of chunk 0 and the start of chunk 1, holes before.
        w.write(CHUNK_SIZE - 1024, &[1; 1024]).unwrap();
        w.write(CHUNK_SIZE, &[2; 3 << 20]).unwrap();
        w.flush().unwrap();
        let len = CHUNK_SIZE + (3 << 20);
        let next = cs.meta().read_chunk(ino, 1).unwrap()[0];
        let first = block_key(next.id, 0, bs);
        // Sequential reads up to the end of chunk 0, none of them inside chunk 1.
        let mut off = 0;
        while off < CHUNK_SIZE {
            let n = (4 << 20).min(CHUNK_SIZE - off);
            assert_eq!(
                cs.read(ino, off, n as usize, len).unwrap().len(),
                n as usize
            );
            off += n;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while cs.cache.get(&first).is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the next chunk's first block was not read ahead"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(*cs.cache.get(&first).unwrap(), vec![2u8; bs as usize]);
        assert_eq!(
            cs.read(ino, CHUNK_SIZE, 3 << 20, len).unwrap(),
            vec![2u8; 3 << 20]
        );
    }

    #[test]
    fn read_ahead_wider_than_the_cache_fetches_each_block_once() {
        let store = Arc::new(aquifer_object::FaultStore::new(MemStore::new()));
        let bs = 64 << 10;
        let cfg = DataConfig {
            block_size: bs,
            // Room for 7 blocks as the cache counts them; the window asked for is wider.
            cache_bytes: 8 * bs as usize,
            readahead_blocks: 16,
            prefetch_threads: 16,
            ..Default::default()
        };
        let (cs, ino) = setup_on(store.clone(), cfg);
        let w = FileWriter::new(cs.clone(), ino);
        let data: Vec<u8> = (0..64 * bs).map(|i| (i / 4099) as u8).collect();
        w.write(0, &data).unwrap();
        w.flush().unwrap();
        let before = store.calls();
        let len = data.len() as u64;
        for off in (0..len).step_by(bs as usize) {
            let got = cs.read(ino, off, bs as usize, len).unwrap();
            assert!(got == data[off as usize..(off + bs as u64) as usize]);
        }
        // Let the last read-ahead requests finish before counting.
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(
            store.calls() - before,
            64,
            "each block is fetched exactly once"
        );
    }

    #[test]
    fn overwrite_then_extend_keeps_newest_bytes() {
        let (cs, _, ino) = setup(64);
        let w = FileWriter::new(cs.clone(), ino);
        w.write(0, &[1; 100]).unwrap();
        w.write(50, &[2; 10]).unwrap();
        // Extends the first slice at 100; no newer slice covers [100, 120).
        w.write(100, &[3; 20]).unwrap();
        w.flush().unwrap();
        let mut want = vec![1u8; 120];
        want[50..60].fill(2);
        want[100..120].fill(3);
        assert_eq!(read_all(&cs, ino), want);
    }

    #[test]
    fn compaction_keeps_content_and_frees_old_slices() {
        let (cs, store, ino) = setup(64);
        let w = FileWriter::new(cs.clone(), ino);
        let mut model = vec![0u8; 300];
        for i in 0..6u8 {
            let off = (i as usize * 37) % 250;
            w.write(off as u64, &[i + 1; 40]).unwrap();
            model[off..off + 40].fill(i + 1);
            w.flush().unwrap();
        }
        model.truncate(cs.meta().getattr(ino).unwrap().length as usize);
        assert!(cs.compact(ino, 0).unwrap());
        assert_eq!(cs.meta().read_chunk(ino, 0).unwrap().len(), 1);
        assert_eq!(read_all(&cs, ino), model);
        let before = store.len();
        cs.empty_trash().unwrap();
        assert!(store.len() < before);
        assert_eq!(read_all(&cs, ino), model);
    }

    #[test]
    fn fragmented_chunks_are_compacted_in_the_background() {
        let (cs, _, ino) = setup_with(64, 4, Compression::None);
        let w = FileWriter::new(cs.clone(), ino);
        let mut model = vec![0u8; 0];
        for i in 0..8u8 {
            let off = (i as usize * 29) % 200;
            w.write(off as u64, &[i + 1; 30]).unwrap();
            if model.len() < off + 30 {
                model.resize(off + 30, 0);
            }
            model[off..off + 30].fill(i + 1);
            w.flush().unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while cs.meta().read_chunk(ino, 0).unwrap().len() >= 4
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            cs.meta().read_chunk(ino, 0).unwrap().len() < 4,
            "compactor never ran"
        );
        assert_eq!(read_all(&cs, ino), model);
    }

    #[test]
    fn corrupt_short_block_is_an_error_not_wrong_bytes() {
        let (cs, store, ino) = setup(64);
        let w = FileWriter::new(cs.clone(), ino);
        w.write(0, &[7; 64]).unwrap();
        w.flush().unwrap();
        let id = cs.meta().read_chunk(ino, 0).unwrap()[0].id;
        use aquifer_object::ObjectStore;
        store
            .put(&block_key(id, 0, 64), bytes::Bytes::from_static(b"short"))
            .unwrap();
        let e = cs.read(ino, 0, 64, 64).unwrap_err();
        assert_eq!(e.errno(), aquifer_meta::Errno::EIO);
        // Same length, one byte flipped: still EIO, not wrong bytes.
        let mut bad = crate::codec::encode(&[7; 64]).to_vec();
        bad[10] ^= 1;
        store
            .put(&block_key(id, 0, 64), bytes::Bytes::from(bad))
            .unwrap();
        assert_eq!(
            cs.read(ino, 0, 64, 64).unwrap_err().errno(),
            aquifer_meta::Errno::EIO
        );
    }

    #[test]
    fn block_buffers_are_reused_and_bounded() {
        // A store that, like S3 or a directory, keeps no reference to what it was given.
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(aquifer_object::FileStore::new(dir.path().to_str().unwrap()).unwrap());
        let cfg = DataConfig {
            block_size: 64 << 10,
            compact_threshold: usize::MAX,
            ..Default::default()
        };
        let (cs, ino) = setup_on(store, cfg);
        let w = FileWriter::new(cs.clone(), ino);
        let data: Vec<u8> = (0..(40 << 16) as u32).map(|i| (i % 241) as u8).collect();
        for part in data.chunks(10_000) {
            w.write(
                (part.as_ptr() as usize - data.as_ptr() as usize) as u64,
                part,
            )
            .unwrap();
        }
        w.flush().unwrap();
        let idle = cs.buffers.idle();
        assert!((1..=8).contains(&idle), "{idle} idle buffers");
        assert_eq!(read_all(&cs, ino), data);
    }

    #[test]
    fn sequential_reads_fetch_ahead_into_the_cache() {
        let (cs, _, ino) = setup(1 << 20);
        let w = FileWriter::new(cs.clone(), ino);
        let data: Vec<u8> = (0..(10 << 20) as u32).map(|i| (i % 253) as u8).collect();
        w.write(0, &data).unwrap();
        w.flush().unwrap();
        let len = data.len() as u64;
        assert_eq!(cs.read(ino, 0, 4096, len).unwrap(), data[..4096]);
        // Block 0 is cached by the read itself, blocks 1 and 2 by the prefetcher.
        let cached = || cs.cache.tiers()[0].usage().entries;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while cached() < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(cached(), 3);
        // A small random read elsewhere in a large block does not fill the cache.
        assert_eq!(
            cs.read(ino, 9 << 20, 100, len).unwrap(),
            data[9 << 20..(9 << 20) + 100]
        );
        assert_eq!(cached(), 3);
        // The cached blocks serve the rest of the sequential read correctly.
        assert_eq!(
            cs.read(ino, 4096, (3 << 20) - 4096, len).unwrap(),
            data[4096..3 << 20]
        );
    }

    #[test]
    fn many_open_writers_stay_within_the_write_budget() {
        let store = Arc::new(MemStore::new());
        let cfg = DataConfig {
            block_size: 64 << 10,
            write_buffer: 1 << 20,
            compact_threshold: usize::MAX,
            ..Default::default()
        };
        let (cs, _) = setup_on(store, cfg);
        let ctx = Context::root();
        let mut files = Vec::new();
        for i in 0..200 {
            let name = format!("f{i}");
            let ino = cs
                .meta()
                .mknod(&ctx, ROOT_INO, name.as_bytes(), FileType::File, 0o644, 0, 0)
                .unwrap()
                .0;
            files.push((ino, FileWriter::new(cs.clone(), ino)));
        }
        let mut peak = 0;
        // Round-robin appends of 10 KiB: every file keeps a partial block buffered.
        for round in 0..6u8 {
            for (i, (_, w)) in files.iter().enumerate() {
                let off = w.pending_end().max(round as u64 * 10_240);
                w.write(off, &[(i as u8) ^ round; 10_240]).unwrap();
                peak = peak.max(cs.buffered_bytes());
            }
        }
        // One block buffer may go past the cap (a write is let through when nothing is held).
        let slack = cs.block_buffer_size();
        assert!(peak <= (1 << 20) + slack, "peak {peak} bytes buffered");
        for (i, (ino, w)) in files.iter().enumerate() {
            w.flush().unwrap();
            let want: Vec<u8> = (0..6u8)
                .flat_map(|r| std::iter::repeat_n((i as u8) ^ r, 10_240))
                .collect();
            assert_eq!(read_all(&cs, *ino), want);
        }
        assert_eq!(cs.buffered_bytes(), 0, "nothing held once all is committed");
    }

    #[test]
    fn compaction_of_a_sparse_file_stores_only_its_data() {
        let store = Arc::new(MemStore::new());
        let cfg = DataConfig {
            block_size: 64 << 10,
            compact_threshold: usize::MAX,
            ..Default::default()
        };
        let (cs, ino) = setup_on(store.clone(), cfg);
        let w = FileWriter::new(cs.clone(), ino);
        // 40 pieces of 4 KiB, 1 MiB apart, each its own flush (so its own slice).
        for i in 0..40u64 {
            w.write(i << 20, &[i as u8 + 1; 4096]).unwrap();
            w.flush().unwrap();
        }
        // And a punched range over one of them.
        let ctx = Context::root();
        cs.meta().fallocate(&ctx, ino, 3, 5 << 20, 4096).unwrap();
        let before = read_all(&cs, ino);
        assert!(cs.compact(ino, 0).unwrap());
        cs.empty_trash().unwrap();
        assert_eq!(read_all(&cs, ino), before);
        let stored: u64 = {
            use aquifer_object::ObjectStore;
            store
                .list("", "", 10_000)
                .unwrap()
                .iter()
                .map(|o| o.size)
                .sum()
        };
        // 39 pieces of data (and checksums), not 39 MiB of stored zeros.
        assert!(stored < 4 * 39 * 4096, "{stored} bytes stored");
        assert_eq!(cs.meta().read_chunk(ino, 0).unwrap().len(), 39);
    }

    #[test]
    fn compaction_racing_a_truncate_stops_quietly() {
        let (cs, store, ino) = setup(1024);
        let w = FileWriter::new(cs.clone(), ino);
        for i in 0..4u64 {
            w.write(i * 3000, &[9; 2000]).unwrap();
            w.flush().unwrap();
        }
        // The inputs are freed (truncate + trash emptied) before compaction reads them.
        let slices = cs.meta().read_chunk(ino, 0).unwrap();
        cs.meta().truncate(&Context::root(), ino, 0).unwrap();
        cs.empty_trash().unwrap();
        assert!(store.is_empty());
        assert_eq!(data_runs(&layout::visible(&slices), 16), vec![(0, 11_000)]);
        // compact() on the now-empty chunk: nothing to do, no error.
        assert!(!cs.compact(ino, 0).unwrap());
        // Reading a freed input reports not-found; compact treats a changed chunk as a race.
        let s = Slice {
            pos: 0,
            id: 999_999,
            size: 10,
            off: 0,
            len: 10,
        };
        assert!(cs.write_compacted(&[s], &s).is_err());
    }

    #[test]
    fn written_blocks_enter_the_disk_tier_and_reads_then_need_no_store() {
        use aquifer_cache::{DiskConfig, DiskTier, Tier};
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(
            DiskTier::open(
                dir.path(),
                DiskConfig {
                    capacity: 64 << 20,
                    free_ratio: 0.0,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        assert!(disk.wait_indexed(std::time::Duration::from_secs(10)));
        let bs = 64 << 10;
        let store = Arc::new(aquifer_object::FaultStore::new(MemStore::new()));
        let cfg = DataConfig {
            block_size: bs,
            compact_threshold: usize::MAX,
            // RAM holds two blocks: the rest must come from the disk.
            cache_bytes: 2 * codec::stored_len(bs as usize),
            lower_tiers: crate::Tiers(vec![disk.clone()]),
            ..Default::default()
        };
        let (cs, ino) = setup_on(store.clone(), cfg);
        let w = FileWriter::new(cs.clone(), ino);
        let data: Vec<u8> = (0..(16 * bs + 100)).map(|i| (i * 7 % 251) as u8).collect();
        w.write(0, &data).unwrap();
        w.flush().unwrap();
        disk.flush();
        assert_eq!(disk.usage().entries, 17, "every written block is on disk");
        let before = store.calls();
        assert_eq!(read_all(&cs, ino), data);
        // Random reads too: with a disk tier they go through the cache, not ranged GETs.
        let mut part = vec![0u8; 1000];
        let len = data.len() as u64;
        for off in [5 * bs as u64 + 17, 11 * bs as u64 + 3, 3] {
            let got = cs.read(ino, off, part.len(), len).unwrap();
            part.copy_from_slice(&got);
            assert_eq!(part, data[off as usize..off as usize + 1000]);
        }
        assert_eq!(store.calls(), before, "reads went to the store");
    }

    #[test]
    fn data_runs_join_the_narrowest_gaps() {
        let sl = |pos, len| Slice {
            pos,
            id: 1,
            size: len,
            off: 0,
            len,
        };
        let vis = [
            sl(0, 10),
            sl(10, 5),
            sl(100, 10),
            sl(200_000, 100_000),
            sl(370_000, 50_000),
            sl(5_000_000, 1),
        ];
        // Pieces within a segment of each other are one run.
        let all = vec![
            (0, 110),
            (200_000, 300_000),
            (370_000, 420_000),
            (5_000_000, 5_000_001),
        ];
        assert_eq!(data_runs(&vis, 16), all);
        // Fewer runs wanted: the narrow gap goes; the wider ones would store more zeros
        // than there are data bytes, and stay.
        let fewer = vec![(0, 110), (200_000, 420_000), (5_000_000, 5_000_001)];
        assert_eq!(data_runs(&vis, 3), fewer);
        assert_eq!(data_runs(&vis, 1), fewer);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, usize, u8),
        Truncate(u64),
        Punch(u64, u64),
        Flush,
        Read(u64, usize),
        /// A read that leaves buffered writes buffered (overlaid on the committed data).
        ReadBuffered(u64, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Offsets straddle the first chunk boundary so multi-chunk paths are exercised; the
        // window is small so compaction (which rewrites a chunk's whole extent) stays cheap.
        let base = CHUNK_SIZE - 6144;
        let off = base..(CHUNK_SIZE + 2048);
        prop_oneof![
            4 => (off.clone(), 1usize..1500, any::<u8>()).prop_map(|(o, l, b)| Op::Write(o, l, b)),
            1 => (base..(CHUNK_SIZE + 2048)).prop_map(Op::Truncate),
            1 => (off.clone(), 1u64..3000).prop_map(|(o, l)| Op::Punch(o, l)),
            2 => Just(Op::Flush),
            2 => (off.clone(), 1usize..3000).prop_map(|(o, l)| Op::Read(o, l)),
            2 => (off, 1usize..3000).prop_map(|(o, l)| Op::ReadBuffered(o, l)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The data path against a reference model: a sparse map of written bytes.
        #[test]
        fn data_path_matches_model(
            ops in prop::collection::vec(op(), 1..60),
            c in prop_oneof![Just(Compression::None), Just(Compression::Lz4), Just(Compression::Zstd)],
        ) {
            let (cs, _, ino) = setup_with(1024, usize::MAX, c);
            let meta = cs.meta().clone();
            let ctx = Context::root();
            let w = FileWriter::new(cs.clone(), ino);
            let mut model: BTreeMap<u64, u8> = BTreeMap::new();
            let mut len = 0u64;
            for (ops_done, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Write(o, l, b) => {
                        w.write(o, &vec![b; l]).unwrap();
                        for i in o..o + l as u64 { model.insert(i, b); }
                        len = len.max(o + l as u64);
                    }
                    Op::Truncate(n) => {
                        // Cut in memory when nothing is uploaded yet, else commit first.
                        let cut = w.truncate_buffered(n, || Ok(meta.truncate(&ctx, ino, n)?)).unwrap();
                        if cut.is_none() {
                            w.flush().unwrap();
                            meta.truncate(&ctx, ino, n).unwrap();
                        }
                        model.retain(|k, _| *k < n);
                        len = n;
                    }
                    Op::Punch(o, l) => {
                        w.flush().unwrap();
                        meta.fallocate(&ctx, ino, 3, o, l).unwrap();
                        for i in o..(o + l).min(len) { model.remove(&i); }
                    }
                    Op::Flush => w.flush().unwrap(),
                    Op::Read(o, l) => {
                        w.flush().unwrap();
                        let a = meta.getattr(ino).unwrap();
                        prop_assert_eq!(a.length, len);
                        let got = cs.read(ino, o, l, a.length).unwrap();
                        let end = (o + l as u64).min(len).max(o);
                        let want: Vec<u8> = (o..end).map(|i| *model.get(&i).unwrap_or(&0)).collect();
                        prop_assert_eq!(got, want);
                    }
                    Op::ReadBuffered(o, l) => {
                        let g = w.generation();
                        let flen = meta.getattr(ino).unwrap().length.max(w.pending_end());
                        prop_assert_eq!(flen, len);
                        let mut got = cs.read(ino, o, l, flen).unwrap();
                        prop_assert!(w.overlay(o, &mut got, g).unwrap());
                        let end = (o + l as u64).min(len).max(o);
                        let want: Vec<u8> = (o..end).map(|i| *model.get(&i).unwrap_or(&0)).collect();
                        prop_assert_eq!(got, want);
                    }
                }
                if ops_done % 7 == 6 {
                    cs.compact(ino, 0).unwrap();
                    cs.compact(ino, 1).unwrap();
                }
            }
        }
    }
}
