//! The FUSE adapter: decode a request, call [`Vfs`], encode the reply. No filesystem
//! semantics live here. Permission checks are the kernel's (`default_permissions`), which
//! knows the caller's supplementary groups.

use aquifer_meta::{Attr, Context, Errno, FileType, PLock, SetAttr, SetTime, Time};
use aquifer_vfs::Vfs;
use fuser::{
    AccessFlags, BackingId, Config, FileAttr, FileHandle, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, RequestId, SessionACL, TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use fuser::{Session, SessionUnmounter};

use aquifer_control as control;
pub mod privilege;

macro_rules! ops {
    ($($name:ident),* $(,)?) => {
        /// The FUSE operations served, for figures.
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug)]
        pub enum Op { $($name),* }
        /// Their names, in [`Op`] order.
        pub const OP_NAMES: &[&str] = &[$(stringify!($name)),*];
    };
}

ops!(
    lookup,
    getattr,
    setattr,
    readlink,
    mknod,
    mkdir,
    unlink,
    rmdir,
    symlink,
    rename,
    link,
    open,
    read,
    write,
    flush,
    release,
    fsync,
    opendir,
    readdir,
    readdirplus,
    releasedir,
    fsyncdir,
    statfs,
    setxattr,
    getxattr,
    listxattr,
    removexattr,
    access,
    create,
    copy_file_range,
    fallocate,
    ioctl
);

/// Requests served and bytes moved, counted by the adapter.
pub struct FuseCounters {
    ops: Vec<AtomicU64>,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Opens answered with a backing file: their reads never reach the adapter.
    pub passthrough_opens: AtomicU64,
}

impl Default for FuseCounters {
    fn default() -> Self {
        FuseCounters {
            ops: OP_NAMES.iter().map(|_| AtomicU64::new(0)).collect(),
            read_bytes: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            passthrough_opens: AtomicU64::new(0),
        }
    }
}

impl FuseCounters {
    fn tick(&self, op: Op) {
        self.ops[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Each operation's name and count.
    pub fn ops(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        OP_NAMES
            .iter()
            .zip(&self.ops)
            .map(|(n, c)| (*n, c.load(Ordering::Relaxed)))
    }
}

/// The mount's figures as JSON, for [`control::STATS`].
pub type FiguresFn = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

/// Largest read and write the kernel sends in one request.
pub const MAX_IO: u32 = 1 << 20;

pub struct MountOptions {
    pub fs_name: String,
    /// FUSE worker threads; each serves one request at a time.
    pub threads: usize,
    /// Let other users in (needs root, or user_allow_other in /etc/fuse.conf).
    pub allow_other: bool,
    pub read_only: bool,
    /// How long the kernel may trust attributes without a GETATTR.
    pub attr_ttl: Duration,
    /// How long the kernel may trust a name's lookup without a LOOKUP.
    pub entry_ttl: Duration,
    /// Counted into by the adapter; read by whoever reports figures.
    pub counters: Arc<FuseCounters>,
    /// Answers [`control::STATS`].
    pub figures: Option<FiguresFn>,
    /// Ask the kernel for FUSE passthrough and hand it whole-file copies of cached files.
    pub passthrough: bool,
}

pub struct AquiferFs {
    vfs: Arc<Vfs>,
    ttl: Duration,
    entry_ttl: Duration,
    counters: Arc<FuseCounters>,
    figures: Option<FiguresFn>,
    /// Directories `aquifer warmup` marked warm (true) or evicted, latest last: the node
    /// daemon reads them to label Kubernetes nodes holding warm volumes.
    marks: Mutex<Vec<(u64, bool)>>,
    /// The user that runs the daemon: it (or CAP_SYS_ADMIN) may warm, evict and mark.
    owner_uid: u32,
    /// Passthrough asked for, and not yet found impossible (kernel, privileges).
    passthrough: AtomicBool,
    backings: Mutex<Backings>,
    /// Lock owners that took POSIX locks through each handle: read-only handles opened
    /// before the mount's first POSIX lock carry FOPEN_NOFLUSH, so locks taken through them
    /// are dropped at release instead of at flush.
    lock_owners: Mutex<HashMap<u64, Vec<u64>>>,
    /// Set once the session exists: tells the kernel to drop attributes it cached.
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
}

/// The kernel wants one backing file per inode while any handle of it is open in
/// passthrough: each handle holds its inode's id, the table only finds it again.
#[derive(Default)]
struct Backings {
    by_ino: HashMap<u64, (Weak<BackingId>, Vec<u8>)>,
    by_fh: HashMap<u64, Arc<BackingId>>,
}

fn ctx(req: &Request) -> Context {
    Context {
        uid: req.uid(),
        gid: req.gid(),
        gids: Vec::new(),
        pid: req.pid(),
        check_permission: false,
    }
}

/// A lock request as the kernel sends it: whether it is a flock(2) lock (kept apart from
/// fcntl locks, as Linux keeps them; the patched fuser marks it in the type), and the lock.
fn lock_request(typ: i32, start: u64, end: u64, pid: u32) -> (bool, PLock) {
    let lock = PLock {
        typ: typ & !fuser::LOCK_FLOCK,
        start,
        end,
        pid,
    };
    (typ & fuser::LOCK_FLOCK != 0, lock)
}

fn err(e: Errno) -> fuser::Errno {
    fuser::Errno::from_i32(e.0)
}

fn system_time(t: Time) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + Duration::from_nanos(t.nsec as u64)
    }
}

fn time_of(t: SystemTime) -> Time {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Time {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let mut sec = -(d.as_secs() as i64);
            let mut nsec = d.subsec_nanos();
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Time { sec, nsec }
        }
    }
}

fn kind(t: FileType) -> fuser::FileType {
    match t {
        FileType::File => fuser::FileType::RegularFile,
        FileType::Directory => fuser::FileType::Directory,
        FileType::Symlink => fuser::FileType::Symlink,
        FileType::Fifo => fuser::FileType::NamedPipe,
        FileType::BlockDev => fuser::FileType::BlockDevice,
        FileType::CharDev => fuser::FileType::CharDevice,
        FileType::Socket => fuser::FileType::Socket,
    }
}

fn file_attr(ino: u64, a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: a.length,
        blocks: a.blocks(),
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: system_time(a.ctime),
        kind: kind(a.typ),
        perm: a.mode,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(st) => SetTime::At(time_of(st)),
    })
}

impl AquiferFs {
    pub fn new(vfs: Arc<Vfs>, opts: &MountOptions) -> Self {
        AquiferFs {
            vfs,
            ttl: opts.attr_ttl,
            entry_ttl: opts.entry_ttl,
            counters: opts.counters.clone(),
            figures: opts.figures.clone(),
            marks: Mutex::new(Vec::new()),
            // SAFETY: geteuid has no preconditions.
            owner_uid: unsafe { libc::geteuid() },
            passthrough: AtomicBool::new(opts.passthrough),
            backings: Mutex::new(Backings::default()),
            lock_owners: Mutex::new(HashMap::new()),
            notifier: Arc::new(std::sync::OnceLock::new()),
        }
    }

    /// The backing id for a handle of `ino` opened on `file` (copy version `stamp`): the
    /// live one of the inode if it is of the same version, else a new one. None when the
    /// kernel refuses (no CAP_SYS_ADMIN, no passthrough), which turns passthrough off, or
    /// when the inode is still open on a copy of another version.
    fn backing_for(
        &self,
        reply: &ReplyOpen,
        ino: u64,
        file: &std::fs::File,
        stamp: &[u8],
    ) -> Option<Arc<BackingId>> {
        let mut b = self.backings.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((w, st)) = b.by_ino.get(&ino) {
            if let Some(id) = w.upgrade() {
                if st.as_slice() != stamp {
                    // Changed elsewhere while handles here still read the old copy: the
                    // kernel takes one backing file per inode, so this open fails until
                    // they close (documented in docs/semantics.md).
                    tracing::warn!(ino, "file changed while open in passthrough; new opens fail until the old ones close");
                }
                return (st.as_slice() == stamp).then_some(id);
            }
        }
        match reply.open_backing(file) {
            Ok(id) => {
                let id = Arc::new(id);
                b.by_ino.insert(ino, (Arc::downgrade(&id), stamp.to_vec()));
                Some(id)
            }
            Err(e) => {
                if self.passthrough.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "FUSE passthrough refused by the kernel (it needs CAP_SYS_ADMIN and Linux 6.9); reads are served by the daemon");
                    self.vfs.set_passthrough(false);
                }
                None
            }
        }
    }

    fn in_passthrough(&self, ino: u64) -> bool {
        let b = self.backings.lock().unwrap_or_else(|e| e.into_inner());
        b.by_ino
            .get(&ino)
            .is_some_and(|(w, _)| w.strong_count() > 0)
    }

    fn drop_backing(&self, fh: u64) {
        let mut b = self.backings.lock().unwrap_or_else(|e| e.into_inner());
        if b.by_fh.remove(&fh).is_some() {
            b.by_ino.retain(|_, (w, _)| w.strong_count() > 0);
        }
    }

    fn entry(&self, reply: ReplyEntry, r: aquifer_vfs::Result<(u64, Attr)>) {
        match r {
            Ok((ino, a)) => reply.entry_with_ttls(
                &self.ttl,
                &self.entry_ttl,
                &file_attr(ino, &a),
                Generation(0),
            ),
            Err(e) => reply.error(err(e)),
        }
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
        // the kernel would keep fcntl and flock locks to this node.
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_POSIX_LOCKS | fuser::InitFlags::FUSE_FLOCK_LOCKS,
        );
        // File handles (name_to_handle_at/open_by_handle_at, NFS re-export): the kernel
        // looks up "." of a node id it has forgotten, which the vfs answers.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_EXPORT_SUPPORT);
        // READDIRPLUS returns attributes with the entries, saving a LOOKUP per entry for
        // `ls -l`, `find` and data loaders that stat what they list; AUTO lets the kernel use
        // plain READDIR when nobody looks at the attributes.
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        );
        if self.passthrough.load(Ordering::Relaxed) {
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
            self.passthrough.store(ok, Ordering::Relaxed);
            self.vfs.set_passthrough(ok);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.vfs.shutdown();
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.counters.tick(Op::lookup);
        self.entry(reply, self.vfs.lookup(&ctx(req), parent.0, name.as_bytes()));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.counters.tick(Op::getattr);
        match self.vfs.getattr(ino.0) {
            Ok(a) => reply.attr(&self.ttl, &file_attr(ino.0, &a)),
            Err(e) => reply.error(err(e)),
        }
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
        match self.vfs.setattr(&ctx(req), ino.0, &set, size) {
            Ok(a) => reply.attr(&self.ttl, &file_attr(ino.0, &a)),
            Err(e) => reply.error(err(e)),
        }
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
        self.entry(
            reply,
            self.vfs
                .mknod(&ctx(req), parent.0, name.as_bytes(), mode, umask, rdev),
        );
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
        self.entry(
            reply,
            self.vfs
                .mkdir(&ctx(req), parent.0, name.as_bytes(), mode, umask),
        );
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
        let r = self.vfs.symlink(
            &ctx(req),
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
        );
        self.entry(reply, r);
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
        let r = self
            .vfs
            .link(&ctx(req), ino.0, newparent.0, newname.as_bytes());
        self.entry(reply, r.map(|a| (ino.0, a)));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.counters.tick(Op::open);
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY && self.in_passthrough(ino.0) {
            // The kernel would fail any open of an inode other handles read in
            // passthrough; say why instead of its EIO.
            return reply.error(fuser::Errno::from_i32(libc::ETXTBSY));
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
                if let Some(file) = &o.backing {
                    if let Some(id) = self.backing_for(&reply, ino.0, file, &o.backing_stamp) {
                        self.counters
                            .passthrough_opens
                            .fetch_add(1, Ordering::Relaxed);
                        // The kernel reads the copy's own page cache: KEEP_CACHE has no
                        // meaning here.
                        let f = if o.flush_at_close {
                            FopenFlags::empty()
                        } else {
                            FopenFlags::FOPEN_NOFLUSH
                        };
                        reply.opened_passthrough(FileHandle(o.fh), f, &id);
                        self.backings
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .by_fh
                            .insert(o.fh, id);
                        return;
                    }
                }
                let mut f = if o.keep_cache {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                // A read-only descriptor on a mount without POSIX locks has nothing to do
                // at close: no FLUSH round trip per file closed (a training epoch opens
                // every file once). POSIX locks taken through it are dropped at its release.
                if !o.flush_at_close {
                    f |= FopenFlags::FOPEN_NOFLUSH;
                }
                reply.opened(FileHandle(o.fh), f)
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.counters.tick(Op::read);
        match self.vfs.read(fh.0, offset, size) {
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
        let flushed = self.vfs.flush(fh.0);
        // close(2) of any descriptor drops the POSIX locks its process holds on the file.
        let unlocked = self.vfs.release_locks(ino.0, lock_owner.0);
        if unlocked.is_ok() {
            // Dropped: the handle's last release must not drop them again, by then they
            // may be locks the owner took anew through another descriptor (a child that
            // inherited this one exits after its parent closed it and locked again).
            let mut m = self.lock_owners.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = m.get_mut(&fh.0) {
                v.retain(|&o| o != lock_owner.0);
            }
        }
        Self::empty(reply, flushed.and(unlocked));
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
        self.drop_backing(fh.0);
        // The last close of a file flock()ed through it: the kernel names the lock owner.
        let mut owners = self
            .lock_owners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0)
            .unwrap_or_default();
        owners.extend(lock_owner.map(|o| o.0));
        let mut unlocked = Ok(());
        for o in owners {
            unlocked = unlocked.and(self.vfs.release_locks(ino.0, o));
        }
        Self::empty(reply, self.vfs.release(fh.0).and(unlocked));
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
        let (ino, owner) = (ino.0, lock_owner.0);
        if typ != libc::F_UNLCK && !flock {
            let mut m = self.lock_owners.lock().unwrap_or_else(|e| e.into_inner());
            let v = m.entry(fh.0).or_default();
            if !v.contains(&owner) {
                v.push(owner);
            }
        }
        if !sleep || typ == libc::F_UNLCK {
            return Self::empty(reply, self.vfs.setlk(ino, owner, &lock, flock));
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
                Self::empty(reply, vfs.setlkw(wait, ino, owner, &lock, flock));
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
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.counters.tick(Op::fsync);
        Self::empty(reply, self.vfs.fsync(fh.0, datasync));
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.counters.tick(Op::opendir);
        match self.vfs.opendir(&ctx(req), ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
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
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        self.counters.tick(Op::readdirplus);
        match self.vfs.readdir(&ctx(req), fh.0, offset, true) {
            Ok(entries) => {
                for (off, e) in entries {
                    // The vfs gives every entry its attributes when asked for them.
                    let Some(attr) = &e.attr else { continue };
                    let fa = file_attr(e.ino, attr);
                    if reply.add(
                        INodeNo(e.ino),
                        off,
                        OsStr::from_bytes(&e.name),
                        // One time for both: the shorter holds for each.
                        &self.ttl.min(self.entry_ttl),
                        &fa,
                        Generation(0),
                    ) {
                        break;
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
        Self::empty(reply, self.vfs.release(fh.0));
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
        Self::empty(reply, self.vfs.meta().sync().map_err(Errno::from));
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
        match self
            .vfs
            .create(&ctx(req), parent.0, name.as_bytes(), mode, umask, flags)
        {
            Ok((ino, a, fh)) => reply.created(
                &self.ttl,
                &file_attr(ino, &a),
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
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
        match cmd {
            control::STATS => {
                let Some(f) = &self.figures else {
                    return reply.error(fuser::Errno::from_i32(libc::ENOTTY));
                };
                let mut json = f();
                json.truncate((out_size as usize).min(control::STATS_SIZE));
                reply.ioctl(json.len() as i32, &json)
            }
            control::WARM => {
                let Some(r) = control::WarmRequest::decode(in_data) else {
                    return reply.error(fuser::Errno::from_i32(libc::EINVAL));
                };
                if !privilege::allowed(r.op, req.uid(), self.owner_uid, || {
                    privilege::caller_has_cap_sys_admin(req.pid(), req.uid())
                }) {
                    return reply.error(fuser::Errno::from_i32(libc::EPERM));
                }
                let op = match r.op {
                    control::WarmOp::Warm => aquifer_vfs::CacheOp::Warm,
                    control::WarmOp::Check => aquifer_vfs::CacheOp::Check,
                    control::WarmOp::Evict => aquifer_vfs::CacheOp::Evict,
                    control::WarmOp::Mark | control::WarmOp::Unmark => {
                        let mut m = self.marks.lock().unwrap_or_else(|e| e.into_inner());
                        m.retain(|(i, _)| *i != ino.0);
                        if m.len() >= control::MAX_MARKS {
                            m.remove(0);
                        }
                        m.push((ino.0, r.op == control::WarmOp::Mark));
                        return reply.ioctl(0, &control::WarmReply::default().encode());
                    }
                };
                let out = match self.vfs.cache_range(ino.0, op, r.off, r.len) {
                    Ok(c) => control::WarmReply {
                        errno: 0,
                        total: c.total,
                        cached: c.cached,
                        done: c.done,
                    },
                    Err(e) => control::WarmReply {
                        errno: e.0,
                        ..Default::default()
                    },
                };
                reply.ioctl(0, &out.encode())
            }
            control::MARKS => {
                let b =
                    control::encode_marks(&self.marks.lock().unwrap_or_else(|e| e.into_inner()));
                reply.ioctl(b.len() as i32, &b)
            }
            _ => reply.error(fuser::Errno::from_i32(libc::ENOTTY)),
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
    let fs = AquiferFs::new(vfs, opts);
    let slot = fs.notifier.clone();
    let session = Session::new(fs, mountpoint, &config)?;
    let _ = slot.set(session.notifier());
    Ok(session)
}
