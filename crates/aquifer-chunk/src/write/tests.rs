//! The write path end to end: slices and blocks written, the budget kept, buffers reused,
//! write-through, and the whole data path against a model.

use super::FileWriter;
use crate::store::codec::{self, Compression};
use crate::testutil::{new_file, no_compaction, read_all, setup, setup_on, setup_with};
use crate::DataConfig;
use aquifer_meta::{Context, CHUNK_SIZE};
use aquifer_object::MemStore;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

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
fn block_buffers_are_reused_and_bounded() {
    // A store that, like S3 or a directory, keeps no reference to what it was given.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(aquifer_object::FileStore::new(dir.path().to_str().unwrap()).unwrap());
    let (cs, ino) = setup_on(store, no_compaction(64 << 10));
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
fn many_open_writers_stay_within_the_write_budget() {
    let store = Arc::new(MemStore::new());
    let cfg = DataConfig {
        write_buffer: 1 << 20,
        ..no_compaction(64 << 10)
    };
    let (cs, _) = setup_on(store, cfg);
    let mut files = Vec::new();
    for i in 0..200 {
        let ino = new_file(&cs, &format!("f{i}"));
        files.push((ino, FileWriter::new(cs.clone(), ino)));
    }
    let mut peak = 0;
    // Round-robin appends of 10 KiB: every file keeps a partial block buffered.
    for round in 0..6u8 {
        for (i, (_, w)) in files.iter().enumerate() {
            let off = w.pending_end().max(round as u64 * 10_240);
            w.write(off, &[(i as u8) ^ round; 10_240]).unwrap();
            peak = peak.max(cs.buffered_bytes());
        }
    }
    // One block buffer may go past the cap (a write is let through when nothing is held).
    let slack = cs.block_buffer_size();
    assert!(peak <= (1 << 20) + slack, "peak {peak} bytes buffered");
    for (i, (ino, w)) in files.iter().enumerate() {
        w.flush().unwrap();
        let want: Vec<u8> = (0..6u8)
            .flat_map(|r| std::iter::repeat_n((i as u8) ^ r, 10_240))
            .collect();
        assert_eq!(read_all(&cs, *ino), want);
    }
    assert_eq!(cs.buffered_bytes(), 0, "nothing held once all is committed");
}

#[test]
fn concurrent_sequential_writers_wait_for_uploads_rather_than_cut_their_slices() {
    // Four ranks of a checkpoint on a slow store, the budget room for about eight blocks:
    // it is mostly full blocks on their way, and a writer short of room waits for them.
    // Sealing the others' tails instead cut every file into short slices and short objects.
    let bs = 64 << 10;
    let mem = Arc::new(MemStore::new());
    let store = Arc::new(aquifer_object::FaultStore::new(mem.clone()));
    store.set_latency(std::time::Duration::from_millis(5));
    let cfg = DataConfig {
        write_buffer: 8 * codec::stored_len(bs as usize),
        upload_threads: 4,
        ..no_compaction(bs)
    };
    let (cs, _) = setup_on(store.clone(), cfg);
    let blocks = 24;
    let ranks: Vec<_> = (0..4u8)
        .map(|r| {
            let ino = new_file(&cs, &format!("rank{r}"));
            let w = FileWriter::new(cs.clone(), ino);
            std::thread::spawn(move || {
                // Writes not aligned to blocks, as a serialiser's are.
                let data: Vec<u8> = (0..blocks * bs as usize)
                    .map(|i| (i % 253) as u8 ^ r)
                    .collect();
                for (i, part) in data.chunks(48 << 10).enumerate() {
                    w.write((i * (48 << 10)) as u64, part).unwrap();
                }
                w.flush().unwrap();
                (ino, data)
            })
        })
        .collect();
    for h in ranks {
        let (ino, data) = h.join().unwrap();
        assert_eq!(read_all(&cs, ino), data);
        let slices = cs.meta().read_chunk(ino, 0).unwrap();
        assert_eq!(
            slices.len(),
            1,
            "rank's chunk cut into {} slices",
            slices.len()
        );
    }
    assert_eq!(mem.len(), 4 * blocks, "one object per full block");
}

/// A disk tier of 64 MiB in a directory of its own (kept while the guard lives), indexed.
fn disk_tier() -> (tempfile::TempDir, Arc<aquifer_cache::DiskTier>) {
    use aquifer_cache::{DiskConfig, DiskTier};
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(
        DiskTier::open(
            dir.path(),
            DiskConfig {
                capacity: 64 << 20,
                free_ratio: 0.0,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    assert!(disk.wait_indexed(std::time::Duration::from_secs(10)));
    (dir, disk)
}

#[test]
fn written_blocks_enter_the_disk_tier_and_reads_then_need_no_store() {
    use aquifer_cache::Tier;
    let (_dir, disk) = disk_tier();
    let bs = 64 << 10;
    let store = Arc::new(aquifer_object::FaultStore::new(MemStore::new()));
    let cfg = DataConfig {
        // RAM holds two blocks: the rest must come from the disk.
        cache_bytes: 2 * codec::stored_len(bs as usize),
        lower_tiers: crate::Tiers(vec![disk.clone()]),
        cache_writes: crate::CacheWrites::All,
        ..no_compaction(bs)
    };
    let (cs, ino) = setup_on(store.clone(), cfg);
    let w = FileWriter::new(cs.clone(), ino);
    let data: Vec<u8> = (0..(16 * bs + 100)).map(|i| (i * 7 % 251) as u8).collect();
    w.write(0, &data).unwrap();
    w.flush().unwrap();
    disk.flush();
    assert_eq!(disk.usage().entries, 17, "every written block is on disk");
    let before = store.calls();
    assert_eq!(read_all(&cs, ino), data);
    // Random reads too: with a disk tier they go through the cache, not ranged GETs.
    let mut part = vec![0u8; 1000];
    let len = data.len() as u64;
    for off in [5 * bs as u64 + 17, 11 * bs as u64 + 3, 3] {
        let got = cs.read(ino, off, part.len(), len).unwrap();
        part.copy_from_slice(&got);
        assert_eq!(part, data[off as usize..off as usize + 1000]);
    }
    assert_eq!(store.calls(), before, "reads went to the store");
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, usize, u8),
    Truncate(u64),
    Punch(u64, u64),
    Flush,
    Read(u64, usize),
    /// A read that leaves buffered writes buffered (overlaid on the committed data).
    ReadBuffered(u64, usize),
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
        2 => (off.clone(), 1usize..3000).prop_map(|(o, l)| Op::Read(o, l)),
        2 => (off, 1usize..3000).prop_map(|(o, l)| Op::ReadBuffered(o, l)),
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
                    // Cut in memory when nothing is uploaded yet, else commit first.
                    let cut = w.truncate_buffered(n, || Ok(meta.truncate(&ctx, ino, n)?)).unwrap();
                    if cut.is_none() {
                        w.flush().unwrap();
                        meta.truncate(&ctx, ino, n).unwrap();
                    }
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
                Op::ReadBuffered(o, l) => {
                    let g = w.generation();
                    let flen = meta.getattr(ino).unwrap().length.max(w.pending_end());
                    prop_assert_eq!(flen, len);
                    let mut got = cs.read(ino, o, l, flen).unwrap();
                    prop_assert!(w.overlay(o, &mut got, g).unwrap());
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

#[test]
fn by_default_only_small_writes_enter_the_disk_tier() {
    use aquifer_cache::Tier;
    let bs = 64 << 10;
    for (keep, want) in [
        (crate::CacheWrites::Small, 1),
        (crate::CacheWrites::None, 0),
        (crate::CacheWrites::All, 6),
    ] {
        let (_dir, disk) = disk_tier();
        let cfg = DataConfig {
            lower_tiers: crate::Tiers(vec![disk.clone()]),
            cache_writes: keep,
            ..no_compaction(bs)
        };
        let (cs, ino) = setup_on(Arc::new(MemStore::new()), cfg);
        let w = FileWriter::new(cs.clone(), ino);
        // A small write (one block of 100 bytes, closed), then a large one (a checkpoint's:
        // four full blocks and a tail).
        let data: Vec<u8> = (0..(4 * bs + 200)).map(|i| (i * 13 % 251) as u8).collect();
        w.write(0, &data[..100]).unwrap();
        w.flush().unwrap();
        w.write(100, &data[100..]).unwrap();
        w.flush().unwrap();
        // Uploaded blocks are offered to the tier by the upload threads, which may do so
        // just after the flush returned: give them a moment (a busy machine) before counting.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            disk.flush();
            if disk.usage().entries >= want || std::time::Instant::now() > end {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(disk.usage().entries, want, "{keep:?}");
        assert_eq!(read_all(&cs, ino), data);
    }
}
