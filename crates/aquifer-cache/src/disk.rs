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
//! its stamp and checksum at every open; it counts in the quota and is evicted like a block.
//!
//! The index (keys, weights, eviction order) lives in memory and is rebuilt by a background
//! scan at start; until it is done, reads still find files by name, and inserts wait.
//! A disk that fails (gone, read-only, full, I/O errors) is taken out of use: its reads are
//! misses and its inserts are dropped, and it is tried again after [`DiskConfig::retry`].

use crate::file::{self, HEADER};
use crate::policy::S3Fifo;
use crate::{Block, Fill, Recycle, Tier, Usage};
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const MAGIC: &[u8; 4] = b"AQCB";
/// Blocks waiting to be written to the disk; beyond this, inserts are dropped rather than
/// let a slow disk hold memory.
const QUEUE_BYTES: usize = 32 << 20;
const FANOUT: u32 = 256;
/// Index keys of whole-file copies start with this, which no block key does.
const WHOLE: char = '~';
const WHOLE_XATTR: &[u8] = b"user.aquifer.whole\0";

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

struct Inner {
    root: PathBuf,
    cfg: DiskConfig,
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
}

#[derive(Default)]
struct Queue {
    items: VecDeque<(String, Block)>,
    bytes: usize,
    /// An item is being written (for `flush`).
    busy: bool,
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
        });
        // A root that cannot be made is an error for the caller (a wrong flag); one that
        // fails later is a disk out of use.
        private_dir(root)?;
        inner.make_dirs()?;
        let mut threads = Vec::new();
        let i = inner.clone();
        threads.push(
            std::thread::Builder::new()
                .name("cache-index".into())
                .spawn(move || i.rebuild())?,
        );
        let i = inner.clone();
        threads.push(
            std::thread::Builder::new()
                .name("cache-write".into())
                .spawn(move || i.write_loop())?,
        );
        let i = inner.clone();
        threads.push(
            std::thread::Builder::new()
                .name("cache-keep".into())
                .spawn(move || i.housekeep())?,
        );
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

/// Make sure `dir` is this process's own: created mode 0700 when missing (with its
/// parents); when it exists, a directory (not a symlink) owned by this process's user and
/// writable by no one else. A cache or staging directory another user owns or may write
/// into is one where they could plant blocks that reads return, or read what others
/// wrote: refused, with one line that says what to change. Its parent (the `--cache-dir`
/// the volume's directory is made in) must not let another user swap `dir` for one of
/// theirs: owned by this user or root, and writable by others only with the sticky bit
/// (as `/tmp`).
pub fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(m) = fs::metadata(parent) {
            check_parent(parent, &m, me)?;
        }
    }
    let m = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            fs::symlink_metadata(dir)?
        }
        Err(e) => return Err(e),
    };
    check_private(&m, me)
}

fn check_parent(dir: &Path, m: &fs::Metadata, me: u32) -> io::Result<()> {
    if m.uid() != me && m.uid() != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: owned by uid {}, who could replace the cache in it: use a directory of uid {me} or root",
                dir.display(),
                m.uid()
            ),
        ));
    }
    if m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: mode {:o} lets other users replace the cache in it: chmod 700 it (or o+t)",
                dir.display(),
                m.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// The error names no path: every caller says which directory it was opening.
fn check_private(m: &fs::Metadata, me: u32) -> io::Result<()> {
    let refuse = |why: String| Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
    if !m.file_type().is_dir() {
        return refuse("not a directory (a symlink is not followed)".into());
    }
    if m.uid() != me {
        return refuse(format!(
            "owned by uid {}, not by uid {me} that runs this mount: give the mount a directory of its own (or chown it)",
            m.uid()
        ));
    }
    if m.mode() & 0o022 != 0 {
        return refuse(format!(
            "mode {:o} lets other users write in it: chmod 700 it",
            m.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Where a key lives among the tiers of a [`crate::Spread`], and in a tier's fan-out: two
/// independent parts of one stable hash, so every start finds blocks where it left them.
pub(crate) fn key_hash(key: &str) -> u32 {
    crc32c::crc32c(key.as_bytes())
}

/// Why a cache file is not a block.
enum Bad {
    Missing,
    Corrupt(String),
    Io(io::Error),
}

/// Bytes free on the device holding `path`, and its size.
fn device_space(path: &Path) -> io::Result<(u64, u64)> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    // SAFETY: statvfs writes a plain struct; `c` outlives the call.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let unit = s.f_frsize as u64;
    Ok((s.f_bavail as u64 * unit, s.f_blocks as u64 * unit))
}

fn allocated(m: &fs::Metadata) -> u64 {
    // Delayed allocation is counted in st_blocks already (ext4, xfs); the size rounded up
    // to a page is a floor for file systems that report nothing yet.
    (m.blocks() * 512).max(m.len().div_ceil(4096) * 4096)
}

impl Inner {
    fn blocks_dir(&self) -> PathBuf {
        self.root.join("blocks")
    }

    fn files_dir(&self) -> PathBuf {
        self.root.join("files")
    }

    fn path(&self, key: &str) -> PathBuf {
        let h = key_hash(key) % FANOUT;
        let dir = if key.starts_with(WHOLE) {
            self.files_dir()
        } else {
            self.blocks_dir()
        };
        dir.join(format!("{h:02x}")).join(file::file_name(key))
    }

    fn make_dirs(&self) -> io::Result<()> {
        fs::create_dir_all(self.root.join("tmp"))?;
        let b = self.blocks_dir();
        for h in 0..FANOUT {
            let d = b.join(format!("{h:02x}"));
            if !d.is_dir() {
                fs::create_dir_all(&d)?;
            }
        }
        Ok(())
    }

    fn usable(&self) -> bool {
        // Tried again by the housekeeper once its time is up; until then, out of use.
        self.down.lock().is_none()
    }

    /// Take the disk out of use after `e` (the first failure is logged).
    fn fail(&self, what: &str, e: &io::Error) {
        let mut d = self.down.lock();
        if d.is_none() {
            tracing::warn!(
                dir = %self.root.display(),
                error = %e,
                "cache disk out of use after a failed {what}; reads go to the object store, retried in {}s",
                self.cfg.retry.as_secs()
            );
        }
        *d = Some(Instant::now() + self.cfg.retry);
    }

    fn wake(&self) {
        *self.wake.lock() = true;
        self.wake_cv.notify_all();
    }

    fn used(&self) -> u64 {
        self.st.lock().bytes() + self.fixed()
    }

    /// What the index does not hold but the quota counts.
    fn fixed(&self) -> u64 {
        self.overhead.load(Ordering::Relaxed) + self.pinned.load(Ordering::Relaxed)
    }

    fn read_block(&self, path: &Path) -> Result<Block, Bad> {
        let mut f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Bad::Missing),
            Err(e) => return Err(Bad::Io(e)),
        };
        let size = f.metadata().map_err(Bad::Io)?.len();
        let mut h = [0u8; HEADER];
        if size < HEADER as u64 {
            return Err(Bad::Corrupt(format!("{size} bytes, shorter than a header")));
        }
        f.read_exact(&mut h).map_err(Bad::Io)?;
        let (len, crc) = file::parse_header(MAGIC, &h).map_err(Bad::Corrupt)?;
        if size != (HEADER + len) as u64 {
            return Err(Bad::Corrupt(format!(
                "{size} bytes for a {len}-byte block (truncated or extended)"
            )));
        }
        let mut buf = self
            .recycle
            .as_ref()
            .map(|r| r.take(len))
            .unwrap_or_default();
        buf.clear();
        buf.reserve_exact(len);
        // Appending through `take` fills the spare capacity without zeroing it first.
        (&mut f)
            .take(len as u64)
            .read_to_end(&mut buf)
            .map_err(Bad::Io)?;
        if buf.len() != len {
            return Err(Bad::Corrupt("shorter than its header says".into()));
        }
        if crc32c::crc32c(&buf) != crc {
            return Err(Bad::Corrupt("checksum mismatch".into()));
        }
        Ok(Arc::new(buf))
    }

    fn get(&self, key: &str) -> Option<Block> {
        if !self.usable() {
            return None;
        }
        let ready = self.ready.load(Ordering::Acquire);
        // With the index complete, a key it lacks is not on disk: no system call for a miss.
        if ready && !self.st.lock().contains(key) {
            return None;
        }
        let path = self.path(key);
        match self.read_block(&path) {
            Ok(b) => {
                let mut st = self.st.lock();
                if st.access(key, crate::mem::REHIT).is_none() && !ready {
                    // Found before the scan reached it; the scan will skip it.
                    let w = (HEADER + b.len()).div_ceil(4096) as u64 * 4096;
                    st.insert(key, (), w, true);
                }
                Some(b)
            }
            Err(Bad::Missing) => {
                // Deleted behind our back (or the whole directory was): forget it.
                self.st.lock().remove(key);
                None
            }
            Err(Bad::Corrupt(why)) => {
                tracing::warn!(path = %path.display(), why, "corrupt cache file removed; the block is fetched again");
                self.corrupt.fetch_add(1, Ordering::Relaxed);
                let _ = fs::remove_file(&path);
                self.st.lock().remove(key);
                None
            }
            Err(Bad::Io(e)) => {
                self.fail("read", &e);
                None
            }
        }
    }

    /// Queue a block for the writer; `wait` for room in the queue rather than drop it.
    fn enqueue(&self, key: &str, block: &Block, wait: bool) {
        if wait {
            // A warm-up right after start: the index is needed to count the quota.
            let end = Instant::now() + Duration::from_secs(60);
            while !self.ready.load(Ordering::Acquire) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if !self.usable() || !self.ready.load(Ordering::Acquire) {
            return;
        }
        if self.low_space.load(Ordering::Relaxed) {
            self.wake();
            return;
        }
        let w = (HEADER + block.len()) as u64;
        let end = Instant::now() + Duration::from_secs(2);
        while self.used() + w > self.cfg.capacity {
            // Declined for room: the housekeeper evicts down to the low watermark even if
            // this block alone is what passes the high one.
            self.pressure.store(true, Ordering::Relaxed);
            self.wake();
            if !wait || Instant::now() > end {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.st.lock().contains(key) {
            return;
        }
        let mut q = self.queue.lock();
        if q.items.iter().any(|(k, _)| k == key) {
            return;
        }
        while wait && !q.items.is_empty() && q.bytes + block.len() > QUEUE_BYTES {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            self.queue_cv.wait_for(&mut q, Duration::from_millis(50));
        }
        if q.bytes + block.len() > QUEUE_BYTES && !q.items.is_empty() {
            return;
        }
        q.bytes += block.len();
        q.items.push_back((key.to_string(), block.clone()));
        drop(q);
        self.queue_cv.notify_one();
    }

    fn write_loop(&self) {
        loop {
            let (key, block) = {
                let mut q = self.queue.lock();
                loop {
                    if let Some(item) = q.items.pop_front() {
                        q.bytes -= item.1.len();
                        q.busy = true;
                        // Room for a waiting warm-up.
                        self.queue_cv.notify_all();
                        break item;
                    }
                    q.busy = false;
                    self.queue_cv.notify_all();
                    if self.stop.load(Ordering::Acquire) {
                        return;
                    }
                    self.queue_cv.wait_for(&mut q, Duration::from_millis(200));
                }
            };
            self.store(&key, &block);
        }
    }

    /// Write one block into place, if it still fits.
    fn store(&self, key: &str, block: &Block) {
        if !self.usable() || self.st.lock().contains(key) {
            return;
        }
        let est = (HEADER + block.len()).div_ceil(4096) as u64 * 4096;
        if self.used() + est > self.cfg.capacity || self.low_space.load(Ordering::Relaxed) {
            self.wake();
            return;
        }
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{}.{seq}", std::process::id()));
        let dst = self.path(key);
        let r = (|| -> io::Result<u64> {
            let mut f = File::create(&tmp)?;
            f.write_all(&file::header(MAGIC, block))?;
            f.write_all(block)?;
            let w = allocated(&f.metadata()?);
            drop(f);
            fs::rename(&tmp, &dst)?;
            Ok(w)
        })();
        match r {
            Ok(w) => {
                let over = {
                    let mut st = self.st.lock();
                    st.insert(key, (), w, false);
                    st.bytes() + self.fixed() > (self.cfg.high * self.cfg.capacity as f64) as u64
                };
                if over {
                    self.wake();
                }
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                if e.kind() == io::ErrorKind::NotFound && !self.root.join("tmp").is_dir() {
                    // The directory was deleted under us: start again empty.
                    self.reset();
                } else {
                    self.fail("write", &e);
                }
            }
        }
    }

    /// The cache directory vanished: forget the index and make the directories again (or
    /// take the disk out of use if that fails).
    fn reset(&self) {
        tracing::warn!(dir = %self.root.display(), "cache directory vanished; starting it again empty");
        *self.st.lock() = S3Fifo::default();
        if let Err(e) = self.make_dirs() {
            self.fail("re-creation of the cache directory", &e);
        }
    }

    /// The start-up scan: every block file indexed, oldest first (evicted first), and
    /// leftovers of interrupted writes removed.
    fn rebuild(&self) {
        if let Ok(rd) = fs::read_dir(self.root.join("tmp")) {
            for e in rd.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        let mut found: Vec<(i64, String, u64)> = Vec::new();
        for (top, whole) in [(self.blocks_dir(), false), (self.files_dir(), true)] {
            for h in 0..FANOUT {
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                let dir = top.join(format!("{h:02x}"));
                let Ok(rd) = fs::read_dir(&dir) else { continue };
                for e in rd.flatten() {
                    let name = e.file_name();
                    let key = name.to_str().and_then(file::key_of);
                    let Ok(m) = e.metadata() else { continue };
                    match key {
                        Some(k)
                            if m.is_file()
                                && key_hash(&k) % FANOUT == h
                                && k.starts_with(WHOLE) == whole =>
                        {
                            found.push((m.mtime(), k, allocated(&m)))
                        }
                        // Not ours, or in the wrong place: it would never be read or counted.
                        _ => {
                            let _ = fs::remove_file(e.path());
                        }
                    }
                }
            }
        }
        found.sort_unstable_by_key(|f| f.0);
        for batch in found.chunks(4096) {
            let mut st = self.st.lock();
            for (_, k, w) in batch {
                st.insert(k, (), *w, true);
            }
        }
        self.measure_overhead();
        self.ready.store(true, Ordering::Release);
        tracing::info!(dir = %self.root.display(), blocks = found.len(), "cache index rebuilt");
        self.wake();
    }

    fn measure_overhead(&self) {
        let mut o = 0;
        let mut add = |p: &Path| {
            if let Ok(m) = fs::metadata(p) {
                o += allocated(&m);
            }
        };
        add(&self.root);
        add(&self.root.join("tmp"));
        add(&self.blocks_dir());
        for h in 0..FANOUT {
            add(&self.blocks_dir().join(format!("{h:02x}")));
        }
        add(&self.files_dir());
        if let Ok(rd) = fs::read_dir(self.files_dir()) {
            for e in rd.flatten() {
                add(&e.path());
            }
        }
        self.overhead.store(o, Ordering::Relaxed);
    }

    fn housekeep(&self) {
        let mut last_measure = Instant::now();
        loop {
            {
                let mut w = self.wake.lock();
                if !*w {
                    self.wake_cv.wait_for(&mut w, Duration::from_secs(1));
                }
                *w = false;
            }
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            if last_measure.elapsed() > Duration::from_secs(10) {
                self.measure_overhead();
                last_measure = Instant::now();
            }
            self.housekeep_once();
        }
    }

    fn housekeep_once(&self) {
        // A disk out of use is tried again once its time is up.
        let retry = matches!(*self.down.lock(), Some(t) if Instant::now() >= t);
        if retry {
            match self.probe() {
                Ok(()) => {
                    tracing::info!(dir = %self.root.display(), "cache disk back in use");
                    *self.down.lock() = None;
                }
                Err(e) => self.fail("check", &e),
            }
        }
        if !self.usable() {
            return;
        }
        if !self.blocks_dir().is_dir() {
            self.reset();
        }
        let cap = self.cfg.capacity;
        let used = self.used();
        let overhead = self.fixed();
        let mut target = u64::MAX;
        let pressed = self.pressure.swap(false, Ordering::Relaxed);
        if pressed || used > (self.cfg.high * cap as f64) as u64 {
            target = (self.cfg.low * cap as f64) as u64;
        }
        match device_space(&self.root) {
            Ok((free, total)) => {
                let want = (self.cfg.free_ratio * total as f64) as u64;
                let short = want > free;
                self.low_space.store(short, Ordering::Relaxed);
                if short {
                    target = target.min(used.saturating_sub(want - free));
                }
            }
            Err(e) => self.fail("statvfs", &e),
        }
        if target == u64::MAX {
            return;
        }
        let small_cap = cap / 10;
        let victims = self
            .st
            .lock()
            .evict_to(target.saturating_sub(overhead), small_cap);
        let n = victims.len() as u64;
        for (k, _) in victims {
            let _ = fs::remove_file(self.path(&k));
        }
        self.evicted.fetch_add(n, Ordering::Relaxed);
        if let Ok((free, total)) = device_space(&self.root) {
            self.low_space.store(
                free < (self.cfg.free_ratio * total as f64) as u64,
                Ordering::Relaxed,
            );
        }
    }

    fn whole_open(&self, key: &str, stamp: &[u8]) -> Option<File> {
        if !self.usable() {
            return None;
        }
        let ik = format!("{WHOLE}{key}");
        if self.ready.load(Ordering::Acquire) && !self.st.lock().contains(&ik) {
            return None;
        }
        let path = self.path(&ik);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.st.lock().remove(&ik);
                return None;
            }
            Err(e) => {
                self.fail("read", &e);
                return None;
            }
        };
        match check_whole(&f, stamp) {
            Ok(true) => {
                let mut st = self.st.lock();
                if st.access(&ik, crate::mem::REHIT).is_none() {
                    if let Ok(m) = f.metadata() {
                        st.insert(&ik, (), allocated(&m), true);
                    }
                }
                Some(f)
            }
            // The file changed since this copy was made: the copy is of no more use.
            Ok(false) => {
                let _ = fs::remove_file(&path);
                self.st.lock().remove(&ik);
                None
            }
            Err(Bad::Corrupt(why)) => {
                tracing::warn!(path = %path.display(), why, "corrupt whole-file copy removed");
                self.corrupt.fetch_add(1, Ordering::Relaxed);
                let _ = fs::remove_file(&path);
                self.st.lock().remove(&ik);
                None
            }
            Err(Bad::Io(e)) => {
                self.fail("read", &e);
                None
            }
            Err(Bad::Missing) => None,
        }
    }

    fn whole_put(&self, key: &str, stamp: &[u8], len: u64, fill: &mut Fill<'_>) -> bool {
        if !self.usable()
            || !self.ready.load(Ordering::Acquire)
            || self.low_space.load(Ordering::Relaxed)
        {
            return false;
        }
        let est = len.div_ceil(4096) * 4096;
        if self.used() + est > (self.cfg.high * self.cfg.capacity as f64) as u64 {
            return false;
        }
        let ik = format!("{WHOLE}{key}");
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{}.{seq}", std::process::id()));
        let dst = self.path(&ik);
        let r = (|| -> io::Result<u64> {
            let f = File::create(&tmp)?;
            let mut w = CrcWriter {
                out: io::BufWriter::with_capacity(1 << 20, f),
                crc: 0,
                n: 0,
            };
            fill(&mut w)?;
            if w.n != len {
                return Err(io::Error::other(format!("{} bytes written of {len}", w.n)));
            }
            let crc = w.crc;
            let f = w.out.into_inner().map_err(|e| e.into_error())?;
            let mut v = Vec::with_capacity(12 + stamp.len());
            v.extend_from_slice(&crc.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            v.extend_from_slice(stamp);
            set_xattr(&f, &v)?;
            let w = allocated(&f.metadata()?);
            drop(f);
            if let Some(d) = dst.parent() {
                fs::create_dir_all(d)?;
            }
            fs::rename(&tmp, &dst)?;
            Ok(w)
        })();
        match r {
            Ok(w) => {
                let mut st = self.st.lock();
                st.remove(&ik);
                st.insert(&ik, (), w, false);
                true
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                if e.kind() == io::ErrorKind::Unsupported
                    || e.raw_os_error() == Some(libc::EOPNOTSUPP)
                {
                    // No extended attributes here: no copies, but blocks still work.
                    tracing::debug!(dir = %self.root.display(), "cache disk keeps no whole-file copies: no xattrs");
                } else if e.kind() != io::ErrorKind::Other {
                    self.fail("write", &e);
                }
                false
            }
        }
    }

    /// Whether the disk takes a write again.
    fn probe(&self) -> io::Result<()> {
        let fresh = !self.blocks_dir().is_dir();
        self.make_dirs()?;
        let p = self.root.join("tmp").join("probe");
        fs::write(&p, b"probe")?;
        fs::remove_file(&p)?;
        if fresh {
            *self.st.lock() = S3Fifo::default();
        }
        Ok(())
    }
}

/// Counts and checksums what a whole-file copy is filled with.
struct CrcWriter<W> {
    out: W,
    crc: u32,
    n: u64,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let k = self.out.write(b)?;
        self.crc = crc32c::crc32c_append(self.crc, &b[..k]);
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn set_xattr(f: &File, v: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the name is NUL-terminated, `v` is valid for its length, `f` is open.
    let r = unsafe {
        libc::fsetxattr(
            f.as_raw_fd(),
            WHOLE_XATTR.as_ptr().cast(),
            v.as_ptr().cast(),
            v.len(),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn get_xattr(f: &File) -> io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut v = vec![0u8; 512];
    // SAFETY: as in `set_xattr`; the kernel writes at most `v.len()` bytes.
    let r = unsafe {
        libc::fgetxattr(
            f.as_raw_fd(),
            WHOLE_XATTR.as_ptr().cast(),
            v.as_mut_ptr().cast(),
            v.len(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    v.truncate(r as usize);
    Ok(v)
}

/// Whether `f` is a sound copy made under `stamp` (Ok(false): a copy of another version).
fn check_whole(f: &File, stamp: &[u8]) -> Result<bool, Bad> {
    let v = match get_xattr(f) {
        Ok(v) => v,
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {
            return Err(Bad::Corrupt("no stamp".into()))
        }
        Err(e) => return Err(Bad::Io(e)),
    };
    if v.len() < 12 {
        return Err(Bad::Corrupt("short stamp".into()));
    }
    if &v[12..] != stamp {
        return Ok(false);
    }
    let crc = u32::from_le_bytes(v[..4].try_into().unwrap());
    let len = u64::from_le_bytes(v[4..12].try_into().unwrap());
    let size = f.metadata().map_err(Bad::Io)?.len();
    if size != len {
        return Err(Bad::Corrupt(format!("{size} bytes for a {len}-byte copy")));
    }
    let mut buf = vec![0u8; (len as usize).clamp(1, 1 << 20)];
    let mut r = f;
    let mut c = 0u32;
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).map_err(Bad::Io)?;
        if k == 0 {
            break;
        }
        c = crc32c::crc32c_append(c, &buf[..k]);
        n += k as u64;
    }
    use std::io::Seek;
    r.seek(io::SeekFrom::Start(0)).map_err(Bad::Io)?;
    if n != len || c != crc {
        return Err(Bad::Corrupt("checksum mismatch".into()));
    }
    Ok(true)
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
        let mut q = self.inner.queue.lock();
        while !q.items.is_empty() || q.busy {
            if self.inner.stop.load(Ordering::Acquire) {
                return;
            }
            self.inner
                .queue_cv
                .wait_for(&mut q, Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_cache_directory_is_the_mounts_own() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let fresh = t.path().join("new").join("vol");
        private_dir(&fresh).unwrap();
        let m = fs::metadata(&fresh).unwrap();
        assert_eq!(m.mode() & 0o777, 0o700, "created 0700");
        let open = t.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let e = private_dir(&open).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("chmod 700"), "{e}");
        assert!(DiskTier::open(&open, DiskConfig::default()).is_err());
        // A volume's directory made in an open --cache-dir: another user could swap it.
        let e = private_dir(&open.join("vol")).unwrap_err();
        assert!(e.to_string().contains("replace the cache"), "{e}");
        assert!(!open.join("vol").exists());
        fs::set_permissions(&open, fs::Permissions::from_mode(0o750)).unwrap();
        private_dir(&open).unwrap();
        // Another user's directory, whatever its mode (as seen by a process of uid+1).
        let m = fs::symlink_metadata(&open).unwrap();
        let e = check_private(&m, m.uid() + 1).unwrap_err();
        assert!(e.to_string().contains("owned by uid"), "{e}");
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        assert!(private_dir(&link).is_err(), "a symlink is refused");
    }

    use super::*;

    fn cfg(capacity: u64) -> DiskConfig {
        DiskConfig {
            capacity,
            high: 0.95,
            low: 0.70,
            free_ratio: 0.0,
            retry: Duration::from_millis(50),
        }
    }

    fn open(root: &Path, capacity: u64) -> DiskTier {
        let t = DiskTier::open(root, cfg(capacity)).unwrap();
        assert!(t.wait_indexed(Duration::from_secs(60)));
        t
    }

    fn block(n: usize, fill: u8) -> Block {
        Arc::new((0..n).map(|i| fill.wrapping_add(i as u8)).collect())
    }

    fn put_whole(t: &DiskTier, key: &str, stamp: &[u8], data: &[u8]) -> bool {
        let mut fill = |w: &mut dyn Write| w.write_all(data);
        t.whole_put(key, stamp, data.len() as u64, &mut fill)
    }

    fn read_all(mut f: File) -> Vec<u8> {
        let mut v = Vec::new();
        f.read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn whole_copies_are_checked_by_stamp_and_checksum_and_survive_restart() {
        let d = tempfile::tempdir().unwrap();
        let data = block(300_000, 7);
        {
            let t = open(d.path(), 64 << 20);
            assert!(t.whole_open("files/1", b"v1").is_none());
            assert!(put_whole(&t, "files/1", b"v1", &data));
            assert_eq!(read_all(t.whole_open("files/1", b"v1").unwrap()), *data);
            // Another version of the file: the old copy is not served, and is gone.
            assert!(t.whole_open("files/1", b"v2").is_none());
            assert!(t.whole_open("files/1", b"v1").is_none());
            assert!(put_whole(&t, "files/1", b"v2", &data));
            assert!(t.usage().bytes >= 300_000);
            // A fill that writes less than it promised leaves no copy.
            let mut short = |w: &mut dyn Write| w.write_all(&data[..10]);
            assert!(!t.whole_put("files/2", b"v1", 300_000, &mut short));
            assert!(t.whole_open("files/2", b"v1").is_none());
        }
        // Indexed again at restart, with its weight.
        let t = open(d.path(), 64 << 20);
        assert!(t.usage().bytes >= 300_000);
        assert_eq!(read_all(t.whole_open("files/1", b"v2").unwrap()), *data);
        // A flipped byte: a miss, counted, and the copy removed.
        let path = t.inner.path("~files/1");
        let mut raw = fs::read(&path).unwrap();
        raw[1234] ^= 1;
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &raw[1234..1235], 1234).unwrap();
        assert!(t.whole_open("files/1", b"v2").is_none());
        assert_eq!(t.corrupt_found(), 1);
        assert!(!path.exists());
    }

    #[test]
    fn a_whole_copy_never_evicts_to_make_room() {
        let d = tempfile::tempdir().unwrap();
        let t = open(d.path(), 4 << 20);
        let big = block(4 << 20, 1);
        assert!(!put_whole(&t, "files/9", b"v", &big));
        assert!(t.whole_open("files/9", b"v").is_none());
    }

    /// What `du` says: every file's and directory's allocated blocks. A file the background
    /// eviction deletes while it is walked counts as gone, as in `du`.
    fn du(p: &Path) -> u64 {
        let m = match fs::symlink_metadata(p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
            Err(e) => panic!("{}: {e}", p.display()),
        };
        let mut n = m.blocks() * 512;
        if m.is_dir() {
            let Ok(entries) = fs::read_dir(p) else {
                return n;
            };
            for e in entries.flatten() {
                n += du(&e.path());
            }
        }
        n
    }

    #[test]
    fn blocks_survive_a_restart_and_the_index_is_rebuilt() {
        let d = tempfile::tempdir().unwrap();
        {
            let t = open(d.path(), 64 << 20);
            for i in 0..20 {
                t.insert(&format!("chunks/0/0/{i}_0_5000"), &block(5000, i as u8));
            }
            t.flush();
            assert_eq!(t.usage().entries, 20);
        }
        let t = open(d.path(), 64 << 20);
        assert_eq!(t.usage().entries, 20);
        for i in 0..20 {
            let b = t.get(&format!("chunks/0/0/{i}_0_5000")).expect("cached");
            assert_eq!(*b, *block(5000, i as u8));
        }
        assert!(t.get("chunks/0/0/99_0_5000").is_none());
    }

    #[test]
    fn reads_before_the_index_is_rebuilt_find_files_by_name() {
        let d = tempfile::tempdir().unwrap();
        {
            let t = open(d.path(), 64 << 20);
            t.insert("k", &block(100, 1));
        }
        let t = DiskTier::open(d.path(), cfg(64 << 20)).unwrap();
        // Whether or not the scan has finished, the block is there.
        assert_eq!(*t.get("k").unwrap(), *block(100, 1));
        assert!(t.wait_indexed(Duration::from_secs(10)));
        assert_eq!(t.usage().entries, 1);
    }

    #[test]
    fn a_damaged_file_is_a_miss_and_is_replaced() {
        let d = tempfile::tempdir().unwrap();
        let t = open(d.path(), 64 << 20);
        type Damage<'a> = (&'a str, &'a dyn Fn(&Path));
        let damage: [Damage; 4] = [
            ("flipped", &|p| {
                let mut v = fs::read(p).unwrap();
                let n = v.len();
                v[n / 2] ^= 0x10;
                fs::write(p, v).unwrap();
            }),
            ("truncated", &|p| {
                let v = fs::read(p).unwrap();
                fs::write(p, &v[..v.len() - 1]).unwrap();
            }),
            ("other version", &|p| {
                let mut v = fs::read(p).unwrap();
                v[4] = 9;
                fs::write(p, v).unwrap();
            }),
            ("emptied", &|p| fs::write(p, b"").unwrap()),
        ];
        for (i, (what, f)) in damage.iter().enumerate() {
            let key = format!("k{i}");
            t.insert(&key, &block(10_000, 3));
            t.flush();
            let p = t.inner.path(&key);
            f(&p);
            assert!(t.get(&key).is_none(), "{what}: served");
            assert!(!p.exists(), "{what}: not removed");
            assert!(!t.contains(&key));
            t.insert(&key, &block(10_000, 3));
            t.flush();
            assert_eq!(*t.get(&key).unwrap(), *block(10_000, 3), "{what}");
        }
        assert_eq!(t.corrupt_found(), 4);
    }

    #[test]
    fn du_stays_within_the_quota_and_eviction_runs_from_high_to_low() {
        let d = tempfile::tempdir().unwrap();
        let cap = 8 << 20;
        let t = open(d.path(), cap);
        // 3x the quota, written as fast as the tier takes it.
        for i in 0..(3 * cap / 100_000) {
            t.insert(&format!("b{i}"), &block(100_000, i as u8));
            if i % 8 == 0 {
                t.flush();
                t.housekeep_now();
            }
            let du = du(d.path());
            assert!(du <= cap + 200_000, "du {du} over the quota {cap}");
        }
        t.flush();
        t.housekeep_now();
        let u = t.usage();
        assert!(u.bytes <= cap, "{u:?}");
        assert!(u.evicted > 0);
        assert!(du(d.path()) <= cap);
        // Past the high watermark, eviction goes down to the low one.
        let before = t.usage().bytes;
        assert!(before as f64 <= 0.96 * cap as f64, "{before}");
    }

    #[test]
    fn a_hot_set_survives_a_scan_of_three_times_the_cache() {
        let d = tempfile::tempdir().unwrap();
        // The directories take about 1 MiB of it.
        let cap = 16 << 20;
        let t = DiskTier::open(d.path(), cfg(cap)).unwrap();
        assert!(t.wait_indexed(Duration::from_secs(10)));
        let sz = 40_000;
        // A quarter of the cache, read again more than a rehit apart.
        for i in 0..100 {
            t.insert(&format!("hot{i}"), &block(sz, 1));
        }
        t.flush();
        std::thread::sleep(crate::mem::REHIT);
        for i in 0..100 {
            assert!(t.get(&format!("hot{i}")).is_some());
        }
        for i in 0..(3 * cap as usize / sz) {
            t.insert(&format!("scan{i}"), &block(sz, 2));
            if i % 20 == 0 {
                t.flush();
                t.housekeep_now();
            }
        }
        t.flush();
        t.housekeep_now();
        let kept = (0..100).filter(|i| t.contains(&format!("hot{i}"))).count();
        assert!(
            kept >= 90,
            "only {kept} of 100 hot blocks survived the scan"
        );
    }

    #[test]
    fn a_deleted_directory_is_a_miss_then_made_again() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("vol");
        let t = open(&root, 64 << 20);
        t.insert("a", &block(1000, 1));
        t.flush();
        fs::remove_dir_all(&root).unwrap();
        assert!(t.get("a").is_none());
        t.housekeep_now();
        t.insert("b", &block(1000, 2));
        t.flush();
        assert_eq!(*t.get("b").unwrap(), *block(1000, 2));
        assert_eq!(t.usage().entries, 1);
    }

    #[test]
    fn a_failing_disk_is_taken_out_of_use_and_tried_again() {
        let d = tempfile::tempdir().unwrap();
        let t = open(d.path(), 64 << 20);
        t.insert("a", &block(1000, 1));
        t.flush();
        // Writes fail: `tmp` is a file now.
        let tmp = d.path().join("tmp");
        fs::remove_dir_all(&tmp).unwrap();
        fs::write(&tmp, b"in the way").unwrap();
        t.insert("b", &block(1000, 2));
        t.flush();
        assert!(!t.in_use());
        assert!(t.get("a").is_none(), "out of use: every read is a miss");
        // Still broken at the retry: still out.
        std::thread::sleep(Duration::from_millis(60));
        t.housekeep_now();
        assert!(!t.in_use());
        fs::remove_file(&tmp).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        t.housekeep_now();
        assert!(t.in_use());
        assert_eq!(*t.get("a").unwrap(), *block(1000, 1));
    }

    #[test]
    fn an_index_of_100000_blocks_is_rebuilt() {
        let d = tempfile::tempdir().unwrap();
        let n = 100_000;
        {
            let t = open(d.path(), 1 << 40);
            // Written straight to their places: the write path is tested elsewhere.
            for i in 0..n {
                let k = format!("chunks/0/{}/{i}_0_64", i / 1000);
                let b = block(64, i as u8);
                let mut v = file::header(MAGIC, &b).to_vec();
                v.extend_from_slice(&b);
                fs::write(t.inner.path(&k), v).unwrap();
            }
        }
        let start = Instant::now();
        let t = open(d.path(), 1 << 40);
        eprintln!("indexed {n} blocks in {:?}", start.elapsed());
        assert_eq!(t.usage().entries, n);
        let k = "chunks/0/54/54321_0_64";
        assert_eq!(*t.get(k).unwrap(), *block(64, 54321u32 as u8));
    }
}
