//! Offline checks of a volume's blocks against its metadata: `aquifer gc` and `aquifer fsck`.
//!
//! Both work through the [`Meta`] and [`ObjectStore`] traits only, so they run on every
//! metadata engine and every store.
//!
//! **gc** lists every object under the volume's `chunks/` and compares it with the slices
//! that metadata references (every chunk's slice list, and trash records still waiting).
//! An object is leaked when no slice owns it: uploads of writers killed before their commit,
//! compaction output whose swap lost, blocks of trash records whose delete failed, temporary
//! files of interrupted puts.
//!
//! gc is safe on a live volume. A writer uploads blocks before it commits their slice, and
//! a slow appender keeps a slice uncommitted for hours, so age says nothing about whether
//! an unreferenced object is leaked. Instead every session records the slice ids it may
//! still commit ([`aquifer_meta::Chunks::live_slice_ranges`]), before it uploads anything under them. gc
//! reads the slice id counter before it lists objects (a higher id is newer than the
//! listing), reads the live sessions' records after the listing (so every id whose object it
//! listed was recorded by then, unless already committed or given up), and the references
//! after that (so a slice committed meanwhile is seen). Objects of ids a live session may
//! still commit are spared whatever their age; `min_age` applies only to the rest, the
//! leftovers of sessions that are gone.
//!
//! **fsck** walks the namespace and checks that every block of every file's slices exists
//! with the size its slice implies (`deep`: reads it and verifies its checksums), naming each
//! broken file by path.

use crate::{block_key, codec, free_trash, slice_keys, DataError, Result};
use aquifer_meta::{Context, FileType, Ino, Meta, Slice, CHUNK_SIZE, ROOT_INO};
use aquifer_object::{ObjectInfo, ObjectStore};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

/// Where a volume's blocks live in its store.
pub const CHUNKS_PREFIX: &str = "chunks/";

/// The slice id, block index and payload length a block key names.
pub fn parse_block_key(key: &str) -> Option<(u64, u32, u32)> {
    let name = key.strip_prefix(CHUNKS_PREFIX)?.rsplit('/').next()?;
    let mut parts = name.split('_');
    let id = parts.next()?.parse().ok()?;
    let idx = parts.next()?.parse().ok()?;
    let len = parts.next()?.parse().ok()?;
    if parts.next().is_some() || block_key(id, idx, len) != key {
        return None;
    }
    Some((id, idx, len))
}

/// The slice id an object under `chunks/` belongs to: a block's, or that of a temporary
/// file of a put in progress (`<id>_<idx>_<len>.tmp-…`).
fn slice_id_of(key: &str) -> Option<u64> {
    let name = key.strip_prefix(CHUNKS_PREFIX)?.rsplit('/').next()?;
    name.split(['_', '.']).next()?.parse().ok()
}

/// Every slice id that metadata references, with its size (chunks and pending trash).
pub fn referenced_slices(meta: &dyn Meta) -> Result<HashMap<u64, u32>> {
    let mut refs = HashMap::new();
    let mut after = None;
    loop {
        let page = meta.scan_chunks(after, 1024)?;
        let Some(last) = page.last() else { break };
        after = Some((last.0, last.1));
        for (_, _, slices) in &page {
            for s in slices.iter().filter(|s| s.id != 0) {
                refs.insert(s.id, s.size);
            }
        }
    }
    let mut after = 0;
    loop {
        let page = meta.trash_batch(after, 1024)?;
        let Some(last) = page.last() else { break };
        after = last.0;
        for (_, slices, _) in &page {
            for s in slices.iter().filter(|s| s.id != 0) {
                refs.insert(s.id, s.size);
            }
        }
    }
    Ok(refs)
}

/// The object naming the volume that owns a store prefix.
pub const MARKER: &str = "aquifer.volume";

fn marker_text(name: &str, uuid: &str) -> String {
    format!("aquifer volume marker v1\nname={name}\nuuid={uuid}\n")
}

/// (name, uuid) recorded in a marker.
fn parse_marker(b: &[u8]) -> Option<(String, String)> {
    let t = std::str::from_utf8(b).ok()?;
    let field = |k: &str| {
        t.lines()
            .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
    };
    Some((field("name=")?, field("uuid=")?))
}

/// Whether `store` holds the marker of volume `uuid`: `Ok(false)` when there is no marker,
/// an error when it names another volume (or cannot be read).
pub fn check_volume(
    store: &dyn ObjectStore,
    name: &str,
    uuid: &str,
) -> std::result::Result<bool, String> {
    match store.get(MARKER, 0, None) {
        Ok(b) => match parse_marker(&b) {
            Some((_, u)) if u == uuid => Ok(true),
            Some((n, u)) => Err(format!(
                "{} holds volume {n} (uuid {u}), not {name} (uuid {uuid}): two volumes must not share blocks; choose another --bucket or name",
                store.describe()
            )),
            None => Err(format!(
                "{}: {MARKER} is not a volume marker; refusing to use this place",
                store.describe()
            )),
        },
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(format!("cannot read the volume marker: {e}")),
    }
}

/// Write the marker of volume `uuid` unless the store already has it; refuses a store
/// that holds another volume's marker or, without one, any objects of another volume.
pub fn claim_volume(
    store: &dyn ObjectStore,
    name: &str,
    uuid: &str,
) -> std::result::Result<(), String> {
    if check_volume(store, name, uuid)? {
        return Ok(());
    }
    let stray = store
        .list(CHUNKS_PREFIX, "", 1)
        .map_err(|e| format!("cannot list {}: {e}", store.describe()))?;
    if !stray.is_empty() {
        return Err(format!(
            "{} already holds blocks of an unknown volume (e.g. {}): refusing to mix volumes",
            store.describe(),
            stray[0].key
        ));
    }
    store
        .put(MARKER, bytes::Bytes::from(marker_text(name, uuid)))
        .and_then(|_| store.sync())
        .map_err(|e| format!("cannot write the volume marker: {e}"))
}

#[derive(Clone, Debug)]
pub struct GcOptions {
    pub delete: bool,
    /// Spare leftovers of dead sessions younger than this.
    pub min_age: Duration,
    pub threads: usize,
    /// Free trash records only this long after the change that freed them (as mounts do).
    pub free_grace: Duration,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Objects listed under `chunks/`, and their bytes.
    pub objects: u64,
    pub bytes: u64,
    /// Objects no slice owns, and their bytes.
    pub leaked: u64,
    pub leaked_bytes: u64,
    /// Leaked objects spared for being younger than `min_age`.
    pub young: u64,
    /// Unreferenced objects spared because a live session may still commit them (or they
    /// are newer than the listing).
    pub live: u64,
    pub deleted: u64,
    /// Trash records whose blocks were freed now (earlier deletes failed or had not run).
    pub trash_freed: usize,
}

/// Find (and with `delete`, remove) the objects of the volume that no metadata references.
/// `progress` is told of every object listed.
pub fn gc(
    meta: &dyn Meta,
    store: &dyn ObjectStore,
    block_size: u32,
    opts: &GcOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<GcReport> {
    let mut report = GcReport::default();
    // Blocks an fsync left only in the metadata journal are the volume's too.
    crate::journal::replay(meta, store)?;
    if opts.delete {
        // Failed trash deletes are retried here, not forgotten.
        // A mount's cache of a block deleted here holds it until evicted: never read
        // again, as block keys are never reused.
        report.trash_freed = free_trash(
            meta,
            store,
            block_size,
            opts.free_grace,
            &|| {
                store.sync()?;
                meta.sync()?;
                Ok(())
            },
            &|_| {},
        )?
        .freed;
    }
    // Every id handed out so far is below this: an object of a higher one was written after
    // this point, and the session records read below may not cover it.
    let limit = meta.slice_id_limit()?;
    let owned = |refs: &HashMap<u64, u32>, key: &str| {
        parse_block_key(key).is_some_and(|(id, idx, len)| {
            // A block of the slice's layout: within it, and of the length it implies.
            refs.get(&id).is_some_and(|&size| {
                let start = idx as u64 * block_size as u64;
                start < size as u64 && len as u64 == (size as u64 - start).min(block_size as u64)
            })
        })
    };
    // What was referenced before the listing: objects it owns are kept without more ado,
    // so only the unreferenced ones are held in memory until the second look below.
    let refs = referenced_slices(meta)?;
    let mut unowned: Vec<ObjectInfo> = Vec::new();
    let mut start_after = String::new();
    loop {
        let page = store.list(CHUNKS_PREFIX, &start_after, 1000)?;
        let Some(last) = page.last() else { break };
        start_after = last.key.clone();
        for o in page {
            report.objects += 1;
            report.bytes += o.size;
            progress(1);
            if !owned(&refs, &o.key) {
                unowned.push(o);
            }
        }
    }
    drop(refs);
    // After the listing: a session records ids before it uploads under them, so every id of
    // a listed object that is still uncommitted is in these ranges (or its session is dead).
    let live = meta.live_slice_ranges()?;
    // And after that: an id that left a session's record was committed (seen here) or
    // given up.
    let refs = referenced_slices(meta)?;
    let now = SystemTime::now();
    let mut doomed: Vec<ObjectInfo> = Vec::new();
    for o in unowned {
        if owned(&refs, &o.key) {
            continue;
        }
        report.leaked += 1;
        report.leaked_bytes += o.size;
        let spared = slice_id_of(&o.key)
            .is_some_and(|id| id >= limit || live.iter().any(|r| r.contains(&id)));
        let age = o
            .modified
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or(Duration::ZERO);
        if spared {
            report.live += 1;
        } else if age < opts.min_age {
            report.young += 1;
        } else if opts.delete {
            doomed.push(o);
        }
    }
    if !doomed.is_empty() {
        let threads = opts.threads.clamp(1, 64);
        let per = doomed.len().div_ceil(threads);
        let deleted: Result<u64> = std::thread::scope(|sc| {
            let jobs: Vec<_> = doomed
                .chunks(per)
                .map(|part| {
                    sc.spawn(move || -> Result<u64> {
                        for o in part {
                            store.delete(&o.key)?;
                        }
                        Ok(part.len() as u64)
                    })
                })
                .collect();
            jobs.into_iter()
                .map(|j| {
                    j.join().unwrap_or_else(|_| {
                        Err(DataError::Setup("a delete thread panicked".into()))
                    })
                })
                .sum()
        });
        report.deleted = deleted?;
    }
    Ok(report)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Broken {
    pub path: String,
    pub ino: Ino,
    pub key: String,
    pub problem: String,
}

#[derive(Clone, Debug, Default)]
pub struct FsckReport {
    pub files: u64,
    pub blocks: u64,
    pub broken: Vec<Broken>,
}

/// Check every block of every regular file below `path` (`/` for the whole volume).
pub fn fsck(
    meta: &dyn Meta,
    store: &dyn ObjectStore,
    block_size: u32,
    compression: codec::Compression,
    path: &str,
    deep: bool,
    progress: &dyn Fn(u64),
) -> Result<FsckReport> {
    // Blocks an fsync left only in the metadata journal are not broken: put them back first.
    crate::journal::replay(meta, store)?;
    let ctx = Context::root();
    let mut ino = ROOT_INO;
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        ino = meta.lookup(&ctx, ino, part.as_bytes())?.0;
    }
    let start = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let mut report = FsckReport::default();
    let mut seen = HashSet::new();
    let mut stack = vec![(ino, start.trim_end_matches('/').to_string())];
    while let Some((ino, p)) = stack.pop() {
        let a = meta.getattr(ino)?;
        match a.typ {
            FileType::Directory => {
                for e in meta.readdir(&ctx, ino, false)? {
                    let name = String::from_utf8_lossy(&e.name);
                    stack.push((e.ino, format!("{p}/{name}")));
                }
            }
            FileType::File if seen.insert(ino) => {
                report.files += 1;
                let path = if p.is_empty() { "/".to_string() } else { p };
                let chunks = a.length.div_ceil(CHUNK_SIZE) as u32;
                let mut slices: Vec<Slice> = Vec::new();
                for idx in 0..chunks {
                    slices.extend(meta.read_chunk(ino, idx)?.into_iter().filter(|s| s.id != 0));
                }
                let mut done = HashSet::new();
                for s in slices.into_iter().filter(|s| done.insert(s.id)) {
                    for (i, key) in slice_keys(s.id, s.size, block_size).into_iter().enumerate() {
                        report.blocks += 1;
                        progress(1);
                        let len = (s.size - i as u32 * block_size).min(block_size) as usize;
                        if let Some(problem) = check_block(store, compression, &key, len, deep) {
                            report.broken.push(Broken {
                                path: path.clone(),
                                ino,
                                key,
                                problem,
                            });
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(report)
}

/// What is wrong with one block, if anything.
fn check_block(
    store: &dyn ObjectStore,
    c: codec::Compression,
    key: &str,
    len: usize,
    deep: bool,
) -> Option<String> {
    if deep {
        return codec::read_whole(store, c, key, len, Vec::new())
            .err()
            .map(|e| e.to_string());
    }
    match store.head(key) {
        Err(e) if e.is_not_found() => Some("missing".into()),
        Err(e) => Some(e.to_string()),
        // A compressed block is smaller; a plain one is exactly its payload and checksums.
        Ok(o) if c == codec::Compression::None && o.size != codec::stored_len(len) as u64 => {
            Some(format!(
                "{} bytes stored, {} expected",
                o.size,
                codec::stored_len(len)
            ))
        }
        Ok(o) if o.size == 0 => Some("empty".into()),
        Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::FileWriter;
    use crate::{ChunkStore, DataConfig};
    use aquifer_meta::conformance::test_format;
    use aquifer_meta::{KvMeta, MemKv};
    use aquifer_object::MemStore;
    use bytes::Bytes;
    use std::sync::Arc;

    fn volume() -> (Arc<ChunkStore>, Arc<MemStore>) {
        let meta: Arc<dyn Meta> = Arc::new(KvMeta::new(MemKv::new()));
        meta.format(&test_format(1024), false).unwrap();
        let store = Arc::new(MemStore::new());
        let cfg = DataConfig {
            block_size: 1024,
            compact_threshold: usize::MAX,
            ..Default::default()
        };
        (ChunkStore::new(meta, store.clone(), cfg).unwrap(), store)
    }

    fn file(cs: &Arc<ChunkStore>, name: &str, data: &[u8]) -> Ino {
        let ctx = Context::root();
        let ino = cs
            .meta()
            .mknod(&ctx, ROOT_INO, name.as_bytes(), FileType::File, 0o644, 0, 0)
            .unwrap()
            .0;
        let w = FileWriter::new(cs.clone(), ino);
        w.write(0, data).unwrap();
        w.flush().unwrap();
        ino
    }

    #[test]
    fn a_store_belongs_to_one_volume() {
        let store = MemStore::new();
        assert_eq!(check_volume(&store, "v", "u1"), Ok(false));
        claim_volume(&store, "v", "u1").unwrap();
        assert_eq!(check_volume(&store, "v", "u1"), Ok(true));
        // The same volume again (format --force) is fine; another volume is refused.
        claim_volume(&store, "v", "u1").unwrap();
        let e = claim_volume(&store, "v", "u2").unwrap_err();
        assert!(e.contains("uuid u1"), "{e}");
        assert!(check_volume(&store, "v", "u2").is_err());
        // Blocks with no marker are someone else's.
        let other = MemStore::new();
        other
            .put(&block_key(1, 0, 1), Bytes::from_static(b"x"))
            .unwrap();
        assert!(claim_volume(&other, "w", "u3").is_err());
    }

    #[test]
    fn block_keys_parse_back() {
        let k = block_key(1_234_567, 3, 4096);
        assert_eq!(parse_block_key(&k), Some((1_234_567, 3, 4096)));
        assert_eq!(parse_block_key("chunks/0/0/5_0_10.tmp-1.2"), None);
        assert_eq!(
            parse_block_key("chunks/9/9/5_0_10"),
            None,
            "wrong directory"
        );
        assert_eq!(parse_block_key("aquifer.volume"), None);
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
        let opts = GcOptions {
            delete: false,
            min_age: Duration::ZERO,
            threads: 2,
            free_grace: Duration::ZERO,
        };
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
        let opts = GcOptions {
            delete: true,
            min_age: Duration::ZERO,
            threads: 2,
            free_grace: Duration::ZERO,
        };
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
}
