//! The memory budget of buffered writes: how much a writer may hold, and what happens when
//! it is spent.
//!
//! Every byte a writer buffers — the tails of open slices, blocks queued for upload or being
//! uploaded, blocks whose upload failed and are kept for a retry — is held against one
//! [`Budget`] (half of `--buffer-size`). A writer that would go past it waits, never fails:
//! for the uploads on their way to give their bytes back, and only if they cannot cover it,
//! having the idlest writers' tails sealed and uploaded too ([`ChunkStore::make_room`]).

use crate::write::FileWriter;
use crate::ChunkStore;
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Bytes of buffered write data allowed in memory at once.
pub struct Budget {
    used: Mutex<usize>,
    cv: Condvar,
    cap: usize,
}

impl Budget {
    pub fn new(cap: usize) -> Arc<Budget> {
        Arc::new(Budget {
            used: Mutex::new(0),
            cv: Condvar::new(),
            cap: cap.max(1),
        })
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    pub fn used(&self) -> usize {
        *self.used.lock()
    }

    /// Take `n` bytes if they fit. A request is always let through when nothing is held, so
    /// one block larger than the whole budget still makes progress.
    pub fn try_acquire(self: &Arc<Self>, n: usize) -> Option<Held> {
        let mut u = self.used.lock();
        if *u + n <= self.cap || *u == 0 {
            *u += n;
            Some(Held {
                budget: Some(self.clone()),
                bytes: n,
            })
        } else {
            None
        }
    }

    /// Take `n` bytes whether or not they fit: for the few bytes by which a buffer's real
    /// capacity exceeds what was asked for.
    pub fn force(self: &Arc<Self>, n: usize) -> Held {
        *self.used.lock() += n;
        Held {
            budget: Some(self.clone()),
            bytes: n,
        }
    }

    /// Wait until `n` bytes could be taken (or `timeout` passes); does not take them.
    pub fn wait_for(&self, n: usize, timeout: Duration) {
        let mut u = self.used.lock();
        if *u + n > self.cap && *u != 0 {
            self.cv.wait_for(&mut u, timeout);
        }
    }

    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut u = self.used.lock();
        *u = u.saturating_sub(n);
        self.cv.notify_all();
    }
}

/// Bytes held against a [`Budget`]; given back when dropped.
#[derive(Default)]
pub struct Held {
    budget: Option<Arc<Budget>>,
    bytes: usize,
}

impl Held {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Add what `other` holds to this hold.
    pub fn merge(&mut self, mut other: Held) {
        if self.budget.is_none() {
            self.budget = other.budget.take();
        }
        self.bytes += std::mem::take(&mut other.bytes);
    }

    /// Split `n` bytes (at most what is held) off into a hold of their own.
    pub fn split(&mut self, n: usize) -> Held {
        let n = n.min(self.bytes);
        self.bytes -= n;
        Held {
            budget: self.budget.clone(),
            bytes: n,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.release(self.bytes);
        }
    }
}

impl ChunkStore {
    pub(crate) fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// Bytes of buffered write data held now (tails, uploads in flight, failed blocks).
    pub fn buffered_bytes(&self) -> usize {
        self.budget.used()
    }

    pub(crate) fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn register_writer(&self, w: &Arc<FileWriter>) {
        let mut ws = self.writers.lock();
        if ws.len() >= 64 && ws.len().is_power_of_two() {
            ws.retain(|w| w.strong_count() > 0);
        }
        ws.push(Arc::downgrade(w));
    }

    /// The budget cannot give `need` bytes. Uploads queued or running give their bytes back
    /// as they finish, so only what they cannot cover is made to move: the tails of the
    /// writers idle longest are uploaded until it is. Then wait a little for uploads to finish.
    ///
    /// Sealing a tail early cuts its slice short: the writer goes on in a new slice, the
    /// store gets a short object and one more later, and the chunk a slice more to read and
    /// compact. With several writers at once (a checkpoint's ranks) the budget is mostly
    /// full blocks on their way, and waiting for them is both cheaper and as quick.
    pub(crate) fn make_room(&self, need: usize) {
        {
            let _one = self.spilling.lock();
            let short = (self.budget.used() + need).saturating_sub(self.budget.cap());
            let still = short.saturating_sub(self.uploads.moving());
            if still > 0 {
                let mut ws: Vec<Arc<FileWriter>> = {
                    let mut reg = self.writers.lock();
                    reg.retain(|w| w.strong_count() > 0);
                    reg.iter().filter_map(|w| w.upgrade()).collect()
                };
                ws.sort_by_key(|w| w.last_write.load(Ordering::Relaxed));
                let mut moving = 0;
                for w in ws {
                    if moving >= still {
                        break;
                    }
                    moving += w.spill();
                }
            }
        }
        self.budget.wait_for(need, Duration::from_millis(50));
    }
}
