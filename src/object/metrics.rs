//! Counters of object-store calls.

use super::{ObjectInfo, ObjectStore, StoreError};
use async_trait::async_trait;
use bytes::Bytes;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Counters of one kind of call.
#[derive(Debug, Default)]
pub struct OpStats {
    /// Calls made.
    pub requests: AtomicU64,
    /// Calls that failed.
    pub errors: AtomicU64,
    /// Payload bytes moved (or keys, for deletes).
    pub bytes: AtomicU64,
    /// Total time spent, in microseconds.
    pub micros: AtomicU64,
}

impl OpStats {
    fn record(&self, started: Instant, bytes: u64, ok: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counters of every call made to a store.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    /// put calls.
    pub put: OpStats,
    /// get calls.
    pub get: OpStats,
    /// head calls.
    pub head: OpStats,
    /// delete_batch calls (bytes counts keys).
    pub delete: OpStats,
    /// list calls.
    pub list: OpStats,
    /// Calls repeated after a transient failure.
    pub retries: AtomicU64,
}

/// Wraps a store, counting every call in [`StoreMetrics`].
#[derive(Debug)]
pub struct Instrumented {
    inner: Arc<dyn ObjectStore>,
    metrics: Arc<StoreMetrics>,
}

impl Instrumented {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Instrumented {
            inner,
            metrics: Arc::default(),
        }
    }

    /// The counters.
    pub fn metrics(&self) -> Arc<StoreMetrics> {
        self.metrics.clone()
    }
}

#[async_trait]
impl ObjectStore for Instrumented {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let (t, n) = (Instant::now(), data.len() as u64);
        let r = self.inner.put(key, data).await;
        self.metrics.put.record(t, n, r.is_ok());
        r
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StoreError> {
        let t = Instant::now();
        let r = self.inner.get(key, range).await;
        let n = r.as_ref().map(|b| b.len() as u64).unwrap_or(0);
        self.metrics.get.record(t, n, r.is_ok());
        r
    }

    async fn head(&self, key: &str) -> Result<u64, StoreError> {
        let t = Instant::now();
        let r = self.inner.head(key).await;
        self.metrics.head.record(t, 0, r.is_ok());
        r
    }

    async fn delete_batch(&self, keys: &[String]) -> Vec<(String, StoreError)> {
        let t = Instant::now();
        let failed = self.inner.delete_batch(keys).await;
        self.metrics
            .delete
            .record(t, keys.len() as u64, failed.is_empty());
        failed
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ObjectInfo>, StoreError> {
        let t = Instant::now();
        let r = self.inner.list(prefix, after, limit).await;
        self.metrics.list.record(t, 0, r.is_ok());
        r
    }
}
