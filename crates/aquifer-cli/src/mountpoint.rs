//! Mount point checks, background mounts, signals and unmounting.

use anyhow::{anyhow, bail, Context as _, Result};
use aquifer_vfs::Vfs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Set in the environment of the background child so it mounts in the foreground.
pub const DAEMON_ENV: &str = "AQUIFER_BACKGROUND_CHILD";

// The mount table (`/proc/self/mountinfo`) is read in one place, beside the CSI driver's
// other mount helpers.
use aquifer_csi::mounts::mounted_fstype;

/// Refuse a mount point that is missing, not a directory, already mounted or not empty.
pub fn check(mp: &Path, nonempty: bool) -> Result<()> {
    let meta = match std::fs::metadata(mp) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("mount point {} does not exist: create it first (mkdir -p {})", mp.display(), mp.display())
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => bail!(
            "mount point {} is a dead mount (transport endpoint not connected): run `aquifer umount --force {}` first",
            mp.display(),
            mp.display()
        ),
        Err(e) => bail!("cannot use mount point {}: {e}", mp.display()),
    };
    if !meta.is_dir() {
        bail!("mount point {} is not a directory", mp.display());
    }
    let canon =
        std::fs::canonicalize(mp).with_context(|| format!("mount point {}", mp.display()))?;
    if let Some(fs) = mounted_fstype(&canon) {
        bail!(
            "{} is already mounted ({fs}): unmount it first",
            canon.display()
        );
    }
    if !nonempty && std::fs::read_dir(&canon)?.next().is_some() {
        bail!(
            "mount point {} is not empty (pass --nonempty to mount over it)",
            canon.display()
        );
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: load the fuse module (modprobe fuse) or run with access to /dev/fuse");
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && which("fusermount3").is_none() && which("fusermount").is_none() {
        bail!("fusermount3 is not installed: install the fuse3 package");
    }
    Ok(())
}

fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// Start this command again in the background, logging to `log`, and return once the volume
/// is mounted (or with the child's error).
pub fn spawn_background(mp: &Path, log: &Path) -> Result<()> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("log directory {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open log file {}", log.display()))?;
    let start_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().context("cannot find the aquifer executable")?;
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "-d" && a != "--background")
        .collect();
    let mut cmd = Command::new(exe);
    cmd.args(&args)
        .env(DAEMON_ENV, "1")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the background mount")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if mounted_fstype(mp).is_some_and(|t| t.starts_with("fuse")) {
            println!(
                "mounted {} in the background (pid {}, log {})",
                mp.display(),
                child.id(),
                log.display()
            );
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read(log).unwrap_or_default();
            let tail =
                String::from_utf8_lossy(&text[(start_len as usize).min(text.len())..]).into_owned();
            let last = tail
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no output");
            let last = last.strip_prefix("aquifer: error: ").unwrap_or(last);
            bail!("background mount exited ({status}): {last}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "background mount did not come up within 60 s; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Block the termination signals in this thread (and every thread started after).
pub fn block_signals() -> libc::sigset_t {
    let set = signal_set();
    // SAFETY: set is a valid, initialised signal set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    set
}

/// On SIGTERM/SIGINT/SIGHUP: commit buffered writes, then unmount; the FUSE session then
/// ends and the mount command returns.
pub fn handle_signals(
    set: libc::sigset_t,
    mut unmounter: fuser::SessionUnmounter,
    vfs: Arc<Vfs>,
    mp: PathBuf,
) {
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: set is a valid signal set and sig a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            tracing::info!(signal = sig, "terminating: flushing and unmounting");
            vfs.flush_all();
            if let Err(e) = unmounter.unmount() {
                tracing::warn!(error = %e, "unmount failed; detaching lazily");
                lazy_unmount(&mp);
            }
            // Lock waiters hold their files open: end their waits (ENOLCK) so that they
            // can close them and let the detached mount go.
            vfs.end_lock_waits();
            // Open files keep a lazily detached mount alive: do not wait for them forever.
            std::thread::sleep(Duration::from_secs(10));
            vfs.shutdown();
            std::process::exit(0);
        });
}

/// The lock file a daemon serving `mp` holds for as long as it runs. `aquifer umount` waits
/// on it: unmounting returns as soon as the kernel lets go, while the daemon still finishes
/// (background work, closing the metadata engine), and a `mount` of the same volume right
/// after would find the metadata database in use.
fn lock_path(mp: &Path) -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let dir = if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/run/aquifer")
    } else if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        PathBuf::from(d).join("aquifer")
    } else {
        // SAFETY: as above.
        std::env::temp_dir().join(format!("aquifer-{}", unsafe { libc::geteuid() }))
    };
    // FNV-1a: stable across builds, so an upgraded `aquifer umount` finds an older daemon's.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in mp.as_os_str().as_encoded_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    dir.join(format!("mount-{h:016x}.lock"))
}

fn flock(f: &std::fs::File, blocking: bool) -> bool {
    use std::os::fd::AsRawFd;
    let op = libc::LOCK_EX | if blocking { 0 } else { libc::LOCK_NB };
    // SAFETY: a valid open descriptor.
    unsafe { libc::flock(f.as_raw_fd(), op) == 0 }
}

/// Taken by the daemon serving `mp` and kept until it exits (the kernel drops the lock with
/// the process, however it ends). Best effort: without it `umount` just does not wait.
pub fn hold_mount_lock(mp: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::MetadataExt;
    let path = lock_path(mp);
    std::fs::create_dir_all(path.parent()?).ok()?;
    // `umount` removes the file once it holds the lock; a file locked after that removal is
    // no longer the one at the path, so open it again.
    for _ in 0..3 {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ok()?;
        if !flock(&f, false) {
            return None;
        }
        let same = match (f.metadata(), std::fs::metadata(&path)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        };
        if same {
            return Some(f);
        }
    }
    None
}

/// Wait until no daemon holds `mp`'s lock, for at most `limit`.
fn wait_for_daemon(mp: &Path, limit: Duration) -> bool {
    let Ok(f) = std::fs::File::open(lock_path(mp)) else {
        return true;
    };
    let start = Instant::now();
    let mut told = false;
    while !flock(&f, false) {
        if start.elapsed() > limit {
            return false;
        }
        if !told && start.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "aquifer: waiting for the daemon of {} to finish",
                mp.display()
            );
            told = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Ours now: nobody serves `mp`, so the file can go (see `hold_mount_lock`).
    let _ = std::fs::remove_file(lock_path(mp));
    true
}

fn lazy_unmount(mp: &Path) {
    let c = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes()).unwrap_or_default();
    // SAFETY: c is a valid NUL-terminated path.
    let r = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if r != 0 {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(mp)
            .status();
    }
}

pub fn umount(mp: &Path, force: bool) -> Result<()> {
    let canon = match std::fs::canonicalize(mp) {
        Ok(p) => p,
        // A dead FUSE mount cannot be stat'ed; use the path as given.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => std::path::absolute(mp)?,
        Err(e) => return Err(anyhow!("{}: {e}", mp.display())),
    };
    if mounted_fstype(&canon).is_none() {
        bail!("{} is not mounted", canon.display());
    }
    let bin = if which("fusermount3").is_some() {
        "fusermount3"
    } else {
        "fusermount"
    };
    let mut cmd = Command::new(bin);
    cmd.arg("-u");
    if force {
        cmd.arg("-z");
    }
    let out = cmd.arg(&canon).output();
    let done = |canon: &Path| {
        // A forced (lazy) unmount may leave the daemon serving open files: do not wait.
        if !force && !wait_for_daemon(canon, Duration::from_secs(60)) {
            eprintln!(
                "aquifer: unmounted {}, but its daemon is still finishing after 60 s; see its log",
                canon.display()
            );
        }
        Ok(())
    };
    match out {
        Ok(o) if o.status.success() => done(&canon),
        Ok(o) => {
            let msg = String::from_utf8_lossy(&o.stderr);
            let msg = msg.lines().next().unwrap_or("").trim().to_string();
            if force {
                lazy_unmount(&canon);
                if mounted_fstype(&canon).is_none() {
                    return Ok(());
                }
            }
            bail!("cannot unmount {}: {msg}", canon.display())
        }
        Err(_) => {
            let c = std::ffi::CString::new(canon.as_os_str().as_encoded_bytes())?;
            let flags = if force { libc::MNT_DETACH } else { 0 };
            // SAFETY: c is a valid NUL-terminated path.
            if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
                bail!(
                    "cannot unmount {}: {}",
                    canon.display(),
                    std::io::Error::last_os_error()
                );
            }
            done(&canon)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_mount_points() {
        let d = tempfile::tempdir().unwrap();
        let e = check(&d.path().join("missing"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        let f = d.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        let e = check(&f, false).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        let e = check(d.path(), false).unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
    }
}
