//! `tidefs objbench`: measures an object store before a volume is put on it.

use crate::object::{ObjectStore, StoreError};
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use std::time::{Duration, Instant};

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Number of small objects.
    pub small_count: usize,
    /// Size of a small object in bytes.
    pub small_size: usize,
    /// Number of large objects.
    pub big_count: usize,
    /// Size of a large object in bytes (a block).
    pub big_size: usize,
    /// Write back and drop this host's page cache before each GET phase, so that a server
    /// running here serves the objects from its disk, as it does after a cold start.
    pub cold_gets: bool,
}

/// Why a measurement stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The object store failed a call.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The page cache could not be dropped (`cold_gets` needs root).
    #[error("cannot drop the page cache: {0}")]
    DropCaches(std::io::Error),
}

/// Writes dirty pages back and drops the clean page cache, dentries and inodes of this host.
fn drop_page_cache() -> std::io::Result<()> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")
}

/// One measured operation.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchRow {
    /// What was done, e.g. "put 4 MiB".
    pub operation: String,
    /// How many objects.
    pub count: usize,
    /// Wall time for all of them.
    pub elapsed: Duration,
    /// Payload bytes moved.
    pub bytes: u64,
}

impl BenchRow {
    /// Objects per second.
    pub fn ops_per_sec(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// MiB per second of payload.
    pub fn mib_per_sec(&self) -> f64 {
        self.bytes as f64 / 1048576.0 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn size_name(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{} KiB", n >> 10)
    }
}

async fn timed<F, Fut>(count: usize, concurrency: usize, f: F) -> Result<Duration, StoreError>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), StoreError>>,
{
    let start = Instant::now();
    stream::iter(0..count)
        .map(f)
        .buffer_unordered(concurrency.max(1))
        .try_collect::<()>()
        .await?;
    Ok(start.elapsed())
}

/// Puts, gets and deletes (in batches) small and large objects under a fresh prefix, and
/// removes everything it wrote, also when a step fails.
pub async fn run(
    store: &dyn ObjectStore,
    opts: &BenchOptions,
) -> Result<Vec<BenchRow>, BenchError> {
    let prefix = format!("objbench-{:016x}/", rand::random::<u64>());
    let mut rows = Vec::new();
    let mut written: Vec<String> = Vec::new();
    let result = async {
        for (count, size) in [
            (opts.small_count, opts.small_size),
            (opts.big_count, opts.big_size),
        ] {
            if count == 0 {
                continue;
            }
            let data = Bytes::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
            let keys: Vec<String> = (0..count)
                .map(|i| format!("{prefix}{size}/{i:06}"))
                .collect();
            written.extend(keys.iter().cloned());
            let bytes = (count * size) as u64;
            let put = timed(count, opts.concurrency, |i| {
                store.put(&keys[i], data.clone())
            })
            .await?;
            rows.push(BenchRow {
                operation: format!("put {}", size_name(size)),
                count,
                elapsed: put,
                bytes,
            });
            if opts.cold_gets {
                tokio::task::spawn_blocking(drop_page_cache)
                    .await
                    .map_err(|e| BenchError::DropCaches(std::io::Error::other(e)))?
                    .map_err(BenchError::DropCaches)?;
            }
            let get = timed(count, opts.concurrency, |i| {
                let key = &keys[i];
                async move {
                    let got = store.get(key, None).await?;
                    if got.len() != size {
                        return Err(StoreError::Corrupt {
                            key: key.clone(),
                            actual: got.len() as u64,
                            expected: size as u64,
                        });
                    }
                    Ok(())
                }
            })
            .await?;
            rows.push(BenchRow {
                operation: format!("get {}", size_name(size)),
                count,
                elapsed: get,
                bytes,
            });
            let start = Instant::now();
            let failed = store.delete_batch(&keys).await;
            if let Some((_, e)) = failed.into_iter().next() {
                return Err(e.into());
            }
            written.retain(|k| !keys.contains(k));
            rows.push(BenchRow {
                operation: format!("delete {} (batched)", size_name(size)),
                count,
                elapsed: start.elapsed(),
                bytes: 0,
            });
        }
        Ok::<(), BenchError>(())
    }
    .await;
    if !written.is_empty() {
        let _ = store.delete_batch(&written).await;
    }
    result.map(|()| rows)
}

/// The rows as a Markdown table.
pub fn table(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "| operation | objects | time | objects/s | MiB/s |\n|---|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let mib = if r.bytes > 0 {
            format!("{:.1}", r.mib_per_sec())
        } else {
            "-".into()
        };
        out.push_str(&format!(
            "| {} | {} | {:.3} s | {:.0} | {} |\n",
            r.operation,
            r.count,
            r.elapsed.as_secs_f64(),
            r.ops_per_sec(),
            mib
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::LocalStore;

    #[tokio::test]
    async fn measures_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let opts = BenchOptions {
            concurrency: 4,
            small_count: 20,
            small_size: 4096,
            big_count: 3,
            big_size: 1 << 20,
            cold_gets: false,
        };
        let rows = run(&store, &opts).await.unwrap();
        let ops: Vec<&str> = rows.iter().map(|r| r.operation.as_str()).collect();
        assert_eq!(
            ops,
            [
                "put 4 KiB",
                "get 4 KiB",
                "delete 4 KiB (batched)",
                "put 1 MiB",
                "get 1 MiB",
                "delete 1 MiB (batched)"
            ]
        );
        assert_eq!(rows[3].bytes, 3 << 20);
        assert!(store.list("", None, 10).await.unwrap().is_empty());
        assert!(table(&rows).contains("| put 1 MiB | 3 |"));
    }
}
