//! The kernel side of publishing: what is mounted where (from `/proc/self/mountinfo`, so
//! nothing is remembered in this process), bind mounts, unmounts, usage.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What is at a path a mount should be at.
#[derive(Debug, PartialEq, Eq)]
pub enum State {
    /// A mount point that answers.
    Mounted,
    /// A mount point whose filesystem daemon is gone ("Transport endpoint is not connected").
    Stale,
    /// No mount here (the path may not exist).
    Absent,
}

pub fn state(p: &Path) -> State {
    // statfs, not stat: the kernel answers a stat from attributes it cached even when the
    // daemon is gone, while every statfs goes to the daemon.
    match usage(p) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => State::Stale,
        Err(_) => {
            // A stale FUSE mount may also fail with EIO or ECONNABORTED; if the table says a
            // mount is here, it is one that does not answer.
            if is_mountpoint(p) {
                State::Stale
            } else {
                State::Absent
            }
        }
        Ok(_) if is_mountpoint(p) => State::Mounted,
        Ok(_) => State::Absent,
    }
}

/// How long a look at a mount may take: a daemon that is alive but stuck (stopped, or
/// waiting on its metadata engine) holds every call on its mount, and the caller — a CSI
/// call, the keeper — must not hang with it.
pub const LOOK_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// `look` (calls into a mount) on a thread of its own, for at most [`LOOK_LIMIT`]; `None`
/// when the mount does not answer in time (the thread is left to finish when it does).
pub async fn in_time<T: Send + 'static>(look: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::time::timeout(LOOK_LIMIT, tokio::task::spawn_blocking(look))
        .await
        .ok()?
        .ok()
}

/// [`state`] in time.
pub async fn state_in_time(p: &Path) -> Option<State> {
    let p = p.to_path_buf();
    in_time(move || state(&p)).await
}

/// [`usage`] in time.
pub async fn usage_in_time(p: &Path) -> Option<io::Result<([u64; 3], [u64; 3])>> {
    let p = p.to_path_buf();
    in_time(move || usage(&p)).await
}

/// `\040`-style escapes of `/proc/self/mountinfo` undone.
fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// `major:minor` of the filesystem: every bind of one FUSE mount shares it, and a
    /// remount gets a new one.
    pub dev: String,
    /// The directory of the filesystem shown here (`/sub/dir` for a bind of a subdirectory).
    pub root: PathBuf,
    pub point: PathBuf,
    pub read_only: bool,
    pub fstype: String,
}

/// The mounts listed in `mountinfo` text, in order (a later mount at one point covers an
/// earlier one).
fn mount_table(mountinfo: &str) -> impl Iterator<Item = Entry> + '_ {
    mountinfo.lines().filter_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        Some(Entry {
            dev: fields.get(2)?.to_string(),
            root: unescape(fields.get(3)?),
            point: unescape(fields.get(4)?),
            read_only: fields.get(5)?.split(',').any(|o| o == "ro"),
            fstype: fields.get(sep + 1)?.to_string(),
        })
    })
}

/// Every mount this process sees (empty if the table cannot be read).
pub fn table() -> Vec<Entry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| mount_table(&info).collect())
        .unwrap_or_default()
}

/// Every mount stacked at `path` (absolute), the topmost last.
pub fn entries_at(path: &Path) -> Vec<Entry> {
    table().into_iter().filter(|e| e.point == path).collect()
}

/// The topmost mount at `path` (absolute), as the kernel resolves it.
pub fn entry(path: &Path) -> Option<Entry> {
    entries_at(path).pop()
}

/// The type of the filesystem mounted at `path` (absolute), if any; the last mount there
/// wins, as the kernel's does.
pub fn mounted_fstype(path: &Path) -> Option<String> {
    entry(path).map(|e| e.fstype)
}

/// True when the kernel lists `p` as a mount point (the path is made absolute without
/// touching it, so a dead FUSE mount does not hang or fail the check).
pub fn is_mountpoint(p: &Path) -> bool {
    std::path::absolute(p).is_ok_and(|abs| mounted_fstype(&abs).is_some())
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bind `src` onto `dst`, then make the bind read-only when asked (a bind mount takes the
/// read-only flag only through a remount).
pub fn bind(src: &Path, dst: &Path, readonly: bool) -> io::Result<()> {
    let (s, d) = (cpath(src)?, cpath(dst)?);
    // SAFETY: valid NUL-terminated paths; no data argument.
    check(unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    })?;
    if readonly {
        // SAFETY: as above.
        let r = check(unsafe {
            libc::mount(
                std::ptr::null(),
                d.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            )
        });
        if let Err(e) = r {
            let _ = unmount(dst, true);
            return Err(e);
        }
    }
    Ok(())
}

/// Unmount `p`; `detach` unmounts lazily (a busy or dead mount goes once unused).
pub fn unmount(p: &Path, detach: bool) -> io::Result<()> {
    let c = cpath(p)?;
    let flags = if detach { libc::MNT_DETACH } else { 0 };
    // SAFETY: valid path.
    check(unsafe { libc::umount2(c.as_ptr(), flags) })
}

/// Space and inodes at `p`: (total, available, used) bytes and (total, free, used) inodes.
pub fn usage(p: &Path) -> io::Result<([u64; 3], [u64; 3])> {
    let c = cpath(p)?;
    // SAFETY: statvfs fills the struct it is given.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    check(unsafe { libc::statvfs(c.as_ptr(), &mut s) })?;
    let f = s.f_frsize as u64;
    let bytes = [
        s.f_blocks as u64 * f,
        s.f_bavail as u64 * f,
        (s.f_blocks as u64).saturating_sub(s.f_bfree as u64) * f,
    ];
    let inodes = [
        s.f_files as u64,
        s.f_ffree as u64,
        (s.f_files as u64).saturating_sub(s.f_ffree as u64),
    ];
    Ok((bytes, inodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        let info = "36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:31 / / rw - tmpfs tmpfs rw\n";
        let m: Vec<(PathBuf, String)> = mount_table(info).map(|e| (e.point, e.fstype)).collect();
        assert_eq!(
            m,
            vec![
                (PathBuf::from("/mnt/with space"), "ext3".to_string()),
                (PathBuf::from("/"), "tmpfs".to_string())
            ]
        );
        let bind = "40 35 0:52 /pvc-1 /var/lib/kubelet/pods/u/mount ro,relatime shared:9 - \
                    fuse.aquifer vol rw,user_id=0\n";
        let e = mount_table(bind).next().unwrap();
        assert_eq!(e.dev, "0:52");
        assert_eq!(e.root, PathBuf::from("/pvc-1"));
        assert!(e.read_only);
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn root_is_a_mount_point_and_a_fresh_dir_is_not() {
        assert!(is_mountpoint(Path::new("/")));
        let d = std::env::temp_dir().join(format!("aquifer-csi-mp-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        assert_eq!(state(&d), State::Absent);
        std::fs::remove_dir(&d).unwrap();
        assert_eq!(state(&d), State::Absent);
    }
}
