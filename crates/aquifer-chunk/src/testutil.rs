//! Fixtures shared by the data path's tests: a fresh file on a volume in memory.

use crate::{ChunkStore, Compression, DataConfig};
use aquifer_meta::conformance::test_format;
use aquifer_meta::{Context, FileType, Ino, KvMeta, MemKv, Meta, ROOT_INO};
use aquifer_object::MemStore;
use std::sync::Arc;

/// A fresh file on a memory volume; background compaction off unless a test asks.
pub(crate) fn setup(block_size: u32) -> (Arc<ChunkStore>, Arc<MemStore>, Ino) {
    setup_with(block_size, usize::MAX, Compression::None)
}

pub(crate) fn setup_with(
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

/// Settings of `block_size` with background compaction off: a test compacts when it says so.
pub(crate) fn no_compaction(block_size: u32) -> DataConfig {
    DataConfig {
        block_size,
        compact_threshold: usize::MAX,
        ..Default::default()
    }
}

/// A fresh file on a volume whose blocks go to `store`.
pub(crate) fn setup_on(
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
    (ChunkStore::new(meta, store, cfg).unwrap(), ino)
}

/// A new empty file `name` in the root of `cs`'s volume.
pub(crate) fn new_file(cs: &ChunkStore, name: &str) -> Ino {
    cs.meta()
        .mknod(
            &Context::root(),
            ROOT_INO,
            name.as_bytes(),
            FileType::File,
            0o644,
            0,
            0,
        )
        .unwrap()
        .0
}

pub(crate) fn read_all(cs: &std::sync::Arc<ChunkStore>, ino: Ino) -> Vec<u8> {
    let len = cs.meta().getattr(ino).unwrap().length;
    cs.read(ino, 0, len as usize, len).unwrap()
}
