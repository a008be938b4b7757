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
        }
    }

    /// The next commits get these faults, in order (then the schedule goes on).
    pub fn force(&self, faults: &[Fault]) {
        let mut f = self.forced.lock().unwrap();
        f.extend(faults.iter().rev());
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

impl<E: KvEngine> KvRead for LossyKv<E> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get(key)
    }
    fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        self.inner.get_many(keys)
    }
    fn get_entry_attr(&self, entry_key: &[u8]) -> Result<EntryAttr> {
        self.inner.get_entry_attr(entry_key)
    }
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KvPair>> {
        self.inner.scan(start, end, limit)
    }
}

impl<E: KvEngine> KvEngine for LossyKv<E> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn txn(&self, f: &mut dyn FnMut(&mut dyn KvTxn) -> Result<()>) -> Result<()> {
        let fault = self.next_fault();
        let lost =
            |what: &str| MetaError::ambiguous(self.inner.name(), format!("injected: {what}"));
        match fault {
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
        self.inner.incr_by(key, delta)
    }

    fn clock(&self) -> Result<crate::Time> {
        self.inner.clock()
    }

    fn may_lose_replies(&self) -> bool {
        true
    }

    fn epoch(&self) -> u64 {
        self.inner.epoch()
    }
}
