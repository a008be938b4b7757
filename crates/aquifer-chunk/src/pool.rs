//! Background block uploads, and the memory budget of buffered writes.
//!
//! Every byte a writer buffers — the tails of open slices, blocks queued for upload or being
//! uploaded, blocks whose upload failed and are kept for a retry — is held against one
//! [`Budget`] (half of `--buffer-size`). A writer that would go past it waits, never fails:
//! it first has the oldest writers' tails sealed and uploaded, then waits for uploads to
//! finish and give their bytes back.
//!
//! A worker that panics fails the upload it was running (its waiters see an error), and the
//! locks here do not poison, so one panic never hangs or fails later callers.

use aquifer_object::ObjectStore;
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
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

enum Outcome {
    Running,
    Done,
    /// The upload failed; the object and its budget are kept so a later flush can retry.
    Failed(String, Bytes, Held),
}

/// Completion of one upload.
pub struct Completion {
    state: Mutex<Outcome>,
    cv: Condvar,
}

impl Completion {
    fn running() -> Arc<Completion> {
        Arc::new(Completion {
            state: Mutex::new(Outcome::Running),
            cv: Condvar::new(),
        })
    }

    fn set(&self, o: Outcome) {
        *self.state.lock() = o;
        self.cv.notify_all();
    }

    pub fn wait(&self) -> Result<(), String> {
        let mut s = self.state.lock();
        loop {
            match &*s {
                Outcome::Running => self.cv.wait(&mut s),
                Outcome::Done => return Ok(()),
                Outcome::Failed(e, ..) => return Err(e.clone()),
            }
        }
    }

    /// The stored object of a failed upload (to retry it, or to read it back), with its
    /// budget; `None` unless the upload finished and failed.
    pub fn take_failed(&self) -> Option<(Bytes, Held)> {
        let mut s = self.state.lock();
        match std::mem::replace(&mut *s, Outcome::Running) {
            Outcome::Failed(_, data, held) if !data.is_empty() => Some((data, held)),
            other => {
                *s = other;
                None
            }
        }
    }

    /// The stored object of a failed upload, for a reader; `None` otherwise.
    pub fn failed_object(&self) -> Option<Bytes> {
        match &*self.state.lock() {
            Outcome::Failed(_, data, _) if !data.is_empty() => Some(data.clone()),
            _ => None,
        }
    }
}

/// Block-sized write buffers kept for reuse. Every block buffer is a fresh 4 MiB mapping
/// otherwise (the allocator maps large buffers directly so that memory goes back to the
/// system), and faulting its pages in costs a fifth of the write path's CPU. At most `max`
/// buffers wait here, so idle memory stays bounded.
pub struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    size: usize,
    max: usize,
}

impl BufferPool {
    pub fn new(size: usize, max: usize) -> BufferPool {
        BufferPool {
            free: Mutex::new(Vec::new()),
            size,
            max,
        }
    }

    /// The capacity of a buffer from [`take`](BufferPool::take).
    pub fn size(&self) -> usize {
        self.size
    }

    /// An empty buffer with room for `size` bytes.
    pub fn take(&self) -> Vec<u8> {
        self.free
            .lock()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.size))
    }

    /// Return a buffer; kept if it is block-sized and the pool is not full.
    pub fn give(&self, mut b: Vec<u8>) {
        if b.capacity() < self.size || b.capacity() > 2 * self.size {
            return;
        }
        let mut free = self.free.lock();
        if free.len() < self.max {
            b.clear();
            free.push(b);
        }
    }

    pub fn idle(&self) -> usize {
        self.free.lock().len()
    }
}

/// The block cache's buffers: a block of at least half a pool buffer gets one; a smaller
/// one (a small file's block) gets an allocation of its own size, so the cache, which counts
/// what entries pin, is not filled by mostly-empty 4 MiB buffers.
impl aquifer_cache::Recycle for BufferPool {
    fn take(&self, want: usize) -> Vec<u8> {
        if 2 * want >= self.size {
            BufferPool::take(self)
        } else {
            Vec::new()
        }
    }
    fn give(&self, buf: Vec<u8>) {
        BufferPool::give(self, buf)
    }
}

struct Job {
    key: String,
    data: Bytes,
    held: Held,
    done: Arc<Completion>,
}

/// Told of every object stored (write-through to a cache).
pub type OnStored = Arc<dyn Fn(&str, &Bytes) + Send + Sync>;

pub struct UploadPool {
    tx: Mutex<Option<SyncSender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    store: Arc<dyn ObjectStore>,
    buffers: Arc<BufferPool>,
    stored: Option<OnStored>,
}

/// Store one block and settle its completion: the budget is released and the buffer
/// recycled on success, the object kept for a retry on failure (a panic is a failure).
fn execute(store: &dyn ObjectStore, buffers: &BufferPool, stored: Option<&OnStored>, job: Job) {
    let Job {
        key,
        data,
        held,
        done,
    } = job;
    let r = catch_unwind(AssertUnwindSafe(|| store.put(&key, data.clone()))).unwrap_or_else(|p| {
        Err(aquifer_object::ObjectError::Config(format!(
            "upload of {key} panicked: {}",
            panic_message(&*p)
        )))
    });
    match r {
        Ok(()) => {
            // Its memory is accounted free before anyone learns it is done.
            drop(held);
            done.set(Outcome::Done);
            if let Some(f) = stored {
                f(&key, &data);
            }
            // The store is done with the block: its buffer can hold the next.
            if data.is_unique() {
                buffers.give(Vec::from(data));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "block upload failed");
            done.set(Outcome::Failed(e.to_string(), data, held));
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl UploadPool {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        threads: usize,
        queue: usize,
        buffers: Arc<BufferPool>,
        stored: Option<OnStored>,
    ) -> std::io::Result<UploadPool> {
        let (tx, rx) = sync_channel::<Job>(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
            let store = store.clone();
            let buffers = buffers.clone();
            let stored = stored.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("upload-{i}"))
                    .spawn(move || loop {
                        let Ok(job) = rx.lock().recv() else { return };
                        execute(&*store, &buffers, stored.as_ref(), job);
                    })?,
            );
        }
        Ok(UploadPool {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(handles),
            store,
            buffers,
            stored,
        })
    }

    /// Upload on the calling thread: for a caller about to wait for this one upload anyway
    /// (a flush with a single tail), two thread hand-offs fewer.
    pub fn run_inline(&self, key: String, data: Bytes, held: Held) -> Arc<Completion> {
        let done = Completion::running();
        let job = Job {
            key,
            data,
            held,
            done: done.clone(),
        };
        execute(&*self.store, &self.buffers, self.stored.as_ref(), job);
        done
    }

    /// Queue an upload of `data` (holding `held` of the budget until it is stored); blocks
    /// while the queue is full.
    pub fn submit(&self, key: String, data: Bytes, held: Held) -> Arc<Completion> {
        let done = Completion::running();
        let tx = self.tx.lock().clone();
        let job = Job {
            key,
            data,
            held,
            done: done.clone(),
        };
        let unsent = match tx {
            Some(tx) => tx.send(job).err().map(|e| e.0),
            None => Some(job),
        };
        if let Some(job) = unsent {
            done.set(Outcome::Failed(
                "upload pool is shut down".into(),
                job.data,
                job.held,
            ));
        }
        done
    }
}

impl Drop for UploadPool {
    fn drop(&mut self) {
        self.tx.lock().take();
        for t in std::mem::take(&mut *self.threads.lock()) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aquifer_object::{FaultStore, MemStore};

    #[test]
    fn a_panicking_upload_fails_its_request_and_the_pool_goes_on() {
        let store = Arc::new(FaultStore::new(MemStore::new()));
        let pool =
            UploadPool::new(store.clone(), 1, 4, Arc::new(BufferPool::new(16, 2)), None).unwrap();
        store.set_panic(true);
        let c = pool.submit("a".into(), Bytes::from_static(b"x"), Held::default());
        let e = c.wait().unwrap_err();
        assert!(e.contains("panicked"), "{e}");
        // The object is kept for a retry, and the same (only) thread serves the next upload.
        assert!(c.failed_object().is_some());
        store.set_panic(false);
        let c = pool.submit("b".into(), Bytes::from_static(b"y"), Held::default());
        c.wait().unwrap();
    }

    #[test]
    fn budget_is_held_until_the_upload_is_stored() {
        let store = Arc::new(FaultStore::new(MemStore::new()));
        let pool =
            UploadPool::new(store.clone(), 1, 4, Arc::new(BufferPool::new(16, 2)), None).unwrap();
        let budget = Budget::new(100);
        let held = budget.try_acquire(60).unwrap();
        assert!(budget.try_acquire(60).is_none(), "over the cap");
        store.set_refuse_writes(true);
        let c = pool.submit("k".into(), Bytes::from_static(b"z"), held);
        assert!(c.wait().is_err());
        // A failed upload keeps its bytes (and their budget) for a retry.
        assert_eq!(budget.used(), 60);
        let (data, held) = c.take_failed().unwrap();
        store.set_refuse_writes(false);
        pool.submit("k".into(), data, held).wait().unwrap();
        assert_eq!(budget.used(), 0);
        // With nothing held, even a request larger than the cap goes through.
        assert!(budget.try_acquire(1000).is_some());
    }
}
