//! The in-memory index (keys, weights, eviction order: an [`S3Fifo`](crate::policy::S3Fifo)
//! in `Inner::st`) and its rebuild: a background scan at start (`cache-index`) that finds
//! every file, oldest first. Until it is done, reads find files by name and inserts wait.

use super::evict::allocated;
use super::layout::{key_hash, FANOUT, WHOLE};
use super::Inner;
use crate::file;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;

impl Inner {
    /// The start-up scan: every block file indexed, oldest first (evicted first), and
    /// leftovers of interrupted writes removed.
    pub(super) fn rebuild(&self) {
        if let Ok(rd) = fs::read_dir(self.root.join("tmp")) {
            for e in rd.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        let mut found: Vec<(i64, String, u64)> = Vec::new();
        for (top, whole) in [(self.blocks_dir(), false), (self.files_dir(), true)] {
            for h in 0..FANOUT {
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                let dir = top.join(format!("{h:02x}"));
                let Ok(rd) = fs::read_dir(&dir) else { continue };
                for e in rd.flatten() {
                    let name = e.file_name();
                    let key = name.to_str().and_then(file::key_of);
                    let Ok(m) = e.metadata() else { continue };
                    match key {
                        Some(k)
                            if m.is_file()
                                && key_hash(&k) % FANOUT == h
                                && k.starts_with(WHOLE) == whole =>
                        {
                            found.push((m.mtime(), k, allocated(&m)))
                        }
                        // Not ours, or in the wrong place: it would never be read or counted.
                        _ => {
                            let _ = fs::remove_file(e.path());
                        }
                    }
                }
            }
        }
        found.sort_unstable_by_key(|f| f.0);
        for batch in found.chunks(4096) {
            let mut st = self.st.lock();
            for (_, k, w) in batch {
                st.insert(k, (), *w, true);
            }
        }
        self.measure_overhead();
        self.ready.store(true, Ordering::Release);
        tracing::info!(dir = %self.root.display(), blocks = found.len(), "cache index rebuilt");
        self.wake();
    }
}
