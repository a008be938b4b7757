//! The local-disk tier: one directory on a node's NVMe, bounded by what the disk holds.
//!
//! Layout under the tier's root (a directory named by the volume's UUID, so volumes never
//! mix): `blocks/XX/NAME`, where `XX` is two hex digits of the key's crc32c (256
//! directories of a few thousand files each at a million blocks) and `NAME` the key with
//! `%` and `/` escaped; `tmp/` holds files being written; `files/XX/NAME` holds whole-file
//! copies for FUSE passthrough.
//!
//! A cache file is a 16-byte header — magic `AQCB`, format version (u16), flags (u16),
//! payload length (u32), crc32c of the payload (u32), little-endian — and the payload. It is
//! written under `tmp/` and renamed into place, so a reader sees a whole file or none; a
//! file that fails its checks (torn by a power cut, truncated, a flipped bit, another
//! version) is a miss, removed so the block is fetched and cached again.
//!
//! What the tier counts is what the disk holds: each file's allocated blocks (`st_blocks`)
//! and the directories' own blocks. Inserts that would pass the capacity are declined, so
//! the directory never holds more than its quota plus the file being written; a background
//! thread evicts (S3-FIFO, see [`crate::policy`]) from the high watermark down to the low
//! one, and further while the device has less free space than the free-space ratio.
//!
//! A whole-file copy is the file's bytes alone, since the kernel reads it directly from
//! offset 0; its stamp (what the file was when copied), length and crc32c are in the
//! `user.aquifer.whole` extended attribute, set before the rename. A copy is checked against
//! its stamp at every open and against its checksum whenever its file changed since the
//! last check (`copies.rs`); it counts in the quota and is evicted like a block.
//!
//! The index (keys, weights, eviction order) lives in memory and is rebuilt by a background
//! scan at start; until it is done, reads still find files by name, and inserts wait.
//! A disk that fails (gone, read-only, full, I/O errors) is taken out of use: its reads are
//! misses and its inserts are dropped, and it is tried again after [`DiskConfig::retry`].
//!
//! One file per role:
//! - `layout.rs`: the directories, which file a key is, and the private-directory check;
//! - `blockfile.rs`: checked reads and writes of block files (where a block is checksummed);
//! - `queue.rs`: the write queue and its writer thread;
//! - `index.rs`: the in-memory index and its rebuild at start;
//! - `evict.rs`: the quota, the watermarks and the housekeeper that evicts;
//! - `copies.rs`: whole-file copies (passthrough), checked by stamp and checksum;
//! - `health.rs`: a failing disk taken out of use, probed and put back.
//!
//! This file holds the [`DiskTier`] type, its shared state (`Inner`) and the [`Tier`] wiring.

mod blockfile;
mod copies;
mod evict;
mod health;
mod index;
mod layout;
mod queue;
#[cfg(test)]
mod tests;

pub(crate) use layout::key_hash;
pub use layout::private_dir;

use crate::policy::S3Fifo;
use crate::{Block, Fill, Recycle, Tier, Usage};
use parking_lot::{Condvar, Mutex};
use queue::Queue;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Limits of one disk tier.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    /// Bytes the directory may hold, as the disk counts them.
    pub capacity: u64,
    /// Eviction starts above this share of the capacity...
    pub high: f64,
    /// ...and stops at this one.
    pub low: f64,
    /// Keep this share of the device free, evicting if others fill it.
    pub free_ratio: f64,
    /// A disk out of use is tried again after this long.
    pub retry: Duration,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            capacity: 100 << 30,
            high: 0.95,
            low: 0.70,
            free_ratio: 0.1,
            retry: Duration::from_secs(30),
        }
    }
}

pub struct DiskTier {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// What the tier and its three threads share; the methods of each role are in that role's
/// file (see the list above).
struct Inner {
    root: PathBuf,
    cfg: DiskConfig,
    /// The index (`index.rs`).
    st: Mutex<S3Fifo<()>>,
    /// The directories' own blocks, measured by the housekeeper.
    overhead: AtomicU64,
    /// Bytes others keep in the directory that eviction must leave (staged writeback).
    pinned: Arc<AtomicU64>,
    /// The index is complete (the start-up scan is done).
    ready: AtomicBool,
    /// Out of use until then (None: in use).
    down: Mutex<Option<Instant>>,
    /// The device has less free space than the ratio asks: inserts wait for eviction.
    low_space: AtomicBool,
    /// An insert was declined for room.
    pressure: AtomicBool,
    queue: Mutex<Queue>,
    queue_cv: Condvar,
    /// Wakes the housekeeper (eviction, health checks).
    wake: Mutex<bool>,
    wake_cv: Condvar,
    stop: AtomicBool,
    recycle: Option<Arc<dyn Recycle>>,
    tmp_seq: AtomicU64,
    evicted: AtomicU64,
    corrupt: AtomicU64,
    /// Whole-file copies whose checksum held, and what their file was then (`copies.rs`).
    verified: Mutex<std::collections::HashMap<String, copies::Seen>>,
}

impl DiskTier {
    /// A tier at `root` (created if missing). The index is rebuilt in the background.
    pub fn open(root: &Path, cfg: DiskConfig) -> io::Result<DiskTier> {
        DiskTier::open_with(root, cfg, None)
    }

    /// As [`DiskTier::open`], reading blocks into buffers from `r`.
    pub fn open_with(
        root: &Path,
        cfg: DiskConfig,
        recycle: Option<Arc<dyn Recycle>>,
    ) -> io::Result<DiskTier> {
        let inner = Arc::new(Inner {
            root: root.to_path_buf(),
            cfg,
            st: Mutex::new(S3Fifo::default()),
            overhead: AtomicU64::new(0),
            pinned: Arc::new(AtomicU64::new(0)),
            ready: AtomicBool::new(false),
            down: Mutex::new(None),
            low_space: AtomicBool::new(false),
            pressure: AtomicBool::new(false),
            queue: Mutex::new(Queue::default()),
            queue_cv: Condvar::new(),
            wake: Mutex::new(false),
            wake_cv: Condvar::new(),
            stop: AtomicBool::new(false),
            recycle,
            tmp_seq: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            verified: Mutex::new(std::collections::HashMap::new()),
        });
        // A root that cannot be made is an error for the caller (a wrong flag); one that
        // fails later is a disk out of use.
        private_dir(root)?;
        inner.make_dirs()?;
        let spawn = |name: &str, run: fn(&Inner)| {
            let i = inner.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || run(&i))
        };
        let threads = vec![
            spawn("cache-index", Inner::rebuild)?,
            spawn("cache-write", Inner::write_loop)?,
            spawn("cache-keep", Inner::housekeep)?,
        ];
        Ok(DiskTier {
            inner,
            threads: Mutex::new(threads),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Whether the start-up scan has indexed every file.
    pub fn indexed(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// Wait for the start-up scan (tests, and figures that want the whole index).
    pub fn wait_indexed(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while !self.indexed() {
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Whether the disk is in use (not taken out after a failure).
    pub fn in_use(&self) -> bool {
        self.inner.usable()
    }

    /// Bytes kept in this directory by others that count in its quota and are never
    /// evicted (blocks staged for upload): the cache makes room for them.
    pub fn pinned(&self) -> Arc<AtomicU64> {
        self.inner.pinned.clone()
    }

    /// Cache files found corrupt (and removed) so far.
    pub fn corrupt_found(&self) -> u64 {
        self.inner.corrupt.load(Ordering::Relaxed)
    }

    /// Run the housekeeper now (eviction, health) and wait for it.
    pub fn housekeep_now(&self) {
        self.inner.housekeep_once();
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        self.flush();
        self.inner.stop.store(true, Ordering::Release);
        self.inner.queue_cv.notify_all();
        self.inner.wake();
        for t in std::mem::take(&mut *self.threads.lock()) {
            let _ = t.join();
        }
    }
}

impl Tier for DiskTier {
    fn name(&self) -> String {
        format!("disk {}", self.inner.root.display())
    }

    fn get(&self, key: &str) -> Option<Block> {
        self.inner.get(key)
    }

    fn contains(&self, key: &str) -> bool {
        if !self.inner.usable() {
            return false;
        }
        if self.inner.st.lock().contains(key) {
            return true;
        }
        !self.indexed() && self.inner.path(key).is_file()
    }

    fn touch(&self, key: &str) {
        self.inner.st.lock().access(key, crate::mem::REHIT);
    }

    fn insert(&self, key: &str, block: &Block) {
        self.inner.enqueue(key, block, false)
    }

    fn admit(&self, key: &str, block: &Block) {
        self.inner.enqueue(key, block, true)
    }

    fn remove(&self, key: &str) {
        // Also when out of use: a removed block must not come back when the disk does.
        let _ = fs::remove_file(self.inner.path(key));
        self.inner.st.lock().remove(key);
    }

    fn usage(&self) -> Usage {
        let st = self.inner.st.lock();
        Usage {
            bytes: st.bytes() + self.inner.fixed(),
            entries: st.len() as u64,
            capacity: self.inner.cfg.capacity,
            evicted: self.inner.evicted.load(Ordering::Relaxed),
        }
    }

    fn whole_open(&self, key: &str, stamp: &[u8]) -> Option<File> {
        self.inner.whole_open(key, stamp)
    }

    fn whole_put(&self, key: &str, stamp: &[u8], len: u64, fill: &mut Fill<'_>) -> bool {
        self.inner.whole_put(key, stamp, len, fill)
    }

    fn flush(&self) {
        self.inner.flush()
    }
}
