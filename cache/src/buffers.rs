//! Reusable buffers: for the write path, for downloads and for disk-cache reads.
//!
//! A fresh 4 MiB buffer costs a thousand page faults to fill, a fifth of the CPU time of a
//! sequential write; a fresh buffer per disk-cache read made page faults 40% of the time of
//! those reads. A pool keeps buffers of one size and hands them out again once the upload or
//! the reader holding one is done.
//!
//! The shared pools follow demand: they keep every buffer that comes back (up to a cap) and
//! free, every few seconds, the idle buffers that no one took in that time. The buffers a pool
//! holds, idle or in use, never outnumber the most that were in use at once (a buffer is
//! allocated only when none is idle). The process can still peak higher, since buffers kept
//! idle after one phase of work sit beside the memory the next one uses: hence the cap. A cold
//! sequential read keeps some 30 blocks in flight (downloads, the memory cache, disk-cache
//! writes); a pool that kept only 8 idle freed and re-allocated a third of them, 63-90k page
//! faults per GiB read.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Idle buffers a shared pool keeps however long they go unused.
const SHARED_KEPT: usize = 8;
/// Bytes of idle buffers a shared pool keeps at most (at least [`SHARED_KEPT`] buffers).
const SHARED_MAX_BYTES: usize = 64 << 20;
/// How often a pool frees the idle buffers that went unused for a whole period.
const DECAY: Duration = Duration::from_secs(5);

/// A bounded pool of buffers of one block size.
#[derive(Debug)]
pub struct BufferPool {
    size: usize,
    /// Idle buffers kept whatever the demand.
    min: usize,
    /// Idle buffers kept at most.
    max: usize,
    free: Mutex<Free>,
}

/// The idle buffers of a pool, most recently returned last.
#[derive(Debug)]
struct Free {
    bufs: Vec<Vec<u8>>,
    /// The fewest idle buffers since `since`: that many went unused all along.
    low: usize,
    since: Instant,
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
    /// A pool keeping at most `max` free buffers of `size` bytes, however long they go unused.
    pub fn new(size: usize, max: usize) -> Arc<Self> {
        Self::with_limits(size, max, max)
    }

    fn with_limits(size: usize, min: usize, max: usize) -> Arc<Self> {
        Arc::new(BufferPool {
            size,
            min,
            max,
            free: Mutex::new(Free {
                bufs: Vec::new(),
                low: 0,
                since: Instant::now(),
            }),
        })
    }

    /// The pool shared by everything in this process that handles blocks of `size` bytes
    /// (writes and downloads): one pool, so idle memory is bounded once, not per user. It
    /// keeps up to 64 MiB of idle buffers, and frees those that go unused for 5 s down to
    /// 8, also when nothing else uses the pool.
    pub fn shared(size: usize) -> Arc<Self> {
        static POOLS: OnceLock<Mutex<HashMap<usize, Arc<BufferPool>>>> = OnceLock::new();
        let pools = POOLS.get_or_init(|| {
            // One thread decays every shared pool, so that an idle mount gives its buffers
            // back too. If it cannot start, idle buffers still stay within the cap.
            let _ = std::thread::Builder::new()
                .name("tidefs-buffers".into())
                .spawn(|| loop {
                    std::thread::sleep(DECAY);
                    let pools: Vec<_> = POOLS
                        .get()
                        .map(|p| lock(p).values().cloned().collect())
                        .unwrap_or_default();
                    for pool in pools {
                        pool.decay(Instant::now());
                    }
                });
            Default::default()
        });
        lock(pools)
            .entry(size)
            .or_insert_with(|| {
                let max = (SHARED_MAX_BYTES / size.max(1)).max(SHARED_KEPT);
                BufferPool::with_limits(size, SHARED_KEPT, max)
            })
            .clone()
    }

    /// The size of the buffers this pool keeps.
    pub fn size(&self) -> usize {
        self.size
    }

    /// An empty buffer with room for a block.
    pub fn take(&self) -> Vec<u8> {
        let reused = {
            let mut free = lock(&self.free);
            let buf = free.bufs.pop();
            free.low = free.low.min(free.bufs.len());
            buf
        };
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
        let mut free = lock(&self.free);
        if free.bufs.len() < self.max {
            free.bufs.push(buf);
        }
    }

    /// Frees the idle buffers beyond the kept minimum that went unused since the last decay,
    /// if that was at least [`DECAY`] ago.
    fn decay(&self, now: Instant) {
        // Freed once the lock is released.
        let shed = lock(&self.free).shed(self.min, now);
        drop(shed);
    }

    /// Free buffers held now.
    pub fn idle(&self) -> usize {
        lock(&self.free).bufs.len()
    }
}

impl Free {
    /// The idle buffers beyond `min` that went unused since `since`, taken out, if that was
    /// at least [`DECAY`] ago (the caller frees them, outside the lock); the oldest go first,
    /// the most recently used (warmest) stay.
    fn shed(&mut self, min: usize, now: Instant) -> Vec<Vec<u8>> {
        if now.saturating_duration_since(self.since) < DECAY {
            return Vec::new();
        }
        let unused = self.low.saturating_sub(min).min(self.bufs.len());
        let shed = self.bufs.drain(..unused).collect();
        self.low = self.bufs.len();
        self.since = now;
        shed
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        assert_eq!((a.size(), a.min), (3000, SHARED_KEPT));
        assert_eq!(a.max, SHARED_MAX_BYTES / 3000);
        // Huge blocks still keep the minimum.
        assert_eq!(BufferPool::shared(SHARED_MAX_BYTES).max, SHARED_KEPT);
    }

    /// A burst of use leaves its buffers idle for reuse; those that then go unused for a
    /// whole period are freed down to the minimum, the most recently returned kept.
    #[test]
    fn idle_buffers_beyond_the_minimum_are_freed_once_unused_for_a_period() {
        let pool = BufferPool::with_limits(1024, 2, 10);
        let start = lock(&pool.free).since;
        let burst: Vec<Vec<u8>> = (0..12).map(|_| pool.take()).collect();
        burst.into_iter().for_each(|b| drop(pool.freeze(b)));
        assert_eq!(pool.idle(), 10, "kept for reuse up to the cap");
        // Within a period nothing is freed, however long the buffers sat.
        pool.decay(start + DECAY / 2);
        assert_eq!(pool.idle(), 10);
        // The first period saw the pool empty: none went unused all along.
        pool.decay(start + DECAY);
        assert_eq!(pool.idle(), 10);
        // A period in which 3 were taken and returned: 7 went unused, 5 beyond the minimum.
        let again: Vec<Vec<u8>> = (0..3).map(|_| pool.take()).collect();
        let last = again[2].as_ptr();
        again.into_iter().for_each(|b| drop(pool.freeze(b)));
        pool.decay(start + DECAY * 2);
        assert_eq!(pool.idle(), 5);
        // A whole period without use: down to the minimum, the most recently returned kept.
        pool.decay(start + DECAY * 3);
        assert_eq!(pool.idle(), 2);
        let kept: Vec<*const u8> = (0..2).map(|_| pool.take().as_ptr()).collect();
        assert!(kept.contains(&last), "the warmest buffers stay");
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
