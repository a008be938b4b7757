//! Liveness of sessions on a shared engine, and what a session that lost it does.
//!
//! **One clock.** A session's `started` and `heartbeat` are stamped with the engine's clock
//! ([`KvEngine::clock`]: Redis `TIME` on a shared engine), and a reaper compares them with
//! its own reading of that same clock. No mount's own clock takes part, so a mount whose
//! clock is minutes off is neither reaped while it heartbeats nor kept alive after it stops.
//!
//! **Reaping is compare-and-mark.** A reaper that finds a heartbeat older than the timeout
//! (the larger of its own and the session's) first marks the record `reaped`, in a
//! transaction that re-reads it and finds the same heartbeat; only then does it release the
//! session's locks and open files and finally delete the record. A heartbeat is a
//! transaction that refuses a record that is gone or marked: the two cannot both win, so a
//! session is never cleaned up while it heartbeats, and a reaped one never comes back.
//!
//! **A reaped session stops.** What it held is gone (its locks are others' to take; an
//! unlinked file it had open may be freed), so nothing it does may rely on it. The
//! transactions that record something for the session (a first open, a lock) check its
//! record inside the transaction and fail with EIO once it is gone or marked; the heartbeat
//! that finds it so logs one error line, and from then on every operation of the mount on
//! the volume fails with EIO until a new session starts (a remount).

use super::KvMeta;
use crate::encoding as key;
use crate::error::{Errno, MetaError, Result};
use crate::kv::{KvEngine, KvTxn};
use crate::types::SessionInfo;
use std::sync::atomic::Ordering;

impl<E: KvEngine> KvMeta<E> {
    /// EIO once this session is lost. When no heartbeat of this client has reached the
    /// engine for longer than the timeout (the mount was stopped, or cut off), another
    /// client may have reaped it meanwhile: the session's record is looked at first, so a
    /// mount that resumes does not act on what it held before its heartbeat thread runs.
    pub(super) fn alive(&self) -> Result<()> {
        if self.lost.load(Ordering::Acquire) {
            return Err(MetaError::Sys(Errno::EIO));
        }
        let sid = self.sid();
        if sid == 0 || self.kv.exclusive() {
            return Ok(());
        }
        let since = (self.born.elapsed().as_millis() as u64)
            .saturating_sub(self.beat_ms.load(Ordering::Acquire));
        if since <= self.session_timeout.as_millis() as u64 {
            return Ok(());
        }
        if self.record_alive(self.kv.get(&key::session(sid))?.as_deref()) {
            return Ok(());
        }
        self.mark_lost(sid);
        Err(MetaError::Sys(Errno::EIO))
    }

    /// A heartbeat (or the session's start) reached the engine now.
    pub(super) fn beat_seen(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.beat_ms.store(ms, Ordering::Release);
    }

    /// Take this session as lost; said once, in the log.
    pub(super) fn mark_lost(&self, sid: u64) {
        if !self.lost.swap(true, Ordering::AcqRel) {
            tracing::error!(
                sid,
                "this mount's session was taken for dead by another client (no heartbeat \
                 reached the metadata server within the session timeout) and the locks and \
                 open files it held were released: every operation on this mount now fails \
                 with EIO; unmount and mount again"
            );
        }
    }

    /// True for a session record that exists, is not marked reaped, and is this client's:
    /// a failover that lost the increment which gave this session its id may give the id
    /// to another mount, whose record must not keep this session alive (their locks and
    /// open files would mix).
    pub(super) fn record_alive(&self, record: Option<&[u8]>) -> bool {
        let me = self.lanes.client();
        match record {
            None => false,
            // An unreadable record is not ours to judge: only absence or the mark count.
            Some(v) => serde_json::from_slice::<SessionInfo>(v).map_or(true, |s| {
                s.reaped.is_none() && (s.client == 0 || s.client == me)
            }),
        }
    }

    /// Inside a transaction that records something for this session (an open file, a
    /// lock): fail with EIO, and take the session as lost, when another client has reaped
    /// it. The record is read in the transaction, so a reaper's mark and this transaction
    /// are ordered: whatever this one records, the reaper's clean-up finds. On a shared
    /// engine the read costs no round trip as a rule: the record as last written here is
    /// given as a guess, checked at commit.
    pub(super) fn check_session(&self, t: &mut dyn KvTxn) -> Result<()> {
        let sid = self.sid();
        if self.kv.exclusive() || sid == 0 {
            // Nobody else can reap an exclusive engine's session; sid 0 is a tool
            // without a session.
            return Ok(());
        }
        let k = key::session(sid);
        if let Some(v) = self.session_record.lock().unwrap().clone() {
            t.guess(&k, Some(v));
        }
        if self.record_alive(t.get(&k)?.as_deref()) {
            return Ok(());
        }
        self.mark_lost(sid);
        Err(MetaError::Sys(Errno::EIO))
    }

    /// Mark session `s` reaped if its record still holds the heartbeat the reaper saw and
    /// that heartbeat is more than `timeout` seconds older than `now` (both on the engine's
    /// clock). False when the session heartbeated meanwhile or is gone.
    pub(super) fn mark_reaped(&self, s: &SessionInfo, now: i64, timeout: i64) -> Result<bool> {
        let k = key::session(s.sid);
        self.txn(|t| {
            let Some(v) = t.get(&k)? else {
                return Ok(false);
            };
            let Ok(mut cur) = serde_json::from_slice::<SessionInfo>(&v) else {
                return Ok(false);
            };
            if cur.reaped.is_some() {
                // Another reaper began and did not finish: finish its clean-up.
                return Ok(true);
            }
            if cur.heartbeat != s.heartbeat || now - cur.heartbeat <= timeout {
                return Ok(false);
            }
            cur.reaped = Some(now);
            let json = serde_json::to_vec(&cur).map_err(|e| MetaError::Config(e.to_string()))?;
            t.set(&k, json);
            Ok(true)
        })
    }
}

#[cfg(test)]
mod tests;
