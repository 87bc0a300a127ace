//! The metrics endpoint of a mount: Prometheus text at `/metrics` and a JSON summary at
//! `/stats` (what `tidefs status` shows), served over plain HTTP on a local address.

use crate::data::DataCtx;
use crate::object::{StoreMetrics, WritebackStore};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::fmt::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the numbers of one mount come from.
pub struct MountMetrics {
    store: Arc<StoreMetrics>,
    data: Arc<DataCtx>,
    started: Instant,
    writeback: Option<Arc<WritebackStore>>,
    splices: Arc<tidefs_fuse::SpliceStats>,
}

impl MountMetrics {
    /// The metrics of a mount using `data`, whose store calls are counted in `store`.
    pub fn new(store: Arc<StoreMetrics>, data: Arc<DataCtx>) -> Self {
        MountMetrics {
            store,
            data,
            started: Instant::now(),
            writeback: None,
            splices: Arc::default(),
        }
    }

    /// Also reports the read replies the FUSE adapter spliced, counted in `splices`.
    pub fn with_splice_stats(mut self, splices: Arc<tidefs_fuse::SpliceStats>) -> Self {
        self.splices = splices;
        self
    }

    /// Also reports the blocks `writeback` has staged and not uploaded yet.
    pub fn with_writeback(mut self, writeback: Option<Arc<WritebackStore>>) -> Self {
        self.writeback = writeback;
        self
    }

    /// Everything in the Prometheus text exposition format.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        self.store.prometheus(&mut out);
        let (gauge, counter) = ("gauge", "counter");
        let mut rows = vec![
            (
                "tidefs_cache_used_bytes",
                gauge,
                "Bytes held by the block cache.",
                self.data.cache.used(),
            ),
            (
                "tidefs_cache_capacity_bytes",
                gauge,
                "Limit of the block cache.",
                self.data.cache.capacity(),
            ),
            (
                "tidefs_buffer_used_bytes",
                gauge,
                "Written bytes held in memory until uploaded.",
                self.data.buffered.load(Ordering::Relaxed),
            ),
            (
                "tidefs_commit_failures_total",
                counter,
                "Commits of written data that failed (reported to the files' handles).",
                self.data.commit_failures.load(Ordering::Relaxed),
            ),
            (
                "tidefs_reads_in_flight",
                gauge,
                "File reads under way.",
                self.data.reads.now(),
            ),
            (
                "tidefs_reads_in_flight_max",
                gauge,
                "The most file reads under way at once since the mount started.",
                self.data.reads.most(),
            ),
            (
                "tidefs_reads_spliced_total",
                counter,
                "Read replies spliced from disk cache files (not copied through the mount).",
                self.splices.spliced.load(Ordering::Relaxed),
            ),
            (
                "tidefs_reads_splice_fallbacks_total",
                counter,
                "Spans of disk cache files that could not be spliced and were copied instead.",
                self.splices.copied.load(Ordering::Relaxed),
            ),
            (
                "tidefs_uptime_seconds",
                gauge,
                "Seconds since the mount started.",
                self.started.elapsed().as_secs(),
            ),
        ];
        if let Some(wb) = &self.writeback {
            let (blocks, bytes) = wb.pending();
            rows.extend([
                (
                    "tidefs_writeback_staged_blocks",
                    gauge,
                    "Blocks staged on local disk and not uploaded yet.",
                    blocks,
                ),
                (
                    "tidefs_writeback_staged_bytes",
                    gauge,
                    "Bytes of those blocks (0 for blocks left by an earlier mount).",
                    bytes,
                ),
            ]);
        }
        if let Some(disk) = self.data.cache.disk() {
            let s = disk.stats();
            rows.extend([
                (
                    "tidefs_disk_cache_used_bytes",
                    gauge,
                    "Bytes in the disk cache.",
                    disk.used(),
                ),
                (
                    "tidefs_disk_cache_hits_total",
                    counter,
                    "Blocks read from the disk cache.",
                    s.hits.load(Ordering::Relaxed),
                ),
                (
                    "tidefs_disk_cache_spans_total",
                    counter,
                    "Reads from the disk cache handed to the kernel unread (spliced), among the hits.",
                    s.spans.load(Ordering::Relaxed),
                ),
                (
                    "tidefs_disk_cache_misses_total",
                    counter,
                    "Blocks not found in the disk cache.",
                    s.misses.load(Ordering::Relaxed),
                ),
                (
                    "tidefs_disk_cache_dropped_total",
                    counter,
                    "Damaged disk cache files dropped.",
                    s.dropped.load(Ordering::Relaxed),
                ),
                (
                    "tidefs_disk_cache_skipped_total",
                    counter,
                    "Blocks not cached: disk failing, full or busy.",
                    s.skipped.load(Ordering::Relaxed),
                ),
                (
                    "tidefs_disk_cache_discarded_total",
                    counter,
                    "Blocks removed from the disk cache because their objects were deleted.",
                    s.discarded.load(Ordering::Relaxed),
                ),
            ]);
        }
        for (name, kind, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out
    }

    /// A JSON summary: store calls with latency quantiles, cache and buffer use.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "uptime_seconds": self.started.elapsed().as_secs(),
            "object_store": self.store.summary(),
            "cache": {
                "used_bytes": self.data.cache.used(),
                "capacity_bytes": self.data.cache.capacity(),
                "disk": self.data.cache.disk().map(|d| serde_json::json!({
                    "used_bytes": d.used(),
                    "capacity_bytes": d.capacity(),
                    "hits": d.stats().hits.load(Ordering::Relaxed),
                    "spans": d.stats().spans.load(Ordering::Relaxed),
                    "misses": d.stats().misses.load(Ordering::Relaxed),
                    "dropped": d.stats().dropped.load(Ordering::Relaxed),
                    "skipped": d.stats().skipped.load(Ordering::Relaxed),
                    "discarded": d.stats().discarded.load(Ordering::Relaxed),
                })),
            },
            "buffer_used_bytes": self.data.buffered.load(Ordering::Relaxed),
            "commit_failures": self.data.commit_failures.load(Ordering::Relaxed),
            "reads": {
                "in_flight": self.data.reads.now(),
                "most_at_once": self.data.reads.most(),
                "spliced": self.splices.spliced.load(Ordering::Relaxed),
                "splice_fallbacks": self.splices.copied.load(Ordering::Relaxed),
            },
            "writeback": self.writeback.as_ref().map(|wb| {
                let (blocks, bytes) = wb.pending();
                serde_json::json!({ "staged_blocks": blocks, "staged_bytes": bytes })
            }),
        })
    }

    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        let (status, kind, body) = match path {
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.prometheus(),
            ),
            "/stats" => (
                StatusCode::OK,
                "application/json",
                self.summary().to_string(),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /metrics or /stats\n".to_string(),
            ),
        };
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(kind),
        );
        resp
    }
}

/// Binds `addr` for the endpoint; if that port is taken (another mount on this host), binds a
/// free port on the same address instead.
pub fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let wanted: SocketAddr = addr.parse().map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("invalid metrics address {addr:?} (expected IP:PORT): {e}"),
        )
    })?;
    match TcpListener::bind(wanted) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            TcpListener::bind(SocketAddr::new(wanted.ip(), 0))
        }
        r => r,
    }
}

/// Serves `metrics` on `listener` until the runtime shuts down; each connection is its own
/// task, so a slow scraper delays nobody.
pub async fn serve(listener: TcpListener, metrics: Arc<MountMetrics>) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|_| tokio::net::TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "metrics endpoint disabled");
            return;
        }
    };
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = metrics.respond(req.uri().path());
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Fetches `path` from the endpoint at `addr`, giving up after `timeout`.
pub async fn fetch(addr: &str, path: &str, timeout: Duration) -> Result<String, String> {
    let work = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(hyper::header::HOST, addr)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        String::from_utf8(body.to_vec()).map_err(|e| e.to_string())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}
