//! Ids this client hands out: inode numbers, slice ids and trash ids come in batches from
//! counters, one round trip per batch, and a batch is dropped once the engine may have
//! moved to another server (a failover can set a counter back). Also the session's record
//! of the slice ids it may still commit, which gc spares ([`SliceIds`]).

use super::{KvMeta, C_NEXT_INODE, C_NEXT_SLICE, INO_BATCH, SLICE_BATCH};
use crate::encoding as key;
use crate::error::{MetaError, Result};
use crate::kv::KvEngine;
use crate::types::*;
use std::sync::Mutex;

/// A batch of ids taken from a counter, handed out one by one without a round trip.
#[derive(Default)]
pub(super) struct IdBatch {
    pub(super) next: u64,
    pub(super) end: u64,
    /// The engine's epoch when the batch was taken (see [`KvMeta::fresh_batch`]).
    pub(super) epoch: u64,
    /// One past the largest id this client handed out.
    pub(super) high: u64,
}

/// Slice ids of this client: the batch being handed out, and what the session may still
/// commit.
///
/// gc must never delete an object a live writer may still commit, however old (a slow
/// appender keeps a slice open for hours). So before any id of a new batch is used, the
/// session records (`R` sid) the ranges of ids it may still commit: the rest of the current
/// batch and, of older batches, the span of ids handed out and neither committed nor
/// abandoned. Commits and abandons only shrink the set; the record follows at the next
/// heartbeat (a stale record only makes gc spare more).
#[derive(Default)]
pub(super) struct SliceIds {
    pub(super) next: u64,
    pub(super) end: u64,
    /// The engine's epoch when the batch was taken, and one past the largest id handed
    /// out (see [`KvMeta::fresh_batch`]).
    pub(super) epoch: u64,
    pub(super) high: u64,
    /// The session the current batch was recorded under (0: none, nothing recorded).
    pub(super) sid: u64,
    /// Ids handed out under a session and neither committed nor abandoned yet.
    pub(super) open: std::collections::BTreeSet<u64>,
    /// Batches `[start, end)` handed out under a session that may hold open ids.
    pub(super) batches: Vec<(u64, u64)>,
    /// What the engine holds for the session.
    pub(super) recorded: Vec<std::ops::Range<u64>>,
}

impl SliceIds {
    /// The ranges of ids the session may still commit; drops batches that have none.
    pub(super) fn ranges(&mut self) -> Vec<std::ops::Range<u64>> {
        let (next, end, open) = (self.next, self.end, &self.open);
        let mut out = Vec::new();
        self.batches.retain(|&(s, e)| {
            let mut ids = open.range(s..e);
            let lo = ids.next().copied();
            let r = if e == end {
                // The current batch: its ids not handed out yet are still to come.
                lo.unwrap_or(next).min(next)..e
            } else {
                match lo {
                    Some(lo) => lo..ids.next_back().map_or(lo, |&hi| hi) + 1,
                    None => return false,
                }
            };
            if r.is_empty() {
                return false;
            }
            out.push(r);
            true
        });
        out
    }
}

impl<E: KvEngine> KvMeta<E> {
    pub(super) fn alloc(
        &self,
        slot: &Mutex<IdBatch>,
        counter: &str,
        batch: u64,
        first: u64,
    ) -> Result<u64> {
        let mut s = slot.lock().unwrap();
        let s = &mut *s;
        if self.fresh_batch(counter, &mut s.epoch, s.high)? {
            s.next = s.end;
        }
        if s.next >= s.end {
            let end = self.kv.incr_by(&key::counter(counter), batch as i64)? as u64;
            (s.next, s.end) = (end.saturating_sub(batch).max(first), end);
            if s.next >= s.end {
                return Err(MetaError::Corrupt {
                    key: counter.into(),
                    msg: "id counter went backwards".into(),
                });
            }
        }
        let id = s.next;
        s.next += 1;
        s.high = s.high.max(s.next);
        Ok(id)
    }

    /// Whether the rest of a batch taken at engine epoch `*epoch` must be dropped, and
    /// the counter moved past `high` (one past the largest id this client handed out)
    /// first. A batch is taken with a bare increment, which a failover to a replica that
    /// had not received it undoes: the new server would hand the same ids to another
    /// client, and two files would share a slice's blocks or an inode number. So once the
    /// engine may have moved to another server (its epoch changed), the rest of the batch
    /// is not used, and before taking another the counter is raised past every id handed
    /// out here, so none is handed out again.
    pub(super) fn fresh_batch(&self, counter: &str, epoch: &mut u64, high: u64) -> Result<bool> {
        let now = self.kv.epoch();
        if now == *epoch {
            return Ok(false);
        }
        if high > 0 {
            let k = key::counter(counter);
            let cur = self.kv.incr_by(&k, 0)?.max(0) as u64;
            if cur < high {
                // Others may add meanwhile: the counter only ends further on.
                tracing::warn!(
                    counter,
                    from = cur,
                    to = high,
                    "the metadata server's id counter was behind ids this mount handed out \
                     (a failover lost them): moving it past them"
                );
                self.kv.incr_by(&k, (high - cur) as i64)?;
            }
        }
        *epoch = now;
        Ok(true)
    }

    pub(super) fn alloc_ino(&self) -> Result<Ino> {
        self.alloc(&self.inos, C_NEXT_INODE, INO_BATCH, 2)
    }

    /// [`crate::Chunks::new_slice_id`]: from the current batch, recorded for the session before
    /// any id of a new batch is used.
    pub(super) fn alloc_slice_id(&self) -> Result<u64> {
        let sid = self.sid();
        let mut s = self.slices.lock().unwrap();
        let st = &mut *s;
        if self.fresh_batch(C_NEXT_SLICE, &mut st.epoch, st.high)? {
            // The ids handed out stay open (a writer may still commit them); the rest of
            // the batch goes unused.
            st.next = st.end;
        }
        if s.next >= s.end || s.sid != sid {
            let end = self
                .kv
                .incr_by(&key::counter(C_NEXT_SLICE), SLICE_BATCH as i64)?
                as u64;
            let start = end.saturating_sub(SLICE_BATCH).max(1);
            if start >= end {
                return Err(MetaError::Corrupt {
                    key: C_NEXT_SLICE.into(),
                    msg: "id counter went backwards".into(),
                });
            }
            (s.next, s.end, s.sid) = (start, start, sid);
            if sid != 0 {
                // Recorded before any id of the batch is used (gc reads the records after
                // listing objects, so it sees every batch whose objects it listed).
                s.batches.push((start, end));
                s.end = end;
                if let Err(e) = self.record_slice_ids(&mut s, false) {
                    s.end = start;
                    return Err(e);
                }
            }
            s.end = end;
        }
        let id = s.next;
        s.next += 1;
        s.high = s.high.max(s.next);
        if sid != 0 {
            s.open.insert(id);
        }
        Ok(id)
    }

    /// Write the session's record of slice ids it may still commit, when it changed (or
    /// always, with `force`: the record was removed by a client that took us for dead).
    pub(super) fn record_slice_ids(&self, s: &mut SliceIds, force: bool) -> Result<()> {
        let sid = self.sid();
        if sid == 0 || s.sid != sid {
            return Ok(());
        }
        let ranges = s.ranges();
        if ranges == s.recorded && !force {
            return Ok(());
        }
        let v = key::encode_ranges(&ranges);
        self.txn(|t| {
            // Not over another mount's record, should a failover have given it this id.
            self.check_session(t)?;
            t.set(&key::reserved_slices(sid), v.clone());
            Ok(())
        })?;
        s.recorded = ranges;
        Ok(())
    }

    /// Ids committed or given up: no longer to be spared by gc (recorded lazily).
    pub(super) fn settle_slice_ids(&self, ids: impl IntoIterator<Item = u64>) {
        let mut s = self.slices.lock().unwrap();
        for id in ids {
            s.open.remove(&id);
        }
    }
}
