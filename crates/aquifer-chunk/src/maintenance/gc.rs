//! `aquifer gc`: objects of the volume that no metadata references.
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

use crate::maintenance::free_trash;
use crate::store::keys::{slice_id_of, BlockKey, CHUNKS_PREFIX};
use crate::{DataError, Result};
use aquifer_meta::Meta;
use aquifer_object::{ObjectInfo, ObjectStore};
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

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
    crate::store::journal::replay(meta, store)?;
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
        BlockKey::parse(key).is_some_and(|BlockKey { id, idx, len }| {
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
