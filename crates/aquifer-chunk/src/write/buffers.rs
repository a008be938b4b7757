//! Block-sized buffers, reused by writers, uploads, fetches and the block cache.

use crate::ChunkStore;
use parking_lot::Mutex;

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

impl ChunkStore {
    /// An empty buffer with room for a whole block and its trailer.
    pub(crate) fn block_buffer(&self) -> Vec<u8> {
        self.buffers.take()
    }

    /// The capacity of [`block_buffer`](ChunkStore::block_buffer)'s buffers.
    pub(crate) fn block_buffer_size(&self) -> usize {
        self.buffers.size()
    }
}
