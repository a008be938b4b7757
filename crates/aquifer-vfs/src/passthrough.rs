//! FUSE passthrough bookkeeping: which backing file the kernel reads for each inode.
//!
//! The kernel takes one backing file per inode while any handle of it is open in
//! passthrough, and refuses a second one. Each handle holds its inode's backing id; the
//! table only finds it again (a weak reference), so the id goes when the last handle does.
//! A file changed elsewhere while handles here still read the old copy cannot get a new
//! backing until they close: such opens are served by the daemon meanwhile.
//!
//! The kernel also keeps an inode's opens in one mode: while any handle of it is open in
//! passthrough, every other open must be too, on the same backing (any other open fails
//! with EIO, direct I/O included), and a passthrough open beside handles that read through
//! the page cache fails with ETXTBSY. So the table also counts each inode's cached
//! handles, and a backing is not handed out beside them: that open reads through the
//! daemon instead. An open that cannot share a live backing (a write open, a file changed
//! since the copy) is refused by the adapter with ETXTBSY after a grace for the RELEASEs on
//! their way (see docs/semantics.md). Generic over the id type so that this runs, and is
//! tested, without FUSE.

use crate::Vfs;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, Weak};

pub struct Backings<B> {
    table: Mutex<Table<B>>,
}

struct Table<B> {
    /// The live backing of each inode and the version (stamp) of the copy it reads.
    by_ino: HashMap<u64, (Weak<B>, Vec<u8>)>,
    /// What each handle in passthrough holds.
    by_fh: HashMap<u64, Arc<B>>,
    /// Handles open in the kernel's cached mode, per inode, and each such handle's inode.
    cached: HashMap<u64, u32>,
    cached_fh: HashMap<u64, u64>,
}

impl<B> Default for Backings<B> {
    fn default() -> Self {
        Backings {
            table: Mutex::new(Table {
                by_ino: HashMap::new(),
                by_fh: HashMap::new(),
                cached: HashMap::new(),
                cached_fh: HashMap::new(),
            }),
        }
    }
}

impl<B> Backings<B> {
    /// The backing id for a handle of `ino` opened on a copy of version `stamp`: the live
    /// one of the inode if it is of the same version, else a new one from `open`. None
    /// when the inode is still open on a copy of another version, or when `open` fails
    /// (the kernel refuses: no CAP_SYS_ADMIN, no passthrough), which turns passthrough off
    /// for the mount.
    pub fn backing_for(
        &self,
        vfs: &Vfs,
        ino: u64,
        stamp: &[u8],
        open: impl FnOnce() -> std::io::Result<B>,
    ) -> Option<Arc<B>> {
        let mut t = self.table.lock();
        if t.cached.get(&ino).is_some_and(|n| *n > 0) {
            // The kernel would refuse a passthrough open beside them.
            return None;
        }
        if let Some((w, st)) = t.by_ino.get(&ino) {
            if let Some(id) = w.upgrade() {
                if st.as_slice() != stamp {
                    // Documented in docs/semantics.md.
                    tracing::warn!(ino, "file or its copy changed while open in passthrough; new opens are served by the daemon until the old ones close");
                    return None;
                }
                return Some(id);
            }
        }
        match open() {
            Ok(id) => {
                let id = Arc::new(id);
                t.by_ino.insert(ino, (Arc::downgrade(&id), stamp.to_vec()));
                Some(id)
            }
            Err(e) => {
                vfs.passthrough_refused(&e);
                None
            }
        }
    }

    /// Handle `fh` was opened in passthrough on `id`: keep it until [`Backings::forget`].
    pub fn keep(&self, fh: u64, id: Arc<B>) {
        self.table.lock().by_fh.insert(fh, id);
    }

    /// Whether a handle of `ino` is open in passthrough (the kernel fails any other open
    /// of the inode but a read-only one on the same backing).
    pub fn in_use(&self, ino: u64) -> bool {
        let t = self.table.lock();
        t.by_ino
            .get(&ino)
            .is_some_and(|(w, _)| w.strong_count() > 0)
    }

    /// Handle `fh` of `ino` is to be opened through the page cache: counted until
    /// [`Backings::forget`], unless the inode has passthrough handles (the kernel would
    /// refuse it: false).
    pub fn cached_open(&self, ino: u64, fh: u64) -> bool {
        let mut t = self.table.lock();
        let passthrough = t
            .by_ino
            .get(&ino)
            .is_some_and(|(w, _)| w.strong_count() > 0);
        if passthrough {
            return false;
        }
        *t.cached.entry(ino).or_insert(0) += 1;
        t.cached_fh.insert(fh, ino);
        true
    }

    /// Handle `fh` is released.
    pub fn forget(&self, fh: u64) {
        let mut t = self.table.lock();
        if t.by_fh.remove(&fh).is_some() {
            t.by_ino.retain(|_, (w, _)| w.strong_count() > 0);
        }
        if let Some(ino) = t.cached_fh.remove(&fh) {
            if let Some(n) = t.cached.get_mut(&ino) {
                *n -= 1;
                if *n == 0 {
                    t.cached.remove(&ino);
                }
            }
        }
    }
}
