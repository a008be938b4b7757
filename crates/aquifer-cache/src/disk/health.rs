//! Disk health: how a failing disk becomes a miss. A failed read or write (gone, read-only,
//! full, I/O errors) takes the disk out of use for [`DiskConfig::retry`](super::DiskConfig::retry):
//! every path asks `Inner::usable` first, so reads are misses and inserts are dropped, and
//! the housekeeper probes it again when its time is up. A directory deleted under the tier
//! is made again, empty.

use super::Inner;
use crate::policy::S3Fifo;
use std::fs;
use std::io;
use std::time::Instant;

impl Inner {
    pub(super) fn usable(&self) -> bool {
        // Tried again by the housekeeper once its time is up; until then, out of use.
        self.down.lock().is_none()
    }

    /// Take the disk out of use after `e` (the first failure is logged).
    pub(super) fn fail(&self, what: &str, e: &io::Error) {
        let mut d = self.down.lock();
        if d.is_none() {
            tracing::warn!(
                dir = %self.root.display(),
                error = %e,
                "cache disk out of use after a failed {what}; reads go to the object store, retried in {}s",
                self.cfg.retry.as_secs()
            );
        }
        *d = Some(Instant::now() + self.cfg.retry);
    }

    /// A disk out of use is tried again once its time is up.
    pub(super) fn retry_if_due(&self) {
        let retry = matches!(*self.down.lock(), Some(t) if Instant::now() >= t);
        if retry {
            match self.probe() {
                Ok(()) => {
                    tracing::info!(dir = %self.root.display(), "cache disk back in use");
                    *self.down.lock() = None;
                }
                Err(e) => self.fail("check", &e),
            }
        }
    }

    /// Whether the disk takes a write again.
    fn probe(&self) -> io::Result<()> {
        let fresh = !self.blocks_dir().is_dir();
        self.make_dirs()?;
        let p = self.root.join("tmp").join("probe");
        fs::write(&p, b"probe")?;
        fs::remove_file(&p)?;
        if fresh {
            *self.st.lock() = S3Fifo::default();
        }
        Ok(())
    }

    /// The cache directory vanished: forget the index and make the directories again (or
    /// take the disk out of use if that fails).
    pub(super) fn reset(&self) {
        tracing::warn!(dir = %self.root.display(), "cache directory vanished; starting it again empty");
        *self.st.lock() = S3Fifo::default();
        if let Err(e) = self.make_dirs() {
            self.fail("re-creation of the cache directory", &e);
        }
    }
}
