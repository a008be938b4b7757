//! Compaction: a chunk that has gathered many slices is rewritten as few, holding only its
//! data, by a background worker; the old slices go to the trash.

use crate::store::codec;
use crate::store::keys::slice_keys;
use crate::{read::layout, ChunkStore, Result};
use aquifer_meta::{Errno, Ino, MetaError, Slice};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Weak;

/// The compaction queue: chunks wait here for the background compactor.
pub(crate) struct Compactor {
    tx: Mutex<Option<Sender<(Ino, u32)>>>,
    /// Chunks queued or being compacted, each with whether it reached another multiple of
    /// the threshold meanwhile (then it is compacted once more when this run ends).
    compacting: Mutex<HashMap<(Ino, u32), bool>>,
}

impl Compactor {
    pub(crate) fn new() -> (Compactor, Receiver<(Ino, u32)>) {
        let (tx, rx) = mpsc::channel();
        let c = Compactor {
            tx: Mutex::new(Some(tx)),
            compacting: Mutex::new(HashMap::new()),
        };
        (c, rx)
    }

    /// Take no more chunks: the compactor stops once it has run what is queued.
    pub(crate) fn close(&self) {
        self.tx.lock().take();
    }
}

impl ChunkStore {
    /// Queue a compaction of a chunk asked for again while it was being compacted.
    fn maybe_compact_now(&self, ino: Ino, idx: u32) {
        if self
            .compactor
            .compacting
            .lock()
            .insert((ino, idx), false)
            .is_some()
        {
            return;
        }
        if let Some(tx) = self.compactor.tx.lock().as_ref() {
            let _ = tx.send((ino, idx));
        }
    }

    pub(crate) fn maybe_compact(&self, ino: Ino, idx: u32, count: usize) {
        // At every multiple of the threshold: a sparse chunk whose data stays in more runs
        // than that after compaction is not rewritten again on every append.
        let t = self.cfg.compact_threshold.max(2);
        if count < t || !count.is_multiple_of(t) {
            return;
        }
        {
            let mut c = self.compactor.compacting.lock();
            if let Some(again) = c.get_mut(&(ino, idx)) {
                // Appends the running compaction does not see: without another run the
                // chunk could stay fragmented until it reaches the next multiple.
                *again = true;
                return;
            }
            c.insert((ino, idx), false);
        }
        if let Some(tx) = self.compactor.tx.lock().as_ref() {
            let _ = tx.send((ino, idx));
        }
    }

    /// Rewrite a chunk's slices as few slices holding only its data: runs of visible bytes
    /// become one slice each and holes stay holes (stored as nothing). Runs are joined
    /// across the narrowest gaps until fewer than half the compaction threshold remain, so a
    /// compacted chunk is not compacted again at once. Blocks are read and written one at a
    /// time, so compaction needs one block of memory whatever the chunk holds.
    ///
    /// Returns false when there was nothing to do or the chunk changed meanwhile (an append,
    /// a truncate, an unlink): then the new blocks are deleted again, and the error of a
    /// read of an input that was freed in the meantime is not an error at all.
    pub fn compact(&self, ino: Ino, idx: u32) -> Result<bool> {
        let slices = self.meta.read_chunk(ino, idx)?;
        if slices.len() < 2 {
            return Ok(false);
        }
        let runs = data_runs(&layout::visible(&slices), self.cfg.compact_threshold / 2);
        let mut new = Vec::with_capacity(runs.len());
        let written = runs.iter().try_for_each(|&(start, end)| {
            let id = self.meta.new_slice_id()?;
            let s = Slice {
                pos: start,
                id,
                size: end - start,
                off: 0,
                len: end - start,
            };
            new.push(s);
            self.write_compacted(&slices, &s)
        });
        if let Err(e) = written {
            new.iter().for_each(|s| self.delete_slice(s));
            // Inputs freed by a racing truncate or unlink: the chunk changed, nothing lost.
            let changed = self.meta.read_chunk(ino, idx).map_or(true, |now| {
                now.len() < slices.len() || now[..slices.len()] != slices[..]
            });
            return if changed { Ok(false) } else { Err(e) };
        }
        let replaced = match self.meta.compact_chunk(ino, idx, &slices, &new) {
            Ok(r) => r,
            // The file is gone.
            Err(e) if e.errno() == Errno::ENOENT => false,
            // The engine refused the change: the new blocks are nobody's.
            Err(e @ MetaError::Sys(_)) => {
                new.iter().for_each(|s| self.delete_slice(s));
                return Err(e.into());
            }
            // The change may have been applied (an answer lost past the retry deadline):
            // the new blocks may be the chunk's now, so they stay; if they are not, gc
            // finds them.
            Err(e) => {
                tracing::warn!(ino, idx, error = %e, "compaction's outcome is unknown; its new blocks are kept");
                return Err(e.into());
            }
        };
        if !replaced {
            new.iter().for_each(|s| self.delete_slice(s));
        }
        Ok(replaced)
    }

    /// Store the chunk content `s` covers (as `slices` describe it) as the blocks of `s`.
    pub(super) fn write_compacted(&self, slices: &[Slice], s: &Slice) -> Result<()> {
        let bs = self.cfg.block_size;
        for (i, key) in slice_keys(s.id, s.size, bs).into_iter().enumerate() {
            let at = s.pos + i as u32 * bs;
            let len = (s.end() - at).min(bs) as usize;
            let mut buf = self.buffers.take();
            buf.resize(len, 0);
            self.read_slices(slices, at, &mut buf, None)?;
            self.store
                .put(&key, codec::seal_with(self.cfg.compression, buf))?;
        }
        Ok(())
    }
}

/// Runs `(start, end)` of visible data (hole slices are not data): adjacent pieces and
/// pieces less than a segment apart are joined (a few KiB of stored zeros cost less than a
/// slice record and a request), then the narrowest gaps while fewer than `max_runs` runs
/// are wanted — but never storing more zeros than there are data bytes, so a sparse chunk
/// stays sparse.
pub(super) fn data_runs(visible: &[Slice], max_runs: usize) -> Vec<(u32, u32)> {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for s in visible.iter().filter(|s| s.id != 0) {
        match runs.last_mut() {
            Some(last) if s.pos - last.1 < codec::SEGMENT as u32 => last.1 = s.end(),
            _ => runs.push((s.pos, s.end())),
        }
    }
    if runs.len() < max_runs.max(1) {
        return runs;
    }
    let data: u64 = runs.iter().map(|r| (r.1 - r.0) as u64).sum();
    let mut by_width: Vec<usize> = (0..runs.len() - 1).collect();
    by_width.sort_by_key(|&i| (runs[i + 1].0 - runs[i].1, i));
    let mut join = vec![false; runs.len() - 1];
    let (mut zeros, mut joined) = (0u64, 0usize);
    for i in by_width {
        let gap = (runs[i + 1].0 - runs[i].1) as u64;
        if runs.len() - joined < max_runs.max(1) || zeros + gap > data {
            break;
        }
        join[i] = true;
        zeros += gap;
        joined += 1;
    }
    let mut merged: Vec<(u32, u32)> = vec![runs[0]];
    for (i, r) in runs.into_iter().enumerate().skip(1) {
        let last = merged.last_mut().expect("starts with one run");
        if join[i - 1] {
            last.1 = r.1;
        } else {
            merged.push(r);
        }
    }
    merged
}

pub(super) fn compact_loop(cs: Weak<ChunkStore>, rx: Receiver<(Ino, u32)>) {
    while let Ok((ino, idx)) = rx.recv() {
        let Some(cs) = cs.upgrade() else { return };
        match catch_unwind(AssertUnwindSafe(|| cs.compact(ino, idx))) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(ino, idx, error = %e, "compaction failed"),
            Err(_) => tracing::error!(ino, idx, "compaction panicked; the chunk is left as it was"),
        }
        let again = cs.compactor.compacting.lock().remove(&(ino, idx)) == Some(true);
        if again {
            cs.maybe_compact_now(ino, idx);
        }
    }
}
