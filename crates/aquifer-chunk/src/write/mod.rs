//! Write buffering for one open file.
//!
//! Writes land in open slices, one list per chunk. A write extends the newest slice it
//! continues when no newer slice overlaps the extension (so "newest wins" still holds after
//! the commit); otherwise it opens a new slice. Full blocks are uploaded in the background as
//! soon as they fill. `flush` uploads the tails, waits for every block, then commits the
//! slices to the metadata in the order they were opened: only then is the data acknowledged.
//!
//! Failures stay with the file. A flush whose uploads or commit failed keeps the chunk's
//! slices (and the objects that failed, for a retry by the next flush) and counts the error;
//! every handle open on the file sees that count move on at its next fsync or close, however
//! the failed flush was started (another handle's close, a setattr, unmount). Data is only
//! dropped by [`discard`](FileWriter::discard) (unlink, truncate, the last close).
//!
//! Readers of a file being written see the buffered bytes through
//! [`overlay`](FileWriter::overlay) without committing them, and `getattr` reads the buffered
//! length from an atomic: neither waits for an upload.
//!
//! The files of this folder:
//!
//! * here: [`FileWriter`], its open slices and the write path into them;
//! * [`durable`]: sealing and uploading blocks, flush and fsync — when a block is durable;
//! * `buffered`: what is still buffered: overlaid for readers, cut by a truncate, dropped
//!   by a discard;
//! * `budget`, `buffers`, `upload`: the memory budget of buffered writes, reusable
//!   block buffers, and the upload pool.

mod budget;
mod buffered;
mod buffers;
pub mod durable;
#[cfg(test)]
mod tests;
mod upload;

pub use budget::{Budget, Held};
pub use buffers::BufferPool;
pub use upload::{Completion, OnStored, UploadPool};

/// Why a written block is stored: what `--cache-writes` decides on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// A full block of a slice being written.
    Full,
    /// The partial last block of a slice, stored early to free memory (the slice goes on
    /// in a new one).
    Spilled,
    /// The last block of any other slice, stored at its flush (close, fsync): a large
    /// file's tail, or a piece of a large write cut short.
    Tail,
    /// The one block of a slice within the file's first block, stored at its flush: a
    /// small file.
    Last,
}

use crate::store::codec;
use crate::store::keys::BlockKey;
use crate::{ChunkStore, DataError, Result};
use aquifer_meta::{Ino, CHUNK_SIZE};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Flush a chunk early when it has this many open slices (random small writes).
const MAX_OPEN_SLICES: usize = 16;

struct OpenSlice {
    pos: u32,
    id: u64,
    len: u32,
    /// Bytes after the last uploaded block, in a buffer with room for the block's checksum
    /// trailer, so a full block is sealed and uploaded without another copy.
    tail: Vec<u8>,
    /// The budget the tail's buffer holds (its capacity).
    held: Held,
    /// Bytes of the slice already handed to the uploader: whole blocks, then the partial
    /// last block once the slice is sealed.
    sent: u32,
    /// A partial block was uploaded: the slice cannot grow any more.
    sealed: bool,
    /// One per uploaded block, in block order.
    uploads: Vec<Arc<Completion>>,
}

impl OpenSlice {
    fn end(&self) -> u32 {
        self.pos + self.len
    }

    /// Key of uploaded block `b`.
    fn block(&self, b: usize, bs: u32) -> BlockKey {
        BlockKey {
            id: self.id,
            idx: b as u32,
            len: (self.sent - b as u32 * bs).min(bs),
        }
    }
}

#[derive(Default)]
struct State {
    chunks: BTreeMap<u32, Vec<OpenSlice>>,
    /// End of the furthest byte written and not yet committed.
    end: u64,
}

/// What a write of one piece will do, decided with the budget it needs in hand.
struct Plan {
    target: Option<usize>,
    take: usize,
    held: Held,
}

pub struct FileWriter {
    ino: Ino,
    cs: Arc<ChunkStore>,
    state: Mutex<State>,
    /// End of uncommitted data, 0 when clean; read without the lock by getattr.
    pending: AtomicU64,
    dirty: AtomicBool,
    /// Bumped whenever buffered slices are committed or dropped, so a reader can tell that
    /// what it read from the metadata and what it overlays from here do not line up.
    generation: AtomicU64,
    /// Failed flushes so far, and the last failure.
    errors: AtomicU64,
    last_error: Mutex<String>,
    /// When this file was last written (a tick of the chunk store's clock), so the budget
    /// seals the tails of the writers idle longest first.
    pub(crate) last_write: AtomicU64,
}

impl FileWriter {
    pub fn new(cs: Arc<ChunkStore>, ino: Ino) -> Arc<FileWriter> {
        let w = Arc::new(FileWriter {
            ino,
            cs: cs.clone(),
            state: Mutex::new(State::default()),
            pending: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_error: Mutex::new(String::new()),
            last_write: AtomicU64::new(cs.tick()),
        });
        cs.register_writer(&w);
        w
    }

    pub fn ino(&self) -> Ino {
        self.ino
    }

    /// True when there is data not yet committed.
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::SeqCst)
    }

    /// End offset of uncommitted data (0 when clean). Never waits for the writer.
    pub fn pending_end(&self) -> u64 {
        self.pending.load(Ordering::SeqCst)
    }

    /// Failed flushes so far: a handle that saw `n` reports an error once this passes `n`.
    pub fn error_count(&self) -> u64 {
        self.errors.load(Ordering::SeqCst)
    }

    pub fn last_error(&self) -> String {
        self.last_error.lock().clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn failed(&self, e: DataError) -> DataError {
        *self.last_error.lock() = e.to_string();
        self.errors.fetch_add(1, Ordering::SeqCst);
        e
    }

    pub fn write(&self, off: u64, data: &[u8]) -> Result<()> {
        self.last_write.store(self.cs.tick(), Ordering::Relaxed);
        let mut pos = off;
        let mut rest = data;
        while !rest.is_empty() {
            let idx = (pos / CHUNK_SIZE) as u32;
            let cpos = (pos % CHUNK_SIZE) as u32;
            let want = ((CHUNK_SIZE - cpos as u64) as usize).min(rest.len());
            let (mut st, plan) = self.reserve(idx, cpos, want)?;
            let take = plan.take;
            let full = self.write_piece(&mut st, idx, cpos, &rest[..take], plan)?;
            st.end = st.end.max(pos + take as u64);
            self.pending.store(st.end, Ordering::SeqCst);
            self.dirty.store(true, Ordering::SeqCst);
            if full {
                // A slice reached the chunk's end: a sequential writer has moved on, so
                // commit this chunk now instead of holding it until close.
                self.flush_chunk(&mut st, idx)?;
                self.settled(&mut st);
            }
            pos += take as u64;
            rest = &rest[take..];
        }
        Ok(())
    }

    /// The slice a write at `cpos` of `n` bytes extends, if any.
    fn target(list: &[OpenSlice], cpos: u32, n: u32) -> Option<usize> {
        let ext = (cpos, cpos + n);
        list.iter()
            .rposition(|s| s.end() == cpos && !s.sealed)
            .filter(|&i| {
                list[i + 1..]
                    .iter()
                    .all(|newer| newer.end() <= ext.0 || newer.pos >= ext.1)
            })
    }

    /// Capacity the tail buffer needs to take `take` more bytes. Small files get what they
    /// need; a buffer on its way to a full block gets the whole block and its trailer at once
    /// (from the buffer pool, so it is not faulted in afresh).
    fn capacity_for(&self, len: usize, cap: usize, take: usize) -> usize {
        let need = len + take;
        if cap >= need {
            cap
        } else if need > self.cs.block_size() as usize / 4 {
            self.cs.block_buffer_size().max(need)
        } else {
            codec::stored_len(need.max(2 * cap))
        }
    }

    /// Lock the state with the budget for the next piece of a write in hand. Waits (with no
    /// lock held) while the budget is spent, having the idlest writers' tails uploaded.
    fn reserve(
        &self,
        idx: u32,
        cpos: u32,
        want: usize,
    ) -> Result<(parking_lot::MutexGuard<'_, State>, Plan)> {
        let bs = self.cs.block_size() as usize;
        loop {
            let mut st = self.state.lock();
            if st
                .chunks
                .get(&idx)
                .is_some_and(|l| l.len() >= MAX_OPEN_SLICES)
            {
                self.flush_chunk(&mut st, idx)?;
                self.settled(&mut st);
            }
            let list: &[OpenSlice] = st.chunks.get(&idx).map(|l| &l[..]).unwrap_or(&[]);
            let target = Self::target(list, cpos, want as u32);
            let (len, cap) = target
                .map(|i| (list[i].tail.len(), list[i].tail.capacity()))
                .unwrap_or((0, 0));
            let take = want.min(bs - len);
            let need = self.capacity_for(len, cap, take) - cap;
            if let Some(held) = self.cs.budget().try_acquire(need) {
                return Ok((st, Plan { target, take, held }));
            }
            // Our own failed uploads may be what fills the budget: the writer learns of it
            // now rather than waiting for a store that keeps refusing.
            if self.error_count() > 0 && Self::holds_failed(&st) {
                return Err(DataError::Poisoned(self.last_error()));
            }
            drop(st);
            self.cs.make_room(need);
        }
    }

    fn holds_failed(st: &State) -> bool {
        st.chunks
            .values()
            .flatten()
            .flat_map(|s| &s.uploads)
            .any(|u| u.failed_object().is_some())
    }

    fn write_piece(
        &self,
        st: &mut State,
        idx: u32,
        cpos: u32,
        data: &[u8],
        plan: Plan,
    ) -> Result<bool> {
        let bs = self.cs.block_size();
        let list = st.chunks.entry(idx).or_default();
        let i = match plan.target {
            Some(i) => i,
            None => {
                let id = self.cs.meta().new_slice_id()?;
                list.push(OpenSlice {
                    pos: cpos,
                    id,
                    len: 0,
                    tail: Vec::new(),
                    held: Held::default(),
                    sent: 0,
                    sealed: false,
                    uploads: Vec::new(),
                });
                list.len() - 1
            }
        };
        let s = &mut list[i];
        let want = self.capacity_for(s.tail.len(), s.tail.capacity(), data.len());
        if want > s.tail.capacity() {
            if want >= self.cs.block_buffer_size() {
                let mut b = self.cs.block_buffer();
                b.extend_from_slice(&s.tail);
                s.tail = b;
            } else {
                s.tail.reserve_exact(want - s.tail.len());
            }
        }
        // The hold follows the buffer's real capacity.
        let mut held = plan.held;
        let cap = s.tail.capacity();
        let have = s.held.bytes() + held.bytes();
        if cap > have {
            held.merge(self.cs.budget().force(cap - have));
        } else {
            drop(held.split(have - cap));
        }
        s.held.merge(held);
        s.tail.extend_from_slice(data);
        if s.tail.len() == bs as usize {
            let block = std::mem::take(&mut s.tail);
            let held = std::mem::take(&mut s.held);
            let key = BlockKey {
                id: s.id,
                idx: s.sent / bs,
                len: bs,
            };
            s.uploads.push(
                self.cs
                    .upload_sealed(key, block, held, false, Written::Full),
            );
            s.sent += bs;
        }
        s.len += data.len() as u32;
        Ok(s.end() as u64 == CHUNK_SIZE)
    }

    /// For the budget: upload the tails of this file now (and retry its failed uploads) if
    /// nobody is using it. Returns the bytes set in motion.
    pub(crate) fn spill(&self) -> usize {
        let Some(mut st) = self.state.try_lock() else {
            return 0;
        };
        let mut n = 0;
        for s in st.chunks.values_mut().flatten() {
            Self::retry_failed(&self.cs, s);
            n += Self::seal(&self.cs, s, false, Written::Spilled);
        }
        n
    }
}
