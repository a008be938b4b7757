//! Checked reads and writes of cache files: where a cached block is checksummed.
//!
//! A block is written with its header (magic, version, length, crc32c: [`crate::file`])
//! under `tmp/` and renamed into place; a read checks all of it before the block is served,
//! and a file that fails is a miss, removed so the block is fetched and cached again. An
//! I/O error takes the disk out of use (`Inner::fail`, in `health.rs`).

use super::evict::allocated;
use super::Inner;
use crate::file::{self, HEADER};
use crate::Block;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(super) const MAGIC: &[u8; 4] = b"AQCB";

/// Why a cache file is not a block.
pub(super) enum Bad {
    Missing,
    Corrupt(String),
    Io(io::Error),
}

impl Inner {
    fn read_block(&self, path: &Path) -> Result<Block, Bad> {
        let mut f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Bad::Missing),
            Err(e) => return Err(Bad::Io(e)),
        };
        let size = f.metadata().map_err(Bad::Io)?.len();
        let mut h = [0u8; HEADER];
        if size < HEADER as u64 {
            return Err(Bad::Corrupt(format!("{size} bytes, shorter than a header")));
        }
        f.read_exact(&mut h).map_err(Bad::Io)?;
        let (len, crc) = file::parse_header(MAGIC, &h).map_err(Bad::Corrupt)?;
        if size != (HEADER + len) as u64 {
            return Err(Bad::Corrupt(format!(
                "{size} bytes for a {len}-byte block (truncated or extended)"
            )));
        }
        let mut buf = self
            .recycle
            .as_ref()
            .map(|r| r.take(len))
            .unwrap_or_default();
        buf.clear();
        buf.reserve_exact(len);
        // Appending through `take` fills the spare capacity without zeroing it first.
        (&mut f)
            .take(len as u64)
            .read_to_end(&mut buf)
            .map_err(Bad::Io)?;
        if buf.len() != len {
            return Err(Bad::Corrupt("shorter than its header says".into()));
        }
        if crc32c::crc32c(&buf) != crc {
            return Err(Bad::Corrupt("checksum mismatch".into()));
        }
        Ok(Arc::new(buf))
    }

    /// The block under `key`, checked; a file that fails its checks is a miss.
    pub(super) fn get(&self, key: &str) -> Option<Block> {
        if !self.usable() {
            return None;
        }
        let ready = self.ready.load(Ordering::Acquire);
        // With the index complete, a key it lacks is not on disk: no system call for a miss.
        if ready && !self.st.lock().contains(key) {
            return None;
        }
        let path = self.path(key);
        match self.read_block(&path) {
            Ok(b) => {
                let mut st = self.st.lock();
                if st.access(key, crate::mem::REHIT).is_none() && !ready {
                    // Found before the scan reached it; the scan will skip it.
                    let w = (HEADER + b.len()).div_ceil(4096) as u64 * 4096;
                    st.insert(key, (), w, true);
                }
                Some(b)
            }
            Err(Bad::Missing) => {
                // Deleted behind our back (or the whole directory was): forget it.
                self.st.lock().remove(key);
                None
            }
            Err(Bad::Corrupt(why)) => {
                tracing::warn!(path = %path.display(), why, "corrupt cache file removed; the block is fetched again");
                self.drop_corrupt(key, &path);
                None
            }
            Err(Bad::Io(e)) => {
                self.fail("read", &e);
                None
            }
        }
    }

    /// A file that failed its checks: counted, removed, and forgotten by the index, so the
    /// next read of `key` is a miss and the block (or copy) is made again.
    pub(super) fn drop_corrupt(&self, key: &str, path: &Path) {
        self.corrupt.fetch_add(1, Ordering::Relaxed);
        let _ = fs::remove_file(path);
        self.st.lock().remove(key);
    }

    /// Write one block into place, if it still fits.
    pub(super) fn store(&self, key: &str, block: &Block) {
        if !self.usable() || self.st.lock().contains(key) {
            return;
        }
        let est = (HEADER + block.len()).div_ceil(4096) as u64 * 4096;
        if self.used() + est > self.cfg.capacity || self.low_space.load(Ordering::Relaxed) {
            self.wake();
            return;
        }
        let tmp = self.tmp_path();
        let dst = self.path(key);
        let r = (|| -> io::Result<u64> {
            let mut f = File::create(&tmp)?;
            f.write_all(&file::header(MAGIC, block))?;
            f.write_all(block)?;
            let w = allocated(&f.metadata()?);
            drop(f);
            fs::rename(&tmp, &dst)?;
            Ok(w)
        })();
        match r {
            Ok(w) => {
                let over = {
                    let mut st = self.st.lock();
                    st.insert(key, (), w, false);
                    st.bytes() + self.fixed() > (self.cfg.high * self.cfg.capacity as f64) as u64
                };
                if over {
                    self.wake();
                }
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                if e.kind() == io::ErrorKind::NotFound && !self.root.join("tmp").is_dir() {
                    // The directory was deleted under us: start again empty.
                    self.reset();
                } else {
                    self.fail("write", &e);
                }
            }
        }
    }
}
