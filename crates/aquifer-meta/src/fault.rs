//! A fault-injecting engine for tests: commits whose answers are lost.
//!
//! [`LossyKv`] wraps any engine and, on a seeded schedule, answers a commit with
//! [`MetaError::Ambiguous`] (as a timeout, a reset connection or a failover would) in one
//! of two ways: **applied, answer lost** — the commit went through; **not applied, answer
//! lost** — the transaction ran its reads and its commit never arrived. The metadata
//! conformance suite runs on it for every engine, and the data path's tests run
//! compaction, truncate, unlink and trash over it: every operation must come out as if no
//! answer had been lost.

use crate::error::{MetaError, Result};
use crate::kv::{BufferedTxn, EntryAttr, KvEngine, KvPair, KvRead, KvTxn, TxnWrites};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// What happened to one commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Applied, answered.
    None,
    /// Applied, then the answer was lost.
    AppliedLost,
    /// Not applied, and no answer.
    NotApplied,
    /// Not applied yet, no answer; the commit is held and can be delivered later with
    /// [`LossyKv::deliver_late`] (a request queued in a paused server).
    Late,
    /// Applied, the answer lost, then a failover to a replica that lacks this commit and
    /// the given number of commits before it (needs [`LossyKv::keep_undo`]).
    LostInFailover(usize),
    /// Applied, the answer lost, then the engine answers nothing to the given number of
    /// calls (reads and commits): the client cannot learn what happened.
    AppliedThenAway(u64),
}

/// An engine whose commits lose their answers now and then.
pub struct LossyKv<E> {
    inner: E,
    rng: Mutex<u64>,
    /// One commit in `every` gets a fault (0: none, unless forced).
    every: u64,
    /// Faults for the next commits, before the schedule.
    forced: Mutex<Vec<Fault>>,
    /// Writes of the commit held by [`Fault::Late`].
    held: Mutex<Option<TxnWrites>>,
    injected: AtomicU64,
    /// Calls still to fail, after [`Fault::AppliedThenAway`].
    away: AtomicU64,
    /// Added to the inner engine's epoch by [`LossyKv::fail_over`].
    epoch: AtomicU64,
    /// For each commit since [`LossyKv::keep_undo`], what the keys it wrote held before.
    undo: Mutex<Option<Vec<Undo>>>,
}

type Undo = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// A transaction that notes what each key it writes held before.
struct Undoing<'a> {
    t: &'a mut dyn KvTxn,
    before: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    failed: Option<MetaError>,
}

impl Undoing<'_> {
    fn note(&mut self, key: &[u8]) {
        if self.before.iter().any(|(k, _)| k == key) {
            return;
        }
        match self.t.get(key) {
            Ok(v) => self.before.push((key.to_vec(), v)),
            Err(e) => self.failed = Some(e),
        }
    }
}

impl KvTxn for Undoing<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.t.get(key)
    }
    fn get_many(&mut self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        self.t.get_many(keys)
    }
    fn scan(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KvPair>> {
        self.t.scan(start, end, limit)
    }
    fn set(&mut self, key: &[u8], value: Vec<u8>) {
        self.note(key);
        self.t.set(key, value)
    }
    fn delete(&mut self, key: &[u8]) {
        self.note(key);
        self.t.delete(key)
    }
    fn add(&mut self, key: &[u8], delta: i64) {
        self.t.add(key, delta)
    }
    fn guess(&mut self, key: &[u8], value: Option<Vec<u8>>) -> bool {
        self.t.guess(key, value)
    }
}

impl<E: KvEngine> LossyKv<E> {
    /// Lose one commit's answer in about `every` (alternating the kinds of fault), from a
    /// schedule given by `seed`.
    pub fn new(inner: E, seed: u64, every: u64) -> Self {
        LossyKv {
            inner,
            rng: Mutex::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            every,
            forced: Mutex::new(Vec::new()),
            held: Mutex::new(None),
            injected: AtomicU64::new(0),
            away: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            undo: Mutex::new(None),
        }
    }

    /// From now on remember what each commit overwrote, for [`LossyKv::fail_over`].
    pub fn keep_undo(&self) {
        self.undo.lock().unwrap().get_or_insert_with(Vec::new);
    }

    /// A failover to a replica that never received the last `n` commits (a bare
    /// increment counts as one; additions inside commits are not undone): they are undone
    /// and the engine's epoch moves.
    pub fn fail_over(&self, n: usize) -> Result<()> {
        let undone: Vec<Undo> = {
            let mut u = self.undo.lock().unwrap();
            let stack = u.get_or_insert_with(Vec::new);
            let keep = stack.len().saturating_sub(n);
            stack.split_off(keep)
        };
        self.inner.txn(&mut |t| {
            for before in undone.iter().rev() {
                for (k, v) in before {
                    match v {
                        Some(v) => t.set(k, v.clone()),
                        None => t.delete(k),
                    }
                }
            }
            Ok(())
        })?;
        self.epoch.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// The next commits get these faults, in order (then the schedule goes on).
    pub fn force(&self, faults: &[Fault]) {
        let mut f = self.forced.lock().unwrap();
        f.extend(faults.iter().rev());
    }

    /// Run `f` on the inner engine, noting what its writes overwrite.
    fn txn_undoable(&self, f: &mut dyn FnMut(&mut dyn KvTxn) -> Result<()>) -> Result<()> {
        let mut before = Vec::new();
        self.inner.txn(&mut |t| {
            let mut u = Undoing {
                t,
                before: Vec::new(),
                failed: None,
            };
            let r = f(&mut u);
            if let Some(e) = u.failed.take() {
                return Err(e);
            }
            before = std::mem::take(&mut u.before);
            r
        })?;
        if !before.is_empty() {
            self.undo
                .lock()
                .unwrap()
                .get_or_insert_with(Vec::new)
                .push(before);
        }
        Ok(())
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    pub fn inner(&self) -> &E {
        &self.inner
    }

    /// Deliver the commit a [`Fault::Late`] held back, as the engine would run it now:
    /// it applies only if every value it read or guessed is still what it saw. Returns
    /// whether it applied.
    pub fn deliver_late(&self) -> Result<bool> {
        let Some(w) = self.held.lock().unwrap().take() else {
            return Ok(false);
        };
        let mut applied = false;
        self.inner.txn(&mut |t| {
            applied = false;
            for (k, v) in &w.guesses {
                if t.get(k)? != *v {
                    return Ok(());
                }
            }
            for (k, v) in &w.writes {
                match v {
                    Some(v) => t.set(k, v.clone()),
                    None => t.delete(k),
                }
            }
            for (k, d) in &w.adds {
                t.add(k, *d);
            }
            applied = true;
            Ok(())
        })?;
        Ok(applied)
    }

    fn next_fault(&self) -> Fault {
        if let Some(f) = self.forced.lock().unwrap().pop() {
            return f;
        }
        if self.every == 0 {
            return Fault::None;
        }
        let mut x = self.rng.lock().unwrap();
        // xorshift64*
        *x ^= *x >> 12;
        *x ^= *x << 25;
        *x ^= *x >> 27;
        let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        if !r.is_multiple_of(self.every) {
            return Fault::None;
        }
        if (r / self.every).is_multiple_of(2) {
            Fault::AppliedLost
        } else {
            Fault::NotApplied
        }
    }
}

impl<E: KvEngine> LossyKv<E> {
    /// Fail this call if the engine is away ([`Fault::AppliedThenAway`]).
    fn reachable(&self) -> Result<()> {
        let gone = self
            .away
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        match gone {
            true => Err(MetaError::engine(self.inner.name(), "injected: no answer")),
            false => Ok(()),
        }
    }
}

impl<E: KvEngine> KvRead for LossyKv<E> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.reachable()?;
        self.inner.get(key)
    }
    fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        self.reachable()?;
        self.inner.get_many(keys)
    }
    fn get_entry_attr(&self, entry_key: &[u8]) -> Result<EntryAttr> {
        self.reachable()?;
        self.inner.get_entry_attr(entry_key)
    }
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KvPair>> {
        self.reachable()?;
        self.inner.scan(start, end, limit)
    }
}

impl<E: KvEngine> KvEngine for LossyKv<E> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn txn(&self, f: &mut dyn FnMut(&mut dyn KvTxn) -> Result<()>) -> Result<()> {
        self.reachable()?;
        let fault = self.next_fault();
        let lost =
            |what: &str| MetaError::ambiguous(self.inner.name(), format!("injected: {what}"));
        match fault {
            Fault::LostInFailover(n) => {
                self.txn_undoable(f)?;
                self.fail_over(n + 1)?;
                self.injected.fetch_add(1, Ordering::Relaxed);
                Err(lost("applied, answer lost, lost again in a failover"))
            }
            Fault::AppliedThenAway(n) => {
                self.inner.txn(f)?;
                self.injected.fetch_add(1, Ordering::Relaxed);
                self.away.store(n, Ordering::SeqCst);
                Err(lost("applied, answer lost, then no answer at all"))
            }
            Fault::None if self.undo.lock().unwrap().is_some() => self.txn_undoable(f),
            Fault::None => self.inner.txn(f),
            Fault::AppliedLost => {
                self.inner.txn(f)?;
                self.injected.fetch_add(1, Ordering::Relaxed);
                Err(lost("applied, answer lost"))
            }
            Fault::NotApplied | Fault::Late => {
                // The transaction runs its reads; its commit goes nowhere (or waits). Its
                // guesses are kept to be checked should it arrive late.
                let mut txn = BufferedTxn::with_guesses(&self.inner, true);
                let r = f(&mut txn);
                let w = txn.into_writes();
                // A transaction that failed, or wrote nothing, sent no commit to lose.
                if r.is_err() || w.is_empty() {
                    if !w.guesses.is_empty() {
                        // Its result may rest on a guess: answer from real reads.
                        return self.inner.txn(f);
                    }
                    return r;
                }
                self.injected.fetch_add(1, Ordering::Relaxed);
                if fault == Fault::Late {
                    *self.held.lock().unwrap() = Some(w);
                }
                Err(lost("not applied, answer lost"))
            }
        }
    }

    fn feed(&self) -> Option<Box<dyn crate::KvFeed>> {
        self.inner.feed()
    }

    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }

    fn sync_on_close(&self) -> Result<()> {
        self.inner.sync_on_close()
    }

    fn exclusive(&self) -> bool {
        self.inner.exclusive()
    }

    fn incr_by(&self, key: &[u8], delta: i64) -> Result<i64> {
        // An increment is a write a failover can lose like any other.
        let before = match self.undo.lock().unwrap().is_some() && delta != 0 {
            true => Some(self.inner.get(key)?),
            false => None,
        };
        let v = self.inner.incr_by(key, delta)?;
        if let (Some(before), Some(u)) = (before, self.undo.lock().unwrap().as_mut()) {
            u.push(vec![(key.to_vec(), before)]);
        }
        Ok(v)
    }

    fn clock(&self) -> Result<crate::Time> {
        self.inner.clock()
    }

    fn may_lose_replies(&self) -> bool {
        true
    }

    fn epoch(&self) -> u64 {
        self.inner.epoch() + self.epoch.load(Ordering::SeqCst)
    }
}
