//! Quota and eviction: what the tier counts (each file's allocated blocks, the directories'
//! own, the pinned bytes of staged writeback) and the housekeeper thread (`cache-keep`)
//! that decides what to evict — from the high watermark down to the low one, after an
//! insert declined for room, and further while the device is short of free space — in the
//! S3-FIFO order of [`crate::policy`].

use super::layout::FANOUT;
use super::Inner;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Bytes free on the device holding `path`, and its size.
fn device_space(path: &Path) -> io::Result<(u64, u64)> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    // SAFETY: statvfs writes a plain struct; `c` outlives the call.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let unit = s.f_frsize as u64;
    Ok((s.f_bavail as u64 * unit, s.f_blocks as u64 * unit))
}

pub(super) fn allocated(m: &fs::Metadata) -> u64 {
    // Delayed allocation is counted in st_blocks already (ext4, xfs); the size rounded up
    // to a page is a floor for file systems that report nothing yet.
    (m.blocks() * 512).max(m.len().div_ceil(4096) * 4096)
}

impl Inner {
    pub(super) fn wake(&self) {
        *self.wake.lock() = true;
        self.wake_cv.notify_all();
    }

    pub(super) fn used(&self) -> u64 {
        self.st.lock().bytes() + self.fixed()
    }

    /// What the index does not hold but the quota counts.
    pub(super) fn fixed(&self) -> u64 {
        self.overhead.load(Ordering::Relaxed) + self.pinned.load(Ordering::Relaxed)
    }

    pub(super) fn measure_overhead(&self) {
        let mut o = 0;
        let mut add = |p: &Path| {
            if let Ok(m) = fs::metadata(p) {
                o += allocated(&m);
            }
        };
        add(&self.root);
        add(&self.root.join("tmp"));
        add(&self.blocks_dir());
        for h in 0..FANOUT {
            add(&self.blocks_dir().join(format!("{h:02x}")));
        }
        add(&self.files_dir());
        if let Ok(rd) = fs::read_dir(self.files_dir()) {
            for e in rd.flatten() {
                add(&e.path());
            }
        }
        self.overhead.store(o, Ordering::Relaxed);
    }

    /// The housekeeper thread: a round when woken (or every second), the directories
    /// measured again every 10 s.
    pub(super) fn housekeep(&self) {
        let mut last_measure = Instant::now();
        loop {
            {
                let mut w = self.wake.lock();
                if !*w {
                    self.wake_cv.wait_for(&mut w, Duration::from_secs(1));
                }
                *w = false;
            }
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            if last_measure.elapsed() > Duration::from_secs(10) {
                self.measure_overhead();
                last_measure = Instant::now();
            }
            self.housekeep_once();
        }
    }

    /// One round: a disk out of use whose time is up is probed (`health.rs`), a vanished
    /// directory made again, then eviction down to what the quota and the free space ask.
    pub(super) fn housekeep_once(&self) {
        self.retry_if_due();
        if !self.usable() {
            return;
        }
        if !self.blocks_dir().is_dir() {
            self.reset();
        }
        let cap = self.cfg.capacity;
        let used = self.used();
        let overhead = self.fixed();
        let mut target = u64::MAX;
        let pressed = self.pressure.swap(false, Ordering::Relaxed);
        if pressed || used > (self.cfg.high * cap as f64) as u64 {
            target = (self.cfg.low * cap as f64) as u64;
        }
        match device_space(&self.root) {
            Ok((free, total)) => {
                let want = (self.cfg.free_ratio * total as f64) as u64;
                let short = want > free;
                self.low_space.store(short, Ordering::Relaxed);
                if short {
                    target = target.min(used.saturating_sub(want - free));
                }
            }
            Err(e) => self.fail("statvfs", &e),
        }
        if target == u64::MAX {
            return;
        }
        let small_cap = cap / 10;
        let victims = self
            .st
            .lock()
            .evict_to(target.saturating_sub(overhead), small_cap);
        let n = victims.len() as u64;
        for (k, _) in victims {
            let _ = fs::remove_file(self.path(&k));
        }
        self.evicted.fetch_add(n, Ordering::Relaxed);
        if let Ok((free, total)) = device_space(&self.root) {
            self.low_space.store(
                free < (self.cfg.free_ratio * total as f64) as u64,
                Ordering::Relaxed,
            );
        }
    }
}
