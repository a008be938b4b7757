//! Transactions and the memory of guesses: every metadata operation runs through
//! [`KvMeta::txn`], which guesses what a shared engine holds from what this client saw last,
//! and, on an engine that may lose a commit's answer, moves one of the client's lanes so a
//! lost answer is fenced instead of the change being run twice.

use super::{KvMeta, HINTS_MAX, HINT_VALUE_MAX};
use crate::error::{MetaError, Result};
use crate::kv::{KvEngine, KvTxn};
use crate::lanes;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

impl<E: KvEngine> KvMeta<E> {
    /// Run `f` as one transaction. On a shared engine it sees the engine through
    /// [`Remembering`]: attributes, entries and slice lists are guessed from
    /// [`KvMeta::hints`] at their first read, and what the committed run read and wrote of
    /// them is remembered.
    ///
    /// On an engine that can lose a commit's answer, a writing transaction also moves one
    /// of this client's lanes (`lanes.rs`): when the outcome of its commit is unknown, a
    /// fence finds out whether it was applied — then the result of the run that committed
    /// is the answer — or makes sure it never is, and only then is `f` run again. So a
    /// change is applied once, and its caller hears what that one application did.
    pub(super) fn txn<T>(&self, mut f: impl FnMut(&mut dyn KvTxn) -> Result<T>) -> Result<T> {
        let did_not_run = || MetaError::engine(self.kv.name(), "transaction did not run");
        if !self.kv.may_lose_replies() {
            let (r, out, ..) = self.txn_once(&mut f, None);
            r?;
            return out.ok_or_else(did_not_run);
        }
        // Each round is a full run with fresh reads. A round ends in a known outcome unless
        // the engine stays away past its own retry deadline during the fence.
        let mut last = None;
        let start = std::time::Instant::now();
        for round in 0.. {
            if round >= 8 && start.elapsed() > Duration::from_secs(60) {
                break;
            }
            let mut lane = self.lanes.take();
            let (r, out, wrote, found) = self.txn_once(&mut f, Some(&lane));
            if let Some(v) = found {
                self.lost_changes("a transaction found its lane behind");
                lane.found(v);
            }
            match r {
                Ok(()) => {
                    if wrote {
                        lane.advance();
                    }
                    self.lanes.give_back(lane);
                    return out.ok_or_else(did_not_run);
                }
                Err(e) if e.is_ambiguous() => match self.lanes.fence(&self.kv, &mut lane) {
                    Ok(lanes::Fenced::Applied) => {
                        self.lanes.give_back(lane);
                        // The run that reached the commit is the one that was applied.
                        return out.ok_or(e);
                    }
                    Ok(lanes::Fenced::NotApplied) => {
                        self.lanes.give_back(lane);
                        tracing::debug!(error = %e, "a commit whose answer was lost was not applied; running it again");
                        last = Some(e);
                    }
                    // Whether it applied cannot be known (the lane lost its history): it is
                    // not run again, and the mount vouches for nothing any more.
                    Ok(lanes::Fenced::Behind) => {
                        self.lanes.give_back(lane);
                        self.lost_changes("a fence found its lane behind");
                        return Err(e);
                    }
                    // What the lane holds is unknown: it is not used again.
                    Err(fe) => {
                        tracing::warn!(error = %e, fence = %fe, "could not learn whether a metadata change was applied");
                        self.lanes.drop_lane(lane);
                        return Err(e);
                    }
                },
                Err(e) => {
                    // Not applied (the engine knows): the lane did not move.
                    self.lanes.give_back(lane);
                    return Err(e);
                }
            }
        }
        // Every round's fence found its commit not applied: the outcome is known (nothing
        // applied), so the error is not an ambiguous one (a writer keeps its data to retry).
        Err(match last {
            Some(e) => MetaError::engine(
                self.kv.name(),
                format!("no answer to any try of a commit (none applied): {e}"),
            ),
            None => did_not_run(),
        })
    }

    /// Note that the server lost changes it had acknowledged to this client.
    pub(super) fn lost_changes(&self, how: &str) {
        if !self.diverged.swap(true, Ordering::SeqCst) {
            tracing::error!(
                how,
                "the metadata server lost changes it had acknowledged to this mount (a failover \
                 to a replica that lacked them): from now on fsync and close fail with EIO, as \
                 data they would vouch for may be gone; unmount and mount again"
            );
        }
    }

    /// After a sync: when the engine may have moved to another server since the last look,
    /// check that this client's last commits are there (each lane holds what this client
    /// left in it, or what a transaction running now writes). A sync that cannot vouch for
    /// them fails.
    pub(super) fn check_lanes(&self) -> Result<()> {
        if !self.kv.may_lose_replies() {
            return Ok(());
        }
        let epoch = self.kv.epoch();
        if !self.diverged.load(Ordering::SeqCst)
            && self.lanes_checked.load(Ordering::SeqCst) != epoch
        {
            if self.lanes.check(&self.kv)? {
                self.lanes_checked.store(epoch, Ordering::SeqCst);
            } else {
                self.lost_changes("a sync after a failover found lanes behind");
            }
        }
        if self.diverged.load(Ordering::SeqCst) {
            return Err(MetaError::engine(
                self.kv.name(),
                "the server lost changes it had acknowledged to this mount (a failover); remount",
            ));
        }
        Ok(())
    }

    /// One run of [`KvMeta::txn`]'s transaction through the engine. With a lane, a run that
    /// writes also moves the lane. Returns the engine's answer, the value of the last run
    /// of `f` (the one that reached the commit), whether that run wrote anything, and what
    /// it found the lane holding when that was not what this client had left there.
    #[allow(clippy::type_complexity)]
    pub(super) fn txn_once<T>(
        &self,
        f: &mut impl FnMut(&mut dyn KvTxn) -> Result<T>,
        lane: Option<&lanes::Lane>,
    ) -> (Result<()>, Option<T>, bool, Option<Option<Vec<u8>>>) {
        let mut out = None;
        let mut wrote = false;
        let mut found = None;
        let shared = !self.kv.exclusive();
        let mut seen = Vec::new();
        let r = self.kv.txn(&mut |t| {
            out = None;
            let mut w = Tracking { t, wrote: false };
            let v = if !shared {
                f(&mut w)?
            } else {
                let mut r = Remembering {
                    t: &mut w,
                    hints: &self.hints,
                    seen: Vec::new(),
                };
                let v = f(&mut r)?;
                seen = r.seen;
                v
            };
            wrote = w.wrote;
            found = None;
            if let (Some(lane), true) = (lane, w.wrote) {
                let k = self.lanes.key(lane);
                let expected = lane.expected();
                // Taken on trust where the engine checks guesses at commit (no round trip).
                // A real read that finds something else (a failover lost the lane's last
                // moves) is what this commit then expects: it writes a value the lane never
                // held, so a fence still tells whether it applied.
                if !w.t.guess(&k, expected.clone()) {
                    let v = w.t.get(&k)?;
                    if v != expected {
                        found = Some(v);
                    }
                }
                w.t.set(&k, lane.next());
            }
            out = Some(v);
            Ok(())
        });
        if r.is_ok() && !seen.is_empty() {
            let mut h = self.hints.lock().unwrap();
            for (k, v) in seen {
                remember(&mut h, k, v);
            }
        }
        (r, out, wrote, found)
    }
}

/// Put what `key` holds into the memory of guesses: `Some(value)` (`None`: absent), or
/// `None` to forget it. Long values (a chunk of many slices) are not kept, and a full
/// memory starts over, so it stays within HINTS_MAX × HINT_VALUE_MAX.
pub(super) fn remember(h: &mut Hints, key: Vec<u8>, value: Noted) {
    match value {
        Some(Some(v)) if v.len() > HINT_VALUE_MAX => {
            h.remove(&key);
        }
        Some(v) => {
            if h.len() >= HINTS_MAX && !h.contains_key(&key) {
                h.clear();
            }
            h.insert(key, v);
        }
        None => {
            h.remove(&key);
        }
    }
}

pub(super) type Hints = HashMap<Vec<u8>, Option<Vec<u8>>>;
/// What a transaction left of a remembered key: `Some(value)` (`None`: absent), or `None`
/// to forget it.
pub(super) type Noted = Option<Option<Vec<u8>>>;

/// A transaction that notes whether it wrote anything (then its commit moves a lane).
struct Tracking<'a> {
    t: &'a mut dyn KvTxn,
    wrote: bool,
}

impl KvTxn for Tracking<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.t.get(key)
    }
    fn get_many(&mut self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        self.t.get_many(keys)
    }
    fn scan(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<crate::KvPair>> {
        self.t.scan(start, end, limit)
    }
    fn set(&mut self, key: &[u8], value: Vec<u8>) {
        self.wrote = true;
        self.t.set(key, value);
    }
    fn delete(&mut self, key: &[u8]) {
        self.wrote = true;
        self.t.delete(key);
    }
    fn add(&mut self, key: &[u8], delta: i64) {
        self.wrote = true;
        self.t.add(key, delta);
    }
    fn guess(&mut self, key: &[u8], value: Option<Vec<u8>>) -> bool {
        self.t.guess(key, value)
    }
}

/// A transaction on a shared engine, seen through by [`KvMeta`]: the first read of an
/// attribute, entry or slice list offers the remembered value as a guess
/// ([`KvTxn::guess`]), and every value of those read or written is noted, to be remembered
/// once the transaction commits. One place for what the metadata operations would
/// otherwise each guess and remember by hand.
struct Remembering<'a> {
    t: &'a mut dyn KvTxn,
    hints: &'a Mutex<Hints>,
    /// Read or written, in order (the last wins); `None`: forget (a deleted inode's keys).
    seen: Vec<(Vec<u8>, Noted)>,
}

/// Keys worth remembering: attributes, directory entries, slice lists.
pub(super) fn remembered(key: &[u8]) -> bool {
    matches!(key.first(), Some(b'I' | b'E' | b'C'))
}

impl Remembering<'_> {
    /// Offer guesses for the keys of a read not seen yet in this transaction.
    pub(super) fn offer(&mut self, keys: &[&[u8]]) {
        let fresh: Vec<&[u8]> = keys
            .iter()
            .copied()
            .filter(|k| remembered(k) && !self.seen.iter().any(|(s, _)| s == k))
            .collect();
        if fresh.is_empty() {
            return;
        }
        let h = self.hints.lock().unwrap();
        for k in fresh {
            if let Some(v) = h.get(k) {
                self.t.guess(k, v.clone());
            }
        }
    }

    pub(super) fn note(&mut self, key: &[u8], value: Noted) {
        if remembered(key) {
            self.seen.push((key.to_vec(), value));
        }
    }
}

impl KvTxn for Remembering<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.offer(&[key]);
        let v = self.t.get(key)?;
        self.note(key, Some(v.clone()));
        Ok(v)
    }

    fn get_many(&mut self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        self.offer(keys);
        let vs = self.t.get_many(keys)?;
        for (k, v) in keys.iter().zip(&vs) {
            self.note(k, Some(v.clone()));
        }
        Ok(vs)
    }

    fn scan(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<crate::KvPair>> {
        self.t.scan(start, end, limit)
    }

    fn set(&mut self, key: &[u8], value: Vec<u8>) {
        let noted = (value.len() <= HINT_VALUE_MAX).then(|| value.clone());
        self.note(key, noted.map(Some));
        self.t.set(key, value);
    }

    fn delete(&mut self, key: &[u8]) {
        // A name that went is worth remembering as absent (a create may follow); a freed
        // inode's attributes and slice lists are not.
        let absent = (key.first() == Some(&b'E')).then_some(None);
        self.note(key, absent);
        self.t.delete(key);
    }

    fn add(&mut self, key: &[u8], delta: i64) {
        self.t.add(key, delta);
    }

    fn guess(&mut self, key: &[u8], value: Option<Vec<u8>>) -> bool {
        self.t.guess(key, value)
    }
}
