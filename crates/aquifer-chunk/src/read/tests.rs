//! Reads: read-ahead within and across chunks, the cache's bound, corrupt blocks.

use crate::store::keys::block_key;
use crate::testutil::{setup, setup_on};
use crate::write::FileWriter;
use crate::DataConfig;
use aquifer_meta::CHUNK_SIZE;
use aquifer_object::MemStore;
use std::sync::Arc;

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
        // Room for 7 blocks as the cache counts them; the window asked for is wider.
        cache_bytes: 8 * bs as usize,
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
    let mut bad = crate::store::codec::encode(&[7; 64]).to_vec();
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
fn sequential_reads_fetch_ahead_into_the_cache() {
    let (cs, _, ino) = setup(1 << 20);
    let w = FileWriter::new(cs.clone(), ino);
    let data: Vec<u8> = (0..(10 << 20) as u32).map(|i| (i % 253) as u8).collect();
    w.write(0, &data).unwrap();
    w.flush().unwrap();
    let len = data.len() as u64;
    assert_eq!(cs.read(ino, 0, 4096, len).unwrap(), data[..4096]);
    // Block 0 is cached by the read itself, blocks 1 and 2 by the prefetcher.
    let cached = || cs.cache.tiers()[0].usage().entries;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while cached() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(cached(), 3);
    // A small random read elsewhere in a large block does not fill the cache.
    assert_eq!(
        cs.read(ino, 9 << 20, 100, len).unwrap(),
        data[9 << 20..(9 << 20) + 100]
    );
    assert_eq!(cached(), 3);
    // The cached blocks serve the rest of the sequential read correctly.
    assert_eq!(
        cs.read(ino, 4096, (3 << 20) - 4096, len).unwrap(),
        data[4096..3 << 20]
    );
}

/// A model loaded through mmap: a large file read at random offsets is fetched whole in
/// the background, so the tensors not touched yet are in the cache before they are asked.
#[test]
fn a_large_file_read_at_random_is_fetched_whole() {
    let bs = 1 << 20;
    let cfg = DataConfig {
        block_size: bs,
        compact_threshold: usize::MAX,
        cache_bytes: 256 << 20,
        ..Default::default()
    };
    let (cs, ino) = setup_on(Arc::new(MemStore::new()), cfg);
    let len: u64 = 80 << 20;
    let w = FileWriter::new(cs.clone(), ino);
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    w.write(0, &data).unwrap();
    w.flush().unwrap();
    let check = || {
        cs.cache_range(ino, crate::CacheOp::Check, 0, len, len)
            .unwrap()
    };
    assert!(
        check().cached < len / 2,
        "written blocks are not all cached"
    );
    // Eight reads far apart, the first not at offset 0 (a read there counts as sequential).
    for i in 0..8u64 {
        let off = ((i * 37 + 11) % 79) << 20;
        let got = cs.read(ino, off, 4096, len).unwrap();
        assert_eq!(got, data[off as usize..off as usize + 4096]);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while check().cached < len {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {len} bytes fetched",
            check().cached
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
