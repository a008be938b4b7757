//! Blocking lock requests (F_SETLKW, flock without LOCK_NB) waiting for their lock.
//!
//! A waiter is told to stop only by the kernel's FUSE_INTERRUPT naming its request: the
//! kernel sends one when the task blocked in the lock call gets a signal, and the request's
//! reply is then EINTR (the kernel restarts the call or fails it with EINTR, as the signal's
//! SA_RESTART says). Nothing here looks at the caller's process: a request from a pod whose
//! PID namespace the daemon cannot see carries pid 0, and there is no /proc entry to read.
//!
//! An interrupt may be read (on one FUSE thread) before the request it names has been
//! registered (on another): interrupts that match no waiter are kept, a bounded number,
//! newest last, and a request registered later finds its interrupt there. Request ids are
//! never reused on a connection, so a kept interrupt of a request already answered matches
//! nothing and just ages out.
//!
//! Waiters are bounded ([`LockWaits::new`]): past the bound a blocking request fails with
//! ENOLCK at once instead of taking another thread and table entry. [`LockWaits::stop`]
//! (unmount, daemon exit) ends every wait.

use aquifer_meta::Errno;
use parking_lot::{Condvar, Mutex};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// Interrupts kept for requests not (yet) waiting.
const EARLY_MAX: usize = 256;

/// What ended a pause of a waiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Woken {
    /// The pause ran out, or a lock on this mount was released: ask again.
    Retry,
    /// FUSE_INTERRUPT for this request: reply EINTR.
    Interrupted,
    /// The mount is going away: reply ENOLCK.
    Stopped,
}

#[derive(Default)]
struct State {
    /// Waiting requests and whether each has been interrupted.
    waiting: HashMap<u64, bool>,
    /// Interrupts that came before (or after) their request waited, oldest first.
    early: VecDeque<u64>,
    stopped: bool,
    /// Bumped whenever a lock on this mount is released, so that waiters ask again at once.
    released: u64,
}

pub struct LockWaits {
    state: Mutex<State>,
    cv: Condvar,
    max: usize,
}

/// One registered waiter; dropping it ends the registration.
pub struct LockWait {
    waits: Arc<LockWaits>,
    request: u64,
}

impl LockWaits {
    /// A table for at most `max` waiting requests at a time.
    pub fn new(max: usize) -> Arc<LockWaits> {
        Arc::new(LockWaits {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            max,
        })
    }

    /// Register request `request` as waiting: ENOLCK when `max` requests already wait or
    /// the mount is stopping.
    pub fn begin(self: &Arc<Self>, request: u64) -> Result<LockWait, Errno> {
        let mut s = self.state.lock();
        if s.stopped || s.waiting.len() >= self.max {
            return Err(Errno(libc::ENOLCK));
        }
        let interrupted = match s.early.iter().position(|&r| r == request) {
            Some(i) => {
                s.early.remove(i);
                true
            }
            None => false,
        };
        s.waiting.insert(request, interrupted);
        Ok(LockWait {
            waits: self.clone(),
            request,
        })
    }

    /// FUSE_INTERRUPT for `request`: wake its waiter, or keep the interrupt for a request
    /// not waiting yet.
    pub fn interrupt(&self, request: u64) {
        let mut s = self.state.lock();
        if let Some(flag) = s.waiting.get_mut(&request) {
            *flag = true;
            self.cv.notify_all();
            return;
        }
        if !s.early.contains(&request) {
            if s.early.len() >= EARLY_MAX {
                s.early.pop_front();
            }
            s.early.push_back(request);
        }
    }

    /// A lock was released on this mount: waiters ask again now instead of at their next
    /// poll (locks released by other mounts are seen at the next poll).
    pub fn released(&self) {
        let mut s = self.state.lock();
        if !s.waiting.is_empty() {
            s.released += 1;
            self.cv.notify_all();
        }
    }

    /// End every wait, now and to come.
    pub fn stop(&self) {
        self.state.lock().stopped = true;
        self.cv.notify_all();
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.state.lock().waiting.len()
    }
}

impl LockWait {
    pub fn request(&self) -> u64 {
        self.request
    }

    /// Whether the wait must end, without pausing.
    pub fn check(&self) -> Woken {
        let s = self.waits.state.lock();
        Self::verdict(&s, self.request).unwrap_or(Woken::Retry)
    }

    fn verdict(s: &State, request: u64) -> Option<Woken> {
        if s.waiting.get(&request) == Some(&true) {
            Some(Woken::Interrupted)
        } else if s.stopped {
            Some(Woken::Stopped)
        } else {
            None
        }
    }

    /// Sleep up to `at_most`, or less if interrupted, stopped or a local lock is released.
    pub fn pause(&self, at_most: Duration) -> Woken {
        let mut s = self.waits.state.lock();
        if let Some(w) = Self::verdict(&s, self.request) {
            return w;
        }
        let released = s.released;
        let deadline = std::time::Instant::now() + at_most;
        loop {
            let timed_out = self.waits.cv.wait_until(&mut s, deadline).timed_out();
            if let Some(w) = Self::verdict(&s, self.request) {
                return w;
            }
            if timed_out || s.released != released {
                return Woken::Retry;
            }
        }
    }
}

impl Drop for LockWait {
    fn drop(&mut self) {
        self.waits.state.lock().waiting.remove(&self.request);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn an_interrupt_wakes_only_its_request() {
        let waits = LockWaits::new(8);
        let a = waits.begin(10).unwrap();
        let b = waits.begin(12).unwrap();
        waits.interrupt(10);
        assert_eq!(a.pause(LONG), Woken::Interrupted);
        assert_eq!(b.check(), Woken::Retry);
        assert_eq!(b.pause(Duration::from_millis(1)), Woken::Retry);
    }

    #[test]
    fn an_interrupt_from_another_thread_ends_a_long_pause() {
        let waits = LockWaits::new(8);
        let a = waits.begin(4).unwrap();
        let w = waits.clone();
        let t = std::thread::spawn(move || {
            // Repeat until the waiter has seen it: the waiter may not have paused yet.
            while w.waiting() == 1 {
                w.interrupt(4);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let t0 = Instant::now();
        assert_eq!(a.pause(LONG), Woken::Interrupted);
        assert!(t0.elapsed() < LONG);
        drop(a);
        t.join().unwrap();
    }

    #[test]
    fn an_interrupt_before_its_request_waits_is_kept() {
        let waits = LockWaits::new(8);
        waits.interrupt(6);
        let a = waits.begin(6).unwrap();
        assert_eq!(a.check(), Woken::Interrupted);
        drop(a);
        // Used once: the id is not interrupted again (ids are never reused anyway).
        let again = waits.begin(6).unwrap();
        assert_eq!(again.check(), Woken::Retry);
    }

    #[test]
    fn kept_interrupts_are_bounded() {
        let waits = LockWaits::new(8);
        for r in 0..(EARLY_MAX as u64 * 4) {
            waits.interrupt(r);
        }
        assert_eq!(waits.state.lock().early.len(), EARLY_MAX);
        // The oldest went first; the newest are still kept.
        assert_eq!(waits.begin(0).unwrap().check(), Woken::Retry);
        let newest = EARLY_MAX as u64 * 4 - 1;
        assert_eq!(waits.begin(newest).unwrap().check(), Woken::Interrupted);
    }

    #[test]
    fn waiters_are_bounded_and_leave_on_drop() {
        let waits = LockWaits::new(2);
        let a = waits.begin(1).unwrap();
        let _b = waits.begin(2).unwrap();
        assert_eq!(waits.begin(3).err(), Some(Errno(libc::ENOLCK)));
        drop(a);
        assert_eq!(waits.waiting(), 1);
        assert!(waits.begin(3).is_ok());
    }

    #[test]
    fn stop_ends_every_wait_and_refuses_new_ones() {
        let waits = LockWaits::new(8);
        let a = waits.begin(1).unwrap();
        let w = waits.clone();
        let t = std::thread::spawn(move || a.pause(LONG));
        waits.stop();
        assert_eq!(t.join().unwrap(), Woken::Stopped);
        assert_eq!(w.begin(2).err(), Some(Errno(libc::ENOLCK)));
    }

    #[test]
    fn a_local_release_wakes_waiters_to_ask_again() {
        let waits = LockWaits::new(8);
        let a = waits.begin(1).unwrap();
        let w = waits.clone();
        let t = std::thread::spawn(move || {
            while w.state.lock().waiting.len() == 1 {
                w.released();
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        assert_eq!(a.pause(LONG), Woken::Retry);
        drop(a);
        t.join().unwrap();
    }
}
