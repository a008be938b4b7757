//! A few named threads taking jobs from one bounded queue. The upload pool and the
//! prefetcher are both this, and stop alike: the queue is closed, then every thread joined.

use parking_lot::Mutex;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

pub(crate) struct Workers<J> {
    tx: Mutex<Option<SyncSender<J>>>,
    threads: Vec<JoinHandle<()>>,
}

impl<J: Send + 'static> Workers<J> {
    /// `threads` threads (at least one) named `name-N`, each running `work` on the jobs of a
    /// queue of `queue` places (at least one).
    pub(crate) fn spawn(
        name: &str,
        threads: usize,
        queue: usize,
        work: impl Fn(J) + Send + Sync + 'static,
    ) -> std::io::Result<Workers<J>> {
        let (tx, rx) = sync_channel::<J>(queue.max(1));
        let rx: Arc<Mutex<Receiver<J>>> = Arc::new(Mutex::new(rx));
        let work = Arc::new(work);
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let (rx, work) = (rx.clone(), work.clone());
            handles.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || loop {
                        let job = rx.lock().recv();
                        let Ok(job) = job else { return };
                        work(job);
                    })?,
            );
        }
        Ok(Workers {
            tx: Mutex::new(Some(tx)),
            threads: handles,
        })
    }

    /// Queue `job`, waiting while the queue is full; the job comes back if the workers are
    /// stopped.
    pub(crate) fn send(&self, job: J) -> Result<(), J> {
        // Not under the lock: a full queue must not hold up the other senders.
        let tx = self.tx.lock().clone();
        match tx {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }

    /// Queue `job` if there is room now; false otherwise.
    pub(crate) fn try_send(&self, job: J) -> bool {
        match self.tx.lock().as_ref() {
            Some(tx) => tx.try_send(job).is_ok(),
            None => false,
        }
    }
}

impl<J> Drop for Workers<J> {
    fn drop(&mut self) {
        self.tx.lock().take();
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
    }
}
