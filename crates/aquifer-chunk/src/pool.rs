//! Background block uploads with a bounded queue: writers wait, rather than fail, when the
//! object store falls behind.

use aquifer_object::ObjectStore;
use bytes::Bytes;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Completion of one upload: `None` while running, then the outcome.
#[derive(Default)]
pub struct Completion {
    state: Mutex<Option<Result<(), String>>>,
    cv: Condvar,
}

impl Completion {
    pub fn done(value: Result<(), String>) -> Arc<Completion> {
        let c = Arc::new(Completion::default());
        c.set(value);
        c
    }

    fn set(&self, value: Result<(), String>) {
        *self.state.lock().unwrap() = Some(value);
        self.cv.notify_all();
    }

    pub fn wait(&self) -> Result<(), String> {
        let mut s = self.state.lock().unwrap();
        loop {
            if let Some(v) = s.as_ref() {
                return v.clone();
            }
            s = self.cv.wait(s).unwrap();
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

    /// An empty buffer with room for `size` bytes.
    pub fn take(&self) -> Vec<u8> {
        self.free
            .lock()
            .unwrap()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.size))
    }

    /// Return a buffer; kept if it is block-sized and the pool is not full.
    pub fn give(&self, mut b: Vec<u8>) {
        if b.capacity() < self.size || b.capacity() > 2 * self.size {
            return;
        }
        let mut free = self.free.lock().unwrap();
        if free.len() < self.max {
            b.clear();
            free.push(b);
        }
    }

    pub fn idle(&self) -> usize {
        self.free.lock().unwrap().len()
    }
}

type Job = (String, Bytes, Arc<Completion>);

pub struct UploadPool {
    tx: Mutex<Option<SyncSender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl UploadPool {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        threads: usize,
        queue: usize,
        buffers: Arc<BufferPool>,
    ) -> UploadPool {
        let (tx, rx) = sync_channel::<Job>(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let handles = (0..threads.max(1))
            .map(|i| {
                let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
                let store = store.clone();
                let buffers = buffers.clone();
                std::thread::Builder::new()
                    .name(format!("upload-{i}"))
                    .spawn(move || loop {
                        let job = rx.lock().unwrap().recv();
                        let Ok((key, data, done)) = job else { return };
                        let r = store.put(&key, data.clone()).map_err(|e| {
                            tracing::error!(error = %e, "block upload failed");
                            e.to_string()
                        });
                        done.set(r);
                        // The store is done with the block: its buffer can hold the next.
                        if data.is_unique() {
                            buffers.give(Vec::from(data));
                        }
                    })
                    .expect("spawn upload thread")
            })
            .collect();
        UploadPool {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(handles),
        }
    }

    /// Queue an upload; blocks while the queue is full.
    pub fn submit(&self, key: String, data: Bytes) -> Arc<Completion> {
        let done = Arc::new(Completion::default());
        let tx = self.tx.lock().unwrap().clone();
        match tx {
            Some(tx) => {
                if tx.send((key, data, done.clone())).is_err() {
                    done.set(Err("upload pool is shut down".into()));
                }
            }
            None => done.set(Err("upload pool is shut down".into())),
        }
        done
    }
}

impl Drop for UploadPool {
    fn drop(&mut self) {
        self.tx.lock().unwrap().take();
        for t in std::mem::take(&mut *self.threads.lock().unwrap()) {
            let _ = t.join();
        }
    }
}
