//! Does [`Vfs`] behave like a plain POSIX file system? A reference-model test without FUSE,
//! in the style of mountpoint-s3's reftests: random sequences of operations over a tiny
//! name space (four names, two levels, so that they collide often) and a few open handles
//! are run against the Vfs and against an in-memory model, and every answer — the value or
//! the errno — must be the model's. At the end every handle is closed and the whole tree
//! is compared, through this mount and through a second mount of the same metadata and
//! store (what was closed must be stored).
//!
//! The model is kept obviously right rather than complete: path resolution is the kernel's
//! job, so an operation whose parent is missing is only looked up; an operation for which
//! POSIX allows more than one errno (or where the kernel would act first, e.g. following a
//! symlink) is not run at all rather than checked loosely.

use crate::Vfs;
use aquifer_chunk::DataConfig;
use aquifer_meta::conformance::{test_format, test_session};
use aquifer_meta::*;
use aquifer_object::MemStore;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Small blocks: files of a few blocks (and writes across their boundaries) stay cheap.
const BLOCK: u64 = 1 << 16;
const NAMES: [&[u8]; 4] = [b"a", b"b", b"c", b"d"];

type Checked<T> = std::result::Result<T, TestCaseError>;
type Check = Checked<()>;

fn root() -> Context {
    Context::root()
}

/// Small buffers and few threads: each case mounts twice.
fn config() -> DataConfig {
    DataConfig {
        upload_threads: 2,
        upload_queue: 4,
        write_buffer: 8 << 20,
        // Compact often, so that compaction runs under the operations too.
        compact_threshold: 4,
        cache_bytes: 1 << 20,
        readahead_blocks: 1,
        prefetch_threads: 1,
        ..DataConfig::default()
    }
}

/// A path of one or two names below the root.
#[derive(Clone, PartialEq, Eq)]
struct Path(Vec<u8>);

impl std::fmt::Debug for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self
            .0
            .iter()
            .map(|&i| std::str::from_utf8(NAMES[i as usize]).unwrap())
            .collect();
        write!(f, "\"{}\"", names.join("/"))
    }
}

impl Path {
    fn name(&self) -> &'static [u8] {
        NAMES[*self.0.last().unwrap() as usize]
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// create(2)-like: O_RDWR | O_CREAT, maybe O_EXCL, maybe O_TRUNC.
    Create {
        path: Path,
        excl: bool,
        trunc: bool,
    },
    /// Open an existing file, O_RDONLY or O_RDWR (O_TRUNC only with O_RDWR).
    Open {
        path: Path,
        write: bool,
        trunc: bool,
    },
    Mkdir(Path),
    Unlink(Path),
    Rmdir(Path),
    Rename {
        from: Path,
        to: Path,
        flags: u32,
    },
    Link {
        from: Path,
        to: Path,
    },
    /// A new name for the file of an open handle (linkat(fd, "", AT_EMPTY_PATH)).
    LinkOpen {
        h: usize,
        to: Path,
    },
    Symlink {
        path: Path,
        target: u8,
    },
    Readlink(Path),
    Write {
        h: usize,
        off: u64,
        len: usize,
        seed: u8,
    },
    Read {
        h: usize,
        off: u64,
        size: u32,
    },
    /// truncate(2) of a path.
    Truncate {
        path: Path,
        size: u64,
    },
    /// ftruncate(2) through a writable handle.
    Ftruncate {
        h: usize,
        size: u64,
    },
    Fsync(usize),
    Flush(usize),
    Release(usize),
    /// Use a handle already released.
    Stale(usize),
    Getattr(Path),
    Fstat(usize),
    Readdir {
        path: Path,
        plus: bool,
    },
    Lookup(Path),
}

fn path() -> impl Strategy<Value = Path> {
    let name = 0..NAMES.len() as u8;
    prop_oneof![
        3 => name.clone().prop_map(|n| Path(vec![n])),
        // Below "a" or "b" only: directories there are more often there to be found.
        2 => (0..2u8, name).prop_map(|(d, n)| Path(vec![d, n])),
    ]
}

/// Offsets near the start, around block boundaries, and far past the end (sparse).
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0..6000u64,
        3 => (1..4u64, 0..4096u64).prop_map(|(k, d)| k * BLOCK - 2048 + d),
        1 => 150_000..300_000u64,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let h = 0..8usize;
    prop_oneof![
        6 => (path(), any::<bool>(), any::<bool>())
            .prop_map(|(path, excl, trunc)| Op::Create { path, excl, trunc }),
        3 => (path(), any::<bool>(), any::<bool>())
            .prop_map(|(path, write, trunc)| Op::Open { path, write, trunc: write && trunc }),
        3 => path().prop_map(Op::Mkdir),
        2 => path().prop_map(Op::Unlink),
        1 => path().prop_map(Op::Rmdir),
        4 => (path(), path(), prop_oneof![Just(0), Just(RENAME_NOREPLACE), Just(RENAME_EXCHANGE)])
            .prop_map(|(from, to, flags)| Op::Rename { from, to, flags }),
        1 => (path(), path()).prop_map(|(from, to)| Op::Link { from, to }),
        1 => (h.clone(), path()).prop_map(|(h, to)| Op::LinkOpen { h, to }),
        1 => (path(), any::<u8>()).prop_map(|(path, target)| Op::Symlink { path, target }),
        1 => path().prop_map(Op::Readlink),
        8 => (
            h.clone(),
            offset(),
            prop_oneof![6 => 1..3000usize, 1 => 60_000..70_000usize],
            any::<u8>()
        )
            .prop_map(|(h, off, len, seed)| Op::Write { h, off, len, seed }),
        5 => (h.clone(), offset(), prop_oneof![1..5000u32, 60_000..140_000u32])
            .prop_map(|(h, off, size)| Op::Read { h, off, size }),
        1 => (path(), prop_oneof![Just(0u64), offset()])
            .prop_map(|(path, size)| Op::Truncate { path, size }),
        2 => (h.clone(), prop_oneof![Just(0u64), offset()])
            .prop_map(|(h, size)| Op::Ftruncate { h, size }),
        1 => h.clone().prop_map(Op::Fsync),
        2 => h.clone().prop_map(Op::Flush),
        3 => h.clone().prop_map(Op::Release),
        1 => h.clone().prop_map(Op::Stale),
        1 => path().prop_map(Op::Getattr),
        1 => h.prop_map(Op::Fstat),
        1 => (path(), any::<bool>()).prop_map(|(path, plus)| Op::Readdir { path, plus }),
        1 => path().prop_map(Op::Lookup),
    ]
}

/// Bytes a write puts at `off`: they depend on the offset, so a misplaced byte shows.
fn pattern(off: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((off + i).wrapping_mul(131).wrapping_add(seed as u64) % 251) as u8)
        .collect()
}

#[derive(Clone, Debug)]
enum Node {
    File(Vec<u8>),
    Dir(BTreeMap<Vec<u8>, Ino>),
    Symlink(Vec<u8>),
}

#[derive(Clone, Copy, Debug)]
struct Open {
    fh: u64,
    ino: Ino,
    write: bool,
}

/// What the file system should hold: inodes by number (the Vfs's numbers, learnt when it
/// creates them), the open handles, and the numbers of inodes freed since.
struct Model {
    nodes: BTreeMap<Ino, Node>,
    handles: Vec<Open>,
    /// Handles released (their numbers are not handed out again).
    released: Vec<u64>,
    dead: Vec<Ino>,
}

impl Model {
    fn new() -> Model {
        Model {
            nodes: BTreeMap::from([(ROOT_INO, Node::Dir(BTreeMap::new()))]),
            handles: Vec::new(),
            released: Vec::new(),
            dead: Vec::new(),
        }
    }

    fn dir(&self, ino: Ino) -> &BTreeMap<Vec<u8>, Ino> {
        match &self.nodes[&ino] {
            Node::Dir(d) => d,
            n => panic!("{ino} is not a directory: {n:?}"),
        }
    }

    fn dir_mut(&mut self, ino: Ino) -> &mut BTreeMap<Vec<u8>, Ino> {
        match self.nodes.get_mut(&ino) {
            Some(Node::Dir(d)) => d,
            n => panic!("{ino} is not a directory: {n:?}"),
        }
    }

    fn data_mut(&mut self, ino: Ino) -> &mut Vec<u8> {
        match self.nodes.get_mut(&ino) {
            Some(Node::File(d)) => d,
            n => panic!("{ino} is not a file: {n:?}"),
        }
    }

    fn child(&self, dir: Ino, name: &[u8]) -> Option<Ino> {
        self.dir(dir).get(name).copied()
    }

    fn is_dir(&self, ino: Ino) -> bool {
        matches!(self.nodes[&ino], Node::Dir(_))
    }

    fn typ(&self, ino: Ino) -> FileType {
        match self.nodes[&ino] {
            Node::File(_) => FileType::File,
            Node::Dir(_) => FileType::Directory,
            Node::Symlink(_) => FileType::Symlink,
        }
    }

    /// A directory's links: its entry, its ".", and the ".." of each subdirectory. Any
    /// other inode's: the entries naming it.
    fn nlink(&self, ino: Ino) -> u32 {
        let dirs = self.nodes.values().filter_map(|n| match n {
            Node::Dir(d) => Some(d),
            _ => None,
        });
        if self.is_dir(ino) {
            2 + self.dir(ino).values().filter(|&&c| self.is_dir(c)).count() as u32
        } else {
            dirs.flat_map(|d| d.values()).filter(|&&c| c == ino).count() as u32
        }
    }

    /// The directory holding a directory's one entry (the root's is the root).
    fn parent_of(&self, dir: Ino) -> Ino {
        if dir == ROOT_INO {
            return ROOT_INO;
        }
        let mut holders = self.nodes.iter().filter_map(|(&p, n)| match n {
            Node::Dir(d) if d.values().any(|&c| c == dir) => Some(p),
            _ => None,
        });
        holders.next().expect("a directory without a parent")
    }

    /// `ino` is `dir` or lies below it.
    fn within(&self, mut ino: Ino, dir: Ino) -> bool {
        loop {
            if ino == dir {
                return true;
            }
            if ino == ROOT_INO {
                return false;
            }
            ino = self.parent_of(ino);
        }
    }

    /// Forget the inodes no name and no handle holds any more.
    fn collect(&mut self) {
        let named: BTreeSet<Ino> = self
            .nodes
            .values()
            .filter_map(|n| match n {
                Node::Dir(d) => Some(d.values().copied()),
                _ => None,
            })
            .flatten()
            .chain(self.handles.iter().map(|h| h.ino))
            .chain([ROOT_INO])
            .collect();
        let gone: Vec<Ino> = self
            .nodes
            .keys()
            .filter(|i| !named.contains(i))
            .copied()
            .collect();
        for ino in gone {
            self.nodes.remove(&ino);
            self.dead.push(ino);
        }
    }
}

/// Where a path's parent leads.
#[derive(Clone, Copy)]
enum Parent {
    Dir(Ino),
    /// An existing inode that is not a directory.
    NotDir(Ino),
    /// The kernel would stop at ENOENT without asking the file system.
    Missing,
}

/// The model's prediction for an operation.
enum Expect {
    Ok,
    Err(Errno),
    /// POSIX allows more than one answer, or the kernel would act first: not run.
    Skip,
}

/// The one errno POSIX allows, if the errors that apply leave only one.
fn only(errs: BTreeSet<i32>) -> Expect {
    let mut it = errs.into_iter();
    match (it.next(), it.next()) {
        (None, _) => Expect::Ok,
        (Some(e), None) => Expect::Err(Errno(e)),
        _ => Expect::Skip,
    }
}

fn errno<T>(r: crate::Result<T>) -> Option<Errno> {
    r.err()
}

/// The Vfs under test, its model, and what a second mount needs.
struct Harness {
    kv: Arc<MemKv>,
    store: Arc<MemStore>,
    v: Arc<Vfs>,
    m: Model,
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Also after a failed check: its threads must not outlive the case.
        shutdown_later(&self.v);
    }
}

/// Shut a mount down without waiting: a shutdown waits for the trash worker's next tick
/// (up to half a second), which would be most of a case's time. Nothing is left to flush
/// when this is called (see [`Harness::finish`]), and the engine is a shared one, so the
/// next mount need not wait for this one to end.
fn shutdown_later(v: &Arc<Vfs>) {
    let v = v.clone();
    std::thread::spawn(move || v.shutdown());
}

fn mount(kv: &Arc<MemKv>, store: &Arc<MemStore>) -> Arc<Vfs> {
    let meta: Arc<dyn Meta> = Arc::new(KvMeta::new(kv.clone()));
    let v = Vfs::new(meta, store.clone(), config()).unwrap();
    v.start_session(test_session("reftest")).unwrap();
    v
}

impl Harness {
    fn new() -> Harness {
        // A shared engine: the second mount at the end is another client of the volume,
        // as another machine's would be.
        let kv = Arc::new(MemKv::shared());
        KvMeta::new(kv.clone())
            .format(&test_format(BLOCK as u32), false)
            .unwrap();
        let store = Arc::new(MemStore::new());
        let v = mount(&kv, &store);
        Harness {
            kv,
            store,
            v,
            m: Model::new(),
        }
    }

    /// The Vfs's attributes of `ino` are the model's: type, links, size.
    fn check_attr(&self, ino: Ino, a: &Attr) -> Check {
        prop_assert_eq!(a.typ, self.m.typ(ino), "type of {}", ino);
        prop_assert_eq!(a.nlink, self.m.nlink(ino), "nlink of {}", ino);
        match &self.m.nodes[&ino] {
            Node::File(d) => prop_assert_eq!(a.length, d.len() as u64, "size of {}", ino),
            Node::Symlink(t) => prop_assert_eq!(a.length, t.len() as u64, "size of {}", ino),
            Node::Dir(_) => {}
        }
        Ok(())
    }

    /// Look `name` up in the directory `dir` and compare with the model.
    fn lookup(&self, dir: Ino, name: &[u8]) -> Checked<Option<Ino>> {
        let got = self.v.lookup(&root(), dir, name);
        match self.m.child(dir, name) {
            None => {
                prop_assert_eq!(errno(got), Some(Errno::ENOENT));
                Ok(None)
            }
            Some(ino) => {
                let (i, a) = got.map_err(|e| TestCaseError::fail(format!("lookup: {e:?}")))?;
                prop_assert_eq!(i, ino);
                self.check_attr(ino, &a)?;
                Ok(Some(ino))
            }
        }
    }

    /// Resolve the parent of `path` as the kernel would, checking each lookup.
    fn parent(&self, path: &Path) -> Checked<Parent> {
        if path.0.len() == 1 {
            return Ok(Parent::Dir(ROOT_INO));
        }
        Ok(match self.lookup(ROOT_INO, NAMES[path.0[0] as usize])? {
            None => Parent::Missing,
            Some(ino) if self.m.is_dir(ino) => Parent::Dir(ino),
            Some(ino) => Parent::NotDir(ino),
        })
    }

    /// The directory an operation on `path` runs in: `None` where there is none, the parent
    /// missing or not a directory. In the latter case `op`, run on that parent, is checked
    /// to fail with ENOTDIR.
    fn dir_parent<T>(
        &self,
        path: &Path,
        op: impl FnOnce(Ino) -> crate::Result<T>,
    ) -> Checked<Option<Ino>> {
        match self.parent(path)? {
            Parent::Dir(p) => Ok(Some(p)),
            Parent::NotDir(p) => {
                prop_assert_eq!(errno(op(p)), Some(Errno::ENOTDIR));
                Ok(None)
            }
            Parent::Missing => Ok(None),
        }
    }

    /// A new inode `ino` made at `path` in `parent`: a number not in use before, entered in
    /// the model with the attributes `a` the Vfs answered checked.
    fn added(&mut self, parent: Ino, path: &Path, ino: Ino, node: Node, a: &Attr) -> Check {
        prop_assert!(!self.m.nodes.contains_key(&ino), "{} reused", ino);
        self.m.nodes.insert(ino, node);
        self.m.dir_mut(parent).insert(path.name().to_vec(), ino);
        self.check_attr(ino, a)
    }

    /// `path` in `parent` removed by an unlink or rmdir that answered `got`: it must have
    /// succeeded, and what no longer has a name or a handle is gone.
    fn removed(&mut self, parent: Ino, path: &Path, got: crate::Result<()>) -> Check {
        prop_assert_eq!(got, Ok(()));
        self.m.dir_mut(parent).remove(path.name());
        self.collect()
    }

    /// Resolve the whole of `path`: `None` where the model says it names nothing (checked:
    /// ENOENT, or ENOTDIR below a non-directory).
    fn resolve(&self, path: &Path) -> Checked<Option<Ino>> {
        match self.dir_parent(path, |p| self.v.lookup(&root(), p, path.name()))? {
            Some(p) => self.lookup(p, path.name()),
            None => Ok(None),
        }
    }

    fn handle(&self, h: usize) -> Option<Open> {
        (!self.m.handles.is_empty()).then(|| self.m.handles[h % self.m.handles.len()])
    }

    fn apply(&mut self, op: &Op) -> Check {
        let v = self.v.clone();
        match op {
            Op::Create { path, excl, trunc } => {
                let Some(parent) = self.dir_parent(path, |p| {
                    v.create(&root(), p, path.name(), 0o644, 0, libc::O_RDWR)
                })?
                else {
                    return Ok(());
                };
                let existing = self.m.child(parent, path.name());
                let expect = match existing.map(|i| &self.m.nodes[&i]) {
                    None => Expect::Ok,
                    Some(_) if *excl => Expect::Err(Errno::EEXIST),
                    Some(Node::Dir(_)) => Expect::Err(Errno::EISDIR),
                    // The kernel follows the link.
                    Some(Node::Symlink(_)) => Expect::Skip,
                    Some(Node::File(_)) => Expect::Ok,
                };
                let mut flags = libc::O_RDWR | libc::O_CREAT;
                if *excl {
                    flags |= libc::O_EXCL;
                }
                if *trunc {
                    flags |= libc::O_TRUNC;
                }
                let got = match expect {
                    Expect::Skip => return Ok(()),
                    Expect::Err(e) => {
                        let got = v.create(&root(), parent, path.name(), 0o644, 0, flags);
                        prop_assert_eq!(errno(got), Some(e));
                        return Ok(());
                    }
                    Expect::Ok => v.create(&root(), parent, path.name(), 0o644, 0, flags),
                };
                let (ino, a, fh) =
                    got.map_err(|e| TestCaseError::fail(format!("create: {e:?}")))?;
                prop_assert_eq!(a.typ, FileType::File);
                match existing {
                    Some(i) => {
                        prop_assert_eq!(ino, i, "create opened another inode");
                        if *trunc {
                            self.m.data_mut(ino).clear();
                        }
                    }
                    None => self.added(parent, path, ino, Node::File(Vec::new()), &a)?,
                }
                self.m.handles.push(Open {
                    fh,
                    ino,
                    write: true,
                });
            }
            Op::Open { path, write, trunc } => {
                let Some(ino) = self.resolve(path)? else {
                    return Ok(());
                };
                let mut flags = if *write { libc::O_RDWR } else { libc::O_RDONLY };
                if *trunc {
                    flags |= libc::O_TRUNC;
                }
                match self.m.nodes[&ino] {
                    Node::File(_) => {
                        let fh = v
                            .open(&root(), ino, flags)
                            .map_err(|e| TestCaseError::fail(format!("open: {e:?}")))?;
                        if *trunc {
                            self.m.data_mut(ino).clear();
                        }
                        self.m.handles.push(Open {
                            fh,
                            ino,
                            write: *write,
                        });
                    }
                    Node::Dir(_) if *write => {
                        prop_assert_eq!(errno(v.open(&root(), ino, flags)), Some(Errno::EISDIR));
                    }
                    // A directory is read through opendir; the kernel follows a symlink.
                    Node::Dir(_) | Node::Symlink(_) => {}
                }
            }
            Op::Mkdir(path) => {
                let Some(parent) =
                    self.dir_parent(path, |p| v.mkdir(&root(), p, path.name(), 0o755, 0))?
                else {
                    return Ok(());
                };
                let got = v.mkdir(&root(), parent, path.name(), 0o755, 0);
                if self.m.child(parent, path.name()).is_some() {
                    prop_assert_eq!(errno(got), Some(Errno::EEXIST));
                    return Ok(());
                }
                let (ino, a) = got.map_err(|e| TestCaseError::fail(format!("mkdir: {e:?}")))?;
                self.added(parent, path, ino, Node::Dir(BTreeMap::new()), &a)?;
            }
            Op::Unlink(path) => {
                let Some(parent) = self.dir_parent(path, |p| v.unlink(&root(), p, path.name()))?
                else {
                    return Ok(());
                };
                let got = v.unlink(&root(), parent, path.name());
                match self.m.child(parent, path.name()) {
                    None => prop_assert_eq!(errno(got), Some(Errno::ENOENT)),
                    // Linux's answer (POSIX also allows EPERM).
                    Some(i) if self.m.is_dir(i) => {
                        prop_assert_eq!(errno(got), Some(Errno::EISDIR))
                    }
                    Some(_) => self.removed(parent, path, got)?,
                }
            }
            Op::Rmdir(path) => {
                let Some(parent) = self.dir_parent(path, |p| v.rmdir(&root(), p, path.name()))?
                else {
                    return Ok(());
                };
                let got = v.rmdir(&root(), parent, path.name());
                match self.m.child(parent, path.name()) {
                    None => prop_assert_eq!(errno(got), Some(Errno::ENOENT)),
                    Some(i) if !self.m.is_dir(i) => {
                        prop_assert_eq!(errno(got), Some(Errno::ENOTDIR))
                    }
                    Some(i) if !self.m.dir(i).is_empty() => {
                        prop_assert_eq!(errno(got), Some(Errno::ENOTEMPTY))
                    }
                    Some(_) => self.removed(parent, path, got)?,
                }
            }
            Op::Rename { from, to, flags } => self.rename(from, to, *flags)?,
            Op::Link { from, to } => {
                let Some(ino) = self.resolve(from)? else {
                    return Ok(());
                };
                self.link(ino, to)?;
            }
            Op::LinkOpen { h, to } => {
                let Some(o) = self.handle(*h) else {
                    return Ok(());
                };
                if self.m.nlink(o.ino) > 0 {
                    self.link(o.ino, to)?;
                    return Ok(());
                }
                // An unlinked file gets no new name (Linux: ENOENT, unless O_TMPFILE).
                if let Parent::Dir(p) = self.parent(to)? {
                    if self.m.child(p, to.name()).is_none() {
                        let got = v.link(&root(), o.ino, p, to.name());
                        prop_assert_eq!(errno(got), Some(Errno::ENOENT));
                    }
                }
            }
            Op::Symlink { path, target } => {
                let target = format!("target-{target}").into_bytes();
                let Some(parent) =
                    self.dir_parent(path, |p| v.symlink(&root(), p, path.name(), &target))?
                else {
                    return Ok(());
                };
                let got = v.symlink(&root(), parent, path.name(), &target);
                if self.m.child(parent, path.name()).is_some() {
                    prop_assert_eq!(errno(got), Some(Errno::EEXIST));
                    return Ok(());
                }
                let (ino, a) = got.map_err(|e| TestCaseError::fail(format!("symlink: {e:?}")))?;
                self.added(parent, path, ino, Node::Symlink(target), &a)?;
            }
            Op::Readlink(path) => {
                let Some(ino) = self.resolve(path)? else {
                    return Ok(());
                };
                let got = v.readlink(ino);
                match &self.m.nodes[&ino] {
                    Node::Symlink(t) => prop_assert_eq!(got, Ok(t.clone())),
                    _ => prop_assert_eq!(errno(got), Some(Errno::EINVAL)),
                }
            }
            Op::Write { h, off, len, seed } => {
                let Some(o) = self.handle(*h) else {
                    return Ok(());
                };
                let data = pattern(*off, *len, *seed);
                let got = v.write(o.fh, *off, &data);
                if !o.write {
                    prop_assert_eq!(errno(got), Some(Errno::EBADF));
                    return Ok(());
                }
                prop_assert_eq!(got, Ok(*len as u32));
                let file = self.m.data_mut(o.ino);
                let end = *off as usize + len;
                if file.len() < end {
                    file.resize(end, 0);
                }
                file[*off as usize..end].copy_from_slice(&data);
            }
            Op::Read { h, off, size } => {
                let Some(o) = self.handle(*h) else {
                    return Ok(());
                };
                let got = v.read(o.fh, *off, *size);
                let Node::File(file) = &self.m.nodes[&o.ino] else {
                    unreachable!("handles are of files")
                };
                let from = (*off as usize).min(file.len());
                let to = (*off as usize + *size as usize).min(file.len());
                let got = got.map_err(|e| TestCaseError::fail(format!("read: {e:?}")))?;
                prop_assert!(
                    got == file[from..to],
                    "read of {} at {} got {} bytes, want {} (first difference at {:?})",
                    size,
                    off,
                    got.len(),
                    to - from,
                    got.iter().zip(&file[from..to]).position(|(a, b)| a != b)
                );
            }
            Op::Truncate { path, size } => {
                let Some(ino) = self.resolve(path)? else {
                    return Ok(());
                };
                match self.m.nodes[&ino] {
                    Node::File(_) => self.truncate(ino, *size)?,
                    Node::Dir(_) => {
                        let got = v.setattr(&root(), ino, &SetAttr::default(), Some(*size));
                        prop_assert_eq!(errno(got), Some(Errno::EISDIR));
                    }
                    // The kernel follows the link.
                    Node::Symlink(_) => {}
                }
            }
            Op::Ftruncate { h, size } => {
                // ftruncate of a read-only descriptor is refused by the kernel.
                if let Some(o) = self.handle(*h).filter(|o| o.write) {
                    self.truncate(o.ino, *size)?;
                }
            }
            Op::Fsync(h) => {
                if let Some(o) = self.handle(*h) {
                    prop_assert_eq!(v.fsync(o.fh, false), Ok(()));
                }
            }
            Op::Flush(h) => {
                if let Some(o) = self.handle(*h) {
                    prop_assert_eq!(v.flush(o.fh, None), Ok(()));
                }
            }
            Op::Release(h) => {
                if let Some(o) = self.handle(*h) {
                    prop_assert_eq!(v.release(o.fh, None), Ok(()));
                    self.m.handles.retain(|x| x.fh != o.fh);
                    self.m.released.push(o.fh);
                    self.collect()?;
                }
            }
            Op::Stale(h) => {
                if !self.m.released.is_empty() {
                    let fh = self.m.released[h % self.m.released.len()];
                    prop_assert_eq!(errno(v.read(fh, 0, 10)), Some(Errno::EBADF));
                    prop_assert_eq!(errno(v.write(fh, 0, b"x")), Some(Errno::EBADF));
                    prop_assert_eq!(errno(v.fsync(fh, false)), Some(Errno::EBADF));
                    prop_assert_eq!(errno(v.release(fh, None)), Some(Errno::EBADF));
                }
            }
            Op::Getattr(path) => {
                if let Some(ino) = self.resolve(path)? {
                    let a = v
                        .getattr(ino)
                        .map_err(|e| TestCaseError::fail(format!("getattr: {e:?}")))?;
                    self.check_attr(ino, &a)?;
                }
            }
            Op::Fstat(h) => {
                if let Some(o) = self.handle(*h) {
                    let a = v
                        .getattr(o.ino)
                        .map_err(|e| TestCaseError::fail(format!("fstat: {e:?}")))?;
                    self.check_attr(o.ino, &a)?;
                }
            }
            Op::Readdir { path, plus } => {
                if let Some(ino) = self.resolve(path)? {
                    if self.m.is_dir(ino) {
                        check_listing(&v, &self.m, ino, *plus)?;
                    } else {
                        prop_assert_eq!(errno(v.opendir(&root(), ino)), Some(Errno::ENOTDIR));
                    }
                }
            }
            Op::Lookup(path) => {
                self.resolve(path)?;
            }
        }
        Ok(())
    }

    /// Forget what nothing holds any more; the Vfs must have freed it at once.
    fn collect(&mut self) -> Check {
        let known = self.m.dead.len();
        self.m.collect();
        for &ino in &self.m.dead[known..] {
            prop_assert_eq!(
                errno(self.v.getattr(ino)),
                Some(Errno::ENOENT),
                "freed {}",
                ino
            );
        }
        Ok(())
    }

    fn truncate(&mut self, ino: Ino, size: u64) -> Check {
        let a = self
            .v
            .setattr(&root(), ino, &SetAttr::default(), Some(size))
            .map_err(|e| TestCaseError::fail(format!("truncate: {e:?}")))?;
        self.m.data_mut(ino).resize(size as usize, 0);
        self.check_attr(ino, &a)
    }

    /// link(2) of the existing inode `ino` to `to`.
    fn link(&mut self, ino: Ino, to: &Path) -> Check {
        let is_dir = self.m.is_dir(ino);
        let p = match self.parent(to)? {
            Parent::Missing => return Ok(()),
            // EPERM and ENOTDIR both apply.
            Parent::NotDir(_) if is_dir => return Ok(()),
            Parent::NotDir(p) => {
                let got = self.v.link(&root(), ino, p, to.name());
                prop_assert_eq!(errno(got), Some(Errno::ENOTDIR));
                return Ok(());
            }
            Parent::Dir(p) => p,
        };
        let expect = match (self.m.child(p, to.name()), is_dir) {
            // EPERM and EEXIST both apply.
            (Some(_), true) => return Ok(()),
            (Some(_), false) => Errno::EEXIST,
            (None, true) => Errno::EPERM,
            (None, false) => {
                let a = self
                    .v
                    .link(&root(), ino, p, to.name())
                    .map_err(|e| TestCaseError::fail(format!("link: {e:?}")))?;
                self.m.dir_mut(p).insert(to.name().to_vec(), ino);
                return self.check_attr(ino, &a);
            }
        };
        let got = self.v.link(&root(), ino, p, to.name());
        prop_assert_eq!(errno(got), Some(expect));
        Ok(())
    }

    /// rename(2) and renameat2(2)'s RENAME_NOREPLACE and RENAME_EXCHANGE.
    fn rename(&mut self, from: &Path, to: &Path, flags: u32) -> Check {
        let (sp, dp) = (self.parent(from)?, self.parent(to)?);
        let (sn, dn) = (from.name(), to.name());
        let mut errs = BTreeSet::new();
        let (sp, dp) = match (sp, dp) {
            (Parent::Missing, _) | (_, Parent::Missing) => return Ok(()),
            (Parent::Dir(s), Parent::Dir(d)) => (s, d),
            (s, d) => {
                errs.insert(libc::ENOTDIR);
                if let Parent::Dir(s) = s {
                    if self.m.child(s, sn).is_none() {
                        errs.insert(libc::ENOENT);
                    }
                }
                if let Expect::Err(e) = only(errs) {
                    let ino = |p: &Parent| match p {
                        Parent::Dir(i) | Parent::NotDir(i) => *i,
                        Parent::Missing => unreachable!(),
                    };
                    let got = self.v.rename(&root(), ino(&s), sn, ino(&d), dn, flags);
                    prop_assert_eq!(errno(got), Some(e));
                }
                return Ok(());
            }
        };
        let src = self.m.child(sp, sn);
        let dst = self.m.child(dp, dn);
        let expect = match src {
            None => Expect::Err(Errno::ENOENT),
            // The same inode under both names (or the same name): nothing to do.
            Some(s) if dst == Some(s) => {
                if flags == RENAME_NOREPLACE {
                    Expect::Err(Errno::EEXIST)
                } else {
                    Expect::Ok
                }
            }
            Some(s) if flags == RENAME_EXCHANGE => match dst {
                None => Expect::Err(Errno::ENOENT),
                Some(d) => {
                    // Neither directory may move below itself.
                    if (self.m.is_dir(s) && self.m.within(dp, s))
                        || (self.m.is_dir(d) && self.m.within(sp, d))
                    {
                        Expect::Err(Errno::EINVAL)
                    } else {
                        Expect::Ok
                    }
                }
            },
            Some(s) => {
                if flags == RENAME_NOREPLACE && dst.is_some() {
                    errs.insert(libc::EEXIST);
                }
                if self.m.is_dir(s) && self.m.within(dp, s) {
                    errs.insert(libc::EINVAL);
                }
                if let Some(d) = dst.filter(|_| flags != RENAME_NOREPLACE) {
                    match (self.m.is_dir(s), self.m.is_dir(d)) {
                        (true, false) => errs.insert(libc::ENOTDIR),
                        (false, true) => errs.insert(libc::EISDIR),
                        _ => false,
                    };
                    if self.m.is_dir(d) && !self.m.dir(d).is_empty() {
                        errs.insert(libc::ENOTEMPTY);
                    }
                }
                only(errs)
            }
        };
        let got = match expect {
            Expect::Skip => return Ok(()),
            _ => self.v.rename(&root(), sp, sn, dp, dn, flags),
        };
        match expect {
            Expect::Err(e) => prop_assert_eq!(errno(got), Some(e)),
            Expect::Ok => {
                prop_assert_eq!(got, Ok(()));
                let s = src.unwrap();
                if dst == Some(s) {
                    return Ok(());
                }
                if flags == RENAME_EXCHANGE {
                    let d = dst.unwrap();
                    self.m.dir_mut(sp).insert(sn.to_vec(), d);
                    self.m.dir_mut(dp).insert(dn.to_vec(), s);
                } else {
                    self.m.dir_mut(sp).remove(sn);
                    self.m.dir_mut(dp).insert(dn.to_vec(), s);
                    self.collect()?;
                }
            }
            Expect::Skip => unreachable!(),
        }
        Ok(())
    }

    /// Close every handle, then compare the whole tree, here and through a second mount
    /// of the same metadata and store.
    fn finish(mut self) -> Check {
        for o in std::mem::take(&mut self.m.handles) {
            prop_assert_eq!(self.v.release(o.fh, None), Ok(()));
        }
        self.m.collect();
        prop_assert!(self.v.handles.lock().is_empty(), "handles left open");
        prop_assert!(self.v.writers.lock().is_empty(), "writers left behind");
        check_tree(&self.v, &self.m)?;
        // Nothing is buffered here any more (no writer is left): what the other mount sees
        // was stored by the closes themselves.
        let again = mount(&self.kv, &self.store);
        let r = check_tree(&again, &self.m);
        shutdown_later(&again);
        r
    }
}

/// List the directory `dir` through `v` and compare with the model.
fn check_listing(v: &Vfs, m: &Model, dir: Ino, plus: bool) -> Checked<Vec<Ino>> {
    let dh = v
        .opendir(&root(), dir)
        .map_err(|e| TestCaseError::fail(format!("opendir: {e:?}")))?;
    let mut got = Vec::new();
    let mut off = 0;
    loop {
        let page = v
            .readdir(&root(), dh, off, plus)
            .map_err(|e| TestCaseError::fail(format!("readdir: {e:?}")))?;
        if page.is_empty() {
            break;
        }
        for (next, e) in page {
            off = next;
            got.push(e);
        }
    }
    prop_assert_eq!(v.release(dh, None), Ok(()));
    let want: Vec<(Vec<u8>, Ino)> = [(b".".to_vec(), dir), (b"..".to_vec(), m.parent_of(dir))]
        .into_iter()
        .chain(m.dir(dir).iter().map(|(n, &i)| (n.clone(), i)))
        .collect();
    let names: Vec<(Vec<u8>, Ino)> = got.iter().map(|e| (e.name.clone(), e.ino)).collect();
    prop_assert_eq!(names, want, "listing of {}", dir);
    for e in &got[2..] {
        prop_assert_eq!(e.typ, m.typ(e.ino), "type of {:?}", e.name);
        if plus {
            let a = e.attr.as_ref().expect("readdirplus without attributes");
            prop_assert_eq!(a.typ, m.typ(e.ino));
            prop_assert_eq!(a.nlink, m.nlink(e.ino), "nlink of {:?}", e.name);
            if let Node::File(d) = &m.nodes[&e.ino] {
                prop_assert_eq!(a.length, d.len() as u64, "size of {:?}", e.name);
            }
        }
    }
    Ok(got[2..].iter().map(|e| e.ino).collect())
}

/// Walk the whole tree through `v`: every directory's names, every file's bytes, every
/// symlink's target, every inode's attributes; and the freed inodes are gone.
fn check_tree(v: &Vfs, m: &Model) -> Check {
    let mut seen = BTreeSet::from([ROOT_INO]);
    let mut dirs = vec![ROOT_INO];
    while let Some(dir) = dirs.pop() {
        for ino in check_listing(v, m, dir, true)? {
            seen.insert(ino);
            let a = v
                .getattr(ino)
                .map_err(|e| TestCaseError::fail(format!("getattr: {e:?}")))?;
            prop_assert_eq!(a.typ, m.typ(ino));
            prop_assert_eq!(a.nlink, m.nlink(ino), "nlink of {}", ino);
            match &m.nodes[&ino] {
                Node::Dir(_) => dirs.push(ino),
                Node::Symlink(t) => prop_assert_eq!(v.readlink(ino), Ok(t.clone())),
                Node::File(data) => {
                    prop_assert_eq!(a.length, data.len() as u64, "size of {}", ino);
                    let fh = v
                        .open(&root(), ino, libc::O_RDONLY)
                        .map_err(|e| TestCaseError::fail(format!("open: {e:?}")))?;
                    let got = v.read(fh, 0, data.len() as u32 + 100);
                    prop_assert_eq!(v.release(fh, None), Ok(()));
                    let got = got.map_err(|e| TestCaseError::fail(format!("read: {e:?}")))?;
                    prop_assert!(
                        got == *data,
                        "contents of {}: {} bytes, want {} (first difference at {:?})",
                        ino,
                        got.len(),
                        data.len(),
                        got.iter().zip(data).position(|(a, b)| a != b)
                    );
                }
            }
        }
    }
    let live: BTreeSet<Ino> = m.nodes.keys().copied().collect();
    prop_assert_eq!(seen, live, "inodes reachable");
    for &ino in m.dead.iter().filter(|i| !m.nodes.contains_key(i)) {
        prop_assert_eq!(errno(v.getattr(ino)), Some(Errno::ENOENT), "freed {}", ino);
    }
    Ok(())
}

fn run(ops: &[Op]) -> Check {
    let mut h = Harness::new();
    for op in ops {
        h.apply(op)?;
    }
    h.finish()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Random operations on a few names and handles answer as the model does, and the
    /// tree left after every handle is closed is the model's, on this mount and the next.
    #[test]
    fn vfs_matches_the_reference_model(ops in prop::collection::vec(op(), 1..100)) {
        run(&ops)?;
    }
}

/// The reftest's first find (minimal sequence: create "b"; write 1 byte at 0 through it;
/// create "b" again without O_EXCL, with O_TRUNC). An O_TRUNC open truncated the stored
/// file only when its stored length was not 0, and never the writes another handle had
/// buffered, so they landed after the truncation. POSIX: "If O_TRUNC is set and the file
/// did previously exist, upon successful completion, open() shall truncate the file to
/// length 0" — a write() that returned earlier is part of the file. (Through FUSE the
/// kernel truncates with a setattr instead, which cut the buffers already: the adapter
/// does not ask for FUSE_ATOMIC_O_TRUNC.)
#[test]
fn an_o_trunc_open_discards_the_writes_another_handle_buffered() {
    let h = Harness::new();
    let v = &h.v;
    let (ino, _, first) = v
        .create(&root(), ROOT_INO, b"b", 0o644, 0, libc::O_RDWR)
        .unwrap();
    v.write(first, 0, b"x").unwrap();
    let (_, _, second) = v
        .create(
            &root(),
            ROOT_INO,
            b"b",
            0o644,
            0,
            libc::O_RDWR | libc::O_TRUNC,
        )
        .unwrap();
    assert_eq!(v.getattr(ino).unwrap().length, 0, "right after the open");
    v.release(first, None).unwrap();
    v.release(second, None).unwrap();
    assert_eq!(v.getattr(ino).unwrap().length, 0, "after the closes");
}
