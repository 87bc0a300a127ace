//! S3 and S3-compatible object stores (AWS, MinIO, Ceph RGW, OSS, ...) through aws-sdk-s3.
//!
//! Concurrency is bounded per kind of request (uploads, downloads) by semaphores; every
//! request has a timeout. Retries are not done here but by [`super::Retrying`], so that they
//! are the same for every store, testable with [`super::FaultyStore`] and counted in metrics.

use super::{ObjectInfo, ObjectStore, StoreError};
use async_trait::async_trait;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use bytes::Bytes;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;
use tidefs_cache::BufferPool;
use tokio::sync::Semaphore;

/// Where an S3 bucket is, parsed from a `--bucket` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    /// Custom endpoint (`http(s)://host:port`), or None for AWS.
    pub endpoint: Option<String>,
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket (empty or ending with `/`).
    pub prefix: String,
}

impl S3Location {
    /// Whether requests go over TLS (AWS, or an `https://` endpoint).
    pub fn is_tls(&self) -> bool {
        self.endpoint
            .as_deref()
            .is_none_or(|e| e.starts_with("https://"))
    }

    /// Parses `s3://bucket[/prefix]` (AWS) or `http(s)://host[:port]/bucket[/prefix]` (a custom
    /// endpoint with path-style addressing).
    pub fn parse(url: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid S3 bucket URL {url:?}: {why}");
        let (endpoint, rest) = if let Some(rest) = url.strip_prefix("s3://") {
            (None, rest)
        } else if let Some((scheme, rest)) = url.split_once("://") {
            if scheme != "http" && scheme != "https" {
                return Err(bad("expected s3://BUCKET or http(s)://HOST[:PORT]/BUCKET"));
            }
            let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            (Some(format!("{scheme}://{host}")), path)
        } else {
            return Err(bad("expected s3://BUCKET or http(s)://HOST[:PORT]/BUCKET"));
        };
        let rest = rest.trim_matches('/');
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid {
            return Err(bad("missing or invalid bucket name"));
        }
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        Ok(S3Location {
            endpoint,
            bucket: bucket.to_string(),
            prefix,
        })
    }
}

/// How to reach and load a bucket.
#[derive(Clone)]
pub struct S3Options {
    /// The bucket.
    pub location: S3Location,
    /// Region (default: from the AWS chain for s3://, `us-east-1` for custom endpoints).
    pub region: Option<String>,
    /// Access key and secret key; None: the standard AWS credential chain.
    pub credentials: Option<(String, String)>,
    /// Concurrent PUT requests.
    pub max_uploads: usize,
    /// Concurrent GET, HEAD and LIST requests.
    pub max_downloads: usize,
    /// Concurrent DeleteObjects requests (each up to 1000 keys).
    pub max_deletes: usize,
    /// Timeout of one request.
    pub timeout: Duration,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("location", &self.location)
            .field("region", &self.region)
            .field("access_key", &self.credentials.as_ref().map(|c| &c.0))
            .field(
                "secret_key",
                &self.credentials.as_ref().map(|_| "<redacted>"),
            )
            .field("max_uploads", &self.max_uploads)
            .field("max_downloads", &self.max_downloads)
            .field("max_deletes", &self.max_deletes)
            .finish()
    }
}

/// An S3 bucket (or a prefix of one) as an object store.
pub struct S3Store {
    client: Client,
    location: S3Location,
    uploads: Arc<Semaphore>,
    downloads: Arc<Semaphore>,
    deletes: Arc<Semaphore>,
    timeout: Duration,
    /// Where downloads of whole blocks get their buffers.
    block_buffers: Option<Arc<BufferPool>>,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

fn io(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io {
        key: key.to_string(),
        cause: std::io::Error::other(e.to_string()),
    }
}

/// An SDK error as a store error: a 4xx answer other than 408 (timeout), 429 (throttled) and a
/// checksum mismatch (a body damaged in transit) is a refusal that retrying cannot fix;
/// everything else (5xx, SlowDown, timeouts, connection errors) is transient.
fn sdk_error<E>(key: &str, e: SdkError<E>) -> StoreError
where
    E: std::error::Error + aws_sdk_s3::error::ProvideErrorMetadata + Send + Sync + 'static,
{
    let status = e.raw_response().map(|r| r.status().as_u16());
    let cause = aws_sdk_s3::error::DisplayErrorContext(&e).to_string();
    // A body that did not match its checksum was damaged on the way: sending it again fixes it.
    let damaged = e
        .as_service_error()
        .and_then(|s| s.meta().code())
        .is_some_and(|c| {
            c == "BadDigest" || c == "XAmzContentChecksumMismatch" || c == "InvalidDigest"
        });
    match status {
        Some(s) if (400..500).contains(&s) && s != 408 && s != 429 && !damaged => {
            StoreError::Refused {
                key: key.to_string(),
                cause,
            }
        }
        _ => io(key, cause),
    }
}

/// Adds `Content-MD5` to a request with an in-memory body. S3 requires an integrity header on
/// DeleteObjects; the SDK sends a CRC32 checksum, but several S3-compatible stores (older MinIO,
/// Ceph RGW) accept only Content-MD5, so both are sent.
fn add_content_md5(req: &mut aws_sdk_s3::config::http::HttpRequest) {
    use md5::Digest;
    if let Some(body) = req.body().bytes() {
        let digest = md5::Md5::digest(body);
        let value = aws_smithy_types::base64::encode(digest.as_slice());
        req.headers_mut().insert("content-md5", value);
    }
}

impl S3Store {
    /// A client for the bucket; makes no request yet.
    pub async fn new(opts: &S3Options) -> Self {
        let mut conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            // Retries are tidefs's (see `Retrying`); one attempt per call here.
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
            // No SDK-computed checksums: it would send them as aws-chunked trailers, which
            // several S3-compatible stores reject. Uploads carry a CRC32 header of our own.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        let custom = opts.location.endpoint.is_some();
        if let Some(endpoint) = &opts.location.endpoint {
            conf = conf.endpoint_url(endpoint).force_path_style(true);
        }
        let shared = if custom && opts.credentials.is_some() {
            None
        } else {
            // The standard chain: environment, profile, instance role.
            Some(aws_config::defaults(BehaviorVersion::latest()).load().await)
        };
        let region = opts
            .region
            .clone()
            .or_else(|| {
                shared
                    .as_ref()
                    .and_then(|s| s.region().map(|r| r.to_string()))
            })
            .unwrap_or_else(|| "us-east-1".to_string());
        conf = conf.region(Region::new(region));
        match (&opts.credentials, &shared) {
            (Some((ak, sk)), _) => {
                conf = conf.credentials_provider(Credentials::new(ak, sk, None, None, "tidefs"));
            }
            (None, Some(shared)) => {
                if let Some(provider) = shared.credentials_provider() {
                    conf = conf.credentials_provider(provider);
                }
            }
            (None, None) => {}
        }
        S3Store {
            client: Client::from_conf(conf.build()),
            location: opts.location.clone(),
            uploads: Arc::new(Semaphore::new(opts.max_uploads.max(1))),
            downloads: Arc::new(Semaphore::new(opts.max_downloads.max(1))),
            deletes: Arc::new(Semaphore::new(opts.max_deletes.max(1))),
            timeout: opts.timeout,
            block_buffers: None,
        }
    }

    /// Downloads of `pool`'s buffer size (whole blocks) fill buffers of the pool, which come
    /// back to it when their last reader is done: a fresh 4 MiB buffer costs a thousand page
    /// faults (in a cold sequential read, page faults fell from 3.3% to 1.1% of the machine).
    pub fn with_block_buffers(mut self, pool: Arc<BufferPool>) -> Self {
        self.block_buffers = Some(pool);
        self
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.location.prefix)
    }

    async fn timed<T>(
        &self,
        key: &str,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(io(
                key,
                format!("request timed out after {:?}", self.timeout),
            )),
        }
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        match &self.location.endpoint {
            Some(e) => format!("{e}/{}/{}", self.location.bucket, self.location.prefix),
            None => format!("s3://{}/{}", self.location.bucket, self.location.prefix),
        }
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let _permit = self.uploads.acquire().await.map_err(|e| io(key, e))?;
        self.timed(key, async {
            // The payload is not signed (SigV4's SHA-256 of every block would be the largest
            // CPU cost of writing, on both ends); its integrity is checked by a CRC32 the
            // server verifies (servers that do not know the header ignore it).
            let crc = crc32fast::hash(&data).to_be_bytes();
            self.client
                .put_object()
                .bucket(&self.location.bucket)
                .key(self.full_key(key))
                .checksum_crc32(aws_smithy_types::base64::encode(crc))
                .body(ByteStream::from(data))
                .customize()
                .disable_payload_signing()
                .send()
                .await
                .map_err(|e| sdk_error(key, e))?;
            Ok(())
        })
        .await
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StoreError> {
        let _permit = self.downloads.acquire().await.map_err(|e| io(key, e))?;
        self.timed(key, async {
            let mut req = self
                .client
                .get_object()
                .bucket(&self.location.bucket)
                .key(self.full_key(key));
            if let Some(r) = &range {
                if r.start >= r.end {
                    return Ok(Bytes::new());
                }
                req = req.range(format!("bytes={}-{}", r.start, r.end - 1));
            }
            let resp = req.send().await.map_err(|e| {
                if e.as_service_error().is_some_and(|s| s.is_no_such_key()) {
                    StoreError::NotFound(key.to_string())
                } else {
                    sdk_error(key, e)
                }
            })?;
            // Filled chunk by chunk into one buffer of the announced size: collecting the chunks
            // first and joining them after held every block twice while it arrived.
            let announced = resp.content_length().unwrap_or(0).clamp(0, 64 << 20) as usize;
            let pool = self
                .block_buffers
                .as_ref()
                .filter(|p| announced > 0 && p.size() == announced);
            let mut data = match pool {
                Some(p) => p.take(),
                None => Vec::with_capacity(announced),
            };
            let mut body = resp.body;
            while let Some(chunk) = body.try_next().await.map_err(|e| io(key, e))? {
                data.extend_from_slice(&chunk);
            }
            Ok(match pool {
                Some(p) => p.freeze(data),
                None => Bytes::from(data),
            })
        })
        .await
    }

    async fn head(&self, key: &str) -> Result<u64, StoreError> {
        let _permit = self.downloads.acquire().await.map_err(|e| io(key, e))?;
        self.timed(key, async {
            let resp = self
                .client
                .head_object()
                .bucket(&self.location.bucket)
                .key(self.full_key(key))
                .send()
                .await
                .map_err(|e| {
                    if e.as_service_error().is_some_and(|s| s.is_not_found()) {
                        StoreError::NotFound(key.to_string())
                    } else {
                        sdk_error(key, e)
                    }
                })?;
            Ok(resp.content_length().unwrap_or(0).max(0) as u64)
        })
        .await
    }

    async fn delete_batch(&self, keys: &[String]) -> Vec<(String, StoreError)> {
        let mut failed = Vec::new();
        // DeleteObjects takes at most 1000 keys.
        for batch in keys.chunks(1000) {
            let ids: Result<Vec<ObjectIdentifier>, _> = batch
                .iter()
                .map(|k| ObjectIdentifier::builder().key(self.full_key(k)).build())
                .collect();
            let result = async {
                let _permit = self.deletes.acquire().await.map_err(|e| io("", e))?;
                let delete = Delete::builder()
                    .set_objects(Some(ids.map_err(|e| io("", e))?))
                    .quiet(true)
                    .build()
                    .map_err(|e| io("", e))?;
                let resp = self
                    .client
                    .delete_objects()
                    .bucket(&self.location.bucket)
                    .delete(delete)
                    .customize()
                    .mutate_request(add_content_md5)
                    .send()
                    .await
                    .map_err(|e| sdk_error("", e))?;
                Ok::<_, StoreError>(resp)
            };
            match self.timed("", result).await {
                Ok(resp) => {
                    for e in resp.errors() {
                        let Some(full) = e.key() else { continue };
                        let key = full.strip_prefix(&self.location.prefix).unwrap_or(full);
                        if e.code() == Some("NoSuchKey") {
                            continue;
                        }
                        let why =
                            format!("{}: {}", e.code().unwrap_or("?"), e.message().unwrap_or(""));
                        failed.push((key.to_string(), io(key, why)));
                    }
                }
                Err(e) => {
                    let why = e.to_string();
                    failed.extend(batch.iter().map(|k| (k.clone(), io(k, &why))));
                }
            }
        }
        failed
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ObjectInfo>, StoreError> {
        let mut out = Vec::new();
        let mut start_after = after.map(|a| self.full_key(a));
        while out.len() < limit {
            let mut req = self
                .client
                .list_objects_v2()
                .bucket(&self.location.bucket)
                .prefix(self.full_key(prefix))
                .max_keys((limit - out.len()).min(1000) as i32);
            if let Some(a) = &start_after {
                req = req.start_after(a);
            }
            let resp = self
                .timed(prefix, async {
                    let _permit = self.downloads.acquire().await.map_err(|e| io(prefix, e))?;
                    req.send().await.map_err(|e| sdk_error(prefix, e))
                })
                .await?;
            let objects = resp.contents();
            if objects.is_empty() {
                break;
            }
            for o in objects {
                let full = o.key().unwrap_or_default();
                start_after = Some(full.to_string());
                let key = full.strip_prefix(&self.location.prefix).unwrap_or(full);
                out.push(ObjectInfo {
                    key: key.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    modified: o
                        .last_modified()
                        .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                });
            }
            if !resp.is_truncated().unwrap_or(false) {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bucket_urls() {
        let l = S3Location::parse("s3://my-bucket/some/prefix").unwrap();
        assert_eq!(
            (l.endpoint, l.bucket.as_str(), l.prefix.as_str()),
            (None, "my-bucket", "some/prefix/")
        );
        assert!(S3Location::parse("s3://b-1/p").unwrap().is_tls());
        assert!(S3Location::parse("https://minio:9000/lake")
            .unwrap()
            .is_tls());
        assert!(!S3Location::parse("http://minio:9000/lake")
            .unwrap()
            .is_tls());
        let l = S3Location::parse("http://127.0.0.1:9000/lake").unwrap();
        assert_eq!(l.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("lake", ""));
        for bad in [
            "s3://",
            "ftp://x/b",
            "http:///bucket",
            "s3://Bad_Bucket",
            "/local/dir",
        ] {
            assert!(S3Location::parse(bad).is_err(), "{bad}");
        }
    }
}
