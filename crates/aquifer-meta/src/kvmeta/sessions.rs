//! Sessions ([`Sessions`]): a mount's session started, kept alive and closed; where the
//! sessions of dead clients are reaped (`reap_dead_sessions`) and what they left is cleaned
//! up (`clean_session`: open files, locks, the record, lanes); liveness on a shared engine,
//! and what a session that lost it does.
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

use super::{KvMeta, C_NEXT_SESSION};
use crate::encoding as key;
use crate::error::{Errno, MetaError, Result};
use crate::kv::{KvEngine, KvTxn};
use crate::types::SessionInfo;
use crate::{Sessions, Volume};
use std::sync::atomic::Ordering;
use std::time::Duration;

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

impl<E: KvEngine> Sessions for KvMeta<E> {
    fn new_session(&self, mut info: SessionInfo) -> Result<u64> {
        self.load_format()?;
        if self.kv.exclusive() {
            // Nobody else can hold this store open: every recorded session is dead, and
            // so are the opens counted in memory under an earlier session of this client.
            self.forget_opens_here();
            let p = [b'S'];
            for (k, _) in self.kv.scan(&p, &key::prefix_end(&p), usize::MAX)? {
                self.clean_session(key::u64_at(&k, 1))?;
            }
            // Locks of dead sessions are void.
            for tag in [b'F', b'P'] {
                let p = [tag];
                for (k, _) in self.kv.scan(&p, &key::prefix_end(&p), usize::MAX)? {
                    self.txn(|t| {
                        t.delete(&k);
                        Ok(())
                    })?;
                }
            }
            // Sessions that died before registering may still have left open inodes.
            let p = [b'O'];
            for (k, _) in self.kv.scan(&p, &key::prefix_end(&p), usize::MAX)? {
                let (sid, ino) = (key::u64_at(&k, 1), key::u64_at(&k, 9));
                self.txn(|t| self.release_holder(t, sid, ino))?;
            }
        }
        let (sid, json) = loop {
            let sid = self.kv.incr_by(&key::counter(C_NEXT_SESSION), 1)? as u64;
            info.sid = sid;
            info.client = self.lanes.client();
            info.started = self.kv.clock()?.sec;
            info.heartbeat = info.started;
            info.timeout = self.session_timeout.as_secs();
            info.reaped = None;
            let json = serde_json::to_vec(&info).map_err(|e| MetaError::Config(e.to_string()))?;
            let k = key::session(sid);
            let fresh = self.txn(|t| {
                // A failover that lost an earlier increment hands its id out again: an id
                // with a record is another mount's.
                t.guess(&k, None);
                if t.get(&k)?.is_some() {
                    return Ok(false);
                }
                t.set(&k, json.clone());
                Ok(true)
            })?;
            if fresh {
                break (sid, json);
            }
            tracing::warn!(
                sid,
                "session id in use (a failover set the counter back): taking another"
            );
        };
        self.sid.store(sid, Ordering::Relaxed);
        *self.session.lock().unwrap() = Some(info);
        *self.session_record.lock().unwrap() = Some(json);
        self.lost.store(false, Ordering::Release);
        self.beat_seen();
        if !self.kv.exclusive() {
            self.reap_now()?;
        }
        Ok(sid)
    }

    fn heartbeat(&self) -> Result<()> {
        let Some(mut info) = self.session.lock().unwrap().clone() else {
            return Ok(());
        };
        if self.lost.load(Ordering::Acquire) {
            // Said once when found; nothing is kept alive any more.
            return Ok(());
        }
        // The server's time, read before the transaction: a reaper compares it with its
        // own reading of the same clock.
        let now = self.kv.clock()?.sec;
        info.heartbeat = now;
        let json = serde_json::to_vec(&info).map_err(|e| MetaError::Config(e.to_string()))?;
        let sid = info.sid;
        let alive = self.txn(|t| {
            // A record gone or marked reaped stays so: a heartbeat never brings back a
            // session whose locks and open files another client already released.
            if !self.record_alive(t.get(&key::session(sid))?.as_deref()) {
                return Ok(false);
            }
            t.set(&key::session(sid), json.clone());
            Ok(true)
        })?;
        if !alive {
            self.mark_lost(sid);
            return Ok(());
        }
        // Only the beat: an update_session made meanwhile keeps its change in memory, and
        // the next heartbeat writes it (update_session writes it at once as well).
        if let Some(s) = self.session.lock().unwrap().as_mut() {
            s.heartbeat = now;
        }
        *self.session_record.lock().unwrap() = Some(json);
        self.beat_seen();
        self.record_slice_ids(&mut self.slices.lock().unwrap(), false)?;
        let last = self.last_reap.load(Ordering::Relaxed) as i64;
        if !self.kv.exclusive() && now - last >= self.session_timeout.as_secs() as i64 / 2 {
            self.last_reap.store(now as u64, Ordering::Relaxed);
            self.reap_dead_sessions(now)?;
        }
        Ok(())
    }

    fn session(&self) -> Option<SessionInfo> {
        self.session.lock().unwrap().clone()
    }

    fn update_session(&self, change: &mut dyn FnMut(&mut SessionInfo)) -> Result<()> {
        match self.session.lock().unwrap().as_mut() {
            Some(info) => change(info),
            None => return Ok(()),
        }
        // The heartbeat writes the record from memory.
        self.heartbeat()
    }

    fn heartbeat_interval(&self) -> Duration {
        (self.session_timeout / 6).clamp(Duration::from_millis(200), Duration::from_secs(10))
    }

    fn close_session(&self) -> Result<()> {
        let sid = self.sid();
        // A record that names another client: a failover lost this session's id and
        // record, and another mount took the id since. What is recorded under the id is
        // that mount's, not to clean; only this client's lanes go.
        let theirs = sid != 0
            && !self.kv.exclusive()
            && self
                .kv
                .get(&key::session(sid))?
                .and_then(|v| serde_json::from_slice::<SessionInfo>(&v).ok())
                .is_some_and(|s| s.client != 0 && s.client != self.lanes.client());
        if theirs {
            tracing::warn!(sid, "this mount's session id belongs to another mount now (a failover lost it): leaving what is recorded under it");
        }
        if sid != 0 {
            if self.kv.exclusive() {
                // What they held is released below, and must not be recorded again as held.
                self.forget_opens_here();
            }
            if !theirs {
                self.clean_session(sid)?;
            }
            if self.kv.may_lose_replies() {
                self.delete_lanes(self.lanes.client())?;
                self.lanes.forget();
            }
        }
        self.kv.sync()
    }

    fn list_sessions(&self) -> Result<Vec<SessionInfo>> {
        let p = [b'S'];
        let mut out = Vec::new();
        for (_, v) in self.kv.scan(&p, &key::prefix_end(&p), usize::MAX)? {
            if let Ok(s) = serde_json::from_slice(&v) {
                out.push(s);
            }
        }
        Ok(out)
    }
}

impl<E: KvEngine> KvMeta<E> {
    /// On an exclusive engine, opens are counted in memory (`files.rs`) and end with the
    /// session: forgotten, so that releasing what the session held does not record it as
    /// held again (has_holders).
    fn forget_opens_here(&self) {
        for shard in &self.open {
            shard.lock().unwrap().clear();
        }
        self.recorded.lock().unwrap().clear();
    }

    /// What a session leaves behind, removed: its open files (freed when unlinked and no
    /// other session has them open), its locks, its record.
    fn clean_session(&self, sid: u64) -> Result<()> {
        for (prefix, locks) in [
            (key::sustained_prefix(sid), false),
            (key::lock_index_prefix(sid), true),
        ] {
            loop {
                let page = self.kv.scan(&prefix, &key::prefix_end(&prefix), 256)?;
                if page.is_empty() {
                    break;
                }
                for (k, _) in page {
                    let ino = key::u64_at(&k, 9);
                    if locks {
                        self.txn(|t| Self::drop_session_locks(t, sid, ino))?;
                    } else {
                        self.txn(|t| self.release_holder(t, sid, ino))?;
                    }
                }
            }
        }
        let client = self
            .kv
            .get(&key::session(sid))?
            .and_then(|v| serde_json::from_slice::<SessionInfo>(&v).ok())
            .map_or(0, |s| s.client);
        self.txn(|t| {
            t.delete(&key::session(sid));
            t.delete(&key::reserved_slices(sid));
            Ok(())
        })?;
        // The session's transaction lanes: nothing of it commits any more (this client's
        // own go when it closes its session: it may have had an older one).
        if client != 0 && client != self.lanes.client() {
            self.delete_lanes(client)?;
        }
        Ok(())
    }

    /// Delete the lanes of `client`, outside any lane: a delete run twice does no harm.
    fn delete_lanes(&self, client: u64) -> Result<()> {
        let p = key::lane_prefix(client);
        for (k, _) in self.kv.scan(&p, &key::prefix_end(&p), usize::MAX)? {
            let del = || {
                self.kv.txn(&mut |t| {
                    t.delete(&k);
                    Ok(())
                })
            };
            if let Err(e) = del() {
                if !e.is_ambiguous() {
                    return Err(e);
                }
                del()?;
            }
        }
        Ok(())
    }

    /// On engines other clients share: clean up after sessions whose heartbeat stopped.
    /// Times are the engine's (the server's clock, [`KvEngine::clock`]), never this
    /// client's: a mount whose clock is minutes off is judged by when its heartbeats
    /// reached the server. A session is only cleaned up after it was marked reaped in a
    /// transaction that found its heartbeat unchanged (see [`KvMeta::mark_reaped`]).
    fn reap_dead_sessions(&self, now: i64) -> Result<usize> {
        // Heartbeats were stamped by the server of the time; after a failover the new
        // master's clock may differ from the old one's. Wait one timeout after the engine
        // moved, so every live session has stamped a heartbeat on the new clock.
        {
            let epoch = self.kv.epoch();
            let mut seen = self.epoch_seen.lock().unwrap();
            if seen.0 != epoch {
                *seen = (epoch, Some(std::time::Instant::now()));
            }
            if seen.1.is_some_and(|t| t.elapsed() < self.session_timeout) {
                return Ok(0);
            }
        }
        let mine = self.session_timeout.as_secs() as i64;
        let mut reaped = 0;
        for s in self.list_sessions()? {
            if s.sid == self.sid() {
                continue;
            }
            // A session that runs with a longer timeout than ours gets its own.
            let timeout = mine.max(s.timeout.min(i64::MAX as u64) as i64);
            if s.reaped.is_none() && now - s.heartbeat <= timeout {
                continue;
            }
            if !self.mark_reaped(&s, now, timeout)? {
                continue;
            }
            tracing::warn!(
                sid = s.sid,
                host = %s.hostname,
                mount_point = %s.mount_point,
                last_heartbeat = s.heartbeat,
                server_time = now,
                "cleaning up after a session that stopped heartbeating"
            );
            self.clean_session(s.sid)?;
            reaped += 1;
        }
        Ok(reaped)
    }

    /// Look for dead sessions now, whatever the time since the last look (tests, `status`).
    pub fn reap_now(&self) -> Result<usize> {
        let now = self.kv.clock()?.sec;
        self.last_reap.store(now as u64, Ordering::Relaxed);
        self.reap_dead_sessions(now)
    }
}

#[cfg(test)]
mod tests;
