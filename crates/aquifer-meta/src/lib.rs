//! Aquifer metadata: the [`Meta`] trait and everything an engine needs, with no engine in it.
//!
//! Layers: [`Meta`] is what the filesystem above calls. [`KvMeta`] implements it once over the
//! [`KvEngine`] transaction model, so each engine crate (RocksDB, later Redis) only provides an
//! ordered, transactional key-value store. Every namespace change is one transaction.

pub mod encoding;
mod error;
mod kv;
mod kvmeta;
mod lanes;
mod locks;
mod types;

pub mod conformance;
pub mod dump;
pub mod fault;
pub mod url;

pub use error::{Errno, MetaError, Result};
pub use kv::{
    counter_value, pack_keys, unpack_keys, BufferedTxn, EntryAttr, FeedBatch, KvEngine, KvFeed,
    KvPair, KvRead, KvTxn, MemKv, TxnWrites,
};
pub use kvmeta::{KvMeta, DEFAULT_SESSION_TIMEOUT};
pub use locks::{PLock, F_RDLCK, F_UNLCK, F_WRLCK};
pub use types::*;

/// `n` bytes from the kernel's generator, in hex: secrets only the volume's clients read.
pub(crate) fn random_hex(n: usize) -> Result<String> {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| MetaError::Config(format!("reading /dev/urandom: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Access mask bits for [`Attrs::access`].
pub const MODE_R: u32 = 4;
pub const MODE_W: u32 = 2;
pub const MODE_X: u32 = 1;

/// The namespace and file layout of one volume: every role below, in one trait object.
///
/// Every method that changes the namespace is atomic. Names are raw bytes. `ctx` is the caller:
/// when `ctx.check_permission` is set the engine enforces POSIX permissions itself; otherwise
/// the kernel already did (mounts use `default_permissions`).
///
/// An implementation (today only [`KvMeta`], one file per role in `kvmeta/`) implements
/// each role trait, then `Meta` with an empty impl (`impl Meta for KvMeta<E> {}`):
/// [`Volume`] (settings, space, clock, durability), [`Sessions`], [`Attrs`], [`Namespace`]
/// (names: lookup, create, link, unlink, rename, readdir), [`Files`] (open, close, length),
/// [`Chunks`] (slice ids, slice lists, trash), [`Xattrs`], [`Locks`], [`ObjectJournal`] and
/// [`Load`]. Callers hold `dyn Meta` or `M: Meta` and call every method without naming the
/// role; code holding a concrete engine (`KvMeta<…>`) imports the roles it calls, or
/// `aquifer_meta::*`.
pub trait Meta:
    Send
    + Sync
    + Volume
    + Sessions
    + Attrs
    + Namespace
    + Files
    + Chunks
    + Xattrs
    + Locks
    + ObjectJournal
    + Load
{
}

/// The volume as a whole: which engine, its settings, its space, its clock, durability.
pub trait Volume {
    /// Engine name for messages ("rocksdb", "memory").
    fn engine(&self) -> &'static str;

    /// Write the volume settings and the root directory. Fails with EEXIST when formatted,
    /// unless `force` (which only rewrites settings that may change).
    fn format(&self, format: &Format, force: bool) -> Result<()>;
    /// The volume settings; [`MetaError::NotFormatted`] if there are none.
    fn load_format(&self) -> Result<Format>;
    /// The secret the volume's cache-group keys derive from ([`Format::group_secret`]),
    /// made and stored in one transaction the first time it is asked for, so members that
    /// join at the same time agree on it.
    fn group_secret(&self) -> Result<Secret>;

    /// The engine's clock ([`KvEngine::clock`]: the metadata server's on a shared engine):
    /// what session times and the age of freed blocks are measured on, so that ages
    /// compared across clients do not depend on any client's own clock.
    fn clock(&self) -> Result<Time> {
        Ok(Time::now())
    }

    fn statfs(&self) -> Result<StatFs>;
    /// Space and inodes in use (from counters).
    fn usage(&self) -> Result<(u64, u64)>;

    /// Make all committed changes durable (fsync).
    fn sync(&self) -> Result<()>;
    /// What close(2) of a written file waits for after committing it: on a shared engine
    /// the durability the operator chose for it (Redis: `--meta-durability`); nothing on an
    /// embedded one, whose commits already survive the daemon's death.
    fn sync_on_close(&self) -> Result<()> {
        Ok(())
    }
    /// Follow the changes other clients make to the volume ([`Follower`]); None where nobody
    /// else can change it (an embedded engine) or the engine keeps no feed.
    fn follow(&self) -> Option<Box<dyn Follower>> {
        None
    }
}

/// A change another client made to the volume, as a follower sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Change {
    /// An inode's attributes (length, times, mode, links).
    Attr(Ino),
    /// A name in a directory was made, removed or pointed elsewhere.
    Entry(Ino, Vec<u8>),
    /// A file's contents (a chunk's slice list).
    Data(Ino),
    /// Continuity was lost (the feed started or came back, or fell behind): anything may
    /// have changed.
    Everything,
}

/// Reads the changes other clients make ([`Volume::follow`]). The client's own caches of
/// the volume (slice lists) are dropped by the follower before it reports a change, and
/// trusted across opens only while it keeps up; what it reports is for the caches above
/// (the kernel's).
pub trait Follower: Send {
    /// Wait up to `wait` for changes. An error is the engine unreachable (the caller waits
    /// a little and calls again: the next answer starts with [`Change::Everything`]).
    fn next(&mut self, wait: std::time::Duration) -> Result<Vec<Change>>;
}

/// The clients of a volume: each mount registers a session, keeps it alive, and cleans up
/// after sessions that died.
pub trait Sessions {
    /// Register this client; cleans up what dead sessions left behind. Returns the session id.
    fn new_session(&self, info: SessionInfo) -> Result<u64>;
    /// Refresh this session's heartbeat; on engines other clients share, also clean up
    /// after sessions whose heartbeat stopped. When another client has taken this session
    /// for dead (and released what it held), the session is lost: this and every later
    /// operation on the volume fails with EIO until a new session is started (remount).
    fn heartbeat(&self) -> Result<()>;
    /// How often [`Sessions::heartbeat`] should be called.
    fn heartbeat_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(10)
    }
    fn close_session(&self) -> Result<()>;
    /// Every session's record, sessions being cleaned up after (`reaped`) included.
    fn list_sessions(&self) -> Result<Vec<SessionInfo>>;
    /// This client's session record as it last wrote it (`None`: no session).
    fn session(&self) -> Option<SessionInfo> {
        None
    }
    /// Change this client's session record (what it tells other clients: its cache group
    /// membership) and write it now.
    fn update_session(&self, _change: &mut dyn FnMut(&mut SessionInfo)) -> Result<()> {
        Ok(())
    }
}

/// An inode's attributes, and the permission checks made on them.
pub trait Attrs {
    fn access(&self, ctx: &Context, ino: Ino, mask: u32) -> Result<()>;
    fn getattr(&self, ino: Ino) -> Result<Attr>;
    fn setattr(&self, ctx: &Context, ino: Ino, set: &SetAttr) -> Result<Attr>;
}

/// Names: looking them up, creating, linking, removing and renaming them, listing directories.
pub trait Namespace {
    fn lookup(&self, ctx: &Context, parent: Ino, name: &[u8]) -> Result<(Ino, Attr)>;

    /// Create a file, directory, fifo, socket or device node.
    #[allow(clippy::too_many_arguments)]
    fn mknod(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        typ: FileType,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Result<(Ino, Attr)>;
    fn symlink(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        target: &[u8],
    ) -> Result<(Ino, Attr)>;
    fn readlink(&self, ino: Ino) -> Result<Vec<u8>>;
    fn link(&self, ctx: &Context, ino: Ino, parent: Ino, name: &[u8]) -> Result<Attr>;
    fn unlink(&self, ctx: &Context, parent: Ino, name: &[u8]) -> Result<()>;
    fn rmdir(&self, ctx: &Context, parent: Ino, name: &[u8]) -> Result<()>;
    fn rename(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> Result<()>;
    /// All entries of a directory, without "." and "..", sorted by name; with attributes
    /// when `plus` (see [`DirEntry::attr`]).
    fn readdir(&self, ctx: &Context, ino: Ino, plus: bool) -> Result<Vec<DirEntry>>;
    /// Up to `limit` entries of a directory whose names sort after `after` (all from the
    /// first when empty), sorted by name: a directory of millions of entries is listed a
    /// page at a time in bounded memory.
    ///
    /// Listing page after page, each from the last name of the one before, returns every
    /// entry that exists for the whole listing exactly once, whatever is created or removed
    /// meanwhile, by this client or any other (an entry created or removed during the
    /// listing may or may not be returned). With `plus`, an entry whose inode is removed
    /// while the page is read is returned with `attr: None`, never left out, so that the
    /// page's last name is always a valid cursor. [`DirPage::end`], not the page's length,
    /// says whether the listing is complete.
    fn readdir_page(
        &self,
        ctx: &Context,
        ino: Ino,
        after: &[u8],
        limit: usize,
        plus: bool,
    ) -> Result<DirPage>;
}

/// Open files and a file's length. [`Namespace`] is a supertrait only for the fallback of
/// [`Files::create_open`], which creates with [`Namespace::mknod`].
pub trait Files: Namespace {
    /// Count an open of `ino` (an open file is kept after its last unlink until closed).
    fn open(&self, ctx: &Context, ino: Ino, flags: i32) -> Result<Attr>;
    /// Create a regular file and count an open of it ([`Files::open`]), in one transaction
    /// where the engine can. The caller closes it with [`Files::close`].
    fn create_open(
        &self,
        ctx: &Context,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> Result<(Ino, Attr)> {
        let (ino, _) = self.mknod(ctx, parent, name, FileType::File, mode, umask, 0)?;
        let opener = Context {
            check_permission: false,
            ..ctx.clone()
        };
        let a = self.open(&opener, ino, libc::O_RDWR)?;
        Ok((ino, a))
    }
    fn close(&self, ino: Ino) -> Result<()>;

    fn truncate(&self, ctx: &Context, ino: Ino, length: u64) -> Result<Attr>;
    fn fallocate(&self, ctx: &Context, ino: Ino, mode: i32, off: u64, len: u64) -> Result<Attr>;
}

/// A file's data as the object store holds it: slice ids, each chunk's slice list, and the
/// trash of slices whose objects are to be deleted.
pub trait Chunks {
    /// Allocate a never-reused slice id. Until it is committed ([`Chunks::write_slice`],
    /// [`Chunks::compact_chunk`]) or given up ([`Chunks::abandon_slice_ids`]), the id stays in
    /// this session's record of ids it may still commit, which gc spares.
    fn new_slice_id(&self) -> Result<u64>;
    /// The writer will never commit these ids (its data was discarded): gc need not spare
    /// their objects any more. Forgetting to call this only makes gc spare more.
    fn abandon_slice_ids(&self, _ids: &[u64]) {}
    /// Every slice id allocated so far, by any client, is below this. gc reads it before it
    /// lists objects: an object of a higher id is newer than the listing's view.
    fn slice_id_limit(&self) -> Result<u64> {
        Ok(0)
    }
    /// Slice ids that live sessions may still commit (allocated, neither committed nor
    /// abandoned): gc must not delete their objects whatever their age. A session that
    /// stopped heartbeating counts until it is cleaned up (reaped). Read after the objects
    /// are listed: a session records ids before it uploads anything under them.
    fn live_slice_ranges(&self) -> Result<Vec<std::ops::Range<u64>>> {
        // Everything: an engine that keeps no records cannot tell what is safe to delete.
        Ok(std::iter::once(0..u64::MAX).collect())
    }
    /// The slice list of one chunk, oldest first. May come from a cache that another
    /// client's change reaches at this client's next open of the file.
    fn read_chunk(&self, ino: Ino, idx: u32) -> Result<Vec<Slice>>;
    /// The slice list as the engine has it now (after a block of a cached list was gone:
    /// another client compacted the chunk).
    fn read_chunk_fresh(&self, ino: Ino, idx: u32) -> Result<Vec<Slice>> {
        self.read_chunk(ino, idx)
    }
    /// Append a written slice to a chunk, growing the file when it ends past the length.
    /// Returns the new attributes and the number of slices in the chunk.
    fn write_slice(&self, ino: Ino, idx: u32, slice: Slice) -> Result<(Attr, usize)>;
    /// Replace the first `replaced.len()` slices of a chunk, if they are still exactly
    /// `replaced`, by `new` (any number, none for a chunk of holes); the replaced slices go
    /// to the trash. Returns false when the chunk changed meanwhile (the caller frees `new`).
    fn compact_chunk(&self, ino: Ino, idx: u32, replaced: &[Slice], new: &[Slice]) -> Result<bool>;
    /// Slices waiting to have their objects deleted, as (trash id, slices, when they were
    /// freed on the engine's clock — `None` for a record an older client made, which counts
    /// as old), for ids after `after`, in order.
    fn trash_batch(&self, after: u64, limit: usize) -> Result<Vec<TrashRecord>>;
    fn trash_done(&self, id: u64) -> Result<()>;
    /// Every chunk's slice list, a page at a time: up to `limit` chunks after `after`
    /// (`None`: from the first), in (inode, index) order. For gc and fsck.
    fn scan_chunks(
        &self,
        after: Option<(Ino, u32)>,
        limit: usize,
    ) -> Result<Vec<(Ino, u32, Vec<Slice>)>>;
}

/// Extended attributes.
pub trait Xattrs {
    fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>>;
    fn setxattr(
        &self,
        ctx: &Context,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> Result<()>;
    fn listxattr(&self, ino: Ino) -> Result<Vec<u8>>;
    fn removexattr(&self, ctx: &Context, ino: Ino, name: &[u8]) -> Result<()>;
}

/// Whole-file BSD locks (flock) and POSIX record locks (fcntl), per session and owner.
pub trait Locks {
    /// Take, convert or release (`F_UNLCK`) a whole-file BSD lock for `owner` of this session.
    /// EAGAIN when another owner holds a conflicting lock.
    fn flock(&self, ino: Ino, owner: u64, typ: i32) -> Result<()>;
    /// The first POSIX lock of another owner that conflicts with `lock`, if any.
    fn getlk(&self, ino: Ino, owner: u64, lock: &PLock) -> Result<Option<PLock>>;
    /// Set or release (`F_UNLCK`) a POSIX record lock; EAGAIN on conflict.
    fn setlk(&self, ino: Ino, owner: u64, lock: &PLock) -> Result<()>;
    /// Drop every lock `owner` of this session holds on `ino` (close of its descriptor).
    fn release_locks(&self, ino: Ino, owner: u64) -> Result<()>;
}

/// Copies of small objects kept in the metadata log until the object store has them on disk.
pub trait ObjectJournal {
    /// Keep copies of small objects in the metadata log until the object store has them on
    /// disk: an fsync of a few KiB then costs one log flush instead of a flush per block file
    /// and directory. Made durable by the next [`Volume::sync`]; replayed into the store after a
    /// crash. Keys are object keys; a key written again replaces its copy.
    fn journal_put(&self, records: &[(&str, &[u8])]) -> Result<()>;
    /// Every journaled object, in key order.
    fn journal_list(&self) -> Result<Vec<(String, Vec<u8>)>>;
    /// Forget journaled objects (the store holds them durably now); missing keys are ignored.
    fn journal_remove(&self, keys: &[String]) -> Result<()>;
}

/// `aquifer load`: filling a freshly formatted volume from a dump.
pub trait Load {
    /// `aquifer load`: store one inode as it was dumped (attributes, symlink target, xattrs,
    /// chunks), replacing any record of that number. Only for filling a volume that was
    /// formatted for the load and is not mounted.
    fn load_inode(&self, ino: Ino, inode: &LoadInode) -> Result<()>;
    /// `aquifer load`: store directory entries as they were dumped.
    fn load_entries(&self, parent: Ino, entries: &[(Vec<u8>, Ino, FileType)]) -> Result<()>;
    /// `aquifer load`, last: set the id counters past every id loaded, and the usage.
    fn load_finish(
        &self,
        next_inode: Ino,
        next_slice: u64,
        used_space: u64,
        inodes: u64,
    ) -> Result<()>;
}

/// A trash record: its id, the slices whose objects are to be deleted, and when they were
/// freed on the engine's clock (`None`: an older client's record, counted as old).
pub type TrashRecord = (u64, Vec<Slice>, Option<Time>);

/// One inode as `aquifer dump` writes it and `aquifer load` reads it.
#[derive(Clone, Debug, Default)]
pub struct LoadInode {
    pub attr: Option<Attr>,
    pub symlink: Option<Vec<u8>>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub chunks: Vec<(u32, Vec<Slice>)>,
}
