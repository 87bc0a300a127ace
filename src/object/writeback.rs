//! Writeback: a store whose puts complete once the block is durable on local disk, and which
//! uploads it to the real store in the background.
//!
//! With `tidefs mount --writeback`, a write's commit (close, fsync) waits only for the local
//! disk: [`Staging`] fsyncs each block before `put` returns, then a background task uploads
//! it (retrying until it succeeds, with backoff) and forgets the local copy. Reads of a block
//! not uploaded yet are served from staging. Blocks staged when the mount was killed are
//! uploaded by the next mount with the same cache directory. A block deleted before its upload
//! is dropped from staging (and, if its upload was under way, deleted again once it lands), so
//! removals never leave uploaded garbage behind.

use super::{ObjectInfo, ObjectStore, StoreError};
use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;
use tidefs_cache::Staging;
use tokio::sync::mpsc;

/// Longest wait between two attempts of a failing upload.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A staged block's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// On local disk, not uploaded yet.
    Staged,
    /// Deleted while staged: the upload must not happen, or must be undone.
    Deleted,
}

/// An [`ObjectStore`] staging writes on local disk and uploading them in the background.
#[derive(Debug)]
pub struct WritebackStore {
    inner: Arc<dyn ObjectStore>,
    staging: Arc<Staging>,
    /// Keys staged and not uploaded yet, with their size.
    pending: Arc<DashMap<String, (State, u64)>>,
    queue: mpsc::UnboundedSender<String>,
}

fn io_err(key: &str, cause: std::io::Error) -> StoreError {
    StoreError::Io {
        key: key.to_string(),
        cause,
    }
}

impl WritebackStore {
    /// Writes through `staging` to `inner`, uploading on `rt`. Blocks found staged (left by
    /// an earlier mount) are queued for upload at once.
    pub fn start(
        inner: Arc<dyn ObjectStore>,
        staging: Staging,
        rt: &tokio::runtime::Handle,
    ) -> std::io::Result<Arc<Self>> {
        let (queue, mut jobs) = mpsc::unbounded_channel::<String>();
        let store = Arc::new(WritebackStore {
            inner,
            staging: Arc::new(staging),
            pending: Arc::new(DashMap::new()),
            queue,
        });
        let left = store.staging.keys()?;
        if !left.is_empty() {
            tracing::info!(
                blocks = left.len(),
                "uploading blocks staged by an earlier mount"
            );
        }
        for key in left {
            let size = store.staging.len(&key).ok().flatten().unwrap_or(0);
            store.pending.insert(key.clone(), (State::Staged, size));
            let _ = store.queue.send(key);
        }
        let uploader = Arc::downgrade(&store);
        rt.spawn(async move {
            while let Some(key) = jobs.recv().await {
                let Some(store) = uploader.upgrade() else {
                    return;
                };
                tokio::spawn(async move { store.upload(key).await });
            }
        });
        Ok(store)
    }

    /// Blocks staged and not yet uploaded, and their bytes.
    pub fn pending(&self) -> (u64, u64) {
        let bytes = self.pending.iter().map(|e| e.value().1).sum();
        (self.pending.len() as u64, bytes)
    }

    /// Waits until every staged block is uploaded, or `limit` has passed; returns how many
    /// are left (they stay staged for the next mount).
    pub async fn drain(&self, limit: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.pending.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.pending.len()
    }

    /// Uploads staged block `key` until it succeeds, then forgets the local copy.
    async fn upload(self: Arc<Self>, key: String) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.is_deleted(&key) {
                return self.forget(&key).await;
            }
            // Read back from disk (most likely from the page cache) rather than kept in
            // memory: a slow store must not make staged blocks pile up in memory.
            let staged = {
                let (staging, k) = (self.staging.clone(), key.clone());
                tokio::task::spawn_blocking(move || staging.get(&k)).await
            };
            let data = match staged {
                Ok(Ok(Some(data))) => data,
                Ok(Ok(None)) => {
                    self.pending.remove(&key);
                    return;
                }
                Ok(Err(e)) => {
                    // A damaged staged block cannot be uploaded; its slice reads will fail
                    // loudly rather than return wrong bytes.
                    tracing::error!(key, error = %e, "staged block is damaged; not uploaded");
                    self.pending.remove(&key);
                    return;
                }
                Err(e) => {
                    tracing::error!(key, error = %e, "reading a staged block failed");
                    return;
                }
            };
            match self.inner.put(&key, data).await {
                Ok(()) => {
                    if self.is_deleted(&key) {
                        // Deleted while uploading: delete what just landed.
                        let _ = self.inner.delete_batch(std::slice::from_ref(&key)).await;
                    }
                    return self.forget(&key).await;
                }
                Err(e) => {
                    tracing::warn!(key, error = %e, retry_in = ?backoff, "upload of a staged block failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn is_deleted(&self, key: &str) -> bool {
        self.pending
            .get(key)
            .is_some_and(|e| e.value().0 == State::Deleted)
    }

    /// Drops the local copy of `key` and its pending entry.
    async fn forget(&self, key: &str) {
        let (staging, k) = (self.staging.clone(), key.to_string());
        let removed = tokio::task::spawn_blocking(move || staging.remove(&k)).await;
        if let Ok(Err(e)) = removed {
            tracing::warn!(key, error = %e, "removing an uploaded block from staging failed");
        }
        self.pending.remove(key);
    }
}

#[async_trait]
impl ObjectStore for WritebackStore {
    fn describe(&self) -> String {
        format!("writeback({})", self.inner.describe())
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let (staging, k, d) = (self.staging.clone(), key.to_string(), data.clone());
        tokio::task::spawn_blocking(move || staging.put(&k, &d))
            .await
            .map_err(|e| io_err(key, std::io::Error::other(e)))?
            .map_err(|e| io_err(key, e))?;
        self.pending
            .insert(key.to_string(), (State::Staged, data.len() as u64));
        let _ = self.queue.send(key.to_string());
        Ok(())
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StoreError> {
        if self.pending.contains_key(key) {
            let (staging, k) = (self.staging.clone(), key.to_string());
            let staged = tokio::task::spawn_blocking(move || staging.get(&k))
                .await
                .map_err(|e| io_err(key, std::io::Error::other(e)))?
                .map_err(|e| io_err(key, e))?;
            if let Some(data) = staged {
                return match range {
                    None => Ok(data),
                    Some(r) if r.start <= r.end && r.end <= data.len() as u64 => {
                        Ok(data.slice(r.start as usize..r.end as usize))
                    }
                    Some(_) => Err(StoreError::Corrupt {
                        key: key.to_string(),
                        actual: data.len() as u64,
                        expected: range.map_or(0, |r| r.end),
                    }),
                };
            }
            // Uploaded (and dropped from staging) meanwhile: read it from the store.
        }
        self.inner.get(key, range).await
    }

    async fn head(&self, key: &str) -> Result<u64, StoreError> {
        if self.pending.contains_key(key) {
            let (staging, k) = (self.staging.clone(), key.to_string());
            if let Ok(Ok(Some(len))) = tokio::task::spawn_blocking(move || staging.len(&k)).await {
                return Ok(len);
            }
        }
        self.inner.head(key).await
    }

    async fn delete_batch(&self, keys: &[String]) -> Vec<(String, StoreError)> {
        let mut local = Vec::new();
        for key in keys {
            if let Some(mut e) = self.pending.get_mut(key) {
                e.value_mut().0 = State::Deleted;
                local.push(key.clone());
            }
        }
        if !local.is_empty() {
            let staging = self.staging.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for key in local {
                    let _ = staging.remove(&key);
                }
            })
            .await;
        }
        // Some may have been uploaded already: delete them in the store too.
        self.inner.delete_batch(keys).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::{FaultyStore, LocalStore};

    fn setup() -> (tempfile::TempDir, Arc<FaultyStore>, tokio::runtime::Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn ObjectStore> =
            Arc::new(LocalStore::open(&dir.path().join("objects")).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        (dir, Arc::new(FaultyStore::new(local)), rt)
    }

    #[test]
    fn staged_blocks_are_readable_uploaded_and_survive_a_restart() {
        let (dir, inner, rt) = setup();
        let staging = dir.path().join("staging");
        inner.fail_puts(1_000_000);
        let wb =
            WritebackStore::start(inner.clone(), Staging::open(&staging).unwrap(), rt.handle())
                .unwrap();
        rt.block_on(wb.put("v/a", Bytes::from_static(b"hello")))
            .unwrap();
        // Not in the store (its puts fail), but readable, whole and by range.
        assert!(rt.block_on(inner.get("v/a", None)).is_err());
        assert_eq!(rt.block_on(wb.get("v/a", Some(1..3))).unwrap(), "el");
        assert_eq!(rt.block_on(wb.head("v/a")).unwrap(), 5);
        assert_eq!(wb.pending().0, 1);
        // A "crash": a new writeback store on the same staging uploads what was left.
        drop(wb);
        inner.fail_puts(0);
        let wb =
            WritebackStore::start(inner.clone(), Staging::open(&staging).unwrap(), rt.handle())
                .unwrap();
        assert_eq!(rt.block_on(wb.drain(Duration::from_secs(10))), 0);
        assert_eq!(rt.block_on(inner.get("v/a", None)).unwrap(), "hello");
        assert!(Staging::open(&staging).unwrap().keys().unwrap().is_empty());
    }

    #[test]
    fn a_block_deleted_before_its_upload_never_lands() {
        let (dir, inner, rt) = setup();
        inner.delay_puts(Duration::from_millis(300));
        let wb = WritebackStore::start(
            inner.clone(),
            Staging::open(&dir.path().join("staging")).unwrap(),
            rt.handle(),
        )
        .unwrap();
        rt.block_on(wb.put("v/gone", Bytes::from_static(b"x")))
            .unwrap();
        // The upload is under way (delayed): delete now.
        assert!(rt
            .block_on(wb.delete_batch(&["v/gone".to_string()]))
            .is_empty());
        assert_eq!(rt.block_on(wb.drain(Duration::from_secs(10))), 0);
        assert!(matches!(
            rt.block_on(inner.get("v/gone", None)),
            Err(StoreError::NotFound(_))
        ));
    }
}
