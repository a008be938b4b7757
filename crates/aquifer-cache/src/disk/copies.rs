//! Whole-file copies for FUSE passthrough: the file's bytes alone (the kernel reads them
//! from offset 0), with what the file was when copied (its stamp), the length and the
//! crc32c in the `user.aquifer.whole` extended attribute, set before the rename. A copy is
//! checked against its stamp at every open, and against its checksum at its first open by
//! this process and whenever its file changed since (inode, length, mtime or ctime: any
//! write moves them), not at every open: that would read the whole file again for each
//! open of a file the kernel then reads from its page cache. It counts in the quota and is
//! evicted like a block, but never evicts to make room for itself.

use super::blockfile::Bad;
use super::evict::allocated;
use super::layout::WHOLE;
use super::Inner;
use crate::Fill;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;

const WHOLE_XATTR: &[u8] = b"user.aquifer.whole\0";

/// Copies whose checksum checks are remembered; past this the table starts over.
const VERIFIED_MAX: usize = 1 << 16;

/// What a copy's file was when its checksum held: inode, length, mtime, ctime.
pub(super) type Seen = (u64, u64, i64, i64, i64, i64);

fn seen(f: &File) -> Option<Seen> {
    use std::os::unix::fs::MetadataExt;
    let m = f.metadata().ok()?;
    Some((
        m.ino(),
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

impl Inner {
    pub(super) fn whole_open(&self, key: &str, stamp: &[u8]) -> Option<File> {
        if !self.usable() {
            return None;
        }
        let ik = format!("{WHOLE}{key}");
        if self.ready.load(Ordering::Acquire) && !self.st.lock().contains(&ik) {
            return None;
        }
        let path = self.path(&ik);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.st.lock().remove(&ik);
                return None;
            }
            Err(e) => {
                self.fail("read", &e);
                return None;
            }
        };
        let now = seen(&f);
        let known = now.is_some() && self.verified.lock().get(&ik) == now.as_ref();
        match check_whole(&f, stamp, !known) {
            Ok(true) => {
                if let Some(now) = now.filter(|_| !known) {
                    let mut v = self.verified.lock();
                    if v.len() >= VERIFIED_MAX {
                        v.clear();
                    }
                    v.insert(ik.clone(), now);
                }
                let mut st = self.st.lock();
                if st.access(&ik, crate::mem::REHIT).is_none() {
                    if let Ok(m) = f.metadata() {
                        st.insert(&ik, (), allocated(&m), true);
                    }
                }
                Some(f)
            }
            // The file changed since this copy was made: the copy is of no more use.
            Ok(false) => {
                self.verified.lock().remove(&ik);
                let _ = fs::remove_file(&path);
                self.st.lock().remove(&ik);
                None
            }
            Err(Bad::Corrupt(why)) => {
                self.verified.lock().remove(&ik);
                tracing::warn!(path = %path.display(), why, "corrupt whole-file copy removed");
                self.drop_corrupt(&ik, &path);
                None
            }
            Err(Bad::Io(e)) => {
                self.fail("read", &e);
                None
            }
            Err(Bad::Missing) => None,
        }
    }

    pub(super) fn whole_put(&self, key: &str, stamp: &[u8], len: u64, fill: &mut Fill<'_>) -> bool {
        if !self.usable()
            || !self.ready.load(Ordering::Acquire)
            || self.low_space.load(Ordering::Relaxed)
        {
            return false;
        }
        let est = len.div_ceil(4096) * 4096;
        if self.used() + est > (self.cfg.high * self.cfg.capacity as f64) as u64 {
            return false;
        }
        let ik = format!("{WHOLE}{key}");
        let tmp = self.tmp_path();
        let dst = self.path(&ik);
        let r = (|| -> io::Result<u64> {
            let f = File::create(&tmp)?;
            let mut w = CrcWriter {
                out: io::BufWriter::with_capacity(1 << 20, f),
                crc: 0,
                n: 0,
            };
            fill(&mut w)?;
            if w.n != len {
                return Err(io::Error::other(format!("{} bytes written of {len}", w.n)));
            }
            let crc = w.crc;
            let f = w.out.into_inner().map_err(|e| e.into_error())?;
            let mut v = Vec::with_capacity(12 + stamp.len());
            v.extend_from_slice(&crc.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            v.extend_from_slice(stamp);
            set_xattr(&f, &v)?;
            let w = allocated(&f.metadata()?);
            drop(f);
            if let Some(d) = dst.parent() {
                fs::create_dir_all(d)?;
            }
            fs::rename(&tmp, &dst)?;
            Ok(w)
        })();
        match r {
            Ok(w) => {
                let mut st = self.st.lock();
                st.remove(&ik);
                st.insert(&ik, (), w, false);
                true
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                if e.kind() == io::ErrorKind::Unsupported
                    || e.raw_os_error() == Some(libc::EOPNOTSUPP)
                {
                    // No extended attributes here: no copies, but blocks still work.
                    tracing::debug!(dir = %self.root.display(), "cache disk keeps no whole-file copies: no xattrs");
                } else if e.kind() != io::ErrorKind::Other {
                    self.fail("write", &e);
                }
                false
            }
        }
    }
}

/// Counts and checksums what a whole-file copy is filled with.
struct CrcWriter<W> {
    out: W,
    crc: u32,
    n: u64,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let k = self.out.write(b)?;
        self.crc = crc32c::crc32c_append(self.crc, &b[..k]);
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// One system call on `f`'s `user.aquifer.whole` attribute, given the descriptor and the
/// attribute's NUL-terminated name: what it answered, or the error it set when negative.
fn on_stamp(
    f: &File,
    call: impl FnOnce(libc::c_int, *const libc::c_char) -> isize,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let r = call(f.as_raw_fd(), WHOLE_XATTR.as_ptr().cast());
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

fn set_xattr(f: &File, v: &[u8]) -> io::Result<()> {
    on_stamp(f, |fd, name| {
        // SAFETY: the name is NUL-terminated, `v` is valid for its length, `f` is open.
        unsafe { libc::fsetxattr(fd, name, v.as_ptr().cast(), v.len(), 0) as isize }
    })?;
    Ok(())
}

fn get_xattr(f: &File) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; 512];
    let n = on_stamp(f, |fd, name| {
        // SAFETY: as in `set_xattr`; the kernel writes at most `v.len()` bytes.
        unsafe { libc::fgetxattr(fd, name, v.as_mut_ptr().cast(), v.len()) }
    })?;
    v.truncate(n);
    Ok(v)
}

/// Whether `f` is a sound copy made under `stamp` (Ok(false): a copy of another version);
/// its bytes are read and checked only with `sum`.
fn check_whole(f: &File, stamp: &[u8], sum: bool) -> Result<bool, Bad> {
    let v = match get_xattr(f) {
        Ok(v) => v,
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {
            return Err(Bad::Corrupt("no stamp".into()))
        }
        Err(e) => return Err(Bad::Io(e)),
    };
    if v.len() < 12 {
        return Err(Bad::Corrupt("short stamp".into()));
    }
    if &v[12..] != stamp {
        return Ok(false);
    }
    let crc = u32::from_le_bytes(v[..4].try_into().unwrap());
    let len = u64::from_le_bytes(v[4..12].try_into().unwrap());
    let size = f.metadata().map_err(Bad::Io)?.len();
    if size != len {
        return Err(Bad::Corrupt(format!("{size} bytes for a {len}-byte copy")));
    }
    if !sum {
        return Ok(true);
    }
    let mut buf = vec![0u8; (len as usize).clamp(1, 1 << 20)];
    let mut r = f;
    let mut c = 0u32;
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).map_err(Bad::Io)?;
        if k == 0 {
            break;
        }
        c = crc32c::crc32c_append(c, &buf[..k]);
        n += k as u64;
    }
    use std::io::Seek;
    r.seek(io::SeekFrom::Start(0)).map_err(Bad::Io)?;
    if n != len || c != crc {
        return Err(Bad::Corrupt("checksum mismatch".into()));
    }
    Ok(true)
}
