//! Filesystem semantics independent of FUSE: file handles, write buffering, flush on
//! close/fsync, directory handles with stable offsets, open-but-unlinked files. The FUSE
//! adapter is a thin layer over [`Vfs`]; tests drive [`Vfs`] directly.

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
use lockwait::{LockWaits, Woken};

pub type Result<T> = std::result::Result<T, Errno>;

mod dir;
use dir::{Cursor, Listing, DIR_PAGE};

/// One open directory, listed a page at a time from a cursor ([`dir`]).
struct DirHandle {
    ino: Ino,
    listing: Mutex<Listing>,
}

struct FileHandle {
    ino: Ino,
    writer: Option<Arc<FileWriter>>,
    /// The writer's error count this handle has reported (or found at open): each failed
    /// flush of the file is reported once by every handle that was open when it happened,
    /// as Linux reports writeback errors to each descriptor.
    seen_errors: AtomicU64,
}

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
    /// Blocking lock requests waiting for their lock.
    lock_waits: Arc<LockWaits>,
    /// A POSIX lock was asked for through this mount: from then on every descriptor's
    /// close is flushed ([`Opened::flush_at_close`]).
    posix_locks_taken: AtomicBool,
}

type Stamp = (u64, aquifer_meta::Time, aquifer_meta::Time);

/// Blocking lock requests that may wait at once (each holds a thread of the FUSE adapter);
/// past this a blocking request fails with ENOLCK.
pub const LOCK_WAITERS_MAX: usize = 1024;

/// Files whose stamps are kept; past this the table starts over (a cache miss, no more).
const OPENED_MAX: usize = 1 << 18;

/// An open file handle and how the kernel may cache its pages.
#[derive(Debug)]
pub struct Opened {
    pub fh: u64,
    /// The file is unchanged since its last open here: the kernel may keep its cached
    /// pages (FOPEN_KEEP_CACHE) instead of dropping them.
    pub keep_cache: bool,
    /// A checked whole-file copy on a cache disk the kernel may read instead of asking
    /// (FUSE passthrough), when asked for ([`Vfs::set_passthrough`]) and the file is opened
    /// read-only, has no writer here and is wholly cached. `backing_stamp` names the
    /// version copied: handles of one inode may share a backing file only if it matches.
    pub backing: Option<std::fs::File>,
    pub backing_stamp: Vec<u8>,
    /// close(2) of this descriptor must reach [`Vfs::flush`]: it has writes to commit, or
    /// may have to drop POSIX locks (close of *any* descriptor of a file drops the locks
    /// its process holds on it). A read-only open on a mount that never took a POSIX lock
    /// needs neither, and saves the round trip (FOPEN_NOFLUSH).
    pub flush_at_close: bool,
}

/// What a whole-file copy was made of: any write, truncate or attribute change through
/// any mount moves ctime (and length or mtime with it), so a copy under another stamp is
/// never served.
fn whole_stamp(ino: Ino, a: &Attr) -> Vec<u8> {
    let mut v = Vec::with_capacity(40);
    v.extend_from_slice(&ino.to_le_bytes());
    v.extend_from_slice(&a.length.to_le_bytes());
    for t in [a.mtime, a.ctime] {
        v.extend_from_slice(&t.sec.to_le_bytes());
        v.extend_from_slice(&t.nsec.to_le_bytes());
    }
    v
}

fn is_write(flags: i32) -> bool {
    matches!(flags & libc::O_ACCMODE, libc::O_WRONLY | libc::O_RDWR)
}

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
            lock_waits: LockWaits::new(LOCK_WAITERS_MAX),
            posix_locks_taken: AtomicBool::new(false),
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

    pub fn lookup(&self, ctx: &Context, parent: Ino, name: &[u8]) -> Result<(Ino, Attr)> {
        // The kernel asks for "." and ".." of a node id when it decodes a file handle
        // (open_by_handle_at, NFS re-export) of an inode it no longer has in its cache.
        if name == b"." {
            return Ok((parent, self.getattr(parent)?));
        }
        if name == b".." {
            let a = self.meta.getattr(parent)?;
            let up = if parent == ROOT_INO || a.parent == 0 {
                ROOT_INO
            } else {
                a.parent
            };
            return Ok((up, self.getattr(up)?));
        }
        let (ino, a) = self.meta.lookup(ctx, parent, name)?;
        let pending = self.pending_end(ino);
        // Re-read the attributes after the buffer (see pending_end) when a write is buffered.
        let a = if pending > 0 {
            self.meta.getattr(ino)?
        } else {
            a
        };
        Ok((ino, Self::view(a, pending)))
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        let pending = self.pending_end(ino);
        let a = self.meta.getattr(ino)?;
        Ok(Self::view(a, pending))
    }

    pub fn setattr(
        &self,
        ctx: &Context,
        ino: Ino,
        set: &SetAttr,
        size: Option<u64>,
    ) -> Result<Attr> {
        let mut attr = None;
        if let (Some(len), None) = (size, set.mtime) {
            // Buffered data still in memory is cut with the metadata, not committed first.
            if let Some(w) = self.writer_of(ino).filter(|w| w.is_dirty()) {
                attr = w.truncate_buffered(len, || Ok(self.meta.truncate(ctx, ino, len)?))?;
            }
        }
        if attr.is_none() && (size.is_some() || set.mtime.is_some()) {
            // Buffered writes must land before: their commit would otherwise stamp a later
            // mtime over the one being set (cp -a, tar, rsync set times after writing).
            self.settle(ino)?;
            if let Some(size) = size {
                attr = Some(self.meta.truncate(ctx, ino, size)?);
            }
        }
        if set.mode.is_some()
            || set.uid.is_some()
            || set.gid.is_some()
            || set.atime.is_some()
            || set.mtime.is_some()
            || set.ctime.is_some()
        {
            attr = Some(self.meta.setattr(ctx, ino, set)?);
        }
        match attr {
            // Buffered writes, if any, were committed above or are covered by getattr.
            Some(a) if size.is_some() || set.mtime.is_some() => Ok(a),
            _ => self.getattr(ino),
        }
    }

    pub fn mknod(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Result<(Ino, Attr)> {
        let typ = FileType::from_mode(mode).ok_or(Errno::EINVAL)?;
        if typ == FileType::Directory || typ == FileType::Symlink {
            return Err(Errno::EINVAL);
        }
        Ok(self.meta.mknod(ctx, parent, name, typ, mode, umask, rdev)?)
    }

    pub fn mkdir(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> Result<(Ino, Attr)> {
        Ok(self
            .meta
            .mknod(ctx, parent, name, FileType::Directory, mode, umask, 0)?)
    }

    /// Create and open a regular file.
    pub fn create(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(Ino, Attr, u64)> {
        // The creator may open what it creates, whatever the new file's mode.
        let opener = Context {
            check_permission: false,
            ..ctx.clone()
        };
        match self.meta.create_open(ctx, parent, name, mode, umask) {
            // Created and counted open in one go.
            Ok((ino, attr)) => {
                let fh = self.opened_file(&opener, ino, flags, attr.clone())?.fh;
                Ok((ino, attr, fh))
            }
            // Without O_EXCL an existing file is simply opened.
            Err(MetaError::Sys(e)) if e == Errno::EEXIST && flags & libc::O_EXCL == 0 => {
                let (ino, a) = self.meta.lookup(ctx, parent, name)?;
                if a.is_dir() {
                    return Err(Errno::EISDIR);
                }
                let fh = self.open(&opener, ino, flags)?;
                Ok((ino, a, fh))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn open(&self, ctx: &Context, ino: Ino, flags: i32) -> Result<u64> {
        Ok(self.open_file(ctx, ino, flags)?.fh)
    }

    /// Open, and say whether the kernel may keep the file's cached pages.
    pub fn open_file(&self, ctx: &Context, ino: Ino, flags: i32) -> Result<Opened> {
        let a = self.meta.open(ctx, ino, flags)?;
        self.opened_file(ctx, ino, flags, a)
    }

    /// The handle of a file the metadata engine has counted open (`a`: its attributes).
    fn opened_file(&self, ctx: &Context, ino: Ino, flags: i32, a: Attr) -> Result<Opened> {
        if a.is_dir() && is_write(flags) {
            self.meta.close(ino)?;
            return Err(Errno::EISDIR);
        }
        let writer = if is_write(flags) && a.typ == FileType::File {
            let mut ws = self.writers.lock();
            let e = ws
                .entry(ino)
                .or_insert_with(|| (FileWriter::new(self.cs.clone(), ino), 0));
            e.1 += 1;
            Some(e.0.clone())
        } else {
            None
        };
        let seen_errors = AtomicU64::new(writer.as_ref().map_or(0, |w| w.error_count()));
        if flags & libc::O_TRUNC != 0 && is_write(flags) && a.typ == FileType::File && a.length > 0
        {
            if let Err(e) = self.meta.truncate(ctx, ino, 0) {
                let _ = self.release_file(ino, writer.as_ref());
                return Err(e.into());
            }
        }
        let keep_cache = a.typ == FileType::File && {
            let mut m = self.opened.lock();
            if flags & libc::O_TRUNC != 0 {
                // Truncated just now: nothing cached is worth keeping.
                m.remove(&ino);
                false
            } else {
                if m.len() >= OPENED_MAX && !m.contains_key(&ino) {
                    m.clear();
                }
                let stamp = (a.length, a.mtime, a.ctime);
                m.insert(ino, stamp) == Some(stamp)
            }
        };
        let mut backing_stamp = Vec::new();
        let backing = if self.passthrough.load(Ordering::Relaxed)
            && a.typ == FileType::File
            && writer.is_none()
            && !self.writers.lock().contains_key(&ino)
        {
            backing_stamp = whole_stamp(ino, &a);
            self.cs.whole_copy(ino, &backing_stamp, a.length)
        } else {
            None
        };
        let fh = self.add_handle(Handle::File(FileHandle {
            ino,
            writer,
            seen_errors,
        }));
        Ok(Opened {
            fh,
            keep_cache,
            backing,
            backing_stamp,
            flush_at_close: is_write(flags) || self.posix_locks_taken.load(Ordering::SeqCst),
        })
    }

    /// Offer whole-file copies to read-only opens (the adapter can pass them to the kernel).
    pub fn set_passthrough(&self, on: bool) {
        self.passthrough.store(on, Ordering::Relaxed);
    }

    /// Warm, check or evict the cached blocks of `[off, off+len)` of a regular file.
    pub fn cache_range(&self, ino: Ino, op: CacheOp, off: u64, len: u64) -> Result<CacheCounts> {
        let a = self.meta.getattr(ino)?;
        if a.typ != FileType::File {
            return Err(if a.typ == FileType::Directory {
                Errno::EISDIR
            } else {
                Errno::EINVAL
            });
        }
        Ok(self.cs.cache_range(ino, op, off, len, a.length)?)
    }

    /// The data path (its cache, for figures).
    pub fn data(&self) -> &Arc<ChunkStore> {
        &self.cs
    }

    pub fn read(&self, fh: u64, off: u64, size: u32) -> Result<Vec<u8>> {
        let h = self.handle(fh)?;
        let Handle::File(f) = &*h else {
            return Err(Errno::EISDIR);
        };
        let Some(w) = self.writer_of(f.ino).filter(|w| w.is_dirty()) else {
            let a = self.meta.getattr(f.ino)?;
            return Ok(self.cs.read(f.ino, off, size as usize, a.length)?);
        };
        // Buffered writes are read from the writer's buffers over what the metadata holds,
        // without committing them: a reader tailing a file being written no longer turns
        // every read into a commit of a tiny slice.
        for _ in 0..3 {
            let generation = w.generation();
            let pending = w.pending_end();
            let a = self.meta.getattr(f.ino)?;
            let mut data = self
                .cs
                .read(f.ino, off, size as usize, a.length.max(pending))?;
            if w.overlay(off, &mut data, generation)? {
                return Ok(data);
            }
        }
        // Commits keep racing the read: commit and read the metadata alone.
        self.settle(f.ino)?;
        let a = self.meta.getattr(f.ino)?;
        Ok(self.cs.read(f.ino, off, size as usize, a.length)?)
    }

    pub fn write(&self, fh: u64, off: u64, data: &[u8]) -> Result<u32> {
        let h = self.handle(fh)?;
        let Handle::File(f) = &*h else {
            return Err(Errno::EISDIR);
        };
        let w = f.writer.as_ref().ok_or(Errno::EBADF)?;
        if off
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > MAX_FILE_SIZE)
        {
            return Err(Errno::EFBIG);
        }
        w.write(off, data)?;
        Ok(data.len() as u32)
    }

    /// F_GETLK: the first lock of another owner (on any mount) that conflicts with `lock`.
    pub fn getlk(&self, ino: Ino, owner: u64, lock: &PLock) -> Result<Option<PLock>> {
        Ok(self.meta.getlk(ino, owner, lock)?)
    }

    /// F_SETLK (a whole-file flock(2) lock with `flock`): the lock is arbitrated by the
    /// metadata engine, so it holds across mounts. A conflict is EAGAIN.
    pub fn setlk(&self, ino: Ino, owner: u64, lock: &PLock, flock: bool) -> Result<()> {
        if !flock && lock.typ != libc::F_UNLCK {
            // Before the lock is taken: a descriptor opened once it may be held is flushed
            // at close, so its close can drop the lock.
            self.posix_locks_taken.store(true, Ordering::SeqCst);
        }
        let r = if flock {
            self.meta.flock(ino, owner, lock.typ)
        } else {
            self.meta.setlk(ino, owner, lock)
        };
        if r.is_ok() && lock.typ == libc::F_UNLCK {
            self.lock_waits.released();
        }
        Ok(r?)
    }

    /// Register FUSE request `request` as a blocking lock request about to wait (see
    /// [`lockwait`]): ENOLCK when too many wait already or the mount is going away.
    pub fn begin_lock_wait(&self, request: u64) -> Result<LockWait> {
        self.lock_waits.begin(request)
    }

    /// F_SETLKW: [`Vfs::setlk`] until the lock is granted. The waiter asks again after a
    /// pause that grows to 50 ms (at once when a lock on this mount is released), and ends
    /// with EINTR when [`Vfs::interrupt`] names its request, with ENOLCK at shutdown.
    pub fn setlkw(
        &self,
        wait: LockWait,
        ino: Ino,
        owner: u64,
        lock: &PLock,
        flock: bool,
    ) -> Result<()> {
        let mut pause = Duration::from_millis(1);
        loop {
            match wait.check() {
                Woken::Interrupted => return Err(Errno(libc::EINTR)),
                Woken::Stopped => return Err(Errno(libc::ENOLCK)),
                Woken::Retry => {}
            }
            match self.setlk(ino, owner, lock, flock) {
                Err(e) if e == Errno::EAGAIN => {}
                r => return r,
            }
            match wait.pause(pause) {
                Woken::Interrupted => return Err(Errno(libc::EINTR)),
                Woken::Stopped => return Err(Errno(libc::ENOLCK)),
                Woken::Retry => pause = (pause * 2).min(Duration::from_millis(50)),
            }
        }
    }

    /// End every lock wait, now and to come, with ENOLCK: the mount is going away (a
    /// waiter holds its file open, so it would keep a lazily detached mount alive).
    pub fn end_lock_waits(&self) {
        self.lock_waits.stop();
    }

    /// FUSE_INTERRUPT: the task waiting for request `request` got a signal. Only lock
    /// waits are cut short; other requests finish as they would.
    pub fn interrupt(&self, request: u64) {
        self.lock_waits.interrupt(request);
    }

    /// Drop the locks `owner` holds on `ino` (close of its descriptor: POSIX locks at
    /// flush, flock locks at release).
    pub fn release_locks(&self, ino: Ino, owner: u64) -> Result<()> {
        self.meta.release_locks(ino, owner)?;
        self.lock_waits.released();
        Ok(())
    }

    /// close(2) of one descriptor: commit what was written to the file, and report a
    /// failure to store the file's data that this descriptor has not reported yet.
    pub fn flush(&self, fh: u64) -> Result<()> {
        let h = self.handle(fh)?;
        match &*h {
            Handle::File(f) => {
                Self::flush_file(f)?;
                // What it committed is as durable as a close promises on this engine
                // (Redis: --meta-durability; nothing more on an embedded one).
                if f.writer.is_some() {
                    self.meta.sync_on_close()?;
                }
                Ok(())
            }
            Handle::Dir(_) => Ok(()),
        }
    }

    fn flush_file(f: &FileHandle) -> Result<()> {
        let Some(w) = &f.writer else { return Ok(()) };
        let r = w.flush();
        let now = w.error_count();
        let seen = f.seen_errors.swap(now, Ordering::SeqCst);
        match r {
            Err(e) => Err(e.into()),
            Ok(()) if now > seen => {
                tracing::error!(ino = f.ino, error = %w.last_error(), "reporting an earlier failure to store this file's data");
                Err(Errno::EIO)
            }
            Ok(()) => Ok(()),
        }
    }

    /// fsync(2): commit the file, then make it durable — blocks first, then the metadata.
    pub fn fsync(&self, fh: u64, _datasync: bool) -> Result<()> {
        let flushed = self.flush(fh);
        self.cs.sync()?;
        flushed
    }

    pub fn release(&self, fh: u64) -> Result<()> {
        let h = self.handles.lock().remove(&fh).ok_or(Errno::EBADF)?;
        match &*h {
            Handle::File(f) => {
                let flushed = Self::flush_file(f);
                self.release_file(f.ino, f.writer.as_ref())?;
                flushed
            }
            Handle::Dir(_) => Ok(()),
        }
    }

    fn release_file(&self, ino: Ino, writer: Option<&Arc<FileWriter>>) -> Result<()> {
        if let Some(w) = writer {
            let mut ws = self.writers.lock();
            if let Some(e) = ws.get_mut(&ino) {
                e.1 -= 1;
                if e.1 == 0 {
                    ws.remove(&ino);
                    if w.error_count() > 0 {
                        // The kernel's pages may hold bytes that were never stored: the
                        // next open must not keep them.
                        self.opened.lock().remove(&ino);
                    }
                    // Nobody is left to retry what could not be stored (each handle has
                    // had the error): free its memory.
                    w.discard();
                }
            }
        }
        self.meta.close(ino)?;
        Ok(())
    }

    pub fn fallocate(&self, ctx: &Context, fh: u64, mode: i32, off: u64, len: u64) -> Result<()> {
        let h = self.handle(fh)?;
        let Handle::File(f) = &*h else {
            return Err(Errno::EISDIR);
        };
        if f.writer.is_none() {
            return Err(Errno::EBADF);
        }
        self.settle(f.ino)?;
        self.meta.fallocate(ctx, f.ino, mode, off, len)?;
        Ok(())
    }

    pub fn opendir(&self, ctx: &Context, ino: Ino) -> Result<u64> {
        let a = self.meta.getattr(ino)?;
        if !a.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        if ctx.check_permission {
            self.meta.access(ctx, ino, MODE_R)?;
        }
        Ok(self.add_handle(Handle::Dir(DirHandle {
            ino,
            listing: Mutex::new(Listing::default()),
        })))
    }

    /// Entries from `offset` on; each entry's offset is the one to resume after it.
    /// "." and ".." come first. Empty only at the end of the directory; with `plus`, every
    /// entry has its attributes (see [`dir`] for what a listing guarantees).
    pub fn readdir(
        &self,
        ctx: &Context,
        fh: u64,
        offset: u64,
        plus: bool,
    ) -> Result<Vec<(u64, DirEntry)>> {
        let h = self.handle(fh)?;
        let Handle::Dir(d) = &*h else {
            return Err(Errno::ENOTDIR);
        };
        let mut listing = d.listing.lock();
        listing.read(offset, plus, |from, plus| match from {
            Cursor::Start => self.first_dir_page(ctx, d.ino, plus),
            Cursor::After(name) => self.dir_page(ctx, d.ino, name, plus),
        })
    }

    /// "." and "..", then the first page of names.
    fn first_dir_page(&self, ctx: &Context, ino: Ino, plus: bool) -> Result<DirPage> {
        let a = self.meta.getattr(ino)?;
        let parent = if ino == ROOT_INO || a.parent == 0 {
            ROOT_INO
        } else {
            a.parent
        };
        let mut entries = vec![
            DirEntry {
                name: b".".to_vec(),
                ino,
                typ: FileType::Directory,
                attr: plus.then(|| a.clone()),
            },
            DirEntry {
                name: b"..".to_vec(),
                ino: parent,
                typ: FileType::Directory,
                // The parent may be gone already (a removed directory): show our own.
                attr: plus.then(|| self.meta.getattr(parent).unwrap_or_else(|_| a.clone())),
            },
        ];
        let names = self.dir_page(ctx, ino, b"", plus)?;
        entries.extend(names.entries);
        Ok(DirPage {
            entries,
            end: names.end,
        })
    }

    fn dir_page(&self, ctx: &Context, ino: Ino, after: &[u8], plus: bool) -> Result<DirPage> {
        let mut page = self.meta.readdir_page(ctx, ino, after, DIR_PAGE, plus)?;
        if plus {
            for e in page.entries.iter_mut() {
                if let Some(a) = e.attr.take() {
                    // May under-report a file growing right now; the next getattr corrects it.
                    e.attr = Some(Self::view(a, self.pending_end(e.ino)));
                }
            }
        }
        Ok(page)
    }

    pub fn unlink(&self, ctx: &Context, parent: Ino, name: &[u8]) -> Result<()> {
        Ok(self.meta.unlink(ctx, parent, name)?)
    }

    pub fn rmdir(&self, ctx: &Context, parent: Ino, name: &[u8]) -> Result<()> {
        Ok(self.meta.rmdir(ctx, parent, name)?)
    }

    pub fn rename(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> Result<()> {
        Ok(self
            .meta
            .rename(ctx, parent, name, new_parent, new_name, flags)?)
    }

    pub fn link(&self, ctx: &Context, ino: Ino, parent: Ino, name: &[u8]) -> Result<Attr> {
        self.meta.link(ctx, ino, parent, name)?;
        self.getattr(ino)
    }

    pub fn symlink(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        target: &[u8],
    ) -> Result<(Ino, Attr)> {
        Ok(self.meta.symlink(ctx, parent, name, target)?)
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        Ok(self.meta.readlink(ino)?)
    }

    pub fn access(&self, ctx: &Context, ino: Ino, mask: u32) -> Result<()> {
        Ok(self.meta.access(ctx, ino, mask)?)
    }

    pub fn statfs(&self) -> Result<StatFs> {
        Ok(self.meta.statfs()?)
    }

    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        Ok(self.meta.getxattr(ino, name)?)
    }

    pub fn setxattr(
        &self,
        ctx: &Context,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        Ok(self.meta.setxattr(ctx, ino, name, value, flags)?)
    }

    pub fn listxattr(&self, ino: Ino) -> Result<Vec<u8>> {
        Ok(self.meta.listxattr(ino)?)
    }

    pub fn removexattr(&self, ctx: &Context, ino: Ino, name: &[u8]) -> Result<()> {
        Ok(self.meta.removexattr(ctx, ino, name)?)
    }
}

#[cfg(test)]
mod tests;
