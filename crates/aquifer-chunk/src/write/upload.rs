//! Background block uploads: a pool of threads putting sealed blocks into the store, and the
//! [`Completion`] a writer waits on before it commits a slice (see [`super::durable`]).
//!
//! A worker that panics fails the upload it was running (its waiters see an error), and the
//! locks here do not poison, so one panic never hangs or fails later callers.

use crate::store::keys::BlockKey;
use crate::workers::Workers;
use crate::write::{BufferPool, Held};
use aquifer_object::ObjectStore;
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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

struct Job {
    key: BlockKey,
    data: Bytes,
    held: Held,
    /// Offer the block to the cache once stored.
    cache: bool,
    done: Arc<Completion>,
}

impl Job {
    /// An upload, and the completion its uploader settles.
    fn new(key: BlockKey, data: Bytes, held: Held, cache: bool) -> (Job, Arc<Completion>) {
        let done = Completion::running();
        let job = Job {
            key,
            data,
            held,
            cache,
            done: done.clone(),
        };
        (job, done)
    }
}

/// Told of every block stored that is to be offered to the cache, with the parts of its
/// key, its key and the object stored (write-through to a cache).
pub type OnStored = Arc<dyn Fn(&BlockKey, &str, &Bytes) + Send + Sync>;

pub struct UploadPool {
    workers: Workers<Job>,
    store: Arc<dyn ObjectStore>,
    buffers: Arc<BufferPool>,
    stored: Option<OnStored>,
    /// Budget bytes of the uploads queued or running: what the budget gets back without
    /// anyone doing more than wait.
    moving: Arc<AtomicUsize>,
}

/// Store one block and settle its completion: the budget is released and the buffer
/// recycled on success, the object kept for a retry on failure (a panic is a failure).
fn execute(store: &dyn ObjectStore, buffers: &BufferPool, stored: Option<&OnStored>, job: Job) {
    let Job {
        key,
        data,
        held,
        cache,
        done,
    } = job;
    let name = key.name();
    let r = catch_unwind(AssertUnwindSafe(|| store.put(&name, data.clone()))).unwrap_or_else(|p| {
        Err(aquifer_object::ObjectError::Config(format!(
            "upload of {name} panicked: {}",
            panic_message(&*p)
        )))
    });
    match r {
        Ok(()) => {
            // Its memory is accounted free before anyone learns it is done.
            drop(held);
            done.set(Outcome::Done);
            if let Some(f) = stored.filter(|_| cache) {
                f(&key, &name, &data);
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

/// Takes `.1` bytes off the uploads' moving count when dropped.
struct Moved<'a>(&'a AtomicUsize, usize);

impl Drop for Moved<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::SeqCst);
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
        let moving = Arc::new(AtomicUsize::new(0));
        let workers = {
            let (store, buffers, stored) = (store.clone(), buffers.clone(), stored.clone());
            let moving = moving.clone();
            Workers::spawn("upload", threads, queue, move |job: Job| {
                // Given back however the job ends, a panic in the cache hook after the
                // put included: a count left too high would have writers wait for bytes
                // that never come instead of sealing idle tails.
                let _moved = Moved(&moving, job.held.bytes());
                execute(&*store, &buffers, stored.as_ref(), job);
            })?
        };
        Ok(UploadPool {
            workers,
            store,
            buffers,
            stored,
            moving,
        })
    }

    /// Budget bytes held by uploads queued or running now: the budget gets them back as
    /// they finish (or keeps them, for a retry, if they fail).
    pub fn moving(&self) -> usize {
        self.moving.load(Ordering::SeqCst)
    }

    /// Upload on the calling thread: for a caller about to wait for this one upload anyway
    /// (a flush with a single tail), two thread hand-offs fewer.
    pub fn run_inline(
        &self,
        key: BlockKey,
        data: Bytes,
        held: Held,
        cache: bool,
    ) -> Arc<Completion> {
        let (job, done) = Job::new(key, data, held, cache);
        execute(&*self.store, &self.buffers, self.stored.as_ref(), job);
        done
    }

    /// Queue an upload of `data` (holding `held` of the budget until it is stored); blocks
    /// while the queue is full.
    pub fn submit(&self, key: BlockKey, data: Bytes, held: Held, cache: bool) -> Arc<Completion> {
        let (job, done) = Job::new(key, data, held, cache);
        let n = job.held.bytes();
        // Counted before it is queued, so the worker's decrement never comes first.
        self.moving.fetch_add(n, Ordering::SeqCst);
        if let Err(job) = self.workers.send(job) {
            self.moving.fetch_sub(n, Ordering::SeqCst);
            done.set(Outcome::Failed(
                "upload pool is shut down".into(),
                job.data,
                job.held,
            ));
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::write::Budget;
    use aquifer_object::{FaultStore, MemStore};

    /// A one-byte block of slice `id`.
    fn key(id: u64) -> BlockKey {
        BlockKey { id, idx: 0, len: 1 }
    }

    #[test]
    fn a_panicking_upload_fails_its_request_and_the_pool_goes_on() {
        let store = Arc::new(FaultStore::new(MemStore::new()));
        let pool =
            UploadPool::new(store.clone(), 1, 4, Arc::new(BufferPool::new(16, 2)), None).unwrap();
        store.set_panic(true);
        let c = pool.submit(key(1), Bytes::from_static(b"x"), Held::default(), false);
        let e = c.wait().unwrap_err();
        assert!(e.contains("panicked"), "{e}");
        // The object is kept for a retry, and the same (only) thread serves the next upload.
        assert!(c.failed_object().is_some());
        store.set_panic(false);
        let c = pool.submit(key(2), Bytes::from_static(b"y"), Held::default(), false);
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
        let c = pool.submit(key(3), Bytes::from_static(b"z"), held, false);
        assert!(c.wait().is_err());
        // A failed upload keeps its bytes (and their budget) for a retry.
        assert_eq!(budget.used(), 60);
        let (data, held) = c.take_failed().unwrap();
        store.set_refuse_writes(false);
        pool.submit(key(3), data, held, false).wait().unwrap();
        assert_eq!(budget.used(), 0);
        // With nothing held, even a request larger than the cap goes through.
        assert!(budget.try_acquire(1000).is_some());
    }
}
