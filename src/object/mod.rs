//! Object stores: where block data lives.
//!
//! Objects are immutable: written once under a fresh key, read whole or by range, deleted in
//! batches. Every store sits behind [`ObjectStore`]; [`Instrumented`] counts every call.

mod faulty;
mod local;
mod metrics;
mod retry;
mod s3;
mod writeback;

pub use faulty::FaultyStore;
pub use local::LocalStore;
pub use metrics::{Instrumented, OpStats, StoreMetrics};
pub use retry::{RetryPolicy, Retrying};
pub use s3::{S3Location, S3Options, S3Store};
pub use writeback::WritebackStore;

use async_trait::async_trait;
use bytes::Bytes;
use std::ops::Range;

/// Why an object-store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("object {0} not found")]
    NotFound(String),
    /// The store could not be reached or refused the call.
    #[error("object store I/O error on {key}: {cause}")]
    Io {
        /// The key involved.
        key: String,
        /// The underlying error.
        cause: std::io::Error,
    },
    /// The store refused the request for good (bad credentials, missing bucket, forbidden,
    /// bad request): retrying cannot help.
    #[error("object store refused the request for {key}: {cause}")]
    Refused {
        /// The key involved.
        key: String,
        /// What the store said.
        cause: String,
    },
    /// The stored object does not have the expected size.
    #[error("object {key} is {actual} bytes, expected {expected}")]
    Corrupt {
        /// The key involved.
        key: String,
        /// Bytes found.
        actual: u64,
        /// Bytes expected.
        expected: u64,
    },
}

/// One object in a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was written, if the store says.
    pub modified: Option<std::time::SystemTime>,
}

/// A store of immutable objects.
#[async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// A description for logs and status (no secrets).
    fn describe(&self) -> String;
    /// Stores `data` under `key`; when this returns Ok the object is durable.
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError>;
    /// Reads the object `key`, or the byte `range` of it.
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StoreError>;
    /// The size of object `key`.
    async fn head(&self, key: &str) -> Result<u64, StoreError>;
    /// Deletes `keys` (a missing key counts as deleted); returns the keys that failed.
    async fn delete_batch(&self, keys: &[String]) -> Vec<(String, StoreError)>;
    /// Up to `limit` objects whose keys start with `prefix` and sort after `after`, in key order.
    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ObjectInfo>, StoreError>;
}
