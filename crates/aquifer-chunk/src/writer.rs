//! Write buffering for one open file.
//!
//! Writes land in open slices, one list per chunk. A write extends the newest slice it
//! continues when no newer slice overlaps the extension (so "newest wins" still holds after
//! the commit); otherwise it opens a new slice. Full blocks are uploaded in the background as
//! soon as they fill. `flush` uploads the tails, waits for every block, then commits the
//! slices to the metadata in the order they were opened: only then is the data acknowledged.

use crate::{block_key, codec, ChunkStore, Completion, DataError, Result};
use aquifer_meta::{Ino, Slice, CHUNK_SIZE};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Flush a chunk early when it has this many open slices (random small writes).
const MAX_OPEN_SLICES: usize = 16;

struct OpenSlice {
    pos: u32,
    id: u64,
    len: u32,
    /// Bytes after the last uploaded block, in a buffer with room for the block's checksum
    /// trailer, so a full block is sealed and uploaded without another copy.
    tail: Vec<u8>,
    /// Bytes of the slice already handed to the uploader (a multiple of the block size).
    sent: u32,
    uploads: Vec<Arc<Completion>>,
}

impl OpenSlice {
    fn end(&self) -> u32 {
        self.pos + self.len
    }
}

#[derive(Default)]
struct State {
    chunks: BTreeMap<u32, Vec<OpenSlice>>,
    /// End of the furthest byte written and not yet committed.
    end: u64,
}

pub struct FileWriter {
    ino: Ino,
    cs: Arc<ChunkStore>,
    state: Mutex<State>,
}

impl FileWriter {
    pub fn new(cs: Arc<ChunkStore>, ino: Ino) -> FileWriter {
        FileWriter {
            ino,
            cs,
            state: Mutex::new(State::default()),
        }
    }

    /// True when there is data not yet committed.
    pub fn is_dirty(&self) -> bool {
        !self.state.lock().unwrap().chunks.is_empty()
    }

    /// End offset of uncommitted data (0 when clean).
    pub fn pending_end(&self) -> u64 {
        let s = self.state.lock().unwrap();
        if s.chunks.is_empty() {
            0
        } else {
            s.end
        }
    }

    pub fn write(&self, off: u64, data: &[u8]) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        let mut pos = off;
        let mut rest = data;
        while !rest.is_empty() {
            let idx = (pos / CHUNK_SIZE) as u32;
            let cpos = (pos % CHUNK_SIZE) as u32;
            let n = ((CHUNK_SIZE - cpos as u64) as usize).min(rest.len());
            let full = self.write_chunk(&mut st, idx, cpos, &rest[..n])?;
            if full {
                // A slice reached the chunk's end: a sequential writer has moved on, so
                // commit this chunk now instead of holding it until close.
                self.flush_chunk(&mut st, idx)?;
            }
            pos += n as u64;
            rest = &rest[n..];
        }
        st.end = st.end.max(off + data.len() as u64);
        Ok(())
    }

    fn write_chunk(&self, st: &mut State, idx: u32, cpos: u32, data: &[u8]) -> Result<bool> {
        let bs = self.cs.block_size();
        if st
            .chunks
            .get(&idx)
            .is_some_and(|l| l.len() >= MAX_OPEN_SLICES)
        {
            self.flush_chunk(st, idx)?;
        }
        let list = st.chunks.entry(idx).or_default();
        let n = data.len() as u32;
        let ext = (cpos, cpos + n);
        let target = list.iter().rposition(|s| s.end() == cpos).filter(|&i| {
            list[i + 1..]
                .iter()
                .all(|newer| newer.end() <= ext.0 || newer.pos >= ext.1)
        });
        let i = match target {
            Some(i) => i,
            None => {
                let id = self.cs.meta().new_slice_id()?;
                list.push(OpenSlice {
                    pos: cpos,
                    id,
                    len: 0,
                    tail: Vec::new(),
                    sent: 0,
                    uploads: Vec::new(),
                });
                list.len() - 1
            }
        };
        let s = &mut list[i];
        let bsz = bs as usize;
        let mut rest = data;
        while !rest.is_empty() {
            let take = (bsz - s.tail.len()).min(rest.len());
            let need = s.tail.len() + take;
            if s.tail.capacity() < need {
                // Small files get what they need; a buffer on its way to a full block gets the
                // whole block and its trailer at once.
                if need > bsz / 4 {
                    let mut b = self.cs.block_buffer();
                    b.extend_from_slice(&s.tail);
                    s.tail = b;
                } else {
                    let target = codec::stored_len(need.max(2 * s.tail.capacity()));
                    s.tail.reserve_exact(target - s.tail.len());
                }
            }
            s.tail.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if s.tail.len() == bsz {
                let block = std::mem::take(&mut s.tail);
                let key = block_key(s.id, s.sent / bs, bs);
                s.uploads.push(self.cs.upload_sealed(key, block));
                s.sent += bs;
            }
        }
        s.len += n;
        Ok(s.end() as u64 == CHUNK_SIZE)
    }

    fn flush_chunk(&self, st: &mut State, idx: u32) -> Result<()> {
        let Some(mut list) = st.chunks.remove(&idx) else {
            return Ok(());
        };
        let bs = self.cs.block_size();
        for s in list.iter_mut() {
            if !s.tail.is_empty() {
                let len = s.tail.len() as u32;
                let key = block_key(s.id, s.sent / bs, len);
                s.uploads
                    .push(self.cs.upload_sealed(key, std::mem::take(&mut s.tail)));
                s.sent += len;
            }
        }
        let mut failed = None;
        for s in &list {
            for u in &s.uploads {
                if let Err(e) = u.wait() {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(DataError::Poisoned(e));
        }
        for s in &list {
            let slice = Slice {
                pos: s.pos,
                id: s.id,
                size: s.len,
                off: 0,
                len: s.len,
            };
            let (_, count) = self.cs.meta().write_slice(self.ino, idx, slice)?;
            self.cs.maybe_compact(self.ino, idx, count);
        }
        Ok(())
    }

    /// Upload and commit everything written so far.
    pub fn flush(&self) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        let idxs: Vec<u32> = st.chunks.keys().copied().collect();
        let mut first_err = None;
        for idx in idxs {
            if let Err(e) = self.flush_chunk(&mut st, idx) {
                first_err.get_or_insert(e);
            }
        }
        st.end = 0;
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Forget uncommitted data (the file is gone or truncated).
    pub fn discard(&self) {
        let mut st = self.state.lock().unwrap();
        st.chunks.clear();
        st.end = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Compression;
    use crate::DataConfig;
    use aquifer_meta::conformance::test_format;
    use aquifer_meta::{Context, FileType, KvMeta, MemKv, Meta, ROOT_INO};
    use aquifer_object::MemStore;
    use proptest::prelude::*;

    /// A fresh file on a memory volume; background compaction off unless a test asks.
    fn setup(block_size: u32) -> (Arc<ChunkStore>, Arc<MemStore>, Ino) {
        setup_with(block_size, usize::MAX, Compression::None)
    }

    fn setup_with(
        block_size: u32,
        compact_threshold: usize,
        compression: Compression,
    ) -> (Arc<ChunkStore>, Arc<MemStore>, Ino) {
        let store = Arc::new(MemStore::new());
        let cfg = DataConfig {
            block_size,
            compact_threshold,
            compression,
            ..Default::default()
        };
        let (cs, ino) = setup_on(store.clone(), cfg);
        (cs, store, ino)
    }

    /// A fresh file on a volume whose blocks go to `store`.
    fn setup_on(
        store: Arc<dyn aquifer_object::ObjectStore>,
        cfg: DataConfig,
    ) -> (Arc<ChunkStore>, Ino) {
        let meta: Arc<dyn Meta> = Arc::new(KvMeta::new(MemKv::new()));
        meta.format(&test_format(cfg.block_size), false).unwrap();
        let ino = meta
            .mknod(
                &Context::root(),
                ROOT_INO,
                b"f",
                FileType::File,
                0o644,
                0,
                0,
            )
            .unwrap()
            .0;
        (ChunkStore::new(meta, store, cfg), ino)
    }

    fn read_all(cs: &ChunkStore, ino: Ino) -> Vec<u8> {
        let len = cs.meta().getattr(ino).unwrap().length;
        cs.read(ino, 0, len as usize, len).unwrap()
    }

    #[test]
    fn sequential_write_makes_one_slice_of_blocks() {
        let (cs, store, ino) = setup(1024);
        let w = FileWriter::new(cs.clone(), ino);
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        for part in data.chunks(700) {
            let off = w.pending_end();
            w.write(off, part).unwrap();
        }
        assert_eq!(w.pending_end(), 5000);
        w.flush().unwrap();
        assert_eq!(cs.meta().read_chunk(ino, 0).unwrap().len(), 1);
        assert_eq!(store.len(), 5, "four full blocks and a tail");
        assert_eq!(read_all(&cs, ino), data);
    }

    #[test]
    fn sequential_reads_fetch_ahead_into_the_next_chunk() {
        let bs = 1 << 20;
        let (cs, _, ino) = setup(bs);
        let w = FileWriter::new(cs.clone(), ino);
        // Data at the end of chunk 0 and the start of chunk 1, holes before.
        w.write(CHUNK_SIZE - 1024, &[1; 1024]).unwrap();
        w.write(CHUNK_SIZE, &[2; 3 << 20]).unwrap();
        w.flush().unwrap();
        let len = CHUNK_SIZE + (3 << 20);
        let next = cs.meta().read_chunk(ino, 1).unwrap()[0];
        let first = block_key(next.id, 0, bs);
        // Sequential reads up to the end of chunk 0, none of them inside chunk 1.
        let mut off = 0;
        while off < CHUNK_SIZE {
            let n = (4 << 20).min(CHUNK_SIZE - off);
            assert_eq!(
                cs.read(ino, off, n as usize, len).unwrap().len(),
                n as usize
            );
            off += n;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while cs.cache.get(&first).is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the next chunk's first block was not read ahead"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(*cs.cache.get(&first).unwrap(), vec![2u8; bs as usize]);
        assert_eq!(
            cs.read(ino, CHUNK_SIZE, 3 << 20, len).unwrap(),
            vec![2u8; 3 << 20]
        );
    }

    #[test]
    fn read_ahead_wider_than_the_cache_fetches_each_block_once() {
        let store = Arc::new(aquifer_object::FaultStore::new(MemStore::new()));
        let bs = 64 << 10;
        let cfg = DataConfig {
            block_size: bs,
            cache_bytes: 4 * bs as usize,
            readahead_blocks: 16,
            prefetch_threads: 16,
            ..Default::default()
        };
        let (cs, ino) = setup_on(store.clone(), cfg);
        let w = FileWriter::new(cs.clone(), ino);
        let data: Vec<u8> = (0..64 * bs).map(|i| (i / 4099) as u8).collect();
        w.write(0, &data).unwrap();
        w.flush().unwrap();
        let before = store.calls();
        let len = data.len() as u64;
        for off in (0..len).step_by(bs as usize) {
            let got = cs.read(ino, off, bs as usize, len).unwrap();
            assert!(got == data[off as usize..(off + bs as u64) as usize]);
        }
        // Let the last read-ahead requests finish before counting.
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(
            store.calls() - before,
            64,
            "each block is fetched exactly once"
        );
    }

    #[test]
    fn overwrite_then_extend_keeps_newest_bytes() {
        let (cs, _, ino) = setup(64);
        let w = FileWriter::new(cs.clone(), ino);
        w.write(0, &[1; 100]).unwrap();
        w.write(50, &[2; 10]).unwrap();
        // Extends the first slice at 100; no newer slice covers [100, 120).
        w.write(100, &[3; 20]).unwrap();
        w.flush().unwrap();
        let mut want = vec![1u8; 120];
        want[50..60].fill(2);
        want[100..120].fill(3);
        assert_eq!(read_all(&cs, ino), want);
    }

    #[test]
    fn compaction_keeps_content_and_frees_old_slices() {
        let (cs, store, ino) = setup(64);
        let w = FileWriter::new(cs.clone(), ino);
        let mut model = vec![0u8; 300];
        for i in 0..6u8 {
            let off = (i as usize * 37) % 250;
            w.write(off as u64, &[i + 1; 40]).unwrap();
            model[off..off + 40].fill(i + 1);
            w.flush().unwrap();
        }
        model.truncate(cs.meta().getattr(ino).unwrap().length as usize);
        assert!(cs.compact(ino, 0).unwrap());
        assert_eq!(cs.meta().read_chunk(ino, 0).unwrap().len(), 1);
        assert_eq!(read_all(&cs, ino), model);
        let before = store.len();
        cs.empty_trash().unwrap();
        assert!(store.len() < before);
        assert_eq!(read_all(&cs, ino), model);
    }

    #[test]
    fn fragmented_chunks_are_compacted_in_the_background() {
        let (cs, _, ino) = setup_with(64, 4, Compression::None);
        let w = FileWriter::new(cs.clone(), ino);
        let mut model = vec![0u8; 0];
        for i in 0..8u8 {
            let off = (i as usize * 29) % 200;
            w.write(off as u64, &[i + 1; 30]).unwrap();
            if model.len() < off + 30 {
                model.resize(off + 30, 0);
            }
            model[off..off + 30].fill(i + 1);
            w.flush().unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while cs.meta().read_chunk(ino, 0).unwrap().len() >= 4
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            cs.meta().read_chunk(ino, 0).unwrap().len() < 4,
            "compactor never ran"
        );
        assert_eq!(read_all(&cs, ino), model);
    }

    #[test]
    fn corrupt_short_block_is_an_error_not_wrong_bytes() {
        let (cs, store, ino) = setup(64);
        let w = FileWriter::new(cs.clone(), ino);
        w.write(0, &[7; 64]).unwrap();
        w.flush().unwrap();
        let id = cs.meta().read_chunk(ino, 0).unwrap()[0].id;
        use aquifer_object::ObjectStore;
        store
            .put(&block_key(id, 0, 64), bytes::Bytes::from_static(b"short"))
            .unwrap();
        let e = cs.read(ino, 0, 64, 64).unwrap_err();
        assert_eq!(e.errno(), aquifer_meta::Errno::EIO);
        // Same length, one byte flipped: still EIO, not wrong bytes.
        let mut bad = crate::codec::encode(&[7; 64]).to_vec();
        bad[10] ^= 1;
        store
            .put(&block_key(id, 0, 64), bytes::Bytes::from(bad))
            .unwrap();
        assert_eq!(
            cs.read(ino, 0, 64, 64).unwrap_err().errno(),
            aquifer_meta::Errno::EIO
        );
    }

    #[test]
    fn block_buffers_are_reused_and_bounded() {
        // A store that, like S3 or a directory, keeps no reference to what it was given.
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(aquifer_object::FileStore::new(dir.path().to_str().unwrap()).unwrap());
        let cfg = DataConfig {
            block_size: 64 << 10,
            compact_threshold: usize::MAX,
            ..Default::default()
        };
        let (cs, ino) = setup_on(store, cfg);
        let w = FileWriter::new(cs.clone(), ino);
        let data: Vec<u8> = (0..(40 << 16) as u32).map(|i| (i % 241) as u8).collect();
        for part in data.chunks(10_000) {
            w.write(
                (part.as_ptr() as usize - data.as_ptr() as usize) as u64,
                part,
            )
            .unwrap();
        }
        w.flush().unwrap();
        let idle = cs.buffers.idle();
        assert!((1..=8).contains(&idle), "{idle} idle buffers");
        assert_eq!(read_all(&cs, ino), data);
    }

    #[test]
    fn sequential_reads_fetch_ahead_into_the_cache() {
        let (cs, _, ino) = setup(1 << 20);
        let w = FileWriter::new(cs.clone(), ino);
        let data: Vec<u8> = (0..(10 << 20) as u32).map(|i| (i % 253) as u8).collect();
        w.write(0, &data).unwrap();
        w.flush().unwrap();
        let len = data.len() as u64;
        assert_eq!(cs.read(ino, 0, 4096, len).unwrap(), data[..4096]);
        // Block 0 is cached by the read itself, blocks 1 and 2 by the prefetcher.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while cs.cache.bytes() < 3 << 20 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(cs.cache.bytes(), 3 << 20);
        // A small random read elsewhere in a large block does not fill the cache.
        assert_eq!(
            cs.read(ino, 9 << 20, 100, len).unwrap(),
            data[9 << 20..(9 << 20) + 100]
        );
        assert_eq!(cs.cache.bytes(), 3 << 20);
        // The cached blocks serve the rest of the sequential read correctly.
        assert_eq!(
            cs.read(ino, 4096, (3 << 20) - 4096, len).unwrap(),
            data[4096..3 << 20]
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, usize, u8),
        Truncate(u64),
        Punch(u64, u64),
        Flush,
        Read(u64, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Offsets straddle the first chunk boundary so multi-chunk paths are exercised; the
        // window is small so compaction (which rewrites a chunk's whole extent) stays cheap.
        let base = CHUNK_SIZE - 6144;
        let off = base..(CHUNK_SIZE + 2048);
        prop_oneof![
            4 => (off.clone(), 1usize..1500, any::<u8>()).prop_map(|(o, l, b)| Op::Write(o, l, b)),
            1 => (base..(CHUNK_SIZE + 2048)).prop_map(Op::Truncate),
            1 => (off.clone(), 1u64..3000).prop_map(|(o, l)| Op::Punch(o, l)),
            2 => Just(Op::Flush),
            2 => (off, 1usize..3000).prop_map(|(o, l)| Op::Read(o, l)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The data path against a reference model: a sparse map of written bytes.
        #[test]
        fn data_path_matches_model(
            ops in prop::collection::vec(op(), 1..60),
            c in prop_oneof![Just(Compression::None), Just(Compression::Lz4), Just(Compression::Zstd)],
        ) {
            let (cs, _, ino) = setup_with(1024, usize::MAX, c);
            let meta = cs.meta().clone();
            let ctx = Context::root();
            let w = FileWriter::new(cs.clone(), ino);
            let mut model: BTreeMap<u64, u8> = BTreeMap::new();
            let mut len = 0u64;
            for (ops_done, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Write(o, l, b) => {
                        w.write(o, &vec![b; l]).unwrap();
                        for i in o..o + l as u64 { model.insert(i, b); }
                        len = len.max(o + l as u64);
                    }
                    Op::Truncate(n) => {
                        w.flush().unwrap();
                        meta.truncate(&ctx, ino, n).unwrap();
                        model.retain(|k, _| *k < n);
                        len = n;
                    }
                    Op::Punch(o, l) => {
                        w.flush().unwrap();
                        meta.fallocate(&ctx, ino, 3, o, l).unwrap();
                        for i in o..(o + l).min(len) { model.remove(&i); }
                    }
                    Op::Flush => w.flush().unwrap(),
                    Op::Read(o, l) => {
                        w.flush().unwrap();
                        let a = meta.getattr(ino).unwrap();
                        prop_assert_eq!(a.length, len);
                        let got = cs.read(ino, o, l, a.length).unwrap();
                        let end = (o + l as u64).min(len).max(o);
                        let want: Vec<u8> = (o..end).map(|i| *model.get(&i).unwrap_or(&0)).collect();
                        prop_assert_eq!(got, want);
                    }
                }
                if ops_done % 7 == 6 {
                    cs.compact(ino, 0).unwrap();
                    cs.compact(ino, 1).unwrap();
                }
            }
        }
    }
}
