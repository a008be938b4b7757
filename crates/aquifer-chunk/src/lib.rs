//! The data path. A file is cut into 64 MiB chunks; every write becomes an immutable slice of
//! one chunk, stored as blocks of at most the volume's block size under keys derived from the
//! never-reused slice id. A chunk's content is its slice list applied oldest to newest.
//!
//! * [`writer::FileWriter`] buffers writes into open slices, uploads full blocks in the
//!   background and commits slices to the metadata on flush.
//! * [`ChunkStore::read`] merges a chunk's slices ([`layout::visible`]) and reads the blocks.
//! * Background workers compact fragmented chunks and delete the objects of freed slices.

pub mod codec;
pub mod journal;
pub mod layout;
pub mod maintenance;
mod pool;
pub mod prefetch;
pub mod staging;
pub mod writer;

use aquifer_cache::{Cache, MemTier, Recycle, Tier};
use aquifer_meta::{Errno, Ino, Meta, MetaError, Slice, CHUNK_SIZE};
use aquifer_object::{ObjectError, ObjectStore};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{mpsc, Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use pool::{Budget, BufferPool, Completion, Held, UploadPool};

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
    #[error("cannot start the data path: {0}")]
    Setup(String),
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
    /// Blocks queued for upload before a submitting writer waits.
    pub upload_queue: usize,
    /// Memory for buffered write data: open slices' tails, blocks queued or being
    /// uploaded, failed blocks kept for a retry. Writers wait when it is spent.
    pub write_buffer: usize,
    /// Compact a chunk once it holds this many slices.
    pub compact_threshold: usize,
    /// Memory for whole blocks read ahead for sequential readers.
    pub cache_bytes: usize,
    /// Blocks fetched ahead of a sequential reader, and the threads fetching them.
    pub readahead_blocks: u32,
    pub prefetch_threads: usize,
    /// How new blocks are compressed (the volume's setting).
    pub compression: codec::Compression,
    /// The cache tiers below RAM (local disks), built by the caller.
    pub lower_tiers: Tiers,
    /// How long freed blocks stay after the change that freed them, on the metadata
    /// engine's clock: long enough that a failover of a shared engine to a replica that
    /// missed the change does not bring back metadata pointing at deleted blocks.
    pub free_grace: Duration,
}

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

/// Largest file copied whole at its open for passthrough (a larger one is read through
/// the data path); the copy is made from cached blocks at disk speed.
pub const WHOLE_SYNC_MAX: u64 = 256 << 20;

/// Cache tiers handed to the data path, slowest last.
#[derive(Clone, Default)]
pub struct Tiers(pub Vec<Arc<dyn Tier>>);

impl std::fmt::Debug for Tiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|t| t.name()))
            .finish()
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            block_size: 4 << 20,
            upload_threads: 4,
            upload_queue: 16,
            write_buffer: 64 << 20,
            compact_threshold: 32,
            cache_bytes: 64 << 20,
            readahead_blocks: 2,
            prefetch_threads: 2,
            compression: codec::Compression::None,
            lower_tiers: Tiers::default(),
            free_grace: Duration::ZERO,
        }
    }
}

pub struct ChunkStore {
    meta: Arc<dyn Meta>,
    /// The store, through the journal (every put is seen by it).
    store: Arc<dyn ObjectStore>,
    journal: Arc<journal::Journal>,
    cfg: DataConfig,
    uploads: UploadPool,
    buffers: Arc<BufferPool>,
    budget: Arc<Budget>,
    /// Every live writer, for the budget to seal the idlest ones' tails.
    writers: Mutex<Vec<Weak<writer::FileWriter>>>,
    /// One writer at a time makes room in the budget; the others wait for it.
    spilling: Mutex<()>,
    clock: AtomicU64,
    cache: Arc<Cache>,
    /// Checksum trailers of blocks read at random: 260 bytes per 4 MiB block.
    trailers: Cache,
    prefetch: prefetch::Prefetcher,
    compact_tx: Mutex<Option<Sender<(Ino, u32)>>>,
    /// Chunks queued or being compacted, each with whether it reached another multiple of
    /// the threshold meanwhile (then it is compacted once more when this run ends).
    compacting: Mutex<HashMap<(Ino, u32), bool>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    stop: Arc<AtomicBool>,
}

impl ChunkStore {
    pub fn new(
        meta: Arc<dyn Meta>,
        store: Arc<dyn ObjectStore>,
        mut cfg: DataConfig,
    ) -> Result<Arc<ChunkStore>> {
        let setup = |e: std::io::Error| DataError::Setup(format!("cannot start a thread: {e}"));
        let journal = journal::Journal::new(meta.clone(), store)?;
        let store: Arc<dyn ObjectStore> = journal.clone();
        // Blocks fetched ahead must still be cached when the reader reaches them: a window
        // wider than the cache evicts them first and every block is fetched twice.
        // The cache counts what a block pins: its stored size (checksums included).
        let fit = cfg.cache_bytes / 2 / codec::stored_len(cfg.block_size.max(1) as usize);
        cfg.readahead_blocks = cfg.readahead_blocks.min(fit.max(1) as u32);
        // Enough idle buffers for a writer to keep the uploaders busy; any more are freed.
        let buffers = Arc::new(BufferPool::new(
            codec::stored_len(cfg.block_size as usize),
            cfg.upload_threads.clamp(2, 8),
        ));
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
        let cache = Arc::new(Cache::new(tiers).with_recycler(recycle));
        // Written blocks enter the disk tiers (write-through). A compressed block's payload
        // is not at hand once sealed, and a compressed volume trades reads for space anyway.
        let stored: Option<pool::OnStored> =
            (cfg.compression == codec::Compression::None && cache.keeps_writes()).then(|| {
                let cache = cache.clone();
                Arc::new(move |key: &str, obj: &Bytes| {
                    if let Some((_, _, len)) = maintenance::parse_block_key(key) {
                        if let Some(payload) = obj.get(..len as usize) {
                            cache.write_through(key, &Arc::new(payload.to_vec()));
                        }
                    }
                }) as pool::OnStored
            });
        let uploads = UploadPool::new(
            store.clone(),
            cfg.upload_threads,
            cfg.upload_queue,
            buffers.clone(),
            stored,
        )
        .map_err(setup)?;
        let (tx, rx) = mpsc::channel();
        let prefetch = prefetch::Prefetcher::new(
            store.clone(),
            cache.clone(),
            cfg.prefetch_threads,
            cfg.compression,
        )
        .map_err(setup)?;
        let budget = Budget::new(cfg.write_buffer);
        let cs = Arc::new(ChunkStore {
            meta,
            store,
            journal,
            cfg,
            uploads,
            buffers,
            budget,
            writers: Mutex::new(Vec::new()),
            spilling: Mutex::new(()),
            clock: AtomicU64::new(0),
            cache,
            trailers: Cache::memory(4 << 20),
            prefetch,
            compact_tx: Mutex::new(Some(tx)),
            compacting: Mutex::new(HashMap::new()),
            workers: Mutex::new(Vec::new()),
            stop: Arc::new(AtomicBool::new(false)),
        });
        let weak = Arc::downgrade(&cs);
        let compactor = std::thread::Builder::new()
            .name("compact".into())
            .spawn(move || compact_loop(weak, rx))
            .map_err(setup)?;
        let weak = Arc::downgrade(&cs);
        let stop = cs.stop.clone();
        let trash = std::thread::Builder::new()
            .name("trash".into())
            .spawn(move || trash_loop(weak, stop))
            .map_err(setup)?;
        cs.workers.lock().extend([compactor, trash]);
        Ok(cs)
    }

    /// Make every committed change durable, with every block put so far (see
    /// [`journal::Journal::sync_committed`]: small blocks through the metadata log, others synced in
    /// the store before the metadata).
    pub fn sync(&self) -> Result<()> {
        self.journal.sync_committed()
    }

    pub(crate) fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// Bytes of buffered write data held now (tails, uploads in flight, failed blocks).
    pub fn buffered_bytes(&self) -> usize {
        self.budget.used()
    }

    pub(crate) fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn register_writer(&self, w: &Arc<writer::FileWriter>) {
        let mut ws = self.writers.lock();
        if ws.len() >= 64 && ws.len().is_power_of_two() {
            ws.retain(|w| w.strong_count() > 0);
        }
        ws.push(Arc::downgrade(w));
    }

    /// The budget cannot give `need` bytes: have the tails of the writers idle longest
    /// uploaded until that much is on its way, then wait a little for uploads to finish.
    pub(crate) fn make_room(&self, need: usize) {
        {
            let _one = self.spilling.lock();
            if self.budget.used() + need > self.budget.cap() {
                let mut ws: Vec<Arc<writer::FileWriter>> = {
                    let mut reg = self.writers.lock();
                    reg.retain(|w| w.strong_count() > 0);
                    reg.iter().filter_map(|w| w.upgrade()).collect()
                };
                ws.sort_by_key(|w| w.last_write.load(Ordering::Relaxed));
                let mut moving = 0;
                for w in ws {
                    if moving >= need {
                        break;
                    }
                    moving += w.spill();
                }
            }
        }
        self.budget.wait_for(need, Duration::from_millis(50));
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
        self.compact_tx.lock().take();
        let workers = std::mem::take(&mut *self.workers.lock());
        for w in workers {
            let _ = w.join();
        }
        let _ = self.empty_trash();
        // A clean stop leaves nothing to replay.
        if let Err(e) = self.journal.checkpoint() {
            tracing::warn!(error = %e, "checkpoint of the object journal failed");
        }
        // What the disk tiers were offered is on disk for the next start.
        self.cache.flush();
    }

    /// The block cache, for warm-up and figures.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// A whole-file copy of `ino` (`file_len` bytes, as `stamp` describes it) on a cache
    /// disk, for the kernel to read directly (FUSE passthrough). An existing copy is checked
    /// against the stamp and its checksum; a file up to [`WHOLE_SYNC_MAX`] whose blocks are
    /// all on the cache disk is copied now from those blocks. None otherwise: the caller
    /// reads through the data path as usual.
    pub fn whole_copy(&self, ino: Ino, stamp: &[u8], file_len: u64) -> Option<std::fs::File> {
        if file_len == 0 || self.cache.tiers().len() < 2 {
            return None;
        }
        let key = format!("files/{ino}");
        if let Some(f) = self.cache.whole_open(&key, stamp) {
            return Some(f);
        }
        if file_len > WHOLE_SYNC_MAX {
            return None;
        }
        let c = self
            .cache_range(ino, CacheOp::Check, 0, file_len, file_len)
            .ok()?;
        if c.cached < c.total {
            return None;
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
                self.read_chunk(ino, idx, cpos as u32, &mut buf[..n], false)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                w.write_all(&buf[..n])?;
                pos += n as u64;
            }
            Ok(())
        };
        if !self.cache.whole_put(&key, stamp, file_len, &mut fill) {
            return None;
        }
        self.cache.whole_open(&key, stamp)
    }

    /// Warm, check or evict the cached blocks under `[off, off+len)` of a file whose
    /// length is `file_len`. "Cached" means held by the last tier (the disk, when there is
    /// one): what survives a restart and RAM pressure. Warming waits for the disk to take
    /// the blocks, so a check or a read right after finds them.
    pub fn cache_range(
        &self,
        ino: Ino,
        op: CacheOp,
        off: u64,
        len: u64,
        file_len: u64,
    ) -> Result<CacheCounts> {
        let end = off.saturating_add(len).min(file_len);
        let bs = self.cfg.block_size;
        let mut c = CacheCounts::default();
        let Some(last) = self.cache.tiers().last().cloned() else {
            return Ok(c);
        };
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
                    let cached = last.contains(&key);
                    if cached {
                        c.cached += n;
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
            let slices = if attempt == 0 {
                self.meta.read_chunk(ino, idx)?
            } else {
                self.meta.read_chunk_fresh(ino, idx)?
            };
            match self.read_slices(&slices, cpos, dst, seq) {
                // A compaction (here or on another mount) may have freed the blocks we were
                // about to read: the slice list has changed, so read it again, fresh.
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
        let mut done = 0usize;
        while done < dst.len() {
            let bidx = soff / bs;
            let boff = soff % bs;
            let blen = (size - bidx * bs).min(bs);
            let n = ((blen - boff) as usize).min(dst.len() - done);
            let key = block_key(id, bidx, blen);
            self.read_block(&key, blen, boff, &mut dst[done..done + n], seq)?;
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
        // disk tier, every block is: the next epoch's random reads find it on disk.
        let whole = whole || c != codec::Compression::None || !self.cfg.lower_tiers.0.is_empty();
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
    fn cached_block(&self, key: &str, blen: u32) -> Result<aquifer_cache::Block> {
        let c = self.cfg.compression;
        self.cache.get_or_fetch(key, || {
            prefetch::fetch_block(&*self.store, &self.cache, c, key, blen as usize)
        })
    }

    /// An empty buffer with room for a whole block and its trailer.
    pub(crate) fn block_buffer(&self) -> Vec<u8> {
        self.buffers.take()
    }

    /// The capacity of [`block_buffer`](ChunkStore::block_buffer)'s buffers.
    pub(crate) fn block_buffer_size(&self) -> usize {
        self.buffers.size()
    }

    /// Queue block `key` whose payload is `block` for upload, holding `held` of the write
    /// budget until it is stored; uncompressed, the checksum trailer is appended in place
    /// (no copy when the buffer has room for it).
    pub(crate) fn upload_sealed(
        &self,
        key: String,
        block: Vec<u8>,
        held: Held,
        inline: bool,
    ) -> Arc<Completion> {
        let obj = codec::seal_with(self.cfg.compression, block);
        if inline {
            self.uploads.run_inline(key, obj, held)
        } else {
            self.uploads.submit(key, obj, held)
        }
    }

    /// Upload again an object whose upload failed.
    pub(crate) fn resubmit(&self, key: String, obj: Bytes, held: Held) -> Arc<Completion> {
        self.uploads.submit(key, obj, held)
    }

    /// Queue a compaction of a chunk asked for again while it was being compacted.
    fn maybe_compact_now(&self, ino: Ino, idx: u32) {
        if self.compacting.lock().insert((ino, idx), false).is_some() {
            return;
        }
        if let Some(tx) = self.compact_tx.lock().as_ref() {
            let _ = tx.send((ino, idx));
        }
    }

    pub(crate) fn maybe_compact(&self, ino: Ino, idx: u32, count: usize) {
        // At every multiple of the threshold: a sparse chunk whose data stays in more runs
        // than that after compaction is not rewritten again on every append.
        let t = self.cfg.compact_threshold.max(2);
        if count < t || !count.is_multiple_of(t) {
            return;
        }
        {
            let mut c = self.compacting.lock();
            if let Some(again) = c.get_mut(&(ino, idx)) {
                // Appends the running compaction does not see: without another run the
                // chunk could stay fragmented until it reaches the next multiple.
                *again = true;
                return;
            }
            c.insert((ino, idx), false);
        }
        if let Some(tx) = self.compact_tx.lock().as_ref() {
            let _ = tx.send((ino, idx));
        }
    }

    /// Rewrite a chunk's slices as few slices holding only its data: runs of visible bytes
    /// become one slice each and holes stay holes (stored as nothing). Runs are joined
    /// across the narrowest gaps until fewer than half the compaction threshold remain, so a
    /// compacted chunk is not compacted again at once. Blocks are read and written one at a
    /// time, so compaction needs one block of memory whatever the chunk holds.
    ///
    /// Returns false when there was nothing to do or the chunk changed meanwhile (an append,
    /// a truncate, an unlink): then the new blocks are deleted again, and the error of a
    /// read of an input that was freed in the meantime is not an error at all.
    pub fn compact(&self, ino: Ino, idx: u32) -> Result<bool> {
        let slices = self.meta.read_chunk(ino, idx)?;
        if slices.len() < 2 {
            return Ok(false);
        }
        let runs = data_runs(&layout::visible(&slices), self.cfg.compact_threshold / 2);
        let mut new = Vec::with_capacity(runs.len());
        let written = runs.iter().try_for_each(|&(start, end)| {
            let id = self.meta.new_slice_id()?;
            let s = Slice {
                pos: start,
                id,
                size: end - start,
                off: 0,
                len: end - start,
            };
            new.push(s);
            self.write_compacted(&slices, &s)
        });
        if let Err(e) = written {
            new.iter().for_each(|s| self.delete_slice(s));
            // Inputs freed by a racing truncate or unlink: the chunk changed, nothing lost.
            let changed = self.meta.read_chunk(ino, idx).map_or(true, |now| {
                now.len() < slices.len() || now[..slices.len()] != slices[..]
            });
            return if changed { Ok(false) } else { Err(e) };
        }
        let replaced = match self.meta.compact_chunk(ino, idx, &slices, &new) {
            Ok(r) => r,
            // The file is gone.
            Err(e) if e.errno() == Errno::ENOENT => false,
            // The engine refused the change: the new blocks are nobody's.
            Err(e @ MetaError::Sys(_)) => {
                new.iter().for_each(|s| self.delete_slice(s));
                return Err(e.into());
            }
            // The change may have been applied (an answer lost past the retry deadline):
            // the new blocks may be the chunk's now, so they stay; if they are not, gc
            // finds them.
            Err(e) => {
                tracing::warn!(ino, idx, error = %e, "compaction's outcome is unknown; its new blocks are kept");
                return Err(e.into());
            }
        };
        if !replaced {
            new.iter().for_each(|s| self.delete_slice(s));
        }
        Ok(replaced)
    }

    /// Store the chunk content `s` covers (as `slices` describe it) as the blocks of `s`.
    fn write_compacted(&self, slices: &[Slice], s: &Slice) -> Result<()> {
        let bs = self.cfg.block_size;
        for (i, key) in slice_keys(s.id, s.size, bs).into_iter().enumerate() {
            let at = s.pos + i as u32 * bs;
            let len = (s.end() - at).min(bs) as usize;
            let mut buf = self.buffers.take();
            buf.resize(len, 0);
            self.read_slices(slices, at, &mut buf, false)?;
            self.store
                .put(&key, codec::seal_with(self.cfg.compression, buf))?;
        }
        Ok(())
    }

    fn delete_slice(&self, s: &Slice) {
        if let Err(e) = self.delete_blocks(s) {
            tracing::warn!(error = %e, "delete of a block failed; gc will find it");
        }
    }

    fn delete_blocks(&self, s: &Slice) -> Result<()> {
        delete_blocks(&*self.store, s, self.cfg.block_size, &|key| {
            self.cache.remove(key)
        })
    }

    /// Delete the objects of every slice in the trash that was freed at least the free
    /// grace period ago. Returns how many slices were freed.
    pub fn empty_trash(&self) -> Result<usize> {
        Ok(self.empty_trash_due()?.freed)
    }

    fn empty_trash_due(&self) -> Result<TrashRound> {
        // An fsync's worth of durability, journal included: forcing a checkpoint here would
        // sync the whole store every time compaction frees a slice.
        free_trash(
            &*self.meta,
            &*self.store,
            self.cfg.block_size,
            self.cfg.free_grace,
            &|| self.journal.sync_committed(),
            // A deleted block's cache files would only wait for eviction.
            &|key| self.cache.remove(key),
        )
    }
}

fn delete_blocks(
    store: &dyn ObjectStore,
    s: &Slice,
    block_size: u32,
    forget: &dyn Fn(&str),
) -> Result<()> {
    for key in slice_keys(s.id, s.size, block_size) {
        store.delete(&key)?;
        forget(&key);
    }
    Ok(())
}

/// What one pass over the trash did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrashRound {
    /// Slices whose blocks were deleted.
    pub freed: usize,
    /// Until the first record left for being younger than the grace period is due (the
    /// grace itself when none was left: a record made later is due later still).
    pub next_due: Duration,
}

/// Delete the objects of every slice in the trash whose record is at least `grace` old on
/// the metadata engine's clock ([`aquifer_meta::Volume::clock`]; a record with no time, an older client's,
/// counts as old).
///
/// The change that freed them is made durable first by `durable` (blocks, then metadata, as
/// [`ChunkStore::sync`]): otherwise a power cut could bring back metadata that points at
/// blocks already deleted. The grace covers what durability on one server does not: a
/// failover to a replica that had not received the change. A record whose deletes failed
/// stays in the trash and is tried again on the next round (and by `aquifer gc --delete`).
/// Each deleted block is passed to `forget` (to drop it from a cache).
pub fn free_trash(
    meta: &dyn Meta,
    store: &dyn ObjectStore,
    block_size: u32,
    grace: Duration,
    durable: &dyn Fn() -> Result<()>,
    forget: &dyn Fn(&str),
) -> Result<TrashRound> {
    let mut round = TrashRound {
        freed: 0,
        next_due: grace,
    };
    let mut synced = false;
    let mut after = 0;
    let now = if grace.is_zero() {
        None
    } else {
        Some(meta.clock()?)
    };
    loop {
        let batch = meta.trash_batch(after, 64)?;
        let Some(last) = batch.last() else {
            return Ok(round);
        };
        after = last.0;
        let due: Vec<_> = batch
            .into_iter()
            .filter(|(_, _, at)| {
                let (Some(now), Some(at)) = (now, *at) else {
                    return true;
                };
                let age = time_diff(now, at);
                if age >= grace {
                    return true;
                }
                round.next_due = round.next_due.min(grace - age);
                false
            })
            .collect();
        if due.is_empty() {
            continue;
        }
        if !synced {
            durable()?;
            synced = true;
        }
        for (id, slices, _) in due {
            let mut seen = HashSet::new();
            let mut failed = None;
            for s in slices.iter().filter(|s| s.id != 0 && seen.insert(s.id)) {
                match delete_blocks(store, s, block_size, forget) {
                    Ok(()) => round.freed += 1,
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            match failed {
                None => meta.trash_done(id)?,
                Some(e) => {
                    round.next_due = Duration::ZERO;
                    tracing::warn!(trash = id, error = %e, "freeing blocks failed; will retry")
                }
            }
        }
    }
}

/// How long after `then` `now` is (zero when it is not after).
fn time_diff(now: aquifer_meta::Time, then: aquifer_meta::Time) -> Duration {
    let ns = |t: aquifer_meta::Time| t.sec as i128 * 1_000_000_000 + t.nsec as i128;
    let d = ns(now) - ns(then);
    if d <= 0 {
        Duration::ZERO
    } else {
        Duration::from_nanos(d.min(u64::MAX as i128) as u64)
    }
}

/// Runs `(start, end)` of visible data (hole slices are not data): adjacent pieces and
/// pieces less than a segment apart are joined (a few KiB of stored zeros cost less than a
/// slice record and a request), then the narrowest gaps while fewer than `max_runs` runs
/// are wanted — but never storing more zeros than there are data bytes, so a sparse chunk
/// stays sparse.
fn data_runs(visible: &[Slice], max_runs: usize) -> Vec<(u32, u32)> {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for s in visible.iter().filter(|s| s.id != 0) {
        match runs.last_mut() {
            Some(last) if s.pos - last.1 < codec::SEGMENT as u32 => last.1 = s.end(),
            _ => runs.push((s.pos, s.end())),
        }
    }
    if runs.len() < max_runs.max(1) {
        return runs;
    }
    let data: u64 = runs.iter().map(|r| (r.1 - r.0) as u64).sum();
    let mut by_width: Vec<usize> = (0..runs.len() - 1).collect();
    by_width.sort_by_key(|&i| (runs[i + 1].0 - runs[i].1, i));
    let mut join = vec![false; runs.len() - 1];
    let (mut zeros, mut joined) = (0u64, 0usize);
    for i in by_width {
        let gap = (runs[i + 1].0 - runs[i].1) as u64;
        if runs.len() - joined < max_runs.max(1) || zeros + gap > data {
            break;
        }
        join[i] = true;
        zeros += gap;
        joined += 1;
    }
    let mut merged: Vec<(u32, u32)> = vec![runs[0]];
    for (i, r) in runs.into_iter().enumerate().skip(1) {
        let last = merged.last_mut().expect("starts with one run");
        if join[i - 1] {
            last.1 = r.1;
        } else {
            merged.push(r);
        }
    }
    merged
}

fn compact_loop(cs: Weak<ChunkStore>, rx: Receiver<(Ino, u32)>) {
    while let Ok((ino, idx)) = rx.recv() {
        let Some(cs) = cs.upgrade() else { return };
        match catch_unwind(AssertUnwindSafe(|| cs.compact(ino, idx))) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(ino, idx, error = %e, "compaction failed"),
            Err(_) => tracing::error!(ino, idx, "compaction panicked; the chunk is left as it was"),
        }
        let again = cs.compacting.lock().remove(&(ino, idx)) == Some(true);
        if again {
            cs.maybe_compact_now(ino, idx);
        }
    }
}

fn trash_loop(cs: Weak<ChunkStore>, stop: Arc<AtomicBool>) {
    let (_keep, idle) = mpsc::channel::<()>();
    // Nothing in the trash can be due before this: every record is at least as young as
    // the grace period was at the last pass, so the trash is not scanned every tick.
    let mut due = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        match idle.recv_timeout(Duration::from_millis(500)) {
            Err(RecvTimeoutError::Timeout) | Ok(()) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some(cs) = cs.upgrade() else { return };
        if let Err(e) = cs.journal.checkpoint_if_due() {
            tracing::warn!(error = %e, "checkpoint of the object journal failed; will retry");
        }
        if Instant::now() < due {
            continue;
        }
        match catch_unwind(AssertUnwindSafe(|| cs.empty_trash_due())) {
            Ok(Ok(r)) => due = Instant::now() + r.next_due,
            Ok(Err(e)) => tracing::warn!(error = %e, "emptying the trash failed; will retry"),
            Err(_) => tracing::error!("emptying the trash panicked; will retry"),
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
