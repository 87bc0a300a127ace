//! A fault-injecting store wrapper: a test tool that makes a real store fail or stall on
//! demand, to prove retries, error reporting and that no acknowledged data is lost.

use super::{ObjectInfo, ObjectStore, StoreError};
use async_trait::async_trait;
use bytes::Bytes;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Wraps a store; calls fail or slow down as set.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    failing_puts: AtomicU32,
    failing_gets: AtomicU32,
    get_delay_ms: AtomicU64,
    put_delay_ms: AtomicU64,
    failing_deletes: std::sync::Mutex<Option<String>>,
    got_bytes: AtomicU64,
    /// Puts that reached the wrapped store.
    puts: AtomicU64,
    /// Gets under way now, and the most there ever were at once.
    gets_in_flight: (AtomicU64, AtomicU64),
}

fn injected(key: &str) -> StoreError {
    StoreError::Io {
        key: key.to_string(),
        cause: std::io::Error::other("injected fault"),
    }
}

fn take(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl FaultyStore {
    /// Wraps `inner` with no faults set.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        FaultyStore {
            inner,
            failing_puts: AtomicU32::new(0),
            failing_gets: AtomicU32::new(0),
            get_delay_ms: AtomicU64::new(0),
            put_delay_ms: AtomicU64::new(0),
            failing_deletes: std::sync::Mutex::new(None),
            got_bytes: AtomicU64::new(0),
            puts: AtomicU64::new(0),
            gets_in_flight: (AtomicU64::new(0), AtomicU64::new(0)),
        }
    }

    /// Bytes returned by successful gets so far.
    pub fn got_bytes(&self) -> u64 {
        self.got_bytes.load(Ordering::SeqCst)
    }

    /// Puts passed on to the wrapped store so far (failed ones not counted).
    pub fn puts(&self) -> u64 {
        self.puts.load(Ordering::SeqCst)
    }

    /// The most gets that were under way at once so far.
    pub fn most_gets_at_once(&self) -> u64 {
        self.gets_in_flight.1.load(Ordering::SeqCst)
    }

    /// The next `n` puts fail.
    pub fn fail_puts(&self, n: u32) {
        self.failing_puts.store(n, Ordering::SeqCst);
    }

    /// The next `n` gets fail.
    pub fn fail_gets(&self, n: u32) {
        self.failing_gets.store(n, Ordering::SeqCst);
    }

    /// Deletes of keys containing `pattern` fail (None: none do).
    pub fn fail_deletes_matching(&self, pattern: Option<&str>) {
        *self
            .failing_deletes
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = pattern.map(str::to_string);
    }

    /// Every get waits this long first.
    pub fn delay_gets(&self, delay: Duration) {
        self.get_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Makes every later put take `delay` longer (zero: no delay).
    pub fn delay_puts(&self, delay: Duration) {
        self.put_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let delay = self.put_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if take(&self.failing_puts) {
            return Err(injected(key));
        }
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put(key, data).await
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StoreError> {
        let (now, most) = &self.gets_in_flight;
        most.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
        // Counted out however the get ends, cancelled during its delay included.
        struct Out<'a>(&'a AtomicU64);
        impl Drop for Out<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _out = Out(now);
        let delay = self.get_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if take(&self.failing_gets) {
            return Err(injected(key));
        }
        let got = self.inner.get(key, range).await;
        if let Ok(b) = &got {
            self.got_bytes.fetch_add(b.len() as u64, Ordering::SeqCst);
        }
        got
    }

    async fn head(&self, key: &str) -> Result<u64, StoreError> {
        self.inner.head(key).await
    }

    async fn delete_batch(&self, keys: &[String]) -> Vec<(String, StoreError)> {
        let pattern = self
            .failing_deletes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (fail, pass): (Vec<String>, Vec<String>) = keys
            .iter()
            .cloned()
            .partition(|k| pattern.as_deref().is_some_and(|p| k.contains(p)));
        let mut failed = self.inner.delete_batch(&pass).await;
        failed.extend(fail.into_iter().map(|k| {
            let e = injected(&k);
            (k, e)
        }));
        failed
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ObjectInfo>, StoreError> {
        self.inner.list(prefix, after, limit).await
    }
}
