//! Where things are on the disk: the directories under a tier's root, which file a key is,
//! and what a cache directory must be (this process's own) before anything goes in it.
//!
//! One stable hash ([`key_hash`]) places a key both among the disks of a [`crate::Spread`]
//! and in a disk's 256 directories, so every start finds blocks where it left them.

use super::Inner;
use crate::file;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

pub(super) const FANOUT: u32 = 256;
/// Index keys of whole-file copies start with this, which no block key does.
pub(super) const WHOLE: char = '~';

/// Make sure `dir` is this process's own: created mode 0700 when missing (with its
/// parents); when it exists, a directory (not a symlink) owned by this process's user and
/// writable by no one else. A cache or staging directory another user owns or may write
/// into is one where they could plant blocks that reads return, or read what others
/// wrote: refused, with one line that says what to change. Its parent (the `--cache-dir`
/// the volume's directory is made in) must not let another user swap `dir` for one of
/// theirs: owned by this user or root, and writable by others only with the sticky bit
/// (as `/tmp`).
pub fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(m) = fs::metadata(parent) {
            check_parent(parent, &m, me)?;
        }
    }
    let m = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            fs::symlink_metadata(dir)?
        }
        Err(e) => return Err(e),
    };
    check_private(&m, me)
}

fn check_parent(dir: &Path, m: &fs::Metadata, me: u32) -> io::Result<()> {
    if m.uid() != me && m.uid() != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: owned by uid {}, who could replace the cache in it: use a directory of uid {me} or root",
                dir.display(),
                m.uid()
            ),
        ));
    }
    if m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: mode {:o} lets other users replace the cache in it: chmod 700 it (or o+t)",
                dir.display(),
                m.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// The error names no path: every caller says which directory it was opening.
fn check_private(m: &fs::Metadata, me: u32) -> io::Result<()> {
    let refuse = |why: String| Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
    if !m.file_type().is_dir() {
        return refuse("not a directory (a symlink is not followed)".into());
    }
    if m.uid() != me {
        return refuse(format!(
            "owned by uid {}, not by uid {me} that runs this mount: give the mount a directory of its own (or chown it)",
            m.uid()
        ));
    }
    if m.mode() & 0o022 != 0 {
        return refuse(format!(
            "mode {:o} lets other users write in it: chmod 700 it",
            m.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Where a key lives among the tiers of a [`crate::Spread`], and in a tier's fan-out: two
/// independent parts of one stable hash, so every start finds blocks where it left them.
pub(crate) fn key_hash(key: &str) -> u32 {
    crc32c::crc32c(key.as_bytes())
}

impl Inner {
    pub(super) fn blocks_dir(&self) -> PathBuf {
        self.root.join("blocks")
    }

    pub(super) fn files_dir(&self) -> PathBuf {
        self.root.join("files")
    }

    pub(super) fn path(&self, key: &str) -> PathBuf {
        let h = key_hash(key) % FANOUT;
        let dir = if key.starts_with(WHOLE) {
            self.files_dir()
        } else {
            self.blocks_dir()
        };
        dir.join(format!("{h:02x}")).join(file::file_name(key))
    }

    /// A name under `tmp/` no other write uses, for a file being written: it is renamed
    /// into place once whole.
    pub(super) fn tmp_path(&self) -> PathBuf {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}.{seq}", std::process::id()))
    }

    pub(super) fn make_dirs(&self) -> io::Result<()> {
        fs::create_dir_all(self.root.join("tmp"))?;
        let b = self.blocks_dir();
        for h in 0..FANOUT {
            let d = b.join(format!("{h:02x}"));
            if !d.is_dir() {
                fs::create_dir_all(&d)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{DiskConfig, DiskTier};
    use super::*;

    #[test]
    fn a_cache_directory_is_the_mounts_own() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let fresh = t.path().join("new").join("vol");
        private_dir(&fresh).unwrap();
        let m = fs::metadata(&fresh).unwrap();
        assert_eq!(m.mode() & 0o777, 0o700, "created 0700");
        let open = t.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let e = private_dir(&open).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("chmod 700"), "{e}");
        assert!(DiskTier::open(&open, DiskConfig::default()).is_err());
        // A volume's directory made in an open --cache-dir: another user could swap it.
        let e = private_dir(&open.join("vol")).unwrap_err();
        assert!(e.to_string().contains("replace the cache"), "{e}");
        assert!(!open.join("vol").exists());
        fs::set_permissions(&open, fs::Permissions::from_mode(0o750)).unwrap();
        private_dir(&open).unwrap();
        // Another user's directory, whatever its mode (as seen by a process of uid+1).
        let m = fs::symlink_metadata(&open).unwrap();
        let e = check_private(&m, m.uid() + 1).unwrap_err();
        assert!(e.to_string().contains("owned by uid"), "{e}");
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        assert!(private_dir(&link).is_err(), "a symlink is refused");
    }
}
