//! Open files: open and create, reads over buffered writes, writes, close (flush), fsync,
//! release, fallocate, and what the kernel may cache (keep_cache, passthrough copies).
//! Where a write is acknowledged and when an error reaches the program that wrote: here
//! and in the writer ([`aquifer_chunk::FileWriter`]).

use crate::{CacheCounts, CacheOp, Handle, Result, Vfs};
use aquifer_chunk::FileWriter;
use aquifer_meta::*;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub(crate) struct FileHandle {
    pub(crate) ino: Ino,
    pub(crate) writer: Option<Arc<FileWriter>>,
    /// The writer's error count this handle has reported (or found at open): each failed
    /// flush of the file is reported once by every handle that was open when it happened,
    /// as Linux reports writeback errors to each descriptor.
    pub(crate) seen_errors: AtomicU64,
    /// Owners that took POSIX locks through this handle: read-only handles opened before
    /// the mount's first POSIX lock carry FOPEN_NOFLUSH, so their locks are dropped at
    /// release instead of at flush.
    pub(crate) lock_owners: Mutex<Vec<u64>>,
}

pub(crate) type Stamp = (u64, aquifer_meta::Time, aquifer_meta::Time);

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
    /// version a copy must hold ([`Vfs::copy_stamp`]): handles of one inode may share a
    /// backing file only if it matches.
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
pub(crate) fn whole_stamp(ino: Ino, a: &Attr) -> Vec<u8> {
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
        // Writes other handles buffered are part of the file too: cut them with it.
        if flags & libc::O_TRUNC != 0
            && a.typ == FileType::File
            && writer
                .as_ref()
                .is_some_and(|w| a.length > 0 || w.is_dirty())
        {
            if let Err(e) = self.truncate_file(ctx, ino, 0) {
                let _ = self.release_file(ino, writer.as_ref());
                return Err(e);
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
            lock_owners: Mutex::new(Vec::new()),
        }));
        Ok(Opened {
            fh,
            keep_cache,
            backing,
            backing_stamp,
            flush_at_close: is_write(flags) || self.posix_locks_taken.load(Ordering::SeqCst),
        })
    }

    /// Cut file `ino` to `len`, its buffered writes included: in memory with the metadata
    /// while all of them still are (nothing to store only for the cut to free it), else
    /// after committing them.
    pub(crate) fn truncate_file(&self, ctx: &Context, ino: Ino, len: u64) -> Result<Attr> {
        if let Some(w) = self.writer_of(ino).filter(|w| w.is_dirty()) {
            if let Some(a) =
                w.truncate_buffered(len, || Ok(self.meta.truncate(ctx, ino, len)?))?
            {
                return Ok(a);
            }
        }
        self.settle(ino)?;
        Ok(self.meta.truncate(ctx, ino, len)?)
    }

    /// Offer whole-file copies to read-only opens (the adapter can pass them to the kernel).
    pub fn set_passthrough(&self, on: bool) {
        self.passthrough.store(on, Ordering::Relaxed);
    }

    /// The kernel refused a backing file (it needs CAP_SYS_ADMIN and Linux 6.9): reads are
    /// served by the daemon from now on.
    pub fn passthrough_refused(&self, e: &std::io::Error) {
        if self.passthrough.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %e, "FUSE passthrough refused by the kernel (it needs CAP_SYS_ADMIN and Linux 6.9); reads are served by the daemon");
        }
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

    pub fn read(&self, fh: u64, off: u64, size: u32) -> Result<Vec<u8>> {
        let h = self.handle(fh)?;
        let Handle::File(f) = &*h else {
            return Err(Errno::EISDIR);
        };
        let Some(w) = self.writer_of(f.ino).filter(|w| w.is_dirty()) else {
            return self.read_ino(f.ino, off, size);
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

    /// A read of what the metadata holds, without buffered writes: a handle's read when
    /// nothing is buffered, and the kernel's no-open mode (read-only mounts: no handle).
    pub fn read_ino(&self, ino: Ino, off: u64, size: u32) -> Result<Vec<u8>> {
        let a = self.meta.getattr(ino)?;
        match a.typ {
            FileType::File => Ok(self.cs.read(ino, off, size as usize, a.length)?),
            FileType::Directory => Err(Errno::EISDIR),
            _ => Err(Errno::EINVAL),
        }
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

    /// close(2) of one descriptor: commit what was written to the file, and report a
    /// failure to store the file's data that this descriptor has not reported yet. With
    /// `lock_owner` (the closing process), drop the POSIX locks it holds on the file: close
    /// of *any* descriptor of a file drops them.
    pub fn flush(&self, fh: u64, lock_owner: Option<u64>) -> Result<()> {
        let h = self.handle(fh)?;
        let Handle::File(f) = &*h else {
            return Ok(());
        };
        let mut flushed = Self::flush_file(f);
        // What it committed is as durable as a close promises on this engine
        // (Redis: --meta-durability; nothing more on an embedded one).
        if flushed.is_ok() && f.writer.is_some() {
            flushed = self.meta.sync_on_close().map_err(Errno::from);
        }
        let Some(owner) = lock_owner else {
            return flushed;
        };
        let unlocked = self.release_locks(f.ino, owner);
        if unlocked.is_ok() {
            // Dropped: the handle's last release must not drop them again, by then they
            // may be locks the owner took anew through another descriptor (a child that
            // inherited this one exits after its parent closed it and locked again).
            f.lock_owners.lock().retain(|&o| o != owner);
        }
        flushed.and(unlocked)
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
        let flushed = self.flush(fh, None);
        self.cs.sync()?;
        flushed
    }

    /// The last close of a handle: flush what is left, drop the locks taken through it
    /// (those of `lock_owner`, which the kernel names after a flock(2), and the POSIX
    /// locks of a handle whose close was not flushed), and let the file go.
    pub fn release(&self, fh: u64, lock_owner: Option<u64>) -> Result<()> {
        let h = self.handles.lock().remove(&fh).ok_or(Errno::EBADF)?;
        match &*h {
            Handle::File(f) => {
                let mut owners = std::mem::take(&mut *f.lock_owners.lock());
                owners.extend(lock_owner);
                let mut unlocked = Ok(());
                for o in owners {
                    unlocked = unlocked.and(self.release_locks(f.ino, o));
                }
                let flushed = Self::flush_file(f);
                self.release_file(f.ino, f.writer.as_ref())?;
                flushed.and(unlocked)
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
}
