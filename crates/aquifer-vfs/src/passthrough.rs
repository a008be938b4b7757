//! FUSE passthrough: which backing file the kernel reads for each inode, and how a copy
//! written through the kernel reaches the file.
//!
//! The kernel takes one backing file per inode while any handle of it is open in
//! passthrough, and refuses a second one. Each handle holds its inode's backing id; the
//! table only finds it again (a weak reference), so the id goes when the last handle does.
//!
//! The kernel also keeps an inode's opens in one mode: while any handle of it is open in
//! passthrough, every other open must be too, on the same backing (any other open fails
//! with EIO, direct I/O included), and a passthrough open beside handles that read through
//! the page cache fails with ETXTBSY. So the table also counts each inode's cached
//! handles, and a backing is not handed out beside them: that open reads through the
//! daemon instead. Beside passthrough handles, every open shares their backing: the copy
//! is then this mount's view of the file. A write open writes into the copy (the kernel
//! passes its writes, and its mmap, to the copy and never to the daemon), and the copy is
//! mirrored into the file ([`Vfs::mirror_copy`]) at each flush, fsync and release of such
//! a handle: close-to-open holds for other mounts as for any writer. A read open of a
//! version changed since the copy (by another mount) first brings the copy up to date
//! ([`Vfs::refresh_copy`]), unless writers here have it open: their copy wins, as the
//! last writer's close would. Generic over the id type so that this runs, and is tested,
//! without FUSE.

use crate::{Handle, Result, Vfs};
use aquifer_meta::{Context, Errno, FileType, Ino};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Weak};

/// Piece compared and copied at once between a copy and its file.
const PIECE: u64 = 1 << 20;

pub struct Backings<B> {
    table: Mutex<Table<B>>,
    /// Held while a copy is mirrored into its file or refreshed from it: one at a time.
    mirroring: Mutex<()>,
}

/// The live backing of an inode.
struct Live<B> {
    id: Weak<B>,
    /// The version (stamp) of the file the copy holds.
    version: Vec<u8>,
    copy: Arc<File>,
}

struct Table<B> {
    by_ino: HashMap<u64, Live<B>>,
    /// What each handle in passthrough holds.
    by_fh: HashMap<u64, Arc<B>>,
    /// Handles in passthrough open for writing (they write into the copy), and their inode.
    writing: HashMap<u64, u64>,
    /// Handles open in the kernel's cached mode, per inode, and each such handle's inode.
    cached: HashMap<u64, u32>,
    cached_fh: HashMap<u64, u64>,
}

/// An inode's live backing as [`Backings::live`] finds it.
pub struct Shared<B> {
    pub id: Arc<B>,
    pub version: Vec<u8>,
    pub copy: Arc<File>,
    /// Handles of the inode writing into the copy.
    pub writers: usize,
}

impl<B> Default for Backings<B> {
    fn default() -> Self {
        Backings {
            table: Mutex::new(Table {
                by_ino: HashMap::new(),
                by_fh: HashMap::new(),
                writing: HashMap::new(),
                cached: HashMap::new(),
                cached_fh: HashMap::new(),
            }),
            mirroring: Mutex::new(()),
        }
    }
}

impl<B> Table<B> {
    fn live(&self, ino: u64) -> Option<(&Live<B>, Arc<B>)> {
        let l = self.by_ino.get(&ino)?;
        Some((l, l.id.upgrade()?))
    }
}

impl<B> Backings<B> {
    /// The backing id for a read-only handle of `ino` on `copy`, a copy of version
    /// `version`: the live one of the inode if it is of the same version, else a new one
    /// from `open`. None when the inode is open on a copy of another version (the caller
    /// then shares that one, [`Backings::live`]), when handles of it read through the page
    /// cache, or when `open` fails (the kernel refuses: no CAP_SYS_ADMIN, no passthrough),
    /// which turns passthrough off for the mount.
    pub fn backing_for(
        &self,
        vfs: &Vfs,
        ino: u64,
        version: &[u8],
        copy: File,
        open: impl FnOnce(&File) -> std::io::Result<B>,
    ) -> Option<Arc<B>> {
        let mut t = self.table.lock();
        if t.cached.get(&ino).is_some_and(|n| *n > 0) {
            // The kernel would refuse a passthrough open beside them.
            return None;
        }
        if let Some((l, id)) = t.live(ino) {
            return (l.version.as_slice() == version).then_some(id);
        }
        match open(&copy) {
            Ok(id) => {
                let id = Arc::new(id);
                let live = Live {
                    id: Arc::downgrade(&id),
                    version: version.to_vec(),
                    copy: Arc::new(copy),
                };
                t.by_ino.insert(ino, live);
                Some(id)
            }
            Err(e) => {
                vfs.passthrough_refused(&e);
                None
            }
        }
    }

    /// The live backing of `ino`, if a handle of it is open in passthrough.
    pub fn live(&self, ino: u64) -> Option<Shared<B>> {
        let t = self.table.lock();
        let (l, id) = t.live(ino)?;
        Some(Shared {
            id,
            version: l.version.clone(),
            copy: l.copy.clone(),
            writers: t.writing.values().filter(|&&i| i == ino).count(),
        })
    }

    /// The copy of `ino` now holds version `version`.
    pub fn set_version(&self, ino: u64, version: Vec<u8>) {
        if let Some(l) = self.table.lock().by_ino.get_mut(&ino) {
            l.version = version;
        }
    }

    /// Handle `fh` was opened in passthrough on `id` (`writing` into the copy of `ino`):
    /// keep it until [`Backings::forget`].
    pub fn keep(&self, fh: u64, ino: u64, id: Arc<B>, writing: bool) {
        let mut t = self.table.lock();
        t.by_fh.insert(fh, id);
        if writing {
            t.writing.insert(fh, ino);
        }
    }

    /// The copy handle `fh` writes into.
    pub fn written_by(&self, fh: u64) -> Option<Arc<File>> {
        let t = self.table.lock();
        let ino = t.writing.get(&fh)?;
        Some(t.by_ino.get(ino)?.copy.clone())
    }

    /// Every handle writing into a copy, its inode and the copy.
    pub fn written(&self) -> Vec<(u64, u64, Arc<File>)> {
        let t = self.table.lock();
        t.writing
            .iter()
            .filter_map(|(&fh, &ino)| Some((fh, ino, t.by_ino.get(&ino)?.copy.clone())))
            .collect()
    }

    /// The copy of `ino` while handles write into it: its length is the file's here.
    pub fn written_copy(&self, ino: u64) -> Option<Arc<File>> {
        let t = self.table.lock();
        if !t.writing.values().any(|&i| i == ino) {
            return None;
        }
        Some(t.by_ino.get(&ino)?.copy.clone())
    }

    /// Whether a handle of `ino` is open in passthrough.
    pub fn in_use(&self, ino: u64) -> bool {
        self.table.lock().live(ino).is_some()
    }

    /// Handle `fh` of `ino` is to be opened through the page cache: counted until
    /// [`Backings::forget`], unless the inode has passthrough handles (the kernel would
    /// refuse it: false; the open must share their backing).
    pub fn cached_open(&self, ino: u64, fh: u64) -> bool {
        let mut t = self.table.lock();
        if t.live(ino).is_some() {
            return false;
        }
        *t.cached.entry(ino).or_insert(0) += 1;
        t.cached_fh.insert(fh, ino);
        true
    }

    /// Mirror every copy with writers into its file (SIGTERM, unmount: before the vfs
    /// commits its writers). A copy whose mirror fails loses its version: the next open
    /// refreshes it.
    pub fn mirror_all(&self, vfs: &Vfs) {
        let _one = self.mirroring();
        for (fh, ino, copy) in self.written() {
            match vfs.mirror_copy(fh, &copy) {
                // Released meanwhile: its release mirrored it.
                Ok(()) | Err(Errno::EBADF) => {}
                Err(e) => {
                    tracing::error!(ino, error = %e, "a copy written through the kernel could not be stored");
                    self.set_version(ino, Vec::new());
                }
            }
        }
    }

    /// Serialises [`Vfs::mirror_copy`] and [`Vfs::refresh_copy`] calls.
    pub fn mirroring(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.mirroring.lock()
    }

    /// Handle `fh` is released.
    pub fn forget(&self, fh: u64) {
        let mut t = self.table.lock();
        t.writing.remove(&fh);
        if t.by_fh.remove(&fh).is_some() {
            t.by_ino.retain(|_, l| l.id.strong_count() > 0);
        }
        if let Some(ino) = t.cached_fh.remove(&fh) {
            if let Some(n) = t.cached.get_mut(&ino) {
                *n -= 1;
                if *n == 0 {
                    t.cached.remove(&ino);
                }
            }
        }
    }
}

/// Cut `copy` to `len` bytes (a truncate of its file, or an O_TRUNC open beside it).
pub fn cut(copy: &File, len: u64) -> Result<()> {
    writable(copy)
        .and_then(|f| f.set_len(len))
        .map_err(io_errno)
}

/// fallocate(2) on `copy`, for a handle whose writes go there.
pub fn fallocate(copy: &File, mode: i32, off: u64, len: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = writable(copy).map_err(io_errno)?;
    // SAFETY: a plain system call on a descriptor we own.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
    if rc != 0 {
        return Err(io_errno(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `copy` opened anew for writing (the kernel's backing is registered read-only).
pub fn writable(copy: &File) -> std::io::Result<File> {
    use std::os::fd::AsRawFd;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", copy.as_raw_fd()))
}

/// Up to `len` bytes of `f` at `off` (fewer at its end).
fn read_at(f: &File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

impl Vfs {
    /// What version of `ino` a copy must hold to be served ([`crate::Opened::backing_stamp`]).
    pub fn copy_stamp(&self, ino: Ino) -> Result<Vec<u8>> {
        Ok(crate::file::whole_stamp(ino, &self.meta.getattr(ino)?))
    }

    /// Make file handle `fh` (open for writing) hold what `copy` holds: the pieces that
    /// differ are written through it and the file is cut to the copy's length. The caller
    /// then flushes the handle as usual. Pieces are compared, not all written, so a close
    /// after a small change stores a small slice.
    pub fn mirror_copy(&self, fh: u64, copy: &File) -> Result<()> {
        let h = self.handle(fh)?;
        let Handle::File(f) = &*h else {
            return Err(Errno::EISDIR);
        };
        if f.writer.is_none() {
            return Err(Errno::EBADF);
        }
        let ino = f.ino;
        let clen = copy.metadata().map_err(io_errno)?.len();
        let mut off = 0;
        while off < clen {
            let n = PIECE.min(clen - off) as usize;
            let want = read_at(copy, off, n).map_err(io_errno)?;
            if want.is_empty() {
                break;
            }
            let have = self.read(fh, off, want.len() as u32)?;
            if have != want {
                self.write(fh, off, &want)?;
            }
            off += want.len() as u64;
        }
        if self.getattr(ino)?.length > clen {
            self.truncate_file(&Context::root(), ino, clen)?;
        }
        Ok(())
    }

    /// Make `copy` hold what file handle `fh` reads (the file changed since the copy was
    /// made): pieces that differ are rewritten in place, since the kernel's handles read
    /// it still.
    pub fn refresh_copy(&self, fh: u64, copy: &File) -> Result<()> {
        let h = self.handle(fh)?;
        let Handle::File(f) = &*h else {
            return Err(Errno::EISDIR);
        };
        let a = self.getattr(f.ino)?;
        if a.typ != FileType::File {
            return Err(Errno::EINVAL);
        }
        let w = writable(copy).map_err(io_errno)?;
        let mut off = 0;
        while off < a.length {
            let n = PIECE.min(a.length - off) as u32;
            let want = self.read(fh, off, n)?;
            if want.is_empty() {
                break;
            }
            if read_at(&w, off, want.len()).map_err(io_errno)? != want {
                w.write_all_at(&want, off).map_err(io_errno)?;
            }
            off += want.len() as u64;
        }
        w.set_len(off).map_err(io_errno)?;
        Ok(())
    }
}

/// A local disk's error as the program's errno (EIO when it has none).
pub fn io_errno(e: std::io::Error) -> Errno {
    tracing::warn!(error = %e, "whole-file copy: I/O error");
    e.raw_os_error().map_or(Errno::EIO, Errno)
}
