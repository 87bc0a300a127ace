//! Block cache of tidefs.
//!
//! [`BlockCache`] keeps recently read blocks in memory up to a byte limit, evicting the least
//! recently used first. Concurrent misses on the same block share one fetch, so a block
//! read by many readers at once is fetched from the object store once.

use bytes::Bytes;
use moka::future::Cache;
use std::future::Future;
use std::sync::Arc;

/// An in-memory cache of immutable blocks, keyed by object key.
#[derive(Clone)]
pub struct BlockCache {
    inner: Option<Cache<Arc<str>, Bytes>>,
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
        if capacity == 0 {
            return BlockCache { inner: None };
        }
        // LRU rather than TinyLFU admission: blocks are read in streams, and a block fetched
        // ahead of a reader must be admitted, not rejected for being new.
        let inner = Cache::builder()
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .max_capacity(capacity)
            .weigher(|_k: &Arc<str>, v: &Bytes| v.len().try_into().unwrap_or(u32::MAX))
            .build();
        BlockCache { inner: Some(inner) }
    }

    /// The byte limit.
    pub fn capacity(&self) -> u64 {
        self.inner
            .as_ref()
            .and_then(|c| c.policy().max_capacity())
            .unwrap_or(0)
    }

    /// The cached block `key`, if present.
    pub async fn get(&self, key: &str) -> Option<Bytes> {
        self.inner.as_ref()?.get(key).await
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

    /// Bytes currently held (approximate until pending maintenance runs).
    pub fn used(&self) -> u64 {
        self.inner.as_ref().map(|c| c.weighted_size()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

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
