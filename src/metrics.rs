//! The daemon's Prometheus metrics (`[metrics] address`, served at `/metrics` by
//! [`serve_metrics`]) and the table of attached devices `ovbd status` reads.
//!
//! One process-wide set ([`metrics`]). The block I/O path never looks a label up: a device's
//! counters are resolved once, at attach, into a [`DeviceMetrics`] handle (atomics behind
//! `Arc`s), and each request only bumps them. Everything else (registry requests, gRPC calls,
//! snapshots) is far from the I/O path and resolves its labels per event. Cache figures are
//! read from [`BlobCache::stats`] at scrape time.

use crate::source::cache::{BlobCache, CacheStats};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    /// The device's directory name under the snapshotter root (stable across restarts).
    pub device: String,
    pub frontend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegistryLabels {
    registry: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegistryErrorLabels {
    registry: String,
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SnapshotLabels {
    kind: String,
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    method: String,
    code: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Request latencies: 10 µs to ~80 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_01, 4.0, 12))
}

/// Upper bounds of [`LatencyHistogram`]'s buckets in nanoseconds: 10 µs × 4^i, 12 of them
/// (to ~42 s), then +Inf.
const LATENCY_BOUNDS_NS: [u64; 12] = {
    let mut b = [0u64; 12];
    let mut i = 0;
    let mut v = 10_000u64;
    while i < 12 {
        b[i] = v;
        v *= 4;
        i += 1;
    }
    b
};

/// A latency histogram of atomics (prometheus-client's takes a lock per observation): what a
/// block request records without waiting for another. Cloning shares it.
#[derive(Clone, Debug, Default)]
pub struct LatencyHistogram(std::sync::Arc<LatencyBuckets>);

#[derive(Debug, Default)]
pub struct LatencyBuckets {
    sum_ns: AtomicU64,
    count: AtomicU64,
    /// Observations per bucket (not cumulative); the last is +Inf.
    buckets: [AtomicU64; LATENCY_BOUNDS_NS.len() + 1],
}

impl LatencyHistogram {
    #[inline]
    pub fn observe(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_NS.partition_point(|&b| b < ns);
        self.0.buckets[i].fetch_add(1, Relaxed);
        self.0.sum_ns.fetch_add(ns, Relaxed);
        self.0.count.fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.0.count.load(Relaxed)
    }
}

impl prometheus_client::metrics::TypedMetric for LatencyHistogram {
    const TYPE: prometheus_client::metrics::MetricType =
        prometheus_client::metrics::MetricType::Histogram;
}

impl prometheus_client::encoding::EncodeMetric for LatencyHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_NS
            .iter()
            .map(|&b| b as f64 / 1e9)
            .chain(std::iter::once(f64::MAX))
            .zip(self.0.buckets.iter().map(|c| c.load(Relaxed)))
            .collect();
        let sum = self.0.sum_ns.load(Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<()>(sum, self.count(), &buckets, None)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        <Self as prometheus_client::metrics::TypedMetric>::TYPE
    }
}

/// A device's counters, resolved once: what each block request bumps (no lookup, no
/// allocation). Cloning shares them.
#[derive(Clone, Debug)]
pub struct DeviceMetrics {
    pub reads: Counter,
    pub writes: Counter,
    pub read_bytes: Counter,
    pub write_bytes: Counter,
    pub eio: Counter,
    pub latency: LatencyHistogram,
}

impl Default for DeviceMetrics {
    /// Counters no scrape sees (a device attached outside the daemon: `ovbd device attach`, tests).
    fn default() -> Self {
        DeviceMetrics {
            reads: Counter::default(),
            writes: Counter::default(),
            read_bytes: Counter::default(),
            write_bytes: Counter::default(),
            eio: Counter::default(),
            latency: LatencyHistogram::default(),
        }
    }
}

impl DeviceMetrics {
    /// Records one finished block request of `op` (ublk op codes) for `bytes` that answered
    /// `result` (a count or `-errno`) after `took`.
    #[inline]
    pub fn record(&self, op: u32, bytes: u64, result: i32, took: Duration) {
        use libublk::sys;
        match op {
            sys::UBLK_IO_OP_READ => {
                self.reads.inc();
                if result > 0 {
                    self.read_bytes.inc_by(result as u64);
                }
            }
            sys::UBLK_IO_OP_WRITE => {
                self.writes.inc();
                if result > 0 {
                    self.write_bytes.inc_by(bytes);
                }
            }
            _ => {}
        }
        if result == -libc::EIO {
            self.eio.inc();
        }
        self.latency.observe(took);
    }
}

/// One attached device as `ovbd status` shows it.
#[derive(Clone, Debug)]
pub struct DeviceEntry {
    /// Its snapshot's id (the `device` label of its counters).
    pub device: String,
    pub frontend: String,
    /// The image's top layer (its config's last lower, or the writable layer's directory).
    pub image: String,
    /// ro (the image an image's containers share) or rw (a container's writable layer).
    pub mode: String,
    /// The image's layers read from registries: (digest, size), for its cached share.
    pub remote_blobs: Vec<(String, u64)>,
    pub counters: DeviceMetrics,
}

pub struct Metrics {
    registry: Registry,
    dev_reads: Family<DeviceLabels, Counter>,
    dev_writes: Family<DeviceLabels, Counter>,
    dev_read_bytes: Family<DeviceLabels, Counter>,
    dev_write_bytes: Family<DeviceLabels, Counter>,
    dev_eio: Family<DeviceLabels, Counter>,
    dev_latency: Family<DeviceLabels, LatencyHistogram>,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_hit_bytes: Counter,
    cache_fetched_bytes: Counter,
    cache_evicted_bytes: Counter,
    cache_size_bytes: Gauge,
    cache_limit_bytes: Gauge,
    registry_requests: Family<RegistryLabels, Counter>,
    registry_bytes: Family<RegistryLabels, Counter>,
    registry_latency: HistogramFamily<RegistryLabels>,
    registry_retries: Family<RegistryLabels, Counter>,
    registry_errors: Family<RegistryErrorLabels, Counter>,
    snapshots: Family<SnapshotLabels, Counter>,
    grpc_calls: Family<GrpcLabels, Counter>,
    lazy_first_byte: Histogram,
    /// Attached devices by their block device path.
    devices: Mutex<BTreeMap<String, DeviceEntry>>,
    /// Each registry asked, with its last failure (empty if none).
    registry_last_error: Mutex<BTreeMap<String, String>>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("ovbd"),
            dev_reads: Family::default(),
            dev_writes: Family::default(),
            dev_read_bytes: Family::default(),
            dev_write_bytes: Family::default(),
            dev_eio: Family::default(),
            dev_latency: Family::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_hit_bytes: Counter::default(),
            cache_fetched_bytes: Counter::default(),
            cache_evicted_bytes: Counter::default(),
            cache_size_bytes: Gauge::default(),
            cache_limit_bytes: Gauge::default(),
            registry_requests: Family::default(),
            registry_bytes: Family::default(),
            registry_latency: Family::new_with_constructor(latency_histogram),
            registry_retries: Family::default(),
            registry_errors: Family::default(),
            snapshots: Family::default(),
            grpc_calls: Family::default(),
            lazy_first_byte: latency_histogram(),
            devices: Mutex::default(),
            registry_last_error: Mutex::default(),
        };
        let r = &mut m.registry;
        r.register("device_reads", "Block read requests", m.dev_reads.clone());
        r.register(
            "device_writes",
            "Block write requests",
            m.dev_writes.clone(),
        );
        r.register(
            "device_read_bytes",
            "Bytes read from devices",
            m.dev_read_bytes.clone(),
        );
        r.register(
            "device_write_bytes",
            "Bytes written to devices",
            m.dev_write_bytes.clone(),
        );
        r.register(
            "device_eio",
            "Block requests failed with EIO",
            m.dev_eio.clone(),
        );
        r.register(
            "device_request_seconds",
            "Block request latency",
            m.dev_latency.clone(),
        );
        r.register(
            "cache_hits",
            "Block cache reads served entirely from the cache",
            m.cache_hits.clone(),
        );
        r.register(
            "cache_misses",
            "Block cache reads that fetched blocks",
            m.cache_misses.clone(),
        );
        r.register(
            "cache_hit_bytes",
            "Bytes served from the block cache",
            m.cache_hit_bytes.clone(),
        );
        r.register(
            "cache_fetched_bytes",
            "Bytes fetched into the block cache",
            m.cache_fetched_bytes.clone(),
        );
        r.register(
            "cache_evicted_bytes",
            "Bytes evicted from the block cache",
            m.cache_evicted_bytes.clone(),
        );
        r.register(
            "cache_size_bytes",
            "Bytes of blocks in the block cache",
            m.cache_size_bytes.clone(),
        );
        r.register(
            "cache_limit_bytes",
            "The block cache's size limit",
            m.cache_limit_bytes.clone(),
        );
        r.register(
            "registry_requests",
            "HTTP requests to registries",
            m.registry_requests.clone(),
        );
        r.register(
            "registry_bytes",
            "Blob bytes received from registries",
            m.registry_bytes.clone(),
        );
        r.register(
            "registry_request_seconds",
            "Registry operation latency (retries included)",
            m.registry_latency.clone(),
        );
        r.register(
            "registry_retries",
            "Registry operations tried again",
            m.registry_retries.clone(),
        );
        r.register(
            "registry_errors",
            "Failed registry requests by class",
            m.registry_errors.clone(),
        );
        r.register(
            "snapshots",
            "Snapshots made, by kind and rootfs mode",
            m.snapshots.clone(),
        );
        r.register(
            "grpc_calls",
            "Snapshots API calls by method and code",
            m.grpc_calls.clone(),
        );
        r.register(
            "lazy_pull_first_byte_seconds",
            "From opening a remote layer to its first bytes read",
            m.lazy_first_byte.clone(),
        );
        m
    }

    /// The counters of device `device` (its directory name) on `frontend`, shown by scrapes
    /// from now on.
    pub fn device(&self, device: &str, frontend: &str) -> DeviceMetrics {
        let l = DeviceLabels {
            device: device.to_owned(),
            frontend: frontend.to_owned(),
        };
        DeviceMetrics {
            reads: self.dev_reads.get_or_create(&l).clone(),
            writes: self.dev_writes.get_or_create(&l).clone(),
            read_bytes: self.dev_read_bytes.get_or_create(&l).clone(),
            write_bytes: self.dev_write_bytes.get_or_create(&l).clone(),
            eio: self.dev_eio.get_or_create(&l).clone(),
            latency: self.dev_latency.get_or_create(&l).clone(),
        }
    }

    /// Lists device `key` (its block device path) for `ovbd status` until [`Metrics::device_gone`].
    pub fn device_attached(&self, key: &str, entry: DeviceEntry) {
        lock(&self.devices).insert(key.to_owned(), entry);
    }

    pub fn device_gone(&self, key: &str) {
        lock(&self.devices).remove(key);
    }

    pub fn devices(&self) -> Vec<(String, DeviceEntry)> {
        lock(&self.devices)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn registry_request(&self, registry: &str) {
        self.registry_requests
            .get_or_create(&RegistryLabels {
                registry: registry.to_owned(),
            })
            .inc();
        lock(&self.registry_last_error)
            .entry(registry.to_owned())
            .or_default();
    }

    pub fn registry_bytes(&self, registry: &str, n: u64) {
        self.registry_bytes
            .get_or_create(&RegistryLabels {
                registry: registry.to_owned(),
            })
            .inc_by(n);
    }

    pub fn registry_done(&self, registry: &str, took: Duration) {
        self.registry_latency
            .get_or_create(&RegistryLabels {
                registry: registry.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn registry_retry(&self, registry: &str) {
        self.registry_retries
            .get_or_create(&RegistryLabels {
                registry: registry.to_owned(),
            })
            .inc();
    }

    /// A failed try against `registry`, of `class` ([`crate::registry::RegistryError::class`]).
    pub fn registry_error(&self, registry: &str, class: &str, error: &str) {
        self.registry_errors
            .get_or_create(&RegistryErrorLabels {
                registry: registry.to_owned(),
                class: class.to_owned(),
            })
            .inc();
        lock(&self.registry_last_error).insert(registry.to_owned(), error.to_owned());
    }

    /// Registries asked so far, with their last error (empty if none).
    pub fn registries(&self) -> Vec<(String, String)> {
        lock(&self.registry_last_error)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Failed tries counted against `registry` under `class`.
    #[cfg(test)]
    pub fn registry_errors_of(&self, registry: &str, class: &str) -> u64 {
        self.registry_errors
            .get_or_create(&RegistryErrorLabels {
                registry: registry.to_owned(),
                class: class.to_owned(),
            })
            .get()
    }

    pub fn snapshot_made(&self, kind: &str, mode: &str) {
        self.snapshots
            .get_or_create(&SnapshotLabels {
                kind: kind.to_owned(),
                mode: mode.to_owned(),
            })
            .inc();
    }

    pub fn grpc_call(&self, method: &str, code: &str) {
        self.grpc_calls
            .get_or_create(&GrpcLabels {
                method: method.to_owned(),
                code: code.to_owned(),
            })
            .inc();
    }

    pub fn lazy_first_byte(&self, took: Duration) {
        self.lazy_first_byte.observe(took.as_secs_f64());
    }

    /// The exposition text, cache figures taken from `cache` now.
    pub fn encode(&self, cache: Option<&CacheStats>) -> String {
        if let Some(s) = cache {
            // Totals since the cache opened: the cache's own counters are the truth.
            self.cache_hits.inner().store(s.hit_reads, Relaxed);
            self.cache_misses.inner().store(s.miss_reads, Relaxed);
            self.cache_hit_bytes.inner().store(s.hit_bytes, Relaxed);
            self.cache_fetched_bytes
                .inner()
                .store(s.fetched_bytes, Relaxed);
            self.cache_evicted_bytes
                .inner()
                .store(s.evicted_bytes, Relaxed);
            self.cache_size_bytes.set(s.cached_bytes as i64);
            self.cache_limit_bytes.set(s.limit_bytes as i64);
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Serves `GET /metrics` on `listener` (plain HTTP/1, one answer per connection: scrapers
/// need no more), cache figures from `cache`.
pub async fn serve_metrics(listener: tokio::net::TcpListener, cache: std::sync::Arc<BlobCache>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    loop {
        let (mut conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                log::warn!("accepting a metrics connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let cache = cache.clone();
        tokio::spawn(async move {
            // The request line and headers: up to the blank line, at most 8 KiB.
            let mut req = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(10), async {
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    let n = conn.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                }
                std::io::Result::Ok(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let line = req.split(|&b| b == b'\r').next().unwrap_or_default();
            let (status, ctype, body) = if line.starts_with(b"GET /metrics ") {
                let stats = cache.stats();
                (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics().encode(Some(&stats)),
                )
            } else {
                (
                    "404 Not Found",
                    "text/plain",
                    "only /metrics here\n".to_owned(),
                )
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_counters_show_in_the_exposition() {
        let m = metrics().device("test-dev-expo", "fuse");
        m.record(
            libublk::sys::UBLK_IO_OP_READ,
            4096,
            4096,
            Duration::from_micros(50),
        );
        m.record(
            libublk::sys::UBLK_IO_OP_READ,
            4096,
            -libc::EIO,
            Duration::from_micros(50),
        );
        let text = metrics().encode(None);
        let l = "{device=\"test-dev-expo\",frontend=\"fuse\"}";
        assert!(
            text.contains(&format!("ovbd_device_reads_total{l} 2")),
            "{text}"
        );
        assert!(
            text.contains(&format!("ovbd_device_read_bytes_total{l} 4096")),
            "{text}"
        );
        assert!(
            text.contains(&format!("ovbd_device_eio_total{l} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!("ovbd_device_request_seconds_count{l} 2")),
            "{text}"
        );
    }

    #[test]
    fn grpc_calls_and_registry_errors_are_counted_by_label() {
        let m = metrics();
        m.grpc_call("test-method", "NotFound");
        m.registry_error("test-registry.invalid:5000", "denied", "HTTP 403");
        let text = m.encode(None);
        assert!(
            text.contains("ovbd_grpc_calls_total{method=\"test-method\",code=\"NotFound\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "ovbd_registry_errors_total{registry=\"test-registry.invalid:5000\",class=\"denied\"} 1"
            ),
            "{text}"
        );
        assert!(m
            .registries()
            .contains(&("test-registry.invalid:5000".into(), "HTTP 403".into())));
    }
}
