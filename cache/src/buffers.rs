//! Reusable buffers: for the write path, for downloads and for disk-cache reads.
//!
//! A fresh 4 MiB buffer costs a thousand page faults to fill, a fifth of the CPU time of a
//! sequential write; a fresh buffer per disk-cache read made page faults 40% of the time of
//! those reads. A pool keeps a few buffers of one size and hands them out again once the
//! upload or the reader holding one is done.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Idle buffers a shared pool keeps.
const SHARED_KEPT: usize = 8;

/// A bounded pool of buffers of one block size.
#[derive(Debug)]
pub struct BufferPool {
    size: usize,
    max: usize,
    free: Mutex<Vec<Vec<u8>>>,
}

/// A buffer that returns to its pool when the last [`Bytes`] viewing it is dropped.
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

impl BufferPool {
    /// A pool keeping at most `max` free buffers of `size` bytes.
    pub fn new(size: usize, max: usize) -> Arc<Self> {
        Arc::new(BufferPool {
            size,
            max,
            free: Mutex::new(Vec::new()),
        })
    }

    /// The pool shared by everything in this process that handles blocks of `size` bytes
    /// (writes and downloads), keeping at most 8 idle buffers: one pool, so idle memory is
    /// bounded once, not per user.
    pub fn shared(size: usize) -> Arc<Self> {
        static POOLS: OnceLock<Mutex<HashMap<usize, Arc<BufferPool>>>> = OnceLock::new();
        let mut pools = POOLS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        pools
            .entry(size)
            .or_insert_with(|| BufferPool::new(size, SHARED_KEPT))
            .clone()
    }

    /// The size of the buffers this pool keeps.
    pub fn size(&self) -> usize {
        self.size
    }

    /// An empty buffer with room for a block.
    pub fn take(&self) -> Vec<u8> {
        let reused = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        reused.unwrap_or_else(|| Vec::with_capacity(self.size))
    }

    /// Freezes `buf` for upload or readers; it comes back to the pool when no longer
    /// referenced.
    pub fn freeze(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        if buf.capacity() < self.size {
            return Bytes::from(buf);
        }
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        // Only buffers of exactly the pool's size: idle memory stays at `max` blocks.
        if buf.capacity() != self.size {
            return;
        }
        buf.clear();
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.max {
            free.push(buf);
        }
    }

    /// Free buffers held now.
    pub fn idle(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_after_the_last_reference() {
        let pool = BufferPool::new(1024, 2);
        let mut b = pool.take();
        let ptr = b.as_ptr();
        b.extend_from_slice(&[7u8; 1024]);
        let frozen = pool.freeze(b);
        let view = frozen.clone();
        drop(frozen);
        assert_eq!(pool.idle(), 0);
        assert_eq!(&view[..3], &[7, 7, 7]);
        drop(view);
        assert_eq!(pool.idle(), 1);
        let again = pool.take();
        assert_eq!((again.as_ptr(), again.len()), (ptr, 0));
    }

    #[test]
    fn one_shared_pool_per_size() {
        let (a, b) = (BufferPool::shared(3000), BufferPool::shared(3000));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &BufferPool::shared(3001)));
        assert_eq!((a.size(), a.max), (3000, SHARED_KEPT));
    }

    #[test]
    fn the_pool_is_bounded_and_keeps_only_buffers_of_its_size() {
        let pool = BufferPool::new(1024, 2);
        let (a, b, c) = (pool.take(), pool.take(), pool.take());
        drop((pool.freeze(a), pool.freeze(b), pool.freeze(c)));
        assert_eq!(pool.idle(), 2);
        let pool = BufferPool::new(1024, 2);
        drop(pool.freeze(vec![1, 2, 3]));
        // A pooled buffer that grew past a block is dropped, not kept idle at its new size.
        let mut grown = pool.take();
        grown.extend_from_slice(&[5u8; 1025]);
        assert!(grown.capacity() > 1024);
        drop(pool.freeze(grown));
        assert_eq!(pool.idle(), 0);
    }
}
