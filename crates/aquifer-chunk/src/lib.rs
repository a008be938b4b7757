//! The data path. A file is cut into 64 MiB chunks; every write becomes an immutable slice of
//! one chunk, stored as blocks of at most the volume's block size under keys derived from the
//! never-reused slice id. A chunk's content is its slice list applied oldest to newest.
//!
//! * [`writer::FileWriter`] buffers writes into open slices, uploads full blocks in the
//!   background and commits slices to the metadata on flush.
//! * [`ChunkStore::read`] merges a chunk's slices ([`layout::visible`]) and reads the blocks.
//! * Background workers compact fragmented chunks and delete the objects of freed slices.

pub mod codec;
pub mod layout;
mod pool;
pub mod prefetch;
pub mod writer;

use aquifer_meta::{Errno, Ino, Meta, MetaError, Slice, CHUNK_SIZE};
use aquifer_object::{ObjectError, ObjectStore};
use bytes::Bytes;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub use pool::{BufferPool, Completion, UploadPool};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error("an earlier write to this file failed: {0}")]
    Poisoned(String),
    #[error("block {key} is corrupt: {msg}")]
    Corrupt { key: String, msg: String },
}

impl DataError {
    pub fn errno(&self) -> Errno {
        match self {
            DataError::Meta(e) => e.errno(),
            _ => Errno::EIO,
        }
    }
}

pub type Result<T> = std::result::Result<T, DataError>;

/// Object key of block `idx` (of length `len`) of slice `id`. Spread over two directory levels
/// so no directory of a local store grows past a thousand entries.
pub fn block_key(id: u64, idx: u32, len: u32) -> String {
    format!(
        "chunks/{}/{}/{}_{}_{}",
        id / 1_000_000,
        id / 1000,
        id,
        idx,
        len
    )
}

/// Every block key of a slice of `size` bytes.
pub fn slice_keys(id: u64, size: u32, block_size: u32) -> Vec<String> {
    let n = size.div_ceil(block_size);
    (0..n)
        .map(|i| block_key(id, i, (size - i * block_size).min(block_size)))
        .collect()
}

#[derive(Clone, Debug)]
pub struct DataConfig {
    pub block_size: u32,
    /// Threads writing blocks to the object store.
    pub upload_threads: usize,
    /// Blocks queued for upload before writers wait (bounds memory).
    pub upload_queue: usize,
    /// Compact a chunk once it holds this many slices.
    pub compact_threshold: usize,
    /// Memory for whole blocks read ahead for sequential readers.
    pub cache_bytes: usize,
    /// Blocks fetched ahead of a sequential reader, and the threads fetching them.
    pub readahead_blocks: u32,
    pub prefetch_threads: usize,
    /// How new blocks are compressed (the volume's setting).
    pub compression: codec::Compression,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            block_size: 4 << 20,
            upload_threads: 4,
            upload_queue: 16,
            compact_threshold: 32,
            cache_bytes: 64 << 20,
            readahead_blocks: 2,
            prefetch_threads: 2,
            compression: codec::Compression::None,
        }
    }
}

pub struct ChunkStore {
    meta: Arc<dyn Meta>,
    store: Arc<dyn ObjectStore>,
    cfg: DataConfig,
    uploads: UploadPool,
    buffers: Arc<BufferPool>,
    cache: Arc<prefetch::BlockCache>,
    /// Checksum trailers of blocks read at random: 260 bytes per 4 MiB block.
    trailers: prefetch::BlockCache,
    prefetch: prefetch::Prefetcher,
    compact_tx: Mutex<Option<Sender<(Ino, u32)>>>,
    compacting: Mutex<HashSet<(Ino, u32)>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    stop: Arc<AtomicBool>,
}

impl ChunkStore {
    pub fn new(
        meta: Arc<dyn Meta>,
        store: Arc<dyn ObjectStore>,
        mut cfg: DataConfig,
    ) -> Arc<ChunkStore> {
        // Blocks fetched ahead must still be cached when the reader reaches them: a window
        // wider than the cache evicts them first and every block is fetched twice.
        let fit = cfg.cache_bytes / 2 / (cfg.block_size.max(1) as usize);
        cfg.readahead_blocks = cfg.readahead_blocks.min(fit.max(1) as u32);
        // Enough idle buffers for a writer to keep the uploaders busy; any more are freed.
        let buffers = Arc::new(BufferPool::new(
            codec::stored_len(cfg.block_size as usize),
            cfg.upload_threads.clamp(2, 8),
        ));
        let uploads = UploadPool::new(
            store.clone(),
            cfg.upload_threads,
            cfg.upload_queue,
            buffers.clone(),
        );
        let (tx, rx) = mpsc::channel();
        let cache = Arc::new(prefetch::BlockCache::with_buffers(
            cfg.cache_bytes,
            buffers.clone(),
        ));
        let prefetch = prefetch::Prefetcher::new(
            store.clone(),
            cache.clone(),
            cfg.prefetch_threads,
            cfg.compression,
        );
        let cs = Arc::new(ChunkStore {
            meta,
            store,
            cfg,
            uploads,
            buffers,
            cache,
            trailers: prefetch::BlockCache::new(4 << 20),
            prefetch,
            compact_tx: Mutex::new(Some(tx)),
            compacting: Mutex::new(HashSet::new()),
            workers: Mutex::new(Vec::new()),
            stop: Arc::new(AtomicBool::new(false)),
        });
        let weak = Arc::downgrade(&cs);
        let compactor = std::thread::Builder::new()
            .name("compact".into())
            .spawn(move || compact_loop(weak, rx))
            .expect("spawn compactor");
        let weak = Arc::downgrade(&cs);
        let stop = cs.stop.clone();
        let trash = std::thread::Builder::new()
            .name("trash".into())
            .spawn(move || trash_loop(weak, stop))
            .expect("spawn trash worker");
        cs.workers.lock().unwrap().extend([compactor, trash]);
        cs
    }

    pub fn meta(&self) -> &Arc<dyn Meta> {
        &self.meta
    }

    pub fn block_size(&self) -> u32 {
        self.cfg.block_size
    }

    /// Stop the background workers after finishing the trash that is already due.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.compact_tx.lock().unwrap().take();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap());
        for w in workers {
            let _ = w.join();
        }
        let _ = self.empty_trash();
    }

    /// Read up to `len` bytes at `off` of a file whose length is `file_len`.
    pub fn read(&self, ino: Ino, off: u64, len: usize, file_len: u64) -> Result<Vec<u8>> {
        if off >= file_len || len == 0 {
            return Ok(Vec::new());
        }
        let end = (off + len as u64).min(file_len);
        let seq = self.prefetch.observe(ino, off, end - off);
        let mut out = vec![0u8; (end - off) as usize];
        let mut pos = off;
        while pos < end {
            let idx = (pos / CHUNK_SIZE) as u32;
            let cpos = pos % CHUNK_SIZE;
            let n = (CHUNK_SIZE - cpos).min(end - pos) as usize;
            let dst_off = (pos - off) as usize;
            self.read_chunk(ino, idx, cpos as u32, &mut out[dst_off..dst_off + n], seq)?;
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
                    .request(block_key(s.id, bidx, len), len as usize);
            }
        }
    }

    fn read_chunk(&self, ino: Ino, idx: u32, cpos: u32, dst: &mut [u8], seq: bool) -> Result<()> {
        let mut attempt = 0;
        loop {
            let slices = self.meta.read_chunk(ino, idx)?;
            match self.read_slices(&slices, cpos, dst, seq) {
                // A compaction may have freed the blocks we were about to read: the slice list
                // has changed, so read it again.
                Err(DataError::Object(e)) if e.is_not_found() && attempt < 3 => attempt += 1,
                r => return r,
            }
        }
    }

    /// Fill `dst` with chunk bytes `[cpos, cpos + dst.len())` as described by `slices`.
    fn read_slices(&self, slices: &[Slice], cpos: u32, dst: &mut [u8], seq: bool) -> Result<()> {
        dst.fill(0);
        let end = cpos + dst.len() as u32;
        for s in layout::visible(slices) {
            let (a, b) = (s.pos.max(cpos), s.end().min(end));
            if a >= b || s.id == 0 {
                continue;
            }
            let d = &mut dst[(a - cpos) as usize..(b - cpos) as usize];
            self.read_slice(s.id, s.size, s.off + (a - s.pos), d, seq)?;
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
        seq: bool,
    ) -> Result<()> {
        let bs = self.cfg.block_size;
        let c = self.cfg.compression;
        // A compressed block is fetched whole anyway, so keep it for the next read; so are
        // small blocks (small files), where one request beats a trailer and a range.
        let whole = seq || c != codec::Compression::None;
        let mut done = 0usize;
        while done < dst.len() {
            let bidx = soff / bs;
            let boff = soff % bs;
            let blen = (size - bidx * bs).min(bs);
            let n = ((blen - boff) as usize).min(dst.len() - done);
            let key = block_key(id, bidx, blen);
            let part = &mut dst[done..done + n];
            let range = boff as usize..(boff as usize + n);
            if let Some(block) = self.cache.get(&key) {
                part.copy_from_slice(&block[range]);
            } else if whole || blen as usize <= 4 * codec::SEGMENT {
                let block = self.cache.get_or_fetch(&key, || {
                    prefetch::fetch_block(&*self.store, &self.cache, c, &key, blen as usize)
                })?;
                part.copy_from_slice(&block[range]);
            } else {
                codec::read(
                    &*self.store,
                    Some(&self.trailers),
                    &key,
                    blen as usize,
                    boff as usize,
                    part,
                )?;
            }
            if seq {
                self.prefetch.cancel(&key);
                for next in bidx + 1..=bidx + self.cfg.readahead_blocks {
                    if next * bs < size {
                        let len = (size - next * bs).min(bs);
                        self.prefetch
                            .request(block_key(id, next, len), len as usize);
                    }
                }
            }
            done += n;
            soff += n as u32;
        }
        Ok(())
    }

    /// An empty buffer with room for a whole block and its trailer.
    pub(crate) fn block_buffer(&self) -> Vec<u8> {
        self.buffers.take()
    }

    /// Queue block `key` whose payload is `block` for upload; uncompressed, the checksum
    /// trailer is appended in place (no copy when the buffer has room for it).
    pub(crate) fn upload_sealed(&self, key: String, block: Vec<u8>) -> Arc<Completion> {
        let obj = codec::seal_with(self.cfg.compression, block);
        self.uploads.submit(key, obj)
    }

    pub(crate) fn maybe_compact(&self, ino: Ino, idx: u32, count: usize) {
        if count < self.cfg.compact_threshold {
            return;
        }
        if !self.compacting.lock().unwrap().insert((ino, idx)) {
            return;
        }
        if let Some(tx) = self.compact_tx.lock().unwrap().as_ref() {
            let _ = tx.send((ino, idx));
        }
    }

    /// Rewrite a chunk's slices as one slice.
    pub fn compact(&self, ino: Ino, idx: u32) -> Result<bool> {
        let slices = self.meta.read_chunk(ino, idx)?;
        if slices.len() < 2 {
            return Ok(false);
        }
        let vis = layout::visible(&slices);
        let Some(start) = vis.iter().map(|s| s.pos).min() else {
            return Ok(false);
        };
        let end = vis.iter().map(|s| s.end()).max().unwrap_or(start);
        let new = if vis.iter().all(|s| s.id == 0) {
            Slice::zero(start, end - start)
        } else {
            let mut buf = vec![0u8; (end - start) as usize];
            self.read_slices(&slices, start, &mut buf, false)?;
            let id = self.meta.new_slice_id()?;
            let buf = Bytes::from(buf);
            let bs = self.cfg.block_size as usize;
            for (i, key) in slice_keys(id, end - start, self.cfg.block_size)
                .into_iter()
                .enumerate()
            {
                let part = &buf[i * bs..((i + 1) * bs).min(buf.len())];
                self.store
                    .put(&key, codec::seal_with(self.cfg.compression, part.to_vec()))?;
            }
            Slice {
                pos: start,
                id,
                size: end - start,
                off: 0,
                len: end - start,
            }
        };
        let replaced = self.meta.compact_chunk(ino, idx, &slices, new)?;
        if !replaced && new.id != 0 {
            self.delete_slice(&new);
        }
        Ok(replaced)
    }

    fn delete_slice(&self, s: &Slice) {
        for key in slice_keys(s.id, s.size, self.cfg.block_size) {
            if let Err(e) = self.store.delete(&key) {
                tracing::warn!(error = %e, "delete of a freed block failed; it stays as garbage");
            }
        }
    }

    /// Delete the objects of every slice in the trash. Returns how many slices were freed.
    pub fn empty_trash(&self) -> Result<usize> {
        let mut freed = 0;
        loop {
            let batch = self.meta.trash_batch(64)?;
            if batch.is_empty() {
                return Ok(freed);
            }
            for (id, slices) in batch {
                let mut seen = HashSet::new();
                for s in slices.iter().filter(|s| s.id != 0 && seen.insert(s.id)) {
                    self.delete_slice(s);
                    freed += 1;
                }
                self.meta.trash_done(id)?;
            }
        }
    }
}

fn compact_loop(cs: std::sync::Weak<ChunkStore>, rx: Receiver<(Ino, u32)>) {
    while let Ok((ino, idx)) = rx.recv() {
        let Some(cs) = cs.upgrade() else { return };
        if let Err(e) = cs.compact(ino, idx) {
            tracing::warn!(ino, idx, error = %e, "compaction failed");
        }
        cs.compacting.lock().unwrap().remove(&(ino, idx));
    }
}

fn trash_loop(cs: std::sync::Weak<ChunkStore>, stop: Arc<AtomicBool>) {
    let (_keep, idle) = mpsc::channel::<()>();
    while !stop.load(Ordering::SeqCst) {
        match idle.recv_timeout(Duration::from_millis(500)) {
            Err(RecvTimeoutError::Timeout) | Ok(()) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some(cs) = cs.upgrade() else { return };
        if let Err(e) = cs.empty_trash() {
            tracing::warn!(error = %e, "emptying the trash failed; will retry");
        }
    }
}

/// Where data-path errors become errno values; I/O failures are logged here with the object.
impl From<DataError> for Errno {
    fn from(e: DataError) -> Errno {
        match e {
            DataError::Meta(m) => m.into(),
            other => {
                tracing::error!(error = %other, "data operation failed");
                Errno::EIO
            }
        }
    }
}
