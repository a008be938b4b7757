//! Layers that wrap any [`ObjectStore`]. Volumes stack them as
//! `Retrying(Counting(RateLimited(backend)))` (in `aquifer_chunk::store::build`): every
//! attempt, including a retry, is counted and takes its share of the bandwidth, and only
//! transient errors are retried.

use crate::{ObjectInfo, ObjectStore, Result};
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Exponential backoff with full jitter, bounded by attempts and by a deadline per request.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub max_backoff: Duration,
    /// Give up (with the last error) once this much time has passed since the first attempt.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            base: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            deadline: Duration::from_secs(60),
        }
    }
}

pub struct Retrying<S> {
    inner: S,
    policy: RetryPolicy,
    /// xorshift state for jitter; seeded, so tests are repeatable.
    rng: AtomicU64,
    retries: AtomicU64,
}

impl<S: ObjectStore> Retrying<S> {
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        Self::with_seed(inner, policy, 0x9e37_79b9_7f4a_7c15)
    }

    pub fn with_seed(inner: S, policy: RetryPolicy, seed: u64) -> Self {
        Retrying {
            inner,
            policy,
            rng: AtomicU64::new(seed | 1),
            retries: AtomicU64::new(0),
        }
    }

    /// Retries made so far (for tests and metrics).
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    fn jitter(&self, max: Duration) -> Duration {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        let nanos = max.as_nanos().max(1) as u64;
        Duration::from_nanos(x % nanos)
    }

    fn run<T>(&self, op: &str, key: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let mut attempt = 0u32;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() => {
                    attempt += 1;
                    let cap = self
                        .policy
                        .base
                        .saturating_mul(1u32 << attempt.min(16))
                        .min(self.policy.max_backoff);
                    let wait = self.jitter(cap);
                    if attempt >= self.policy.max_attempts
                        || start.elapsed() + wait > self.policy.deadline
                    {
                        tracing::error!(op, key, attempts = attempt, error = %e, "giving up");
                        return Err(e);
                    }
                    tracing::warn!(op, key, attempt, error = %e, "retrying in {wait:?}");
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(wait);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl<S: ObjectStore> ObjectStore for Retrying<S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    // Keys are never reused, so repeating a put that may have succeeded is safe.
    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.run("put", key, || self.inner.put(key, data.clone()))
    }
    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
        self.run("get", key, || self.inner.get(key, off, len))
    }
    fn get_into(&self, key: &str, off: u64, buf: &mut [u8]) -> Result<usize> {
        self.run("get", key, || self.inner.get_into(key, off, buf))
    }
    fn get_owned(&self, key: &str, off: u64, len: usize, buf: Vec<u8>) -> Result<Vec<u8>> {
        // The buffer goes to the first attempt; a retry (rare) brings its own.
        let mut buf = Some(buf);
        self.run("get", key, || {
            self.inner
                .get_owned(key, off, len, buf.take().unwrap_or_default())
        })
    }
    fn head(&self, key: &str) -> Result<ObjectInfo> {
        self.run("head", key, || self.inner.head(key))
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.run("delete", key, || self.inner.delete(key))
    }
    fn list(&self, prefix: &str, start_after: &str, limit: usize) -> Result<Vec<ObjectInfo>> {
        self.run("list", prefix, || {
            self.inner.list(prefix, start_after, limit)
        })
    }
    fn sync(&self) -> Result<()> {
        self.run("sync", "", || self.inner.sync())
    }
    fn puts_need_sync(&self) -> bool {
        self.inner.puts_need_sync()
    }
}

/// A token bucket in bytes per second. Callers wait for tokens outside the lock; a request
/// larger than the burst is let through once the bucket is full and then drives it negative,
/// so the long-run rate holds for any request size.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(bytes_per_sec: u64) -> Arc<TokenBucket> {
        let rate = bytes_per_sec.max(1) as f64;
        Arc::new(TokenBucket {
            rate,
            burst: rate.max(4.0 * 1024.0 * 1024.0),
            state: Mutex::new((rate, Instant::now())),
        })
    }

    /// Take `n` bytes' worth of tokens, sleeping as long as the rate demands.
    pub fn acquire(&self, n: u64) {
        let wait = {
            let mut s = self.state.lock().unwrap();
            let now = Instant::now();
            let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
            s.0 = (s.0 + refill).min(self.burst);
            s.1 = now;
            s.0 -= n as f64;
            if s.0 >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-s.0 / self.rate)
            }
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// Holds uploads and downloads to their bandwidth shares (`--upload-limit`,
/// `--download-limit`).
pub struct RateLimited<S> {
    inner: S,
    up: Option<Arc<TokenBucket>>,
    down: Option<Arc<TokenBucket>>,
}

impl<S: ObjectStore> RateLimited<S> {
    pub fn new(inner: S, up: Option<Arc<TokenBucket>>, down: Option<Arc<TokenBucket>>) -> Self {
        RateLimited { inner, up, down }
    }
}

impl<S: ObjectStore> ObjectStore for RateLimited<S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        if let Some(b) = &self.up {
            b.acquire(data.len() as u64);
        }
        self.inner.put(key, data)
    }
    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
        let data = self.inner.get(key, off, len)?;
        if let Some(b) = &self.down {
            b.acquire(data.len() as u64);
        }
        Ok(data)
    }
    fn get_into(&self, key: &str, off: u64, buf: &mut [u8]) -> Result<usize> {
        if let Some(b) = &self.down {
            b.acquire(buf.len() as u64);
        }
        self.inner.get_into(key, off, buf)
    }
    fn get_owned(&self, key: &str, off: u64, len: usize, buf: Vec<u8>) -> Result<Vec<u8>> {
        if let Some(b) = &self.down {
            b.acquire(len as u64);
        }
        self.inner.get_owned(key, off, len, buf)
    }
    fn head(&self, key: &str) -> Result<ObjectInfo> {
        self.inner.head(key)
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key)
    }
    fn list(&self, prefix: &str, start_after: &str, limit: usize) -> Result<Vec<ObjectInfo>> {
        self.inner.list(prefix, start_after, limit)
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn puts_need_sync(&self) -> bool {
        self.inner.puts_need_sync()
    }
}

impl<S: ObjectStore + ?Sized> ObjectStore for Arc<S> {
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        (**self).put(key, data)
    }
    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
        (**self).get(key, off, len)
    }
    fn get_into(&self, key: &str, off: u64, buf: &mut [u8]) -> Result<usize> {
        (**self).get_into(key, off, buf)
    }
    fn get_owned(&self, key: &str, off: u64, len: usize, buf: Vec<u8>) -> Result<Vec<u8>> {
        (**self).get_owned(key, off, len, buf)
    }
    fn head(&self, key: &str) -> Result<ObjectInfo> {
        (**self).head(key)
    }
    fn delete(&self, key: &str) -> Result<()> {
        (**self).delete(key)
    }
    fn list(&self, prefix: &str, start_after: &str, limit: usize) -> Result<Vec<ObjectInfo>> {
        (**self).list(prefix, start_after, limit)
    }
    fn sync(&self) -> Result<()> {
        (**self).sync()
    }
    fn puts_need_sync(&self) -> bool {
        (**self).puts_need_sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FaultStore, MemStore};

    fn fast() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
            deadline: Duration::from_secs(5),
        }
    }

    #[test]
    fn retries_transient_failures_then_succeeds() {
        let faults = Arc::new(FaultStore::new(MemStore::new()));
        faults.fail_next(3);
        let s = Retrying::new(faults.clone(), fast());
        s.put("k", Bytes::from_static(b"v")).unwrap();
        assert_eq!(s.retries(), 3);
        assert_eq!(s.get("k", 0, None).unwrap(), &b"v"[..]);
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let faults = Arc::new(FaultStore::new(MemStore::new()));
        faults.set_down(true);
        let s = Retrying::new(faults.clone(), fast());
        let e = s.put("k", Bytes::from_static(b"v")).unwrap_err();
        assert!(e.is_retryable());
        assert_eq!(s.retries(), 4);
    }

    #[test]
    fn permanent_errors_are_not_retried() {
        let s = Retrying::new(MemStore::new(), fast());
        assert!(s.get("missing", 0, None).unwrap_err().is_not_found());
        assert_eq!(s.retries(), 0);
    }

    #[test]
    fn token_bucket_holds_the_rate() {
        // 8 MiB/s with a 8 MiB burst: 24 MiB take at least ~2 s after the burst.
        let b = TokenBucket::new(8 << 20);
        let start = Instant::now();
        for _ in 0..24 {
            b.acquire(1 << 20);
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1800), "{took:?}");
    }

    crate::object_conformance!((
        Retrying::new(
            RateLimited::new(
                MemStore::new(),
                Some(TokenBucket::new(1 << 30)),
                Some(TokenBucket::new(1 << 30))
            ),
            RetryPolicy::default()
        ),
        ()
    ));
}

/// Requests and bytes that reached the store. The mount puts the counter under the retries,
/// so each attempt counts.
#[derive(Debug, Default)]
pub struct StoreCounters {
    pub gets: AtomicU64,
    pub get_bytes: AtomicU64,
    pub puts: AtomicU64,
    pub put_bytes: AtomicU64,
    pub deletes: AtomicU64,
    pub heads: AtomicU64,
    pub lists: AtomicU64,
    pub errors: AtomicU64,
}

/// Counts every request that passes, for figures (`aquifer stats`, Prometheus).
pub struct Counting<S> {
    inner: S,
    c: Arc<StoreCounters>,
}

impl<S: ObjectStore> Counting<S> {
    pub fn new(inner: S) -> Self {
        Counting {
            inner,
            c: Arc::default(),
        }
    }

    pub fn counters(&self) -> Arc<StoreCounters> {
        self.c.clone()
    }

    fn count<T>(&self, n: &AtomicU64, r: Result<T>) -> Result<T> {
        n.fetch_add(1, Ordering::Relaxed);
        if r.is_err() {
            self.c.errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn got(&self, bytes: usize) {
        self.c.get_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

impl<S: ObjectStore> ObjectStore for Counting<S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let n = data.len() as u64;
        let r = self.count(&self.c.puts, self.inner.put(key, data));
        if r.is_ok() {
            self.c.put_bytes.fetch_add(n, Ordering::Relaxed);
        }
        r
    }
    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
        let r = self.count(&self.c.gets, self.inner.get(key, off, len));
        if let Ok(b) = &r {
            self.got(b.len());
        }
        r
    }
    fn get_into(&self, key: &str, off: u64, buf: &mut [u8]) -> Result<usize> {
        let r = self.count(&self.c.gets, self.inner.get_into(key, off, buf));
        if let Ok(n) = &r {
            self.got(*n);
        }
        r
    }
    fn get_owned(&self, key: &str, off: u64, len: usize, buf: Vec<u8>) -> Result<Vec<u8>> {
        let r = self.count(&self.c.gets, self.inner.get_owned(key, off, len, buf));
        if let Ok(b) = &r {
            self.got(b.len());
        }
        r
    }
    fn head(&self, key: &str) -> Result<ObjectInfo> {
        self.count(&self.c.heads, self.inner.head(key))
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.count(&self.c.deletes, self.inner.delete(key))
    }
    fn list(&self, prefix: &str, start_after: &str, limit: usize) -> Result<Vec<ObjectInfo>> {
        self.count(&self.c.lists, self.inner.list(prefix, start_after, limit))
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn puts_need_sync(&self) -> bool {
        self.inner.puts_need_sync()
    }
}
