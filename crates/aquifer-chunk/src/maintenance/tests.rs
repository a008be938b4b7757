//! Compaction, freeing, gc and fsck on small volumes in memory.

use super::compact::data_runs;
use super::*;
use crate::read::layout;
use crate::store::codec;
use crate::store::keys::block_key;
use crate::testutil::{no_compaction, read_all, setup, setup_on, setup_with};
use crate::write::FileWriter;
use crate::{ChunkStore, Compression, Result};
use aquifer_meta::conformance::test_format;
use aquifer_meta::{Context, FileType, Ino, KvMeta, MemKv, Meta, Slice, ROOT_INO};
use aquifer_object::{MemStore, ObjectStore};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

fn volume() -> (Arc<ChunkStore>, Arc<MemStore>) {
    let meta: Arc<dyn Meta> = Arc::new(KvMeta::new(MemKv::new()));
    meta.format(&test_format(1024), false).unwrap();
    let store = Arc::new(MemStore::new());
    (
        ChunkStore::new(meta, store.clone(), no_compaction(1024)).unwrap(),
        store,
    )
}

fn file(cs: &Arc<ChunkStore>, name: &str, data: &[u8]) -> Ino {
    let ino = crate::testutil::new_file(cs, name);
    let w = FileWriter::new(cs.clone(), ino);
    w.write(0, data).unwrap();
    w.flush().unwrap();
    ino
}

/// gc on two threads that waits for no object or freed slice to age: `delete` or only count.
fn gc_at_once(delete: bool) -> GcOptions {
    GcOptions {
        delete,
        min_age: Duration::ZERO,
        threads: 2,
        free_grace: Duration::ZERO,
    }
}

#[test]
fn gc_finds_exactly_the_orphans() {
    let (cs, store) = volume();
    file(&cs, "a", &[1; 3000]);
    let keep = store.len();
    // An upload that never got committed, a stray temp file and a block of a slice id
    // that exists but with a block index past its end.
    let orphan = block_key(cs.meta().new_slice_id().unwrap(), 0, 100);
    store.put(&orphan, Bytes::from_static(b"x")).unwrap();
    store
        .put("chunks/0/0/7_0_9.tmp-1.0", Bytes::from_static(b"y"))
        .unwrap();
    let id = cs.meta().read_chunk(2, 0).unwrap()[0].id;
    store
        .put(&block_key(id, 9, 10), Bytes::from_static(b"z"))
        .unwrap();
    let opts = gc_at_once(false);
    let r = gc(cs.meta().as_ref(), store.as_ref(), 1024, &opts, &|_| {}).unwrap();
    assert_eq!((r.leaked, r.deleted), (3, 0));
    assert_eq!(r.objects as usize, keep + 3);
    // Young objects are spared.
    let young = GcOptions {
        delete: true,
        min_age: Duration::from_secs(3600),
        ..opts.clone()
    };
    let r = gc(cs.meta().as_ref(), store.as_ref(), 1024, &young, &|_| {}).unwrap();
    assert_eq!((r.young, r.deleted), (3, 0));
    let r = gc(
        cs.meta().as_ref(),
        store.as_ref(),
        1024,
        &GcOptions {
            delete: true,
            ..opts.clone()
        },
        &|_| {},
    )
    .unwrap();
    assert_eq!(r.deleted, 3);
    assert_eq!(store.len(), keep, "exactly the orphans went");
    assert_eq!(cs.read(2, 0, 3000, 3000).unwrap(), vec![1; 3000]);
}

#[test]
fn gc_spares_what_a_live_writer_has_not_committed() {
    let (cs, store) = volume();
    cs.meta()
        .new_session(aquifer_meta::conformance::test_session("h"))
        .unwrap();
    let ctx = Context::root();
    let ino = cs
        .meta()
        .mknod(&ctx, ROOT_INO, b"slow", FileType::File, 0o644, 0, 0)
        .unwrap()
        .0;
    // A slow appender: two full blocks uploaded, nothing committed yet.
    let data: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
    let w = FileWriter::new(cs.clone(), ino);
    w.write(0, &data).unwrap();
    while store.len() < 2 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let opts = gc_at_once(true);
    let r = gc(cs.meta().as_ref(), store.as_ref(), 1024, &opts, &|_| {}).unwrap();
    assert_eq!((r.leaked, r.live, r.deleted), (2, 2, 0), "{r:?}");
    w.flush().unwrap();
    assert_eq!(cs.read(ino, 0, 2500, 2500).unwrap(), data);
    // Once the session is gone, what it left uncommitted is an ordinary leftover.
    let orphan = block_key(cs.meta().new_slice_id().unwrap(), 0, 100);
    store.put(&orphan, Bytes::from_static(b"x")).unwrap();
    let r = gc(cs.meta().as_ref(), store.as_ref(), 1024, &opts, &|_| {}).unwrap();
    assert_eq!(r.deleted, 0, "still live: {r:?}");
    cs.meta().close_session().unwrap();
    let r = gc(cs.meta().as_ref(), store.as_ref(), 1024, &opts, &|_| {}).unwrap();
    assert_eq!(r.deleted, 1, "{r:?}");
    assert_eq!(cs.read(ino, 0, 2500, 2500).unwrap(), data);
}

#[test]
fn freed_blocks_outlive_the_grace_period() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (cs, store) = volume();
    let meta = cs.meta().as_ref();
    file(&cs, "a", &[1; 3000]);
    let before = store.len();
    meta.unlink(&Context::root(), ROOT_INO, b"a").unwrap();
    let synced = AtomicUsize::new(0);
    let durable = || -> Result<()> {
        synced.fetch_add(1, Ordering::SeqCst);
        Ok(())
    };
    let forget = |_: &str| assert_eq!(synced.load(Ordering::SeqCst), 1, "synced first");
    let hour = Duration::from_secs(3600);
    let r = free_trash(meta, store.as_ref(), 1024, hour, &durable, &forget).unwrap();
    assert_eq!(r.freed, 0, "younger than the grace");
    assert!(r.next_due <= hour && r.next_due > hour / 2, "{r:?}");
    assert_eq!(store.len(), before);
    assert_eq!(
        synced.load(Ordering::SeqCst),
        0,
        "nothing to make durable yet"
    );
    // Older than the grace (on the engine's clock): freed, after a sync.
    let grace = Duration::from_millis(200);
    std::thread::sleep(grace * 2);
    let r = free_trash(meta, store.as_ref(), 1024, grace, &durable, &forget).unwrap();
    assert_eq!(r.freed, 1);
    assert_eq!(store.len(), before - 3);
    assert!(meta.trash_batch(0, 10).unwrap().is_empty());
}

#[test]
fn fsck_names_the_file_whose_block_is_gone() {
    let (cs, store) = volume();
    file(&cs, "good", &[1; 2500]);
    let bad = file(&cs, "bad", &[2; 2500]);
    let check = |path: &str, deep: bool| {
        let c = codec::Compression::None;
        fsck(
            cs.meta().as_ref(),
            store.as_ref(),
            1024,
            c,
            path,
            deep,
            &|_| {},
        )
        .unwrap()
    };
    let r = check("/", true);
    assert_eq!((r.files, r.blocks, r.broken.len()), (2, 6, 0));
    let id = cs.meta().read_chunk(bad, 0).unwrap()[0].id;
    use aquifer_object::ObjectStore;
    store.delete(&block_key(id, 1, 1024)).unwrap();
    let r = check("/", false);
    assert_eq!(r.broken.len(), 1);
    assert_eq!(r.broken[0].path, "/bad");
    assert_eq!(r.broken[0].problem, "missing");
    // A flipped byte is found only by --deep.
    let key = block_key(id, 0, 1024);
    let mut obj = store.get(&key, 0, None).unwrap().to_vec();
    obj[5] ^= 1;
    store.put(&key, Bytes::from(obj)).unwrap();
    let r = check("/", true);
    assert_eq!(r.broken.len(), 2);
    let r = check("/good", true);
    assert_eq!((r.files, r.broken.len()), (1, 0));
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
    while cs.meta().read_chunk(ino, 0).unwrap().len() >= 4 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        cs.meta().read_chunk(ino, 0).unwrap().len() < 4,
        "compactor never ran"
    );
    assert_eq!(read_all(&cs, ino), model);
}

#[test]
fn compaction_of_a_sparse_file_stores_only_its_data() {
    let store = Arc::new(MemStore::new());
    let (cs, ino) = setup_on(store.clone(), no_compaction(64 << 10));
    let w = FileWriter::new(cs.clone(), ino);
    // 40 pieces of 4 KiB, 1 MiB apart, each its own flush (so its own slice).
    for i in 0..40u64 {
        w.write(i << 20, &[i as u8 + 1; 4096]).unwrap();
        w.flush().unwrap();
    }
    // And a punched range over one of them.
    let ctx = Context::root();
    cs.meta().fallocate(&ctx, ino, 3, 5 << 20, 4096).unwrap();
    let before = read_all(&cs, ino);
    assert!(cs.compact(ino, 0).unwrap());
    cs.empty_trash().unwrap();
    assert_eq!(read_all(&cs, ino), before);
    let stored: u64 = {
        use aquifer_object::ObjectStore;
        store
            .list("", "", 10_000)
            .unwrap()
            .iter()
            .map(|o| o.size)
            .sum()
    };
    // 39 pieces of data (and checksums), not 39 MiB of stored zeros.
    assert!(stored < 4 * 39 * 4096, "{stored} bytes stored");
    assert_eq!(cs.meta().read_chunk(ino, 0).unwrap().len(), 39);
}

#[test]
fn compaction_racing_a_truncate_stops_quietly() {
    let (cs, store, ino) = setup(1024);
    let w = FileWriter::new(cs.clone(), ino);
    for i in 0..4u64 {
        w.write(i * 3000, &[9; 2000]).unwrap();
        w.flush().unwrap();
    }
    // The inputs are freed (truncate + trash emptied) before compaction reads them.
    let slices = cs.meta().read_chunk(ino, 0).unwrap();
    cs.meta().truncate(&Context::root(), ino, 0).unwrap();
    cs.empty_trash().unwrap();
    assert!(store.is_empty());
    assert_eq!(data_runs(&layout::visible(&slices), 16), vec![(0, 11_000)]);
    // compact() on the now-empty chunk: nothing to do, no error.
    assert!(!cs.compact(ino, 0).unwrap());
    // Reading a freed input reports not-found; compact treats a changed chunk as a race.
    let s = Slice {
        pos: 0,
        id: 999_999,
        size: 10,
        off: 0,
        len: 10,
    };
    assert!(cs.write_compacted(&[s], &s).is_err());
}

#[test]
fn data_runs_join_the_narrowest_gaps() {
    let sl = |pos, len| Slice {
        pos,
        id: 1,
        size: len,
        off: 0,
        len,
    };
    let vis = [
        sl(0, 10),
        sl(10, 5),
        sl(100, 10),
        sl(200_000, 100_000),
        sl(370_000, 50_000),
        sl(5_000_000, 1),
    ];
    // Pieces within a segment of each other are one run.
    let all = vec![
        (0, 110),
        (200_000, 300_000),
        (370_000, 420_000),
        (5_000_000, 5_000_001),
    ];
    assert_eq!(data_runs(&vis, 16), all);
    // Fewer runs wanted: the narrow gap goes; the wider ones would store more zeros
    // than there are data bytes, and stay.
    let fewer = vec![(0, 110), (200_000, 420_000), (5_000_000, 5_000_001)];
    assert_eq!(data_runs(&vis, 3), fewer);
    assert_eq!(data_runs(&vis, 1), fewer);
}
