//! Counters of object-store calls.

use super::{ObjectInfo, ObjectStore, StoreError};
use async_trait::async_trait;
use bytes::Bytes;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Upper bounds of the latency buckets, in microseconds: powers of two from 64 µs to about
/// 67 s; slower calls land in a last, unbounded bucket.
pub const LATENCY_BOUNDS_MICROS: [u64; 21] = {
    let mut b = [0u64; 21];
    let mut i = 0;
    while i < b.len() {
        b[i] = 64 << i;
        i += 1;
    }
    b
};

/// A latency histogram with fixed power-of-two buckets, updated without locks.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// `counts[i]` counts calls of at most `LATENCY_BOUNDS_MICROS[i]`; the last counts the rest.
    counts: [AtomicU64; LATENCY_BOUNDS_MICROS.len() + 1],
}

impl LatencyHistogram {
    /// Records one call of `micros` microseconds.
    pub fn record(&self, micros: u64) {
        let i = LATENCY_BOUNDS_MICROS.partition_point(|&b| b < micros);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The count of each bucket (not cumulative), the last one unbounded.
    pub fn counts(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// An upper bound of the `q` quantile (0 < q <= 1) in microseconds: the bound of the bucket
    /// holding it. None when nothing was recorded or the quantile is in the unbounded bucket.
    pub fn quantile_micros(&self, q: f64) -> Option<u64> {
        let counts = self.counts();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return LATENCY_BOUNDS_MICROS.get(i).copied();
            }
        }
        None
    }
}

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
    /// How long calls took.
    pub latency: LatencyHistogram,
}

impl OpStats {
    fn record(&self, started: Instant, bytes: u64, ok: bool) {
        let micros = started.elapsed().as_micros() as u64;
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.micros.fetch_add(micros, Ordering::Relaxed);
        self.latency.record(micros);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A summary for display: counts, bytes and latency quantiles in milliseconds.
    pub fn summary(&self) -> serde_json::Value {
        let requests = self.requests.load(Ordering::Relaxed);
        let ms = |q| self.latency.quantile_micros(q).map(|us| us as f64 / 1000.0);
        serde_json::json!({
            "requests": requests,
            "errors": self.errors.load(Ordering::Relaxed),
            "bytes": self.bytes.load(Ordering::Relaxed),
            "avg_ms": if requests == 0 { 0.0 } else {
                self.micros.load(Ordering::Relaxed) as f64 / requests as f64 / 1000.0
            },
            "p50_ms_at_most": ms(0.5),
            "p99_ms_at_most": ms(0.99),
        })
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

impl StoreMetrics {
    /// Each kind of call with its name.
    pub fn ops(&self) -> [(&'static str, &OpStats); 5] {
        [
            ("put", &self.put),
            ("get", &self.get),
            ("head", &self.head),
            ("delete", &self.delete),
            ("list", &self.list),
        ]
    }

    /// A JSON summary (per-call counts and latency quantiles, retries).
    pub fn summary(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (name, op) in self.ops() {
            out.insert(name.to_string(), op.summary());
        }
        out.insert(
            "retries".into(),
            self.retries.load(Ordering::Relaxed).into(),
        );
        out.into()
    }

    /// The counters in the Prometheus text exposition format.
    pub fn prometheus(&self, out: &mut String) {
        use std::fmt::Write;
        let families = [
            ("tidefs_object_requests_total", "Object store calls."),
            (
                "tidefs_object_errors_total",
                "Object store calls that failed.",
            ),
            (
                "tidefs_object_bytes_total",
                "Bytes moved by object store calls (keys, for deletes).",
            ),
        ];
        for (i, (family, help)) in families.iter().enumerate() {
            let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} counter");
            for (name, op) in self.ops() {
                let v = [&op.requests, &op.errors, &op.bytes][i].load(Ordering::Relaxed);
                let _ = writeln!(out, "{family}{{method=\"{name}\"}} {v}");
            }
        }
        let family = "tidefs_object_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {family} Latency of object store calls.\n# TYPE {family} histogram"
        );
        for (name, op) in self.ops() {
            let mut cumulative = 0;
            let counts = op.latency.counts();
            for (bound, c) in LATENCY_BOUNDS_MICROS.iter().zip(&counts) {
                cumulative += c;
                let le = *bound as f64 / 1e6;
                let _ = writeln!(
                    out,
                    "{family}_bucket{{method=\"{name}\",le=\"{le}\"}} {cumulative}"
                );
            }
            cumulative += counts.last().copied().unwrap_or(0);
            let sum = op.micros.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(
                out,
                "{family}_bucket{{method=\"{name}\",le=\"+Inf\"}} {cumulative}\n\
                 {family}_sum{{method=\"{name}\"}} {sum}\n\
                 {family}_count{{method=\"{name}\"}} {cumulative}"
            );
        }
        let family = "tidefs_object_retries_total";
        let _ = writeln!(
            out,
            "# HELP {family} Object store calls repeated after a transient failure.\n\
             # TYPE {family} counter\n{family} {}",
            self.retries.load(Ordering::Relaxed)
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile_micros(0.5), None);
        for us in [10, 64, 65, 1000, 1000, 1000, 5_000_000] {
            h.record(us);
        }
        h.record(u64::MAX);
        let counts = h.counts();
        assert_eq!(counts[0], 2, "10 and 64 fall in the first bucket");
        assert_eq!(counts[1], 1, "65 in (64, 128]");
        assert_eq!(counts[4], 3, "1000 in (512, 1024]");
        assert_eq!(*counts.last().unwrap(), 1);
        assert_eq!(counts.iter().sum::<u64>(), 8);
        assert_eq!(h.quantile_micros(0.25), Some(64));
        assert_eq!(h.quantile_micros(0.5), Some(1024));
        assert_eq!(h.quantile_micros(0.8), Some(64 << 17));
        assert_eq!(h.quantile_micros(1.0), None);
    }

    #[test]
    fn prometheus_text_is_cumulative() {
        let m = StoreMetrics::default();
        m.get.record(Instant::now(), 100, true);
        m.get.record(Instant::now(), 50, false);
        let mut text = String::new();
        m.prometheus(&mut text);
        assert!(text.contains("tidefs_object_requests_total{method=\"get\"} 2\n"));
        assert!(text.contains("tidefs_object_errors_total{method=\"get\"} 1\n"));
        assert!(text.contains("tidefs_object_bytes_total{method=\"get\"} 150\n"));
        assert!(text.contains(
            "tidefs_object_request_duration_seconds_bucket{method=\"get\",le=\"+Inf\"} 2\n"
        ));
        assert!(text.contains("tidefs_object_request_duration_seconds_count{method=\"put\"} 0\n"));
        // Every bucket line of one method is at most the next one.
        let gets: Vec<u64> = text
            .lines()
            .filter(|l| {
                l.starts_with("tidefs_object_request_duration_seconds_bucket{method=\"get\"")
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(gets.len(), LATENCY_BOUNDS_MICROS.len() + 1);
        assert!(gets.windows(2).all(|w| w[0] <= w[1]));
    }
}
