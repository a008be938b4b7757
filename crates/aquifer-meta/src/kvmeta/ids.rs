//! Ids this client hands out: inode numbers, slice ids and trash ids come in batches from
//! counters, one round trip per batch, and a batch is dropped once the engine may have
//! moved to another server (a failover can set a counter back).

use super::{KvMeta, C_NEXT_INODE, INO_BATCH};
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
}
