//! Retries with exponential backoff and full jitter, for any store.
//!
//! Transient failures (I/O, throttling, 5xx, dropped connections, timeouts) are retried;
//! a missing or corrupt object is not. Each retry is counted in [`StoreMetrics`].

use super::{ObjectInfo, ObjectStore, StoreError, StoreMetrics};
use async_trait::async_trait;
use bytes::Bytes;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How often and how patiently to retry.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// Backoff before the first retry; it doubles each time.
    pub base: Duration,
    /// Longest backoff.
    pub cap: Duration,
    /// No retry starts after this much time since the first attempt.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // Up to about two minutes of retrying before a write is reported as failed (the
        // attempt running at the deadline may take up to its own timeout more).
        RetryPolicy {
            attempts: 10,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(15),
            deadline: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `n` (1-based): random in [0, min(cap, base * 2^(n-1))].
    pub fn backoff(&self, n: u32) -> Duration {
        let ceiling = self.base.saturating_mul(1 << (n - 1).min(20)).min(self.cap);
        ceiling.mul_f64(rand::random::<f64>())
    }
}

/// Whether retrying may help: I/O errors, 5xx, throttling and timeouts, not refusals or
/// missing objects.
fn transient(e: &StoreError) -> bool {
    matches!(e, StoreError::Io { .. })
}

/// Wraps a store, retrying transient failures.
#[derive(Debug)]
pub struct Retrying {
    inner: Arc<dyn ObjectStore>,
    policy: RetryPolicy,
    metrics: Arc<StoreMetrics>,
}

impl Retrying {
    /// Wraps `inner`; retries are counted in `metrics`.
    pub fn new(
        inner: Arc<dyn ObjectStore>,
        policy: RetryPolicy,
        metrics: Arc<StoreMetrics>,
    ) -> Self {
        Retrying {
            inner,
            policy,
            metrics,
        }
    }

    async fn retry<T, F, Fut>(&self, key: &str, mut call: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let started = std::time::Instant::now();
        let mut attempt = 1;
        loop {
            match call().await {
                Err(e)
                    if transient(&e)
                        && attempt < self.policy.attempts
                        && started.elapsed() < self.policy.deadline =>
                {
                    self.metrics.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(key, attempt, error = %e, "retrying");
                    tokio::time::sleep(self.policy.backoff(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[async_trait]
impl ObjectStore for Retrying {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.retry(key, || self.inner.put(key, data.clone())).await
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StoreError> {
        self.retry(key, || self.inner.get(key, range.clone())).await
    }

    async fn head(&self, key: &str) -> Result<u64, StoreError> {
        self.retry(key, || self.inner.head(key)).await
    }

    async fn delete_batch(&self, keys: &[String]) -> Vec<(String, StoreError)> {
        let mut pending = keys.to_vec();
        let started = std::time::Instant::now();
        let mut attempt = 1;
        loop {
            let failed = self.inner.delete_batch(&pending).await;
            let retry = failed.iter().any(|(_, e)| transient(e));
            let out_of_time = started.elapsed() >= self.policy.deadline;
            if failed.is_empty() || !retry || attempt >= self.policy.attempts || out_of_time {
                return failed;
            }
            // Only the keys that failed go again.
            self.metrics.retries.fetch_add(1, Ordering::Relaxed);
            pending = failed.into_iter().map(|(k, _)| k).collect();
            tokio::time::sleep(self.policy.backoff(attempt)).await;
            attempt += 1;
        }
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ObjectInfo>, StoreError> {
        self.retry(prefix, || self.inner.list(prefix, after, limit))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::{FaultyStore, LocalStore};

    fn fast() -> RetryPolicy {
        RetryPolicy {
            attempts: 5,
            base: Duration::from_millis(1),
            cap: Duration::from_millis(5),
            deadline: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let faulty = Arc::new(FaultyStore::new(Arc::new(
            LocalStore::open(dir.path()).unwrap(),
        )));
        let metrics = Arc::new(StoreMetrics::default());
        let store = Retrying::new(faulty.clone(), fast(), metrics.clone());
        faulty.fail_puts(3);
        store.put("k", Bytes::from_static(b"v")).await.unwrap();
        assert_eq!(metrics.retries.load(Ordering::Relaxed), 3);
        faulty.fail_gets(2);
        assert_eq!(store.get("k", None).await.unwrap(), "v");
        assert_eq!(metrics.retries.load(Ordering::Relaxed), 5);
        // Past the attempts, the failure comes through.
        faulty.fail_puts(10);
        assert!(store.put("k2", Bytes::from_static(b"v")).await.is_err());
        // A missing object is not retried.
        let before = metrics.retries.load(Ordering::Relaxed);
        assert!(matches!(
            store.get("missing", None).await,
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(metrics.retries.load(Ordering::Relaxed), before);
    }

    #[tokio::test]
    async fn partial_batch_delete_failures_retry_only_the_failed_keys() {
        let dir = tempfile::tempdir().unwrap();
        let faulty = Arc::new(FaultyStore::new(Arc::new(
            LocalStore::open(dir.path()).unwrap(),
        )));
        let metrics = Arc::new(StoreMetrics::default());
        let store = Retrying::new(faulty.clone(), fast(), metrics.clone());
        let keys: Vec<String> = (0..10).map(|i| format!("d/{i}")).collect();
        for k in &keys {
            store.put(k, Bytes::from_static(b"x")).await.unwrap();
        }
        faulty.fail_deletes_matching(Some("d/3"));
        let failed = store.delete_batch(&keys).await;
        assert_eq!(
            failed.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["d/3"]
        );
        assert_eq!(store.list("d/", None, 100).await.unwrap().len(), 1);
        faulty.fail_deletes_matching(None);
        assert!(store.delete_batch(&["d/3".to_string()]).await.is_empty());
        assert!(store.list("d/", None, 100).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn retries_stop_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let faulty = Arc::new(FaultyStore::new(Arc::new(
            LocalStore::open(dir.path()).unwrap(),
        )));
        let metrics = Arc::new(StoreMetrics::default());
        let policy = RetryPolicy {
            attempts: 1000,
            base: Duration::from_millis(20),
            cap: Duration::from_millis(20),
            deadline: Duration::from_millis(100),
        };
        let store = Retrying::new(faulty.clone(), policy, metrics.clone());
        faulty.fail_puts(1000);
        assert!(store.put("k", Bytes::from_static(b"v")).await.is_err());
        let retries = metrics.retries.load(Ordering::Relaxed);
        assert!(
            (1..=20).contains(&retries),
            "{retries} retries within a 100 ms deadline"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            cap: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        for n in 1..30 {
            let b = p.backoff(n);
            assert!(b <= Duration::from_secs(1));
            assert!(b <= Duration::from_millis(100).saturating_mul(1 << (n - 1).min(20)));
        }
    }
}
