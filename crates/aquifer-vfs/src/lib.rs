//! Filesystem semantics independent of FUSE: file handles, write buffering, flush on
//! close/fsync, directory handles with stable offsets, open-but-unlinked files, locks per
//! handle, the control ioctls. The FUSE adapter is a thin layer over [`Vfs`]; tests drive
//! [`Vfs`] directly (`tests.rs`, and `reftest.rs` against a model).
//!
//! A file per role, each adding the methods of its part to [`Vfs`]:
//! * `namespace`: lookups and attributes as this mount shows them (buffered sizes folded
//!   in), node creation, unlink, rename, links, xattrs, statfs;
//! * `file`: open and create, read, write, close (flush), fsync, release, fallocate, and
//!   what the kernel may cache ([`Opened`]);
//! * `dir`: open directories, listed a page at a time;
//! * `locks` and [`lockwait`]: POSIX and flock locks, the owners each handle took them
//!   for, and blocking requests waiting;
//! * [`passthrough`]: which backing file the kernel reads for each inode;
//! * `control` and [`privilege`]: the control ioctls and who may change shared state.
//!
//! This file holds the [`Vfs`] type, its constructor, the session and shutdown.

use aquifer_chunk::FileWriter;
pub use aquifer_chunk::{CacheCounts, CacheOp};
use aquifer_chunk::{ChunkStore, DataConfig, DataError};
use aquifer_meta::*;
use aquifer_object::ObjectStore;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub mod lockwait;
pub use lockwait::LockWait;
use lockwait::LockWaits;

pub type Result<T> = std::result::Result<T, Errno>;

mod dir;
use dir::DirHandle;

mod file;
pub use file::Opened;
use file::{FileHandle, Stamp};
mod control;
mod locks;
mod namespace;
pub use control::{Caller, ControlReply, FiguresFn};
pub mod passthrough;
pub use passthrough::Backings;
pub mod privilege;

enum Handle {
    File(FileHandle),
    Dir(DirHandle),
}

pub struct Vfs {
    meta: Arc<dyn Meta>,
    cs: Arc<ChunkStore>,
    format: Format,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    /// One writer per inode, shared by its handles, with a count of handles using it.
    writers: Mutex<HashMap<Ino, (Arc<FileWriter>, usize)>>,
    stop: Arc<AtomicBool>,
    heartbeat: Mutex<Option<JoinHandle<()>>>,
    /// Set once shut down; the lock serialises concurrent shutdowns.
    closed: Mutex<bool>,
    /// Length, mtime and ctime of each file at its last open here. A file found unchanged
    /// at its next open keeps the kernel's page cache (close-to-open: what another mount
    /// changed and closed shows in the attributes read at open).
    opened: Mutex<HashMap<Ino, Stamp>>,
    /// Offer whole-file copies for read-only opens ([`Opened::backing`]).
    passthrough: AtomicBool,
    /// Called first by [`Vfs::flush_all`]: the adapter mirrors copies written through the
    /// kernel (`passthrough.rs`) into their files' writers.
    before_flush_all: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// Blocking lock requests waiting for their lock.
    lock_waits: Arc<LockWaits>,
    /// A POSIX lock was asked for through this mount: from then on every descriptor's
    /// close is flushed ([`Opened::flush_at_close`]).
    posix_locks_taken: AtomicBool,
    /// The control ioctls' state: figures, warm marks.
    control: control::Control,
}

/// Blocking lock requests that may wait at once (each holds a thread of the FUSE adapter);
/// past this a blocking request fails with ENOLCK.
pub const LOCK_WAITERS_MAX: usize = 1024;

impl Vfs {
    pub fn new(
        meta: Arc<dyn Meta>,
        store: Arc<dyn ObjectStore>,
        mut cfg: DataConfig,
    ) -> Result<Arc<Vfs>> {
        let format = meta.load_format()?;
        cfg.block_size = format.block_size;
        let cs = ChunkStore::new(meta.clone(), store, cfg).map_err(DataError::into_start_errno)?;
        Ok(Arc::new(Vfs {
            meta,
            cs,
            format,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            writers: Mutex::new(HashMap::new()),
            stop: Arc::new(AtomicBool::new(false)),
            heartbeat: Mutex::new(None),
            closed: Mutex::new(false),
            opened: Mutex::new(HashMap::new()),
            passthrough: AtomicBool::new(false),
            before_flush_all: Mutex::new(None),
            lock_waits: LockWaits::new(LOCK_WAITERS_MAX),
            posix_locks_taken: AtomicBool::new(false),
            control: control::Control::new(),
        }))
    }

    /// Register this mount as a session and keep it alive.
    pub fn start_session(self: &Arc<Self>, info: SessionInfo) -> Result<u64> {
        let sid = self.meta.new_session(info)?;
        let meta = self.meta.clone();
        let stop = self.stop.clone();
        let hb = std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                let every = meta.heartbeat_interval();
                let mut last = std::time::Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100).min(every));
                    if last.elapsed() >= every {
                        last = std::time::Instant::now();
                        if let Err(e) = meta.heartbeat() {
                            tracing::warn!(error = %e, "session heartbeat failed");
                        }
                    }
                }
            })
            .map_err(|_| Errno::EIO)?;
        *self.heartbeat.lock() = Some(hb);
        Ok(sid)
    }

    pub fn meta(&self) -> &Arc<dyn Meta> {
        &self.meta
    }

    pub fn format(&self) -> &Format {
        &self.format
    }

    pub fn chunk_store(&self) -> &Arc<ChunkStore> {
        &self.cs
    }

    /// Commit the buffered writes of every open file.
    pub fn flush_all(&self) {
        if let Some(f) = &*self.before_flush_all.lock() {
            f();
        }
        let writers: Vec<_> = self
            .writers
            .lock()
            .values()
            .map(|(w, _)| w.clone())
            .collect();
        for w in writers {
            // Counted by the writer: its handles report it at their next fsync or close.
            if let Err(e) = w.flush() {
                tracing::error!(ino = w.ino(), error = %e, "flush failed");
            }
        }
        if let Err(e) = self.cs.sync() {
            tracing::error!(error = %e, "sync failed");
        }
    }

    /// Run `f` first at each [`Vfs::flush_all`] (SIGTERM, unmount).
    pub fn set_before_flush_all(&self, f: Box<dyn Fn() + Send + Sync>) {
        *self.before_flush_all.lock() = Some(f);
    }

    /// Flush every writer, stop background work and end the session. Idempotent; returns
    /// only when the first shutdown has finished.
    pub fn shutdown(&self) {
        let mut closed = self.closed.lock();
        if *closed {
            return;
        }
        *closed = true;
        self.end_lock_waits();
        self.flush_all();
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.heartbeat.lock().take() {
            let _ = h.join();
        }
        self.cs.shutdown();
        if let Err(e) = self.meta.close_session() {
            tracing::error!(error = %e, "closing the session failed");
        }
    }

    /// Whether `ino` is open for writing here: its attributes change at commits that no
    /// request of the kernel's answers, so they are not for the kernel to keep long.
    pub fn writing(&self, ino: Ino) -> bool {
        self.writers.lock().contains_key(&ino)
    }

    fn writer_of(&self, ino: Ino) -> Option<Arc<FileWriter>> {
        self.writers.lock().get(&ino).map(|(w, _)| w.clone())
    }

    /// Commit buffered writes of `ino` so the metadata describes every byte written.
    fn settle(&self, ino: Ino) -> Result<()> {
        if let Some(w) = self.writer_of(ino) {
            if w.is_dirty() {
                w.flush()?;
            }
        }
        Ok(())
    }

    /// End of the buffered, uncommitted writes of `ino`. Read it *before* the attributes:
    /// a concurrent flush commits (growing the stored length) before it clears the buffer,
    /// so either the buffer or the stored length covers every acknowledged write.
    fn pending_end(&self, ino: Ino) -> u64 {
        self.writer_of(ino).map(|w| w.pending_end()).unwrap_or(0)
    }

    /// Attributes as this client sees them: the size includes buffered writes.
    fn view(mut a: Attr, pending: u64) -> Attr {
        if a.typ == FileType::File {
            a.length = a.length.max(pending);
        }
        a
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>> {
        self.handles.lock().get(&fh).cloned().ok_or(Errno::EBADF)
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Arc::new(h));
        fh
    }

    /// The data path (its cache, for figures).
    pub fn data(&self) -> &Arc<ChunkStore> {
        &self.cs
    }
}

#[cfg(test)]
mod reftest;
#[cfg(test)]
mod tests;
