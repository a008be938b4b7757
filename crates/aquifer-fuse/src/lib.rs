//! The FUSE adapter: decode a request, call [`Vfs`], encode the reply. No filesystem
//! semantics live here. Permission checks are the kernel's (`default_permissions`), which
//! knows the caller's supplementary groups.

use aquifer_meta::{Attr, SetAttr};
use aquifer_vfs::{passthrough, Backings, Caller, Vfs};
use fuser::{
    AccessFlags, BackingId, Config, FileHandle, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, RequestId, SessionACL, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use fuser::{Session, SessionUnmounter};

mod counters;
pub use counters::{FuseCounters, Op, OP_NAMES};
mod follow;
use follow::Kernel;
pub use follow::{Ttls, AUTO_TTL, SHORT_TTL};
mod convert;
use convert::*;

pub use aquifer_vfs::FiguresFn;

/// Largest read and write the kernel sends in one request.
pub const MAX_IO: u32 = 1 << 20;
/// Tries of an open beside passthrough handles that come and go meanwhile (each try
/// either counts the handle as cached or shares their backing; it fails only if the last
/// passthrough handle closed and a new one opened between the two).
const BESIDE_TRIES: usize = 100;

fn is_write(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY
}

/// What a backing must be to be shared: the version of the file it holds and the copy
/// itself (a copy found damaged at an open is replaced by a fresh one; a backing still
/// live on the old copy must not be handed out for it, or the kernel reads the damage).
fn version(stamp: &[u8], copy: &std::fs::File) -> Vec<u8> {
    let mut v = stamp.to_vec();
    if let Ok(m) = copy.metadata() {
        use std::os::unix::fs::MetadataExt;
        v.extend_from_slice(&m.dev().to_le_bytes());
        v.extend_from_slice(&m.ino().to_le_bytes());
    }
    v
}

pub struct MountOptions {
    pub fs_name: String,
    /// FUSE worker threads; each serves one request at a time.
    pub threads: usize,
    /// Let other users in (needs root, or user_allow_other in /etc/fuse.conf).
    pub allow_other: bool,
    pub read_only: bool,
    /// How long the kernel may trust attributes without a GETATTR, and a name's lookup
    /// without a LOOKUP; unset: [`AUTO_TTL`] while invalidation keeps the kernel's caches
    /// true, [`SHORT_TTL`] when it cannot (`follow.rs`).
    pub ttls: Ttls,
    /// Counted into by the adapter; read by whoever reports figures.
    pub counters: Arc<FuseCounters>,
    /// Answers the STATS control ioctl ([`aquifer_vfs::Vfs::control`]).
    pub figures: Option<FiguresFn>,
    /// Ask the kernel for FUSE passthrough and hand it whole-file copies of cached files.
    pub passthrough: bool,
    /// The kernel's no-open mode (read-only mounts): opens and closes of files never reach
    /// the daemon (see `AquiferFs::no_open`).
    pub no_open: bool,
}

pub struct AquiferFs {
    vfs: Arc<Vfs>,
    /// What the kernel holds and for how long (`follow.rs`).
    kernel: Arc<Kernel>,
    counters: Arc<FuseCounters>,
    /// Passthrough asked for: offered to the kernel at init.
    passthrough: bool,
    /// Answer the first OPEN with ENOSYS, so that the kernel opens files itself from then
    /// on (FUSE no-open mode: no OPEN or RELEASE, reads with handle 0, pages kept across
    /// opens), and the first FLUSH too. Only on a read-only mount: without handles there
    /// are no writers to commit at close and no close to drop locks at, so locks are the
    /// kernel's own (this node's), and what another mount changes reaches this one by
    /// invalidation alone (docs/semantics.md).
    no_open: bool,
    backings: Arc<Backings<BackingId>>,
    /// Set once the session exists: tells the kernel to drop attributes it cached.
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
}

impl AquiferFs {
    pub fn new(vfs: Arc<Vfs>, opts: &MountOptions) -> Self {
        if let Some(f) = &opts.figures {
            vfs.set_figures(f.clone());
        }
        let backings: Arc<Backings<BackingId>> = Arc::default();
        {
            // SIGTERM and unmount commit what was written through the kernel into copies too.
            let (b, v) = (backings.clone(), Arc::downgrade(&vfs));
            vfs.set_before_flush_all(Box::new(move || {
                if let Some(vfs) = v.upgrade() {
                    b.mirror_all(&vfs);
                }
            }));
        }
        let kernel = Arc::new(Kernel::new(opts.ttls));
        let no_open = opts.no_open && opts.read_only;
        kernel.no_open.store(no_open, Ordering::Release);
        AquiferFs {
            vfs,
            kernel,
            counters: opts.counters.clone(),
            passthrough: opts.passthrough && !opts.no_open,
            no_open,
            backings,
            notifier: Arc::new(std::sync::OnceLock::new()),
        }
    }

    /// Reply with `name` in `parent` found as `r`, read after `snap`
    /// ([`Kernel::snapshot`]).
    fn entry(
        &self,
        reply: ReplyEntry,
        snap: u64,
        parent: INodeNo,
        name: &[u8],
        r: aquifer_vfs::Result<(u64, Attr)>,
    ) {
        match r {
            Ok((ino, a)) => {
                let (attr_ttl, entry_ttl) = self.ttls(snap, ino);
                self.kernel.looked_up(parent.0, name, ino);
                reply.entry_with_ttls(&attr_ttl, &entry_ttl, &self.seen(ino, &a), Generation(0))
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn attr(&self, reply: ReplyAttr, snap: u64, ino: INodeNo, r: aquifer_vfs::Result<Attr>) {
        match r {
            Ok(a) => reply.attr(&self.ttls(snap, ino.0).0, &self.seen(ino.0, &a)),
            Err(e) => reply.error(err(e)),
        }
    }

    /// Attribute and entry times for `ino` read after `snap` ([`Kernel::ttls`]); a file
    /// open for writing here gets the short attribute time, since its length and times
    /// change at commits the kernel does not see.
    fn ttls(&self, snap: u64, ino: u64) -> (Duration, Duration) {
        let (attr, entry) = self.kernel.ttls(snap);
        if self.vfs.writing(ino) {
            return (self.kernel.short_attr(), entry);
        }
        (attr, entry)
    }

    /// Attributes for the kernel as this mount shows them: while handles write into the
    /// passthrough copy of a file, its length is the copy's (the kernel's writes go there
    /// directly). Without passthrough there are no copies, and no table to ask.
    fn seen(&self, ino: u64, a: &Attr) -> fuser::FileAttr {
        if self.passthrough {
            if let Some(m) = self
                .backings
                .written_copy(ino)
                .and_then(|c| c.metadata().ok())
            {
                let length = m.len();
                return file_attr(
                    ino,
                    &Attr {
                        length,
                        ..a.clone()
                    },
                );
            }
        }
        file_attr(ino, a)
    }

    /// Handle `fh` of `ino`, opened with `flags`, not on a backing of its own: counted as
    /// one reading through the page cache (None), or, beside passthrough handles of the
    /// inode (the kernel allows no other open then), sharing their backing.
    fn open_beside(
        &self,
        ino: u64,
        fh: u64,
        flags: i32,
    ) -> Result<Option<Arc<BackingId>>, fuser::Errno> {
        for _ in 0..BESIDE_TRIES {
            if self.backings.cached_open(ino, fh) {
                return Ok(None);
            }
            if let Some(id) = self.share_live(ino, fh, flags)? {
                return Ok(Some(id));
            }
        }
        Err(fuser::Errno::EBUSY)
    }

    /// Share the live backing of `ino` with handle `fh` (None: there is none now). A copy
    /// of an older version (changed through another mount) is brought up to date first,
    /// unless handles here write into it; a write open writes into it from now on (see
    /// aquifer_vfs::passthrough).
    fn share_live(
        &self,
        ino: u64,
        fh: u64,
        flags: i32,
    ) -> Result<Option<Arc<BackingId>>, fuser::Errno> {
        // Version and writers are read, and this handle kept, under the lock: a writer
        // that came in between must not have its bytes refreshed away.
        let _one = self.backings.mirroring();
        let Some(l) = self.backings.live(ino) else {
            return Ok(None);
        };
        {
            let stamp = self.vfs.copy_stamp(ino).map_err(err)?;
            let now = version(&stamp, &l.copy);
            if l.version != now && l.writers == 0 {
                self.vfs.refresh_copy(fh, &l.copy).map_err(err)?;
                self.backings.set_version(ino, now);
            }
            if is_write(flags) && flags & libc::O_TRUNC != 0 {
                // The vfs cut the file at this open.
                passthrough::cut(&l.copy, 0).map_err(err)?;
            }
        }
        // Kept before the reply: its RELEASE may be handled by another thread as soon as
        // the reply is out, and a keep after that forget would hold the backing for ever.
        self.backings.keep(fh, ino, l.id.clone(), is_write(flags));
        drop(_one);
        self.counters.shared_opens.fetch_add(1, Ordering::Relaxed);
        Ok(Some(l.id))
    }

    /// Run `then` (a flush, fsync or release of handle `fh` of `ino`) after mirroring the
    /// copy the handle writes into, if it does, into the file; the copy then holds the
    /// version committed.
    fn mirrored(
        &self,
        fh: u64,
        ino: u64,
        then: impl FnOnce() -> aquifer_vfs::Result<()>,
    ) -> aquifer_vfs::Result<()> {
        let Some(copy) = self.backings.written_by(fh) else {
            return then();
        };
        let _one = self.backings.mirroring();
        let mirrored = self.vfs.mirror_copy(fh, &copy);
        // Locks are dropped and what was mirrored is committed even if the copy failed.
        let done = then();
        if mirrored.is_ok() && done.is_ok() {
            // Read after the commit: a commit of another mount in between would be taken
            // for this one (two mounts writing one file: docs/semantics.md).
            if let Ok(stamp) = self.vfs.copy_stamp(ino) {
                self.backings.set_version(ino, version(&stamp, &copy));
            }
        } else {
            // Said to the program at a flush or fsync; at a release nobody hears it. The
            // copy no longer says what the file holds: the next open refreshes it.
            tracing::error!(ino, mirror = ?mirrored.err(), commit = ?done.as_ref().err(), "what was written through the kernel's copy was not all stored");
            self.backings.set_version(ino, Vec::new());
        }
        mirrored.and(done)
    }

    fn empty(reply: ReplyEmpty, r: aquifer_vfs::Result<()>) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn xattr_reply(reply: ReplyXattr, size: u32, r: aquifer_vfs::Result<Vec<u8>>) {
        match r {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(fuser::Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(err(e)),
        }
    }
}

impl Filesystem for AquiferFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        let _ = config.set_max_background(64);
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS);
        // Locks are the metadata engine's, so that they hold across mounts: without these
        // the kernel would keep fcntl and flock locks to this node. Not in no-open mode: no
        // FLUSH or RELEASE would drop them at close.
        if !self.no_open {
            let _ = config.add_capabilities(
                fuser::InitFlags::FUSE_POSIX_LOCKS | fuser::InitFlags::FUSE_FLOCK_LOCKS,
            );
        }
        // File handles (name_to_handle_at/open_by_handle_at, NFS re-export): the kernel
        // looks up "." of a node id it has forgotten, which the vfs answers.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_EXPORT_SUPPORT);
        // READDIRPLUS returns attributes with the entries, saving a LOOKUP per entry for
        // `ls -l`, `find` and data loaders that stat what they list; AUTO lets the kernel use
        // plain READDIR when nobody looks at the attributes.
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        );
        if self.passthrough {
            // Backing files live on a plain local file system (depth 1 would let this mount
            // itself sit under an overlay, as in a container's root).
            let ok = config
                .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
                .is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                tracing::info!(
                    "the kernel has no FUSE passthrough; reads are served by the daemon"
                );
            }
            self.vfs.set_passthrough(ok);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.kernel.stop.store(true, Ordering::Release);
        self.vfs.shutdown();
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.counters.tick(Op::lookup);
        let snap = self.kernel.snapshot();
        let r = self.vfs.lookup(&ctx(req), parent.0, name.as_bytes());
        self.entry(reply, snap, parent, name.as_bytes(), r);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.kernel.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.counters.tick(Op::getattr);
        let snap = self.kernel.snapshot();
        let r = self.vfs.getattr(ino.0);
        self.attr(reply, snap, ino, r);
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.counters.tick(Op::setattr);
        let set = SetAttr {
            mode,
            uid,
            gid,
            atime: set_time(atime),
            mtime: set_time(mtime),
            ctime: ctime.map(time_of),
        };
        let snap = self.kernel.snapshot();
        // Handles in passthrough read (and may write) the copy: it is cut with the file, or
        // a copy written into would be mirrored back at its length. Under the lock, so that
        // no mirror runs between the two.
        let one = size
            .filter(|_| self.passthrough)
            .map(|_| self.backings.mirroring());
        let mut r = self.vfs.setattr(&ctx(req), ino.0, &set, size);
        if let (Ok(_), Some(len)) = (&r, size) {
            if let Some(l) = self.backings.live(ino.0) {
                if let Err(e) = passthrough::cut(&l.copy, len) {
                    // The next open refreshes it from the file (cut).
                    self.backings.set_version(ino.0, Vec::new());
                    r = Err(e);
                }
            }
        }
        drop(one);
        self.attr(reply, snap, ino, r);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.counters.tick(Op::readlink);
        match self.vfs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.counters.tick(Op::mknod);
        let snap = self.kernel.snapshot();
        let r = self
            .vfs
            .mknod(&ctx(req), parent.0, name.as_bytes(), mode, umask, rdev);
        self.entry(reply, snap, parent, name.as_bytes(), r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.counters.tick(Op::mkdir);
        let snap = self.kernel.snapshot();
        let r = self
            .vfs
            .mkdir(&ctx(req), parent.0, name.as_bytes(), mode, umask);
        self.entry(reply, snap, parent, name.as_bytes(), r);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.counters.tick(Op::unlink);
        Self::empty(reply, self.vfs.unlink(&ctx(req), parent.0, name.as_bytes()));
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.counters.tick(Op::rmdir);
        Self::empty(reply, self.vfs.rmdir(&ctx(req), parent.0, name.as_bytes()));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.counters.tick(Op::symlink);
        let snap = self.kernel.snapshot();
        let r = self.vfs.symlink(
            &ctx(req),
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
        );
        self.entry(reply, snap, parent, link_name.as_bytes(), r);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.counters.tick(Op::rename);
        let r = self.vfs.rename(
            &ctx(req),
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            flags.bits(),
        );
        if r.is_ok() {
            // The kernel moves its entry to the new name, which no lookup told us.
            self.kernel.renamed(newparent.0, newname.as_bytes());
        }
        Self::empty(reply, r);
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.counters.tick(Op::link);
        let snap = self.kernel.snapshot();
        let r = self
            .vfs
            .link(&ctx(req), ino.0, newparent.0, newname.as_bytes());
        self.entry(
            reply,
            snap,
            newparent,
            newname.as_bytes(),
            r.map(|a| (ino.0, a)),
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.counters.tick(Op::open);
        if self.no_open {
            // The kernel goes on with this open without a handle, and with every later one.
            return reply.error(fuser::Errno::ENOSYS);
        }
        match self.vfs.open_file(&ctx(req), ino.0, flags.0) {
            Ok(o) => {
                if !o.keep_cache {
                    // Close-to-open: the file is new to this mount or changed since it was
                    // last opened here (maybe by another mount), so attributes the kernel
                    // cached from an earlier lookup or stat (its size above all) are stale.
                    if let Some(n) = self.notifier.get() {
                        let _ = n.inval_inode(ino, -1, 0);
                    }
                }
                // A descriptor with nothing to do at close (read-only, on a mount without
                // POSIX locks) saves the FLUSH round trip: a training epoch opens every
                // file once. POSIX locks taken through it are dropped at its release.
                let noflush = if o.flush_at_close {
                    FopenFlags::empty()
                } else {
                    FopenFlags::FOPEN_NOFLUSH
                };
                if let Some(file) = o.backing {
                    let v = version(&o.backing_stamp, &file);
                    let id = self
                        .backings
                        .backing_for(&self.vfs, ino.0, &v, file, |f| reply.open_backing(f));
                    if let Some(id) = id {
                        self.counters
                            .passthrough_opens
                            .fetch_add(1, Ordering::Relaxed);
                        // Kept before the reply (see share_live). The kernel reads the
                        // copy's own page cache: KEEP_CACHE has no meaning here.
                        self.backings.keep(o.fh, ino.0, id.clone(), false);
                        reply.opened_passthrough(FileHandle(o.fh), noflush, &id);
                        return;
                    }
                }
                match self.open_beside(ino.0, o.fh, flags.0) {
                    Ok(Some(id)) => reply.opened_passthrough(FileHandle(o.fh), noflush, &id),
                    Ok(None) => {
                        let keep = if o.keep_cache {
                            FopenFlags::FOPEN_KEEP_CACHE
                        } else {
                            FopenFlags::empty()
                        };
                        reply.opened(FileHandle(o.fh), keep | noflush)
                    }
                    Err(e) => {
                        let _ = self.vfs.release(o.fh, None);
                        reply.error(e)
                    }
                }
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.counters.tick(Op::read);
        let r = if fh.0 == 0 && self.no_open {
            self.vfs.read_ino(ino.0, offset, size)
        } else {
            self.vfs.read(fh.0, offset, size)
        };
        match r {
            Ok(d) => {
                self.counters
                    .read_bytes
                    .fetch_add(d.len() as u64, Ordering::Relaxed);
                reply.data(&d)
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.counters.tick(Op::write);
        match self.vfs.write(fh.0, offset, data) {
            Ok(n) => {
                self.counters
                    .write_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
                reply.written(n)
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.counters.tick(Op::flush);
        if fh.0 == 0 && self.no_open {
            // Nothing to commit or unlock: the kernel stops sending FLUSH.
            return reply.error(fuser::Errno::ENOSYS);
        }
        // close(2) of any descriptor drops the POSIX locks its process holds on the file.
        let r = self.mirrored(fh.0, ino.0, || self.vfs.flush(fh.0, Some(lock_owner.0)));
        Self::empty(reply, r);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.counters.tick(Op::release);
        if fh.0 == 0 && self.no_open {
            return reply.ok();
        }
        // The last close of a file flock()ed through it: the kernel names the lock owner.
        // Writes through an mmap of a passthrough copy may come after the last FLUSH.
        let r = self.mirrored(fh.0, ino.0, || {
            self.vfs.release(fh.0, lock_owner.map(|o| o.0))
        });
        self.backings.forget(fh.0);
        Self::empty(reply, r);
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let (_, lock) = lock_request(typ, start, end, pid);
        match self.vfs.getlk(ino.0, lock_owner.0, &lock) {
            Ok(Some(l)) => reply.locked(l.start, l.end, l.typ, l.pid),
            Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let (flock, lock) = lock_request(typ, start, end, pid);
        let typ = lock.typ;
        let (fh, ino, owner) = (fh.0, ino.0, lock_owner.0);
        if !sleep || typ == libc::F_UNLCK {
            return Self::empty(reply, self.vfs.setlk(fh, ino, owner, &lock, flock));
        }
        // F_SETLKW: wait on a thread of its own, not a FUSE worker, until granted or
        // interrupted (FUSE_INTERRUPT naming this request, see `interrupt`).
        let wait = match self.vfs.begin_lock_wait(req.unique().0) {
            Ok(w) => w,
            Err(e) => return reply.error(err(e)),
        };
        let vfs = self.vfs.clone();
        let spawned = std::thread::Builder::new()
            .name("lock-wait".into())
            .spawn(move || {
                Self::empty(reply, vfs.setlkw(wait, fh, ino, owner, &lock, flock));
            });
        if let Err(e) = spawned {
            // The reply, dropped with the closure, answers EIO.
            tracing::error!(error = %e, "cannot start a lock waiter");
        }
    }

    fn interrupt(&self, _req: &Request, unique: RequestId) -> Result<(), fuser::Errno> {
        // The kernel sends this when the task waiting for request `unique` gets a signal;
        // only lock waits end early (with EINTR). No reply: an error would stop interrupts.
        self.vfs.interrupt(unique.0);
        Ok(())
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.counters.tick(Op::fsync);
        if fh.0 == 0 && self.no_open {
            // Nothing written here (read-only): nothing to make durable.
            return reply.ok();
        }
        let r = self.mirrored(fh.0, ino.0, || self.vfs.fsync(fh.0, datasync));
        Self::empty(reply, r);
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.counters.tick(Op::opendir);
        // The listing is read at this open or later: replies from it are as old as this.
        let snap = self.kernel.snapshot();
        match self.vfs.opendir(&ctx(req), ino.0) {
            Ok(fh) => {
                self.kernel.listing_opened(fh, snap);
                reply.opened(FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.counters.tick(Op::readdir);
        match self.vfs.readdir(&ctx(req), fh.0, offset, false) {
            Ok(entries) => {
                for (off, e) in entries {
                    if reply.add(INodeNo(e.ino), off, kind(e.typ), OsStr::from_bytes(&e.name)) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        self.counters.tick(Op::readdirplus);
        // Entries and attributes come from a page read when the listing started.
        let snap = self.kernel.listing_snapshot(fh.0);
        match self.vfs.readdir(&ctx(req), fh.0, offset, true) {
            Ok(entries) => {
                for (off, e) in entries {
                    // The vfs gives every entry its attributes when asked for them.
                    let Some(attr) = &e.attr else { continue };
                    let (attr_ttl, entry_ttl) = self.ttls(snap, e.ino);
                    let fa = self.seen(e.ino, attr);
                    if reply.add(
                        INodeNo(e.ino),
                        off,
                        OsStr::from_bytes(&e.name),
                        // One time for both: the shorter holds for each.
                        &attr_ttl.min(entry_ttl),
                        &fa,
                        Generation(0),
                    ) {
                        break;
                    }
                    // The kernel counts a lookup for every entry but "." and "..".
                    if e.name != b"." && e.name != b".." {
                        self.kernel.looked_up(ino.0, &e.name, e.ino);
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.counters.tick(Op::releasedir);
        self.kernel.listing_closed(fh.0);
        Self::empty(reply, self.vfs.release(fh.0, None));
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.counters.tick(Op::fsyncdir);
        Self::empty(reply, self.vfs.fsyncdir());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.counters.tick(Op::statfs);
        match self.vfs.statfs() {
            Ok(s) => {
                let bs = 4096u64;
                reply.statfs(
                    s.total_space / bs,
                    s.avail_space / bs,
                    s.avail_space / bs,
                    s.used_inodes + s.avail_inodes,
                    s.avail_inodes,
                    bs as u32,
                    aquifer_meta::MAX_NAME as u32,
                    bs as u32,
                )
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.counters.tick(Op::setxattr);
        Self::empty(
            reply,
            self.vfs
                .setxattr(&ctx(req), ino.0, name.as_bytes(), value, flags),
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.counters.tick(Op::getxattr);
        Self::xattr_reply(reply, size, self.vfs.getxattr(ino.0, name.as_bytes()));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.counters.tick(Op::listxattr);
        Self::xattr_reply(reply, size, self.vfs.listxattr(ino.0));
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.counters.tick(Op::removexattr);
        Self::empty(
            reply,
            self.vfs.removexattr(&ctx(req), ino.0, name.as_bytes()),
        );
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.counters.tick(Op::access);
        Self::empty(reply, self.vfs.access(&ctx(req), ino.0, mask.bits() as u32));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.counters.tick(Op::create);
        let snap = self.kernel.snapshot();
        match self
            .vfs
            .create(&ctx(req), parent.0, name.as_bytes(), mode, umask, flags)
        {
            Ok((ino, a, fh)) => {
                // An existing file opened by this create may have passthrough handles.
                let beside = match self.open_beside(ino, fh, flags) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = self.vfs.release(fh, None);
                        return reply.error(e);
                    }
                };
                let (attr_ttl, entry_ttl) = self.ttls(snap, ino);
                self.kernel.looked_up(parent.0, name.as_bytes(), ino);
                let attr = self.seen(ino, &a);
                match beside {
                    // One time for both (fuser has no other): the short one of a writer.
                    Some(id) => reply.created_passthrough(
                        &attr_ttl,
                        &attr,
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                        &id,
                    ),
                    None => reply.created_with_ttls(
                        &attr_ttl,
                        &entry_ttl,
                        &attr,
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                    ),
                }
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.counters.tick(Op::copy_file_range);
        // The kernel remembers ENOSYS and copies through read/write from then on.
        reply.error(fuser::Errno::ENOSYS);
    }

    fn fallocate(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.counters.tick(Op::fallocate);
        if let Some(copy) = self.backings.written_by(fh.0) {
            // Its writes go to the copy: so does this, mirrored into the file at close.
            return Self::empty(reply, passthrough::fallocate(&copy, mode, offset, length));
        }
        Self::empty(
            reply,
            self.vfs.fallocate(&ctx(req), fh.0, mode, offset, length),
        );
    }

    fn ioctl(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        self.counters.tick(Op::ioctl);
        let caller = Caller {
            uid: req.uid(),
            pid: req.pid(),
        };
        match self.vfs.control(caller, ino.0, cmd, in_data, out_size) {
            Ok((result, out)) => reply.ioctl(result, &out),
            Err(e) => reply.error(err(e)),
        }
    }
}

/// Mount `vfs` at `mountpoint`; the returned session serves requests when run.
pub fn mount(
    vfs: Arc<Vfs>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> std::io::Result<Session<AquiferFs>> {
    let mut mount_options = vec![
        MountOption::FSName(opts.fs_name.clone()),
        MountOption::Subtype("aquifer".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    if opts.read_only {
        mount_options.push(MountOption::RO);
    }
    let mut config = Config::default();
    config.mount_options = mount_options;
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    let follower = vfs.meta().follow();
    let fs = AquiferFs::new(vfs, opts);
    let slot = fs.notifier.clone();
    let kernel = fs.kernel.clone();
    let counters = fs.counters.clone();
    let session = Session::new(fs, mountpoint, &config)?;
    let _ = slot.set(session.notifier());
    if let Some(f) = follower {
        // Ends with the mount (destroy sets `stop`), within a second.
        follow::spawn_follower(kernel, counters, f, session.notifier())?;
    }
    Ok(session)
}
