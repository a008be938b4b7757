//! Layers that wrap any [`ObjectStore`]. Volumes stack them as
//! `Retrying(Counting(RateLimited(backend)))` (in `aquifer_chunk::store::build`): every
//! attempt, including a retry, is counted and takes its share of the bandwidth, and only
//! transient errors are retried.

use crate::{ObjectInfo, ObjectStore, Result};
pub use aquifer_retry::RetryPolicy;
use aquifer_retry::Transient;
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The object store's retry policy: ten attempts, waits of up to 100 ms doubling to up to
/// 5 s (full jitter: anywhere from nothing to that), and a minute from the first attempt
/// at most.
pub fn object_retry_policy() -> RetryPolicy {
    RetryPolicy::new(Duration::from_millis(100), Duration::from_secs(5))
        .with_jitter(1.0)
        .with_max_attempts(10)
        .with_deadline(Duration::from_secs(60))
}

/// Retries what [`ObjectError::is_retryable`](crate::ObjectError::is_retryable) says is
/// transient, under a [`RetryPolicy`] (aquifer-retry: one policy for every layer).
pub struct Retrying<S> {
    inner: S,
    policy: RetryPolicy,
    retries: AtomicU64,
}

impl Transient for crate::ObjectError {
    fn is_transient(&self) -> bool {
        self.is_retryable()
    }
}

impl<S: ObjectStore> Retrying<S> {
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        Retrying {
            inner,
            policy,
            retries: AtomicU64::new(0),
        }
    }

    /// Retries made so far (for tests and metrics).
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    fn run<T>(&self, op: &str, key: &str, f: impl FnMut() -> Result<T>) -> Result<T> {
        let r = self.policy.retry(f, |e, attempt, wait| {
            tracing::warn!(op, key, attempt, error = %e, "retrying in {wait:?}");
            self.retries.fetch_add(1, Ordering::Relaxed);
        });
        if let Err(e) = &r {
            if e.is_retryable() {
                tracing::error!(op, key, error = %e, "giving up");
            }
        }
        r
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
///
/// The burst is a tenth of a second's worth (at least one 4 MiB block): a limit is there so
/// that a checkpoint leaves the reads beside it their share, and a second's worth at full
/// speed at the start of every burst (100 MiB at `--upload-limit 100`) took that share away
/// when it mattered most, as eight ranks began at once.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(bytes_per_sec: u64) -> Arc<TokenBucket> {
        let rate = bytes_per_sec.max(1) as f64;
        let burst = (rate / 10.0).max(4.0 * 1024.0 * 1024.0);
        // Starts full: the first tenth of a second's worth goes at once.
        Arc::new(TokenBucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
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
        RetryPolicy::new(Duration::from_millis(1), Duration::from_millis(4))
            .with_max_attempts(5)
            .with_deadline(Duration::from_secs(5))
            .with_seed(1)
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
        // 8 MiB/s with a 4 MiB burst (one block): 24 MiB take at least 2.5 s.
        let b = TokenBucket::new(8 << 20);
        let start = Instant::now();
        for _ in 0..24 {
            b.acquire(1 << 20);
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1800), "{took:?}");
    }

    #[test]
    fn an_idle_token_bucket_lets_through_a_tenth_of_a_second_not_a_second() {
        // 80 MiB/s: the burst is 8 MiB, so 24 MiB take at least 0.2 s (not 0: a second's
        // worth, 80 MiB, would let them all through at once).
        let b = TokenBucket::new(80 << 20);
        std::thread::sleep(Duration::from_millis(300));
        let start = Instant::now();
        for _ in 0..24 {
            b.acquire(1 << 20);
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(180), "{took:?}");
    }

    crate::object_conformance!((
        Retrying::new(
            RateLimited::new(
                MemStore::new(),
                Some(TokenBucket::new(1 << 30)),
                Some(TokenBucket::new(1 << 30))
            ),
            object_retry_policy()
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
