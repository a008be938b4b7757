//! The one retry policy every layer that retries uses: the object store layers
//! (`aquifer_object::layers::Retrying`), the Redis engine's connections and transactions,
//! a lane's fence after a lost reply, and writeback staging's background uploads.
//!
//! What is retried is the caller's to say — only an error that says nothing was done, or
//! that doing it again is harmless ([`Transient`]): a put of a never-reused key, a Redis
//! command refused before it ran. An outcome that may have applied is not retried blindly
//! (the Redis engine reports it as ambiguous and the lanes find out what happened).
//!
//! How long to wait is this crate's: waits grow exponentially from [`RetryPolicy::first`]
//! to [`RetryPolicy::max_wait`], each shortened by a random part ([`RetryPolicy::jitter`],
//! so that clients that failed together — every mount at a failover — retry apart; a wait
//! never exceeds the cap), until [`RetryPolicy::max_attempts`] or the
//! [`RetryPolicy::deadline`], counted in wall time from the first attempt (attempts take
//! time too: a Redis command may wait seconds on a dead socket). A wait that would end
//! past the deadline is cut to end at it, for one last attempt there: "until the deadline"
//! means an outage that ends just before it is ridden out. The schedule is backon's
//! exponential backoff, used as an iterator of waits (no async runtime); the jitter is
//! applied here so that the cap holds.

use backon::BackoffBuilder;
use std::time::{Duration, Instant};

/// An error that says doing the same again may succeed and cannot do harm.
pub trait Transient {
    fn is_transient(&self) -> bool;
}

/// How often and how long to try again.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// The first wait.
    pub first: Duration,
    /// Waits double up to this (before jitter).
    pub max_wait: Duration,
    /// Attempts in all, the first included; None: no limit but the deadline.
    pub max_attempts: Option<u32>,
    /// Give up when the next wait would end this long after the first attempt began;
    /// None: never (a background upload that must get through eventually).
    pub deadline: Option<Duration>,
    /// The random part of each wait: 0 none, 0.5 "equal jitter" (a wait is between half
    /// the schedule's and all of it), 1 "full jitter" (between nothing and all of it).
    pub jitter: f32,
    /// Seed of the jitter; None: random. Seeded in tests, so they are repeatable.
    pub seed: Option<u64>,
}

impl RetryPolicy {
    /// Waits from `first` doubling to `max_wait`, forever until a limit is set.
    pub const fn new(first: Duration, max_wait: Duration) -> Self {
        RetryPolicy {
            first,
            max_wait,
            max_attempts: None,
            deadline: None,
            jitter: 0.5,
            seed: None,
        }
    }

    /// The random part of each wait, from 0 (none) to 1 (full jitter).
    pub const fn with_jitter(mut self, jitter: f32) -> Self {
        self.jitter = jitter;
        self
    }

    pub const fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    pub const fn with_deadline(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }

    pub const fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// A schedule for one operation, starting now.
    pub fn start(&self) -> Backoff {
        Backoff {
            policy: self.clone(),
            waits: self.waits(),
            rng: match self.seed {
                Some(seed) => fastrand::Rng::with_seed(seed),
                None => fastrand::Rng::new(),
            },
            started: Instant::now(),
            attempts: 1,
            last_call: false,
        }
    }

    fn waits(&self) -> backon::ExponentialBackoff {
        backon::ExponentialBuilder::new()
            .with_min_delay(self.first)
            .with_max_delay(self.max_wait)
            .with_factor(2.0)
            .without_max_times()
            .build()
    }

    /// Run `op` until it succeeds, fails for good (an error not [`Transient`]) or the
    /// policy gives up (the last error). `on_retry` hears of each error retried, the
    /// attempt that failed (from 1) and the wait before the next.
    pub fn retry<T, E: Transient>(
        &self,
        mut op: impl FnMut() -> Result<T, E>,
        mut on_retry: impl FnMut(&E, u32, Duration),
    ) -> Result<T, E> {
        let mut backoff = self.start();
        loop {
            match op() {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() => match backoff.next_wait() {
                    Some(wait) => {
                        on_retry(&e, backoff.attempts - 1, wait);
                        std::thread::sleep(wait);
                    }
                    None => return Err(e),
                },
                Err(e) => return Err(e),
            }
        }
    }
}

/// The waits of one operation under a [`RetryPolicy`].
pub struct Backoff {
    policy: RetryPolicy,
    waits: backon::ExponentialBackoff,
    rng: fastrand::Rng,
    started: Instant,
    /// Attempts made, counting the one about to follow the next wait.
    attempts: u32,
    /// The last wait was cut to end at the deadline: the attempt after it is the last.
    last_call: bool,
}

impl Backoff {
    /// The wait before the next attempt, or None when the policy gives up (attempts
    /// spent, or the deadline reached: a wait that would end past it ends at it instead,
    /// for one last attempt).
    pub fn next_wait(&mut self) -> Option<Duration> {
        if self.last_call || self.policy.max_attempts.is_some_and(|n| self.attempts >= n) {
            return None;
        }
        let full = self.waits.next()?;
        let jitter = self.policy.jitter.clamp(0.0, 1.0);
        let mut wait = full.mul_f32(1.0 - jitter * self.rng.f32());
        if let Some(deadline) = self.policy.deadline {
            let left = deadline.checked_sub(self.started.elapsed())?;
            if wait >= left {
                wait = left;
                self.last_call = true;
            }
        }
        self.attempts += 1;
        Some(wait)
    }

    /// [`Backoff::next_wait`], slept; false when the policy gives up.
    pub fn wait(&mut self) -> bool {
        match self.next_wait() {
            Some(d) => {
                std::thread::sleep(d);
                true
            }
            None => false,
        }
    }

    /// Attempts so far, the first included.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Time since the first attempt began.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Whether the deadline has passed (a caller with attempts of its own to bound).
    pub fn past_deadline(&self) -> bool {
        self.policy
            .deadline
            .is_some_and(|d| self.started.elapsed() >= d)
    }

    /// Start over after a success, for a loop that retries many operations in turn
    /// (writeback staging's uploads): the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.waits = self.policy.waits();
        self.started = Instant::now();
        self.attempts = 1;
        self.last_call = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum E {
        Busy,
        Broken,
    }

    impl Transient for E {
        fn is_transient(&self) -> bool {
            *self == E::Busy
        }
    }

    fn quick() -> RetryPolicy {
        RetryPolicy::new(Duration::from_millis(1), Duration::from_millis(4)).with_seed(7)
    }

    #[test]
    fn waits_double_to_the_cap_and_jitter_only_shortens_them() {
        for jitter in [0.0, 0.5, 1.0] {
            let mut b = quick().with_jitter(jitter).start();
            let waits: Vec<_> = (0..6).map(|_| b.next_wait().unwrap()).collect();
            for (w, base) in waits.iter().zip([1u64, 2, 4, 4, 4, 4]) {
                let base = Duration::from_millis(base);
                assert!(
                    *w >= base.mul_f32(1.0 - jitter) && *w <= base,
                    "{w:?} for {base:?} with jitter {jitter}"
                );
            }
            assert_eq!(b.attempts(), 7);
        }
    }

    #[test]
    fn the_last_wait_ends_at_the_deadline_for_one_last_attempt() {
        let deadline = Duration::from_millis(1000);
        let policy = RetryPolicy::new(Duration::from_millis(400), Duration::from_millis(400))
            .with_jitter(0.0)
            .with_deadline(deadline);
        let mut b = policy.start();
        assert!(b.wait() && b.wait());
        // 800 ms slept: a third wait of 400 would end past the deadline, so it is cut to
        // what is left and the attempt after it is the last.
        match b.next_wait() {
            Some(cut) => {
                assert!(cut < Duration::from_millis(400), "{cut:?}");
                assert_eq!(b.next_wait(), None);
            }
            // A machine that stalled past the deadline meanwhile: nothing left to wait.
            None => assert!(b.elapsed() >= deadline),
        }
    }

    #[test]
    fn attempts_are_bounded_and_the_last_error_returned() {
        let mut tries = 0;
        let mut retried = Vec::new();
        let r: Result<(), E> = quick().with_max_attempts(3).retry(
            || {
                tries += 1;
                Err(E::Busy)
            },
            |_, attempt, _| retried.push(attempt),
        );
        assert_eq!((r, tries, retried), (Err(E::Busy), 3, vec![1, 2]));
    }

    #[test]
    fn a_lasting_error_is_not_retried_and_a_success_ends_the_retries() {
        let mut tries = 0;
        let r: Result<(), E> = quick().retry(
            || {
                tries += 1;
                Err(E::Broken)
            },
            |_, _, _| {},
        );
        assert_eq!((r, tries), (Err(E::Broken), 1));
        let mut tries = 0;
        let r = quick().retry(
            || {
                tries += 1;
                if tries < 4 {
                    Err(E::Busy)
                } else {
                    Ok(tries)
                }
            },
            |_, _, _| {},
        );
        assert_eq!(r, Ok(4));
    }

    #[test]
    fn the_deadline_counts_the_attempts_own_time() {
        // Each attempt takes 30 ms, the waits a few: a 100 ms deadline allows four, not
        // the dozens the waits alone would.
        let mut tries = 0;
        let r: Result<(), E> = quick().with_deadline(Duration::from_millis(100)).retry(
            || {
                tries += 1;
                std::thread::sleep(Duration::from_millis(30));
                Err(E::Busy)
            },
            |_, _, _| {},
        );
        assert_eq!(r, Err(E::Busy));
        assert!((1..=4).contains(&tries), "{tries} attempts");
    }

    #[test]
    fn reset_starts_the_waits_over() {
        let mut b = quick().with_max_attempts(3).start();
        assert!(b.wait() && b.wait());
        assert_eq!(b.next_wait(), None);
        b.reset();
        let w = b.next_wait().unwrap();
        assert!(w <= Duration::from_millis(2), "{w:?}");
    }
}
