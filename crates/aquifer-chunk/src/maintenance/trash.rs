//! Freeing: the objects of slices in the trash are deleted once the change that freed them
//! is durable and the grace period has passed. A background worker does it on every mount
//! (and checkpoints the object journal on the way); `aquifer gc --delete` does it offline.

use crate::store::keys::slice_keys;
use crate::{ChunkStore, Result};
use aquifer_meta::{Meta, Slice};
use aquifer_object::ObjectStore;
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

impl ChunkStore {
    pub(super) fn delete_slice(&self, s: &Slice) {
        if let Err(e) = self.delete_blocks(s) {
            tracing::warn!(error = %e, "delete of a block failed; gc will find it");
        }
    }

    fn delete_blocks(&self, s: &Slice) -> Result<()> {
        delete_blocks(&*self.store, s, self.cfg.block_size, &|key| {
            self.cache.remove(key)
        })
    }

    /// Delete the objects of every slice in the trash that was freed at least the free
    /// grace period ago. Returns how many slices were freed.
    pub fn empty_trash(&self) -> Result<usize> {
        Ok(self.empty_trash_due()?.freed)
    }

    fn empty_trash_due(&self) -> Result<TrashRound> {
        // An fsync's worth of durability, journal included: forcing a checkpoint here would
        // sync the whole store every time compaction frees a slice.
        free_trash(
            &*self.meta,
            &*self.store,
            self.cfg.block_size,
            self.cfg.free_grace,
            &|| self.journal.sync_committed(),
            // A deleted block's cache files would only wait for eviction.
            &|key| self.cache.remove(key),
        )
    }
}

fn delete_blocks(
    store: &dyn ObjectStore,
    s: &Slice,
    block_size: u32,
    forget: &dyn Fn(&str),
) -> Result<()> {
    for key in slice_keys(s.id, s.size, block_size) {
        store.delete(&key)?;
        forget(&key);
    }
    Ok(())
}

/// What one pass over the trash did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrashRound {
    /// Slices whose blocks were deleted.
    pub freed: usize,
    /// Until the first record left for being younger than the grace period is due (the
    /// grace itself when none was left: a record made later is due later still).
    pub next_due: Duration,
}

/// Delete the objects of every slice in the trash whose record is at least `grace` old on
/// the metadata engine's clock ([`aquifer_meta::Volume::clock`]; a record with no time, an older client's,
/// counts as old).
///
/// The change that freed them is made durable first by `durable` (blocks, then metadata, as
/// [`ChunkStore::sync`]): otherwise a power cut could bring back metadata that points at
/// blocks already deleted. The grace covers what durability on one server does not: a
/// failover to a replica that had not received the change. A record whose deletes failed
/// stays in the trash and is tried again on the next round (and by `aquifer gc --delete`).
/// Each deleted block is passed to `forget` (to drop it from a cache).
pub fn free_trash(
    meta: &dyn Meta,
    store: &dyn ObjectStore,
    block_size: u32,
    grace: Duration,
    durable: &dyn Fn() -> Result<()>,
    forget: &dyn Fn(&str),
) -> Result<TrashRound> {
    let mut round = TrashRound {
        freed: 0,
        next_due: grace,
    };
    let mut synced = false;
    let mut after = 0;
    let now = if grace.is_zero() {
        None
    } else {
        Some(meta.clock()?)
    };
    loop {
        let batch = meta.trash_batch(after, 64)?;
        let Some(last) = batch.last() else {
            return Ok(round);
        };
        after = last.0;
        let due: Vec<_> = batch
            .into_iter()
            .filter(|(_, _, at)| {
                let (Some(now), Some(at)) = (now, *at) else {
                    return true;
                };
                let age = time_diff(now, at);
                if age >= grace {
                    return true;
                }
                round.next_due = round.next_due.min(grace - age);
                false
            })
            .collect();
        if due.is_empty() {
            continue;
        }
        if !synced {
            durable()?;
            synced = true;
        }
        for (id, slices, _) in due {
            let mut seen = HashSet::new();
            let mut failed = None;
            for s in slices.iter().filter(|s| s.id != 0 && seen.insert(s.id)) {
                match delete_blocks(store, s, block_size, forget) {
                    Ok(()) => round.freed += 1,
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            match failed {
                None => meta.trash_done(id)?,
                Some(e) => {
                    round.next_due = Duration::ZERO;
                    tracing::warn!(trash = id, error = %e, "freeing blocks failed; will retry")
                }
            }
        }
    }
}

/// How long after `then` `now` is (zero when it is not after).
fn time_diff(now: aquifer_meta::Time, then: aquifer_meta::Time) -> Duration {
    let ns = |t: aquifer_meta::Time| t.sec as i128 * 1_000_000_000 + t.nsec as i128;
    let d = ns(now) - ns(then);
    if d <= 0 {
        Duration::ZERO
    } else {
        Duration::from_nanos(d.min(u64::MAX as i128) as u64)
    }
}

pub(super) fn trash_loop(cs: Weak<ChunkStore>, stop: Arc<AtomicBool>) {
    let (_keep, idle) = mpsc::channel::<()>();
    // Nothing in the trash can be due before this: every record is at least as young as
    // the grace period was at the last pass, so the trash is not scanned every tick.
    let mut due = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        match idle.recv_timeout(Duration::from_millis(500)) {
            Err(RecvTimeoutError::Timeout) | Ok(()) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some(cs) = cs.upgrade() else { return };
        if let Err(e) = cs.journal.checkpoint_if_due() {
            tracing::warn!(error = %e, "checkpoint of the object journal failed; will retry");
        }
        if Instant::now() < due {
            continue;
        }
        match catch_unwind(AssertUnwindSafe(|| cs.empty_trash_due())) {
            Ok(Ok(r)) => due = Instant::now() + r.next_due,
            Ok(Err(e)) => tracing::warn!(error = %e, "emptying the trash failed; will retry"),
            Err(_) => tracing::error!("emptying the trash panicked; will retry"),
        }
    }
}
