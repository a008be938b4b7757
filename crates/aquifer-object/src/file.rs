use crate::{ObjectError, ObjectInfo, ObjectStore, Result};
use bytes::Bytes;
use std::fs;
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Objects as files under a directory: `file://PATH`. A put writes a temporary file and renames
/// it into place, so a reader never sees half an object and nothing is overwritten in place.
pub struct FileStore {
    root: PathBuf,
    tmp_seq: AtomicU64,
}

const TMP_SUFFIX: &str = ".tmp-";
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
        fs::create_dir_all(&root).map_err(|e| {
            ObjectError::Config(format!(
                "cannot create block directory {}: {e}",
                root.display()
            ))
        })?;
        Ok(FileStore {
            root,
            tmp_seq: AtomicU64::new(0),
        })
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        if key.is_empty()
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
            if ft.is_dir() {
                self.walk(&e.path(), &key, out)?;
            } else if !name.contains(TMP_SUFFIX) {
                out.push(ObjectInfo {
                    key,
                    size: e.metadata()?.len(),
                });
            }
        }
        Ok(())
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
            let mut f = fs::File::create(tmp)?;
            f.write_all(&data)?;
            Ok(())
        };
        if let Err(e) = write(&tmp) {
            if e.kind() != ErrorKind::NotFound {
                let _ = fs::remove_file(&tmp);
                return Err(self.io("put", key, e));
            }
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(|e| self.io("put", key, e))?;
            }
            write(&tmp).map_err(|e| {
                let _ = fs::remove_file(&tmp);
                self.io("put", key, e)
            })?;
        }
        fs::rename(&tmp, &path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            self.io("put", key, e)
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
        })
    }

    fn delete(&self, key: &str) -> Result<()> {
        match fs::remove_file(self.path(key)?) {
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
    fn rejects_keys_that_escape_the_root() {
        let (s, _d) = fresh();
        assert!(s.put("../x", Bytes::from_static(b"a")).is_err());
        assert!(s.put("a//b", Bytes::from_static(b"a")).is_err());
    }
}
