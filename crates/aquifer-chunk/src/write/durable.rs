//! When is a block durable? The whole path, from a write to a block that survives a power cut:
//!
//! 1. **Buffered.** A write lands in the tail of an open slice ([`FileWriter::write`]): memory
//!    only, held against the write budget. Readers on this mount see it through
//!    [`FileWriter::overlay`]; nobody else does, and a crash loses it.
//! 2. **Uploaded.** A full block, and at a flush or a spill the partial last one (which seals
//!    the slice), is sealed ([`crate::store::codec`]) and handed to the upload pool
//!    (`ChunkStore::upload_sealed`). Its put goes through the store stack
//!    ([`crate::store`]): the journal notes a copy of a small put when the store needs a sync
//!    to make puts durable; with `--writeback`, staging writes it to a file on the cache disk
//!    and returns. When the put returns the upload's [`Completion`] is done: on S3 the block
//!    is durable now; on a file store or a staging file it is written but not yet synced.
//! 3. **Committed.** A flush (close, fsync, a chunk filled, too many open slices) waits for
//!    every upload of the chunk, then commits its slices to the metadata in the order they
//!    were opened ([`FileWriter::flush`]). Only then is the data part of the file and seen by
//!    other mounts. A failed upload commits nothing of its chunk and keeps the block (and its
//!    budget) for the next flush to retry; the failure is counted for every open handle.
//! 4. **Durable.** fsync then calls [`ChunkStore::sync`] ([`Journal::sync_committed`]):
//!    with puts durable on return (S3) only the metadata is synced; when all that was put
//!    since the store's last sync is small, copies of it go into the metadata engine and one
//!    metadata sync makes blocks and metadata durable together; otherwise the store is synced
//!    (the file store fdatasyncs files and directories, staging fsyncs its files), then the
//!    metadata. With `--writeback`, durable means on the local cache disk: the staged block
//!    is uploaded in the background, and first at the next start after a crash.
//! 5. **Afterwards.** A checkpoint (journal copies 5 s old, 32 MiB of them, unmount) syncs
//!    the store and drops the copies; after a crash [`replay`] puts them back before the
//!    volume is used. A freed block is deleted only once the change that freed it is durable
//!    in the same way and the grace period has passed ([`crate::maintenance::free_trash`]).
//!
//! [`Journal::sync_committed`]: crate::store::journal::Journal::sync_committed
//! [`replay`]: crate::store::journal::replay

use super::{upload::Completion, FileWriter, Held, OpenSlice, State, Written};
use crate::store::codec;
use crate::store::keys::BlockKey;
use crate::{ChunkStore, DataError, Result};
use aquifer_meta::Slice;
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl FileWriter {
    /// Upload a slice's partial last block (on this thread with `inline`); the slice is
    /// closed to extension from now on.
    pub(super) fn seal(cs: &ChunkStore, s: &mut OpenSlice, inline: bool, kind: Written) -> usize {
        if s.tail.is_empty() {
            return 0;
        }
        let bs = cs.block_size();
        let len = s.tail.len() as u32;
        let key = BlockKey {
            id: s.id,
            idx: s.sent / bs,
            len,
        };
        let held = std::mem::take(&mut s.held);
        let bytes = held.bytes();
        s.uploads
            .push(cs.upload_sealed(key, std::mem::take(&mut s.tail), held, inline, kind));
        s.sent += len;
        s.sealed = true;
        bytes
    }

    /// Upload again every block of `s` whose upload failed.
    pub(super) fn retry_failed(cs: &ChunkStore, s: &mut OpenSlice) {
        let bs = cs.block_size();
        for b in 0..s.uploads.len() {
            if let Some((data, held)) = s.uploads[b].take_failed() {
                s.uploads[b] = cs.resubmit(s.block(b, bs), data, held);
            }
        }
    }

    pub(super) fn flush_chunk(&self, st: &mut State, idx: u32) -> Result<()> {
        let Some(list) = st.chunks.get_mut(&idx) else {
            return Ok(());
        };
        // One tail to store and then wait for: store it here rather than hand it to an
        // upload thread and sleep until it is done (a small file's close, an fsync).
        let inline = list.iter().filter(|s| !s.tail.is_empty()).count() == 1;
        for s in list.iter_mut() {
            Self::retry_failed(&self.cs, s);
            // A slice within the file's first block is (part of) a small file: what a node
            // that writes a dataset reads back. A short slice further on is a piece of a
            // large write (cut short by a spill or a flush), and a large slice's tail too.
            let kind = if idx == 0 && s.pos + s.len <= self.cs.block_size() {
                Written::Last
            } else {
                Written::Tail
            };
            Self::seal(&self.cs, s, inline, kind);
        }
        let mut failed = None;
        for u in list.iter().flat_map(|s| &s.uploads) {
            if let Err(e) = u.wait() {
                failed.get_or_insert(e);
            }
        }
        if let Some(e) = failed {
            // Nothing of the chunk is committed: its slices stay for the next flush.
            return Err(self.failed(DataError::Poisoned(e)));
        }
        while let Some(s) = list.first() {
            let slice = Slice {
                pos: s.pos,
                id: s.id,
                size: s.len,
                off: 0,
                len: s.len,
            };
            match self.cs.meta().write_slice(self.ino, idx, slice) {
                Ok((_, count)) => {
                    list.remove(0);
                    self.generation.fetch_add(1, Ordering::SeqCst);
                    self.cs.maybe_compact(self.ino, idx, count);
                }
                Err(e) if e.is_ambiguous() => {
                    // Whether the commit applied cannot be learnt (the engine stayed away,
                    // or a failover lost its history). Committing the slice again could
                    // bring it back after a compaction replaced it and freed its blocks
                    // (old bytes over newer ones, then reads of deleted blocks). So it is
                    // not retried: if it applied, its bytes are in the file; if not, this
                    // flush reports the loss. Its id stays open, so gc spares its blocks
                    // while the commit may still arrive.
                    list.remove(0);
                    self.generation.fetch_add(1, Ordering::SeqCst);
                    return Err(self.failed(e.into()));
                }
                Err(e) => return Err(self.failed(e.into())),
            }
        }
        st.chunks.remove(&idx);
        Ok(())
    }

    /// Once nothing is buffered, the file is clean again.
    pub(super) fn settled(&self, st: &mut State) {
        if st.chunks.is_empty() {
            st.end = 0;
            self.dirty.store(false, Ordering::SeqCst);
            self.pending.store(0, Ordering::SeqCst);
        }
    }

    /// Upload and commit everything written so far. On failure the data stays buffered for
    /// the next flush and the error is counted for every handle.
    pub fn flush(&self) -> Result<()> {
        let mut st = self.state.lock();
        let idxs: Vec<u32> = st.chunks.keys().copied().collect();
        let mut first_err = None;
        for idx in idxs {
            if let Err(e) = self.flush_chunk(&mut st, idx) {
                first_err.get_or_insert(e);
            }
        }
        self.settled(&mut st);
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl ChunkStore {
    /// Make every committed change durable, with every block put so far (see
    /// [`Journal::sync_committed`](crate::store::journal::Journal::sync_committed): small blocks through the metadata log, others synced in
    /// the store before the metadata).
    pub fn sync(&self) -> Result<()> {
        self.journal.sync_committed()
    }

    /// Queue block `key` whose payload is `block` for upload, holding `held` of the write
    /// budget until it is stored; uncompressed, the checksum trailer is appended in place
    /// (no copy when the buffer has room for it).
    /// `kind` says whether the disk cache is offered the block once stored
    /// (`--cache-writes`).
    pub(crate) fn upload_sealed(
        &self,
        key: BlockKey,
        block: Vec<u8>,
        held: Held,
        inline: bool,
        kind: Written,
    ) -> Arc<Completion> {
        let obj = codec::seal_with(self.cfg.compression, block);
        let cache = self.cfg.cache_writes.keeps(kind);
        if inline {
            self.uploads.run_inline(key, obj, held, cache)
        } else {
            self.uploads.submit(key, obj, held, cache)
        }
    }

    /// Upload again an object whose upload failed (not offered to the cache: rare, and
    /// its kind is not kept).
    pub(crate) fn resubmit(&self, key: BlockKey, obj: Bytes, held: Held) -> Arc<Completion> {
        self.uploads.submit(key, obj, held, false)
    }
}
