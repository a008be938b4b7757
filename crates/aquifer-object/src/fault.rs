//! A fault-injecting wrapper for tests: outages, a number of failing calls, added latency.

use crate::{ObjectError, ObjectInfo, ObjectStore, Result};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

pub struct FaultStore<S> {
    inner: S,
    down: AtomicBool,
    fail_next: AtomicU64,
    latency_us: AtomicU64,
    calls: AtomicU64,
    refuse_writes: AtomicBool,
    panic: AtomicBool,
    syncs: AtomicU64,
    /// (syncs are held, syncs waiting at the gate)
    gate: std::sync::Mutex<(bool, usize)>,
    gate_cv: std::sync::Condvar,
}

impl<S: ObjectStore> FaultStore<S> {
    pub fn new(inner: S) -> Self {
        FaultStore {
            inner,
            down: AtomicBool::new(false),
            fail_next: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            refuse_writes: AtomicBool::new(false),
            panic: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
            gate: std::sync::Mutex::new((false, 0)),
            gate_cv: std::sync::Condvar::new(),
        }
    }

    /// While down, every call fails as unavailable.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// The next `n` calls fail as unavailable.
    pub fn fail_next(&self, n: u64) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    pub fn set_latency(&self, d: Duration) {
        self.latency_us
            .store(d.as_micros() as u64, Ordering::SeqCst);
    }

    /// While set, puts fail with a permanent error, as a store that refuses writes (full,
    /// read-only, access denied) does: not retried.
    pub fn set_refuse_writes(&self, refuse: bool) {
        self.refuse_writes.store(refuse, Ordering::SeqCst);
    }

    /// While set, every call panics (to test that a panicking worker fails its request
    /// instead of hanging the callers waiting for it).
    pub fn set_panic(&self, panic: bool) {
        self.panic.store(panic, Ordering::SeqCst);
    }

    /// While held, calls of [`ObjectStore::sync`] wait (to catch a caller mid-sync).
    pub fn hold_syncs(&self, hold: bool) {
        self.gate.lock().unwrap_or_else(|e| e.into_inner()).0 = hold;
        self.gate_cv.notify_all();
    }

    /// Wait until a sync is waiting at the gate of [`FaultStore::hold_syncs`].
    pub fn wait_for_a_held_sync(&self) {
        let g = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        drop(self.gate_cv.wait_while(g, |g| g.1 == 0));
    }

    fn pass_gate(&self) {
        let mut g = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 {
            g.1 += 1;
            self.gate_cv.notify_all();
            g = self
                .gate_cv
                .wait_while(g, |g| g.0)
                .unwrap_or_else(|e| e.into_inner());
            g.1 -= 1;
        }
    }

    /// Calls of [`ObjectStore::sync`] that reached this wrapper.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    /// Calls that reached this wrapper.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    fn check(&self, op: &str) -> Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.panic.load(Ordering::SeqCst) {
            panic!("injected panic in {op}");
        }
        let us = self.latency_us.load(Ordering::SeqCst);
        if us > 0 {
            std::thread::sleep(Duration::from_micros(us));
        }
        let injected = self.down.load(Ordering::SeqCst)
            || self
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if injected {
            return Err(ObjectError::Unavailable {
                store: self.inner.describe(),
                msg: format!("injected fault in {op}"),
            });
        }
        Ok(())
    }
}

impl<S: ObjectStore> ObjectStore for FaultStore<S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.check("put")?;
        if self.refuse_writes.load(Ordering::SeqCst) {
            return Err(ObjectError::Io {
                store: self.inner.describe(),
                op: "put",
                key: key.to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "injected: the store refuses writes",
                ),
            });
        }
        self.inner.put(key, data)
    }
    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
        self.check("get")?;
        self.inner.get(key, off, len)
    }
    fn get_into(&self, key: &str, off: u64, buf: &mut [u8]) -> Result<usize> {
        self.check("get")?;
        self.inner.get_into(key, off, buf)
    }
    fn head(&self, key: &str) -> Result<ObjectInfo> {
        self.check("head")?;
        self.inner.head(key)
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.check("delete")?;
        self.inner.delete(key)
    }
    fn list(&self, prefix: &str, start_after: &str, limit: usize) -> Result<Vec<ObjectInfo>> {
        self.check("list")?;
        self.inner.list(prefix, start_after, limit)
    }
    fn sync(&self) -> Result<()> {
        self.pass_gate();
        self.syncs.fetch_add(1, Ordering::SeqCst);
        self.check("sync")?;
        self.inner.sync()
    }
    fn puts_need_sync(&self) -> bool {
        self.inner.puts_need_sync()
    }
}
