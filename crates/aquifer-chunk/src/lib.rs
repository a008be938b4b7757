//! The data path. A file is cut into 64 MiB chunks; every write becomes an immutable slice of
//! one chunk, stored as blocks of at most the volume's block size under keys derived from the
//! never-reused slice id. A chunk's content is its slice list applied oldest to newest.
//!
//! One folder per subsystem, each adding the methods of its part to [`ChunkStore`]:
//!
//! * [`write`](mod@write): [`FileWriter`] buffers writes into open slices, uploads full
//!   blocks in the background and commits slices to the metadata on flush;
//!   [`write::durable`] answers "when is a block durable?".
//! * [`read`]: [`ChunkStore::read`] merges a chunk's slices ([`read::layout::visible`]) and
//!   reads the blocks, fetching ahead for sequential readers; warm-up and whole-file copies.
//! * [`store`]: what blocks are stored in and as what: the object store stack
//!   ([`store::build`]), block keys ([`store::keys`]), the stored form ([`store::codec`]),
//!   the journal and writeback layers, the volume marker, the cache tiers.
//! * [`maintenance`]: background workers that compact fragmented chunks and delete the
//!   objects of freed slices; offline gc and fsck.
//!
//! This file holds the [`ChunkStore`] type, its settings, its constructor and its shutdown.

mod error;
pub mod maintenance;
pub mod read;
pub mod store;
#[cfg(test)]
mod testutil;
mod workers;
pub mod write;

use aquifer_cache::{Cache, Tier};
use aquifer_meta::Meta;
use aquifer_object::ObjectStore;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

pub use error::{DataError, Result};
pub use read::{CacheCounts, CacheOp, WHOLE_SYNC_MAX};
pub use store::codec::Compression;
pub use write::{Budget, BufferPool, Completion, FileWriter, Held, UploadPool};

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
    pub compression: Compression,
    /// The cache tiers below RAM (local disks), built by the caller.
    pub lower_tiers: Tiers,
    /// The peer cache group this mount is a member of: asked for a block after the local
    /// tiers, before the store (`--cache-group`).
    pub group: Option<Arc<aquifer_group::Group>>,
    /// Which written blocks the disk tiers keep ([`CacheWrites`]).
    pub cache_writes: CacheWrites,
    /// How long freed blocks stay after the change that freed them, on the metadata
    /// engine's clock: long enough that a failover of a shared engine to a replica that
    /// missed the change does not bring back metadata pointing at deleted blocks.
    pub free_grace: Duration,
}

/// Which written blocks enter the disk cache tiers on their way to the store.
///
/// A checkpoint is rarely read back on the node that wrote it: its blocks would only take
/// the cache's room from the blocks training reads keep hitting. Small files — written
/// within their first block, stored when the file is closed or synced — are what a node
/// that writes a dataset reads back, and cost little room; they are kept
/// by default. Not kept by default: a large write's full blocks, its tail, and the partial
/// blocks a writer stores early to free memory (a burst of concurrent writers makes many).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheWrites {
    /// None: written blocks go to the store only.
    None,
    /// Writes within a file's first block (small files).
    #[default]
    Small,
    /// Every written block.
    All,
}

impl CacheWrites {
    pub fn parse(s: &str) -> std::result::Result<CacheWrites, String> {
        match s {
            "none" => Ok(CacheWrites::None),
            "small" => Ok(CacheWrites::Small),
            "all" => Ok(CacheWrites::All),
            _ => Err(format!("{s:?} is not one of none, small, all")),
        }
    }

    /// Whether a written block of this kind is kept.
    pub fn keeps(self, kind: write::Written) -> bool {
        match self {
            CacheWrites::None => false,
            CacheWrites::Small => kind == write::Written::Last,
            CacheWrites::All => true,
        }
    }
}

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
            compression: Compression::None,
            lower_tiers: Tiers::default(),
            group: None,
            cache_writes: CacheWrites::Small,
            free_grace: Duration::ZERO,
        }
    }
}

pub struct ChunkStore {
    meta: Arc<dyn Meta>,
    /// The store, through the journal (every put is seen by it).
    store: Arc<dyn ObjectStore>,
    journal: Arc<store::journal::Journal>,
    cfg: DataConfig,
    uploads: UploadPool,
    buffers: Arc<BufferPool>,
    budget: Arc<Budget>,
    /// Every live writer, for the budget to seal the idlest ones' tails.
    writers: Mutex<Vec<Weak<FileWriter>>>,
    /// One writer at a time makes room in the budget; the others wait for it.
    spilling: Mutex<()>,
    clock: AtomicU64,
    cache: Arc<Cache>,
    /// Checksum trailers of blocks read at random: 260 bytes per 4 MiB block.
    trailers: Cache,
    prefetch: read::prefetch::Prefetcher,
    /// Queues chunks for the background compactor ([`maintenance`]).
    compactor: maintenance::Compactor,
    workers: Mutex<Vec<JoinHandle<()>>>,
    stop: Arc<AtomicBool>,
    /// Whole-file copies being made in the background (read/warm.rs).
    whole_builds: read::warm::WholeBuilds,
    /// Large files read at random, fetched whole in the background (read/warm.rs).
    fills: std::sync::Mutex<read::warm::Fills>,
}

impl ChunkStore {
    pub fn new(
        meta: Arc<dyn Meta>,
        store: Arc<dyn ObjectStore>,
        mut cfg: DataConfig,
    ) -> Result<Arc<ChunkStore>> {
        let setup = |e: std::io::Error| DataError::Setup(format!("cannot start a thread: {e}"));
        let journal = store::journal::Journal::new(meta.clone(), store)?;
        let store: Arc<dyn ObjectStore> = journal.clone();
        store::cache::fit_readahead(&mut cfg);
        // Enough idle buffers for a writer to keep the uploaders busy; any more are freed.
        let buffers = Arc::new(BufferPool::new(
            store::codec::stored_len(cfg.block_size as usize),
            cfg.upload_threads.clamp(2, 8),
        ));
        let cache = store::cache::block_cache(&cfg, &buffers);
        let uploads = UploadPool::new(
            store.clone(),
            cfg.upload_threads,
            cfg.upload_queue,
            buffers.clone(),
            store::cache::write_through(&cfg, &cache),
        )
        .map_err(setup)?;
        let (compactor, rx) = maintenance::Compactor::new();
        let prefetch = read::prefetch::Prefetcher::new(
            store.clone(),
            cache.clone(),
            cfg.prefetch_threads,
            cfg.readahead_blocks as usize,
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
            compactor,
            workers: Mutex::new(Vec::new()),
            stop: Arc::new(AtomicBool::new(false)),
            whole_builds: Default::default(),
            fills: Default::default(),
        });
        let workers = maintenance::start(&cs, rx).map_err(setup)?;
        cs.workers.lock().extend(workers);
        Ok(cs)
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
        self.compactor.close();
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
}
