//! Block cache of tidefs.
//!
//! [`BlockCache`] keeps recently read blocks in memory up to a byte limit, evicting the least
//! recently used first, optionally in front of a [`DiskCache`] on local disks. Concurrent
//! misses on the same block share one fetch, so a block read by many readers at once is
//! fetched from the object store (or the disk) once.

mod buffers;
mod checked;
mod disk;
mod staging;

pub use buffers::BufferPool;
pub use disk::{DiskCache, DiskCacheConfig, DiskCacheError, DiskCacheStats, FileSpan};
pub use staging::Staging;

use bytes::Bytes;
use moka::future::Cache;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Blocks waiting to be written to the disk cache at most; more are not cached, so a slow
/// disk cannot make fetched blocks pile up in memory.
const DISK_WRITES_IN_FLIGHT: usize = 16;

/// A cache of immutable blocks, keyed by object key: memory, then optionally local disks.
#[derive(Clone)]
pub struct BlockCache {
    inner: Option<Cache<Arc<str>, Bytes>>,
    disk: Option<Arc<DiskCache>>,
    disk_writes: Arc<Semaphore>,
}

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache")
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl BlockCache {
    /// A cache holding at most `capacity` bytes of block data; 0 disables caching (every read
    /// fetches, but concurrent fetches are still not shared).
    pub fn new(capacity: u64) -> Self {
        let disk_writes = Arc::new(Semaphore::new(DISK_WRITES_IN_FLIGHT));
        if capacity == 0 {
            return BlockCache {
                inner: None,
                disk: None,
                disk_writes,
            };
        }
        // LRU rather than TinyLFU admission: blocks are read in streams, and a block fetched
        // ahead of a reader must be admitted, not rejected for being new.
        let inner = Cache::builder()
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .max_capacity(capacity)
            .weigher(|_k: &Arc<str>, v: &Bytes| v.len().try_into().unwrap_or(u32::MAX))
            .build();
        BlockCache {
            inner: Some(inner),
            disk: None,
            disk_writes,
        }
    }

    /// A cache of `memory` bytes in front of `disk`: blocks missing from memory are looked
    /// for on disk before they are fetched, and fetched blocks are written to disk in the
    /// background.
    pub fn with_disk(memory: u64, disk: DiskCache) -> Self {
        BlockCache {
            disk: Some(Arc::new(disk)),
            ..BlockCache::new(memory)
        }
    }

    /// The disk layer, if any.
    pub fn disk(&self) -> Option<&DiskCache> {
        self.disk.as_deref()
    }

    /// The byte limit of the memory layer.
    pub fn capacity(&self) -> u64 {
        self.inner
            .as_ref()
            .and_then(|c| c.policy().max_capacity())
            .unwrap_or(0)
    }

    /// The byte limit of the largest layer: what a reader may fetch ahead without losing it.
    pub fn room(&self) -> u64 {
        self.capacity()
            .max(self.disk.as_ref().map_or(0, |d| d.capacity()))
    }

    /// The cached block `key`, if present.
    pub async fn get(&self, key: &str) -> Option<Bytes> {
        self.inner.as_ref()?.get(key).await
    }

    /// Readies block `key` for a read soon without fetching it from the store: true if a
    /// cache layer holds it. A block on disk is not copied into memory; the kernel is asked to
    /// read its file ahead instead (on `rt`'s blocking pool), so the reads that follow are
    /// served from the page cache with a single copy.
    pub fn ready(&self, key: &str, rt: &tokio::runtime::Handle) -> bool {
        if self.inner.as_ref().is_some_and(|c| c.contains_key(key)) {
            return true;
        }
        match &self.disk {
            Some(disk) if disk.contains(key) => {
                let (disk, key) = (disk.clone(), key.to_string());
                rt.spawn_blocking(move || disk.will_need(&key));
                true
            }
            _ => false,
        }
    }

    /// Bytes `range` of block `key` if the memory or the disk layer holds it, without
    /// fetching; the disk layer reads only the segments the range falls in. A disk read
    /// blocks the calling thread (no hand-off to the blocking pool and back): call it from
    /// threads that are not runtime workers, such as the FUSE request loops inside
    /// `Runtime::block_on`.
    pub async fn get_range(&self, key: &str, range: std::ops::Range<u32>) -> Option<Bytes> {
        if let Some(b) = self.get(key).await {
            return slice_of(&b, range);
        }
        self.disk
            .as_ref()
            .filter(|d| d.contains(key))?
            .get_range(key, Some(range))
    }

    /// Bytes `range` of block `key` as a span of its disk cache file that may be served
    /// unread (see [`DiskCache::span`]); None if the memory layer holds the block (serve it
    /// from there) or the disk layer cannot vouch for the span.
    pub fn span(&self, key: &str, range: std::ops::Range<u32>) -> Option<FileSpan> {
        if self.inner.as_ref().is_some_and(|c| c.contains_key(key)) {
            return None;
        }
        self.disk.as_ref()?.span(key, range)
    }

    /// Caches `data` as block `key`.
    pub async fn insert(&self, key: &str, data: Bytes) {
        if let Some(c) = &self.inner {
            c.insert(Arc::from(key), data).await;
            // Evict now: blocks are large, and moka's deferred maintenance would let many of
            // them pile up past the byte limit.
            c.run_pending_tasks().await;
        }
    }

    /// The block `key`, from the cache or else from `fetch`, whose result is cached. Callers
    /// asking for the same missing key at once wait for a single `fetch`.
    pub async fn get_or_fetch<E, F>(&self, key: &str, fetch: F) -> Result<Bytes, Arc<E>>
    where
        F: Future<Output = Result<Bytes, E>>,
        E: Send + Sync + 'static,
    {
        let fetch = self.through_disk(key, fetch);
        match &self.inner {
            Some(c) => {
                let fetched = std::sync::atomic::AtomicBool::new(false);
                let fetch = async {
                    fetched.store(true, std::sync::atomic::Ordering::Relaxed);
                    fetch.await
                };
                let result = c.try_get_with(Arc::from(key), fetch).await;
                if fetched.load(std::sync::atomic::Ordering::Relaxed) {
                    c.run_pending_tasks().await;
                }
                result
            }
            None => fetch.await.map_err(Arc::new),
        }
    }

    /// `fetch`, looking on disk first and writing what it fetched to disk after.
    async fn through_disk<E, F>(&self, key: &str, fetch: F) -> Result<Bytes, E>
    where
        F: Future<Output = Result<Bytes, E>>,
    {
        let Some(disk) = self.disk.clone() else {
            return fetch.await;
        };
        let key: Arc<str> = Arc::from(key);
        let (d, k) = (disk.clone(), key.clone());
        if let Ok(Some(data)) = tokio::task::spawn_blocking(move || d.get(&k)).await {
            return Ok(data);
        }
        let data = fetch.await?;
        self.write_to_disk(disk, key, data.clone(), false);
        Ok(data)
    }

    /// Keeps a block just written in the disk layer, if there is one (not in memory: a large
    /// write would only flush the hottest blocks), so reading it back needs no fetch. Must be
    /// called on a tokio runtime.
    pub fn keep_written(&self, key: &str, data: Bytes) {
        if let Some(disk) = self.disk.clone() {
            self.write_to_disk(disk, Arc::from(key), data, true);
        }
    }

    /// Writes `data` to the disk layer in the background (replacing what is there if
    /// `replace`), or skips it if too many writes are waiting already.
    fn write_to_disk(&self, disk: Arc<DiskCache>, key: Arc<str>, data: Bytes, replace: bool) {
        match self.disk_writes.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::task::spawn_blocking(move || {
                    if replace {
                        disk.replace(&key, &data);
                    } else {
                        disk.insert(&key, &data);
                    }
                    drop(permit);
                });
            }
            Err(_) => {
                disk.stats()
                    .skipped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Drops blocks `keys` from every layer: for blocks whose objects were deleted, which no
    /// read can ask for again. Their disk cache files are removed before this returns (on the
    /// blocking pool), so the space is free for live blocks instead of waiting for eviction.
    pub async fn discard(&self, keys: Vec<String>) {
        if let Some(c) = &self.inner {
            for k in &keys {
                c.invalidate(k.as_str()).await;
            }
        }
        if let Some(disk) = self.disk.clone() {
            let _ =
                tokio::task::spawn_blocking(move || disk.remove(keys.iter().map(String::as_str)))
                    .await;
        }
    }

    /// Bytes currently held (approximate until pending maintenance runs).
    pub fn used(&self) -> u64 {
        self.inner.as_ref().map(|c| c.weighted_size()).unwrap_or(0)
    }
}

/// Bytes `range` of `block`, if it has them.
fn slice_of(block: &Bytes, range: std::ops::Range<u32>) -> Option<Bytes> {
    let r = range.start as usize..range.end as usize;
    (r.start <= r.end && r.end <= block.len()).then(|| block.slice(r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// `ready` says which blocks a layer holds, and leaves a block on disk there (the kernel
    /// reads its file ahead) instead of copying it into memory; range reads then serve it.
    #[tokio::test(flavor = "multi_thread")]
    async fn ready_blocks_on_disk_stay_out_of_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let disk = DiskCache::open(&crate::DiskCacheConfig {
            dirs: vec![tmp.path().to_path_buf()],
            capacity: 1 << 20,
            free_ratio: 0.0,
        })
        .unwrap();
        disk.insert("on-disk", &[3u8; 5000]);
        let cache = BlockCache::with_disk(1 << 20, disk);
        let rt = tokio::runtime::Handle::current();
        assert!(cache.ready("on-disk", &rt));
        assert!(!cache.ready("nowhere", &rt));
        assert!(cache.get("on-disk").await.is_none(), "copied into memory");
        assert_eq!(
            cache.get_range("on-disk", 10..20).await.unwrap(),
            Bytes::from(vec![3u8; 10])
        );
        assert!(cache.get_range("nowhere", 0..1).await.is_none());
        cache.insert("in-memory", Bytes::from_static(b"x")).await;
        assert!(cache.ready("in-memory", &rt));
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_fetch() {
        let cache = BlockCache::new(1 << 20);
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (cache, fetches) = (cache.clone(), fetches.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_fetch::<(), _>("k", async {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        Ok(Bytes::from_static(b"block"))
                    })
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Bytes::from_static(b"block"));
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert_eq!(cache.get("k").await.unwrap(), Bytes::from_static(b"block"));
    }

    #[tokio::test]
    async fn stays_within_capacity_and_failed_fetches_are_not_cached() {
        let cache = BlockCache::new(10_000);
        for i in 0..100 {
            cache
                .insert(&format!("b{i}"), Bytes::from(vec![0u8; 1000]))
                .await;
        }
        // The limit holds right after the inserts, not only after some later maintenance.
        assert!(cache.used() <= 10_000, "used {}", cache.used());
        for i in 0..100 {
            let key = format!("f{i}");
            cache
                .get_or_fetch::<(), _>(&key, async { Ok(Bytes::from(vec![1u8; 1000])) })
                .await
                .unwrap();
        }
        assert!(cache.used() <= 10_000, "used {}", cache.used());
        let err = cache
            .get_or_fetch("bad", async { Err::<Bytes, _>("boom") })
            .await;
        assert_eq!(*err.unwrap_err(), "boom");
        assert!(cache.get("bad").await.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fetched_blocks_land_on_disk_and_serve_later_mounts() {
        let tmp = tempfile::tempdir().unwrap();
        let config = DiskCacheConfig {
            dirs: vec![tmp.path().to_path_buf()],
            capacity: 1 << 20,
            free_ratio: 0.0,
        };
        let cache = BlockCache::with_disk(0, DiskCache::open(&config).unwrap());
        let v = cache
            .get_or_fetch::<(), _>("k", async { Ok(Bytes::from_static(b"from store")) })
            .await;
        assert_eq!(v.unwrap(), Bytes::from_static(b"from store"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while cache.disk().unwrap().used() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "never written to disk"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        drop(cache);
        // A new cache on the same directory (a remount) serves it without fetching.
        let cache = BlockCache::with_disk(1 << 20, DiskCache::open(&config).unwrap());
        let v = cache
            .get_or_fetch("k", async { Err::<Bytes, _>("store is down") })
            .await;
        assert_eq!(v.unwrap(), Bytes::from_static(b"from store"));
        assert_eq!(cache.room(), 1 << 20);
    }

    #[tokio::test]
    async fn zero_capacity_disables_caching() {
        let cache = BlockCache::new(0);
        let v = cache
            .get_or_fetch::<(), _>("k", async { Ok(Bytes::from_static(b"x")) })
            .await;
        assert_eq!(v.unwrap(), Bytes::from_static(b"x"));
        assert!(cache.get("k").await.is_none());
    }
}
