//! The write queue: blocks offered to the tier wait here for the one writer thread per
//! disk (`cache-write`), so a reader never waits for the disk. The queue is bounded in
//! bytes: a busy disk drops what readers offer, a warm-up ([`crate::Tier::admit`]) waits
//! for room.

use super::Inner;
use crate::file::HEADER;
use crate::Block;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Blocks waiting to be written to the disk; beyond this, inserts are dropped rather than
/// let a slow disk hold memory.
const QUEUE_BYTES: usize = 32 << 20;

#[derive(Default)]
pub(super) struct Queue {
    items: VecDeque<(String, Block)>,
    bytes: usize,
    /// An item is being written (for `flush`).
    busy: bool,
}

impl Inner {
    /// Queue a block for the writer; `wait` for room in the queue rather than drop it.
    pub(super) fn enqueue(&self, key: &str, block: &Block, wait: bool) {
        if wait {
            // A warm-up right after start: the index is needed to count the quota.
            let end = Instant::now() + Duration::from_secs(60);
            while !self.ready.load(Ordering::Acquire) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if !self.usable() || !self.ready.load(Ordering::Acquire) {
            return;
        }
        if self.low_space.load(Ordering::Relaxed) {
            self.wake();
            return;
        }
        let w = (HEADER + block.len()) as u64;
        let end = Instant::now() + Duration::from_secs(2);
        while self.used() + w > self.cfg.capacity {
            // Declined for room: the housekeeper evicts down to the low watermark even if
            // this block alone is what passes the high one.
            self.pressure.store(true, Ordering::Relaxed);
            self.wake();
            if !wait || Instant::now() > end {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.st.lock().contains(key) {
            return;
        }
        let mut q = self.queue.lock();
        if q.items.iter().any(|(k, _)| k == key) {
            return;
        }
        while wait && !q.items.is_empty() && q.bytes + block.len() > QUEUE_BYTES {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            self.queue_cv.wait_for(&mut q, Duration::from_millis(50));
        }
        if q.bytes + block.len() > QUEUE_BYTES && !q.items.is_empty() {
            return;
        }
        q.bytes += block.len();
        q.items.push_back((key.to_string(), block.clone()));
        drop(q);
        self.queue_cv.notify_one();
    }

    pub(super) fn write_loop(&self) {
        loop {
            let (key, block) = {
                let mut q = self.queue.lock();
                loop {
                    if let Some(item) = q.items.pop_front() {
                        q.bytes -= item.1.len();
                        q.busy = true;
                        // Room for a waiting warm-up.
                        self.queue_cv.notify_all();
                        break item;
                    }
                    q.busy = false;
                    self.queue_cv.notify_all();
                    if self.stop.load(Ordering::Acquire) {
                        return;
                    }
                    self.queue_cv.wait_for(&mut q, Duration::from_millis(200));
                }
            };
            self.store(&key, &block);
        }
    }

    /// Wait until the queue is empty and nothing is being written ([`crate::Tier::flush`]).
    pub(super) fn flush(&self) {
        let mut q = self.queue.lock();
        while !q.items.is_empty() || q.busy {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            self.queue_cv.wait_for(&mut q, Duration::from_millis(50));
        }
    }
}
