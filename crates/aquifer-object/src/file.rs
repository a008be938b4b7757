use crate::{ObjectError, ObjectInfo, ObjectStore, Result};
use bytes::Bytes;
use std::collections::BTreeSet;
use std::fs;
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Objects as files under a directory: `file://PATH`. A put writes a temporary file and renames
/// it into place, so a reader never sees half an object and nothing is overwritten in place.
///
/// Puts do not fsync: a block written and committed by `close` survives the death of the
/// process (it is in the page cache), and [`sync`](ObjectStore::sync) — called before the
/// metadata is made durable, i.e. by every fsync(2) — makes every block put since the last
/// sync durable at once: each file is fdatasync'ed (several at a time, so the disk sees one
/// deep queue instead of a round trip per block), then every directory a name was added to.
/// That is the batching a journaling filesystem does for its own fsync, and it keeps a
/// sequential writer's `close` free of any disk wait.
///
/// Files are created 0600 and directories 0700 whatever the umask: blocks are file data.
///
/// Deleted objects are not unlinked but renamed into `.free/` and truncated (up to
/// [`MAX_FREE`] of them: their space goes back at once, their inodes are kept), and a put
/// takes one from there instead of creating a new inode. A volume rewrites and
/// frees blocks all the time (every commit is a new object, compaction and truncates free
/// old ones), and on ext4 without a journal (common on cloud VMs, and this project's CI)
/// every inode created after many deletes scans past all the inodes deleted in the last
/// minutes: that scan was half the daemon's CPU under fsx. Reusing inodes avoids it on
/// every filesystem. `.free/` is not listed, and is removed when the store is dropped and at
/// start-up (after a kill).
pub struct FileStore {
    root: PathBuf,
    tmp_seq: AtomicU64,
    free: Mutex<Vec<PathBuf>>,
    unsynced: Mutex<Unsynced>,
    /// Held for a whole `sync`, so a sync that returns has waited for every earlier one.
    syncing: Mutex<()>,
}

/// What a power cut could still lose: files put since the last sync and the directories
/// their names went into.
#[derive(Default)]
struct Unsynced {
    files: Vec<PathBuf>,
    dirs: BTreeSet<PathBuf>,
    /// Too many to track one by one: sync the whole filesystem instead.
    overflow: bool,
}

/// Past this many unsynced files, `sync` uses one syncfs(2) instead of a call per file.
const MAX_TRACKED: usize = 1 << 16;
/// Deleted objects kept for reuse (their inodes, not their bytes: they are truncated).
pub const MAX_FREE: usize = 4096;
const FREE_DIR: &str = ".free";

const TMP_SUFFIX: &str = ".tmp-";
/// Objects this large have their writeback started as they are put (whole blocks of a
/// streaming writer); small ones are left to the page cache, and to the object journal.
const EARLY_WRITEBACK_MIN: usize = 1 << 20;
/// Reads at least this large from offset 0 prefetch the whole block.
const READAHEAD_MIN: usize = 256 << 10;

impl FileStore {
    pub fn new(root: impl AsRef<Path>) -> Result<FileStore> {
        let root = root.as_ref().to_path_buf();
        if root.as_os_str().is_empty() {
            return Err(ObjectError::Config(
                "the file store needs a directory (--bucket PATH)".into(),
            ));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(|e| {
                ObjectError::Config(format!(
                    "cannot create block directory {}: {e}",
                    root.display()
                ))
            })?;
        // Left by an earlier process: garbage (their names are this process's to reuse).
        let _ = fs::remove_dir_all(root.join(FREE_DIR));
        Ok(FileStore {
            root,
            tmp_seq: AtomicU64::new(0),
            free: Mutex::new(Vec::new()),
            unsynced: Mutex::new(Unsynced::default()),
            syncing: Mutex::new(()),
        })
    }

    /// A temporary name for a put, holding a freed inode when there is one.
    fn reuse(&self, tmp: &Path) -> bool {
        let Some(old) = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop() else {
            return false;
        };
        match fs::rename(&old, tmp) {
            Ok(()) => true,
            Err(_) => {
                // The put's directory does not exist yet: keep the inode for the next put
                // (dropping it from the pool would leave it behind in `.free/`).
                self.free
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(old);
                false
            }
        }
    }

    /// Create the directories of `path` that are missing, 0700, and remember each new one's
    /// parent: its name must reach the disk too.
    fn make_parents(&self, path: &Path) -> std::io::Result<()> {
        let Some(dir) = path.parent() else {
            return Ok(());
        };
        let mut missing = Vec::new();
        let mut d = dir;
        while d != self.root && !d.exists() {
            missing.push(d.to_path_buf());
            match d.parent() {
                Some(p) => d = p,
                None => break,
            }
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mut u = self.unsynced.lock().unwrap_or_else(|e| e.into_inner());
        for m in missing {
            if let Some(p) = m.parent() {
                u.dirs.insert(p.to_path_buf());
            }
        }
        Ok(())
    }

    fn note_put(&self, path: PathBuf) {
        let mut u = self.unsynced.lock().unwrap_or_else(|e| e.into_inner());
        if u.overflow {
            return;
        }
        if let Some(p) = path.parent() {
            if !u.dirs.contains(p) {
                u.dirs.insert(p.to_path_buf());
            }
        }
        u.files.push(path);
        if u.files.len() > MAX_TRACKED {
            *u = Unsynced {
                overflow: true,
                ..Default::default()
            };
        }
    }

    fn sync_pending(&self, u: &Unsynced) -> std::io::Result<()> {
        if u.overflow {
            let d = fs::File::open(&self.root)?;
            use std::os::fd::AsRawFd;
            // SAFETY: the descriptor is open for the duration of the call.
            if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            return Ok(());
        }
        let sync_one = |p: &PathBuf, data_only: bool| -> std::io::Result<()> {
            match fs::File::open(p) {
                Ok(f) if data_only => f.sync_data(),
                Ok(f) => f.sync_all(),
                // Deleted since (its slice was freed): nothing left to lose.
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        };
        // Several at a time: each fdatasync waits for its own writeback, and the disk does
        // best with many of them queued.
        let threads = u.files.len().div_ceil(8).clamp(1, 8);
        let per = u.files.len().div_ceil(threads).max(1);
        std::thread::scope(|sc| {
            let jobs: Vec<_> = u
                .files
                .chunks(per)
                .map(|part| sc.spawn(move || part.iter().try_for_each(|p| sync_one(p, true))))
                .collect();
            jobs.into_iter().try_for_each(|j| {
                j.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("a sync thread panicked")))
            })
        })?;
        // Deepest first, so a new directory's own entries are down before its name.
        for d in u.dirs.iter().rev() {
            sync_one(d, false)?;
        }
        Ok(())
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        if key.is_empty()
            || key.split('/').next() == Some(FREE_DIR)
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(ObjectError::Config(format!("invalid object key {key:?}")));
        }
        Ok(self.root.join(key))
    }

    fn io(&self, op: &'static str, key: &str, source: std::io::Error) -> ObjectError {
        if source.kind() == ErrorKind::NotFound {
            ObjectError::NotFound {
                store: self.describe(),
                key: key.to_string(),
            }
        } else {
            ObjectError::Io {
                store: self.describe(),
                op,
                key: key.to_string(),
                source,
            }
        }
    }

    fn walk(&self, dir: &Path, rel: &str, out: &mut Vec<ObjectInfo>) -> std::io::Result<()> {
        let mut entries: Vec<_> = match fs::read_dir(dir) {
            Ok(rd) => rd.collect::<std::io::Result<_>>()?,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let key = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let ft = e.file_type()?;
            if rel.is_empty() && name == FREE_DIR {
                continue;
            } else if ft.is_dir() {
                self.walk(&e.path(), &key, out)?;
            } else {
                // Temporary files of interrupted puts are listed too (under names no put
                // uses), so that gc can find and remove them.
                let m = match e.metadata() {
                    Ok(m) => m,
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                out.push(ObjectInfo {
                    key,
                    size: m.len(),
                    modified: m.modified().ok(),
                });
            }
        }
        Ok(())
    }
}

impl Drop for FileStore {
    fn drop(&mut self) {
        let free = std::mem::take(&mut *self.free.lock().unwrap_or_else(|e| e.into_inner()));
        for f in free {
            let _ = fs::remove_file(f);
        }
    }
}

impl ObjectStore for FileStore {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path(key)?;
        let tmp = PathBuf::from(format!(
            "{}{}{}.{}",
            path.display(),
            TMP_SUFFIX,
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let write = |tmp: &Path| -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(tmp)?;
            f.write_all(&data)?;
            if data.len() >= EARLY_WRITEBACK_MIN {
                // Start writing it to the disk now, without waiting: a writer streaming
                // gigabytes then finds its fsync nearly done instead of flushing them all at
                // the end, as ingestion through FUSE and the disk's writes overlap.
                use std::os::fd::AsRawFd;
                // SAFETY: the descriptor is open for the duration of the call; the flags
                // only start asynchronous writeback of the file's dirty pages.
                unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
            }
            Ok(())
        };
        self.reuse(&tmp);
        if let Err(e) = write(&tmp) {
            if e.kind() != ErrorKind::NotFound {
                let _ = fs::remove_file(&tmp);
                return Err(self.io("put", key, e));
            }
            self.make_parents(&path)
                .map_err(|e| self.io("put", key, e))?;
            write(&tmp).map_err(|e| {
                let _ = fs::remove_file(&tmp);
                self.io("put", key, e)
            })?;
        }
        fs::rename(&tmp, &path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            self.io("put", key, e)
        })?;
        self.note_put(path);
        Ok(())
    }

    fn puts_need_sync(&self) -> bool {
        true
    }

    fn sync(&self) -> Result<()> {
        let _one = self.syncing.lock().unwrap_or_else(|e| e.into_inner());
        let pending = std::mem::take(&mut *self.unsynced.lock().unwrap_or_else(|e| e.into_inner()));
        if pending.files.is_empty() && pending.dirs.is_empty() && !pending.overflow {
            return Ok(());
        }
        self.sync_pending(&pending).map_err(|e| {
            // Keep them for the next attempt: they are still not known to be durable.
            let mut u = self.unsynced.lock().unwrap_or_else(|e| e.into_inner());
            u.overflow |= pending.overflow;
            u.files.extend(pending.files);
            u.dirs.extend(pending.dirs);
            self.io("sync", "", e)
        })
    }

    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
        if let Some(l) = len {
            // The caller knows the size (a whole block): one pread, no stat.
            let mut buf = vec![0u8; l as usize];
            let n = self.get_into(key, off, &mut buf)?;
            buf.truncate(n);
            return Ok(Bytes::from(buf));
        }
        let path = self.path(key)?;
        let mut f = fs::File::open(&path).map_err(|e| self.io("get", key, e))?;
        let size = f.metadata().map_err(|e| self.io("get", key, e))?.len();
        let start = off.min(size);
        let n = match len {
            Some(l) => l.min(size - start),
            None => size - start,
        } as usize;
        let mut buf = vec![0u8; n];
        if start > 0 {
            f.seek(SeekFrom::Start(start))
                .map_err(|e| self.io("get", key, e))?;
        }
        f.read_exact(&mut buf).map_err(|e| self.io("get", key, e))?;
        Ok(Bytes::from(buf))
    }

    fn get_into(&self, key: &str, off: u64, buf: &mut [u8]) -> Result<usize> {
        use std::os::unix::fs::FileExt;
        let f = fs::File::open(self.path(key)?).map_err(|e| self.io("get", key, e))?;
        if off == 0 && buf.len() >= READAHEAD_MIN {
            // A large read from the start of a block is a sequential reader: ask the kernel
            // for the whole block now instead of in 128 KiB read-ahead steps.
            use std::os::fd::AsRawFd;
            // SAFETY: the descriptor is open for the duration of the call.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
        }
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io("get", key, e)),
            }
        }
        Ok(done)
    }

    fn head(&self, key: &str) -> Result<ObjectInfo> {
        let m = fs::metadata(self.path(key)?).map_err(|e| self.io("head", key, e))?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: m.len(),
            modified: m.modified().ok(),
        })
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        let r = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            if free.len() < MAX_FREE {
                let dir = self.root.join(FREE_DIR);
                let to = dir.join(self.tmp_seq.fetch_add(1, Ordering::Relaxed).to_string());
                let mut r = fs::rename(&path, &to);
                if matches!(&r, Err(e) if e.kind() == ErrorKind::NotFound) && !dir.exists() {
                    let _ = fs::DirBuilder::new().mode(0o700).create(&dir);
                    r = fs::rename(&path, &to);
                }
                if r.is_ok() {
                    // The bytes go back to the filesystem now; only the inode is kept.
                    let _ = fs::OpenOptions::new()
                        .write(true)
                        .open(&to)
                        .and_then(|f| f.set_len(0));
                    free.push(to);
                }
                r
            } else {
                fs::remove_file(&path)
            }
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io("delete", key, e)),
        }
    }

    fn list(&self, prefix: &str, start_after: &str, limit: usize) -> Result<Vec<ObjectInfo>> {
        // Walk only the directory that holds the prefix.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let mut all = Vec::new();
        self.walk(&self.root.join(dir_part), dir_part, &mut all)
            .map_err(|e| self.io("list", prefix, e))?;
        Ok(all
            .into_iter()
            .filter(|o| o.key.starts_with(prefix) && o.key.as_str() > start_after)
            .take(limit)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> (FileStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (FileStore::new(dir.path()).unwrap(), dir)
    }

    crate::object_conformance!(fresh());

    #[test]
    fn files_are_private_and_sync_covers_every_put() {
        use std::os::unix::fs::PermissionsExt;
        let (s, d) = fresh();
        s.put("chunks/0/0/1_0_3", Bytes::from_static(b"abc"))
            .unwrap();
        s.put("chunks/0/0/2_0_3", Bytes::from_static(b"def"))
            .unwrap();
        let f = fs::metadata(d.path().join("chunks/0/0/1_0_3")).unwrap();
        assert_eq!(f.permissions().mode() & 0o777, 0o600);
        let dir = fs::metadata(d.path().join("chunks/0")).unwrap();
        assert_eq!(dir.permissions().mode() & 0o777, 0o700);
        {
            let u = s.unsynced.lock().unwrap();
            assert_eq!(u.files.len(), 2);
            // The leaf directory, and the parents that got new directories.
            assert!(u.dirs.contains(&d.path().join("chunks/0/0")));
            assert!(u.dirs.contains(&d.path().join("chunks")));
            assert!(u.dirs.contains(d.path()));
        }
        s.delete("chunks/0/0/2_0_3").unwrap();
        s.sync().unwrap();
        assert!(s.unsynced.lock().unwrap().files.is_empty());
    }

    #[test]
    fn deleted_objects_lend_their_inodes_to_new_puts() {
        use std::os::unix::fs::MetadataExt;
        let (s, d) = fresh();
        s.put("chunks/a", Bytes::from_static(b"old bytes, longer"))
            .unwrap();
        let ino = fs::metadata(d.path().join("chunks/a")).unwrap().ino();
        s.delete("chunks/a").unwrap();
        assert!(s.get("chunks/a", 0, None).unwrap_err().is_not_found());
        assert!(
            s.list("", "", 10).unwrap().is_empty(),
            "the free pool is not listed"
        );
        s.put("chunks/b", Bytes::from_static(b"new")).unwrap();
        assert_eq!(fs::metadata(d.path().join("chunks/b")).unwrap().ino(), ino);
        assert_eq!(s.get("chunks/b", 0, None).unwrap(), &b"new"[..]);
        assert!(s.put(".free/x", Bytes::from_static(b"x")).is_err());
        // A restart forgets the pool.
        s.delete("chunks/b").unwrap();
        drop(s);
        let s = FileStore::new(d.path()).unwrap();
        assert!(!d.path().join(FREE_DIR).exists());
        assert!(s.list("", "", 10).unwrap().is_empty());
    }

    /// A put into a directory that does not exist yet cannot take a freed inode; the inode
    /// stays in the pool and is removed with it (objbench once left such files behind).
    #[test]
    fn the_pool_is_removed_whole_when_puts_make_directories() {
        let (s, d) = fresh();
        for i in 0..3 {
            s.put(&format!("large/{i}"), Bytes::from_static(b"big"))
                .unwrap();
        }
        for i in 0..3 {
            s.delete(&format!("large/{i}")).unwrap();
        }
        s.put("small/0", Bytes::from_static(b"s")).unwrap();
        s.put("small/1", Bytes::from_static(b"t")).unwrap();
        assert_eq!(s.get("small/1", 0, None).unwrap(), &b"t"[..]);
        s.delete("small/0").unwrap();
        s.delete("small/1").unwrap();
        drop(s);
        let left: Vec<_> = walk_files(d.path());
        assert!(left.is_empty(), "files left behind: {left:?}");
    }

    fn walk_files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk_files(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn temp_files_of_interrupted_puts_are_listed() {
        let (s, d) = fresh();
        s.put("chunks/a", Bytes::from_static(b"x")).unwrap();
        fs::write(d.path().join("chunks/b.tmp-1.0"), b"half").unwrap();
        let keys: Vec<_> = s
            .list("chunks/", "", 10)
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, ["chunks/a", "chunks/b.tmp-1.0"]);
    }

    #[test]
    fn rejects_keys_that_escape_the_root() {
        let (s, _d) = fresh();
        assert!(s.put("../x", Bytes::from_static(b"a")).is_err());
        assert!(s.put("a//b", Bytes::from_static(b"a")).is_err());
    }
}
