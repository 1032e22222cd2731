//! The control API (proto/ovbd/control/v1/control.proto) on the daemon's root-only control
//! socket: what it serves, for `ovbd status`. Figures come from the same counters as the
//! metrics ([`crate::metrics`]), the snapshots from the metadata, the cache from
//! [`BlobCache::stats`].

pub mod pb {
    tonic::include_proto!("ovbd.control.v1");
}

use crate::metrics::metrics;
use crate::snapshotter::Snapshotter;
use crate::source::cache::BlobCache;
use containerd_snapshots::Kind;
use pb::control_server::{Control, ControlServer};
use pb::{StatusRequest, StatusResponse};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct ControlService {
    snap: Arc<Snapshotter>,
    cache: Option<Arc<BlobCache>>,
}

/// The control service over `snap` and the block cache `cache`.
pub fn control_server(
    snap: Arc<Snapshotter>,
    cache: Option<Arc<BlobCache>>,
) -> ControlServer<ControlService> {
    ControlServer::new(ControlService { snap, cache })
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let (snap, cache) = (self.snap.clone(), self.cache.clone());
        // The metadata read blocks: off the async threads.
        let answer = tokio::task::spawn_blocking(move || status(&snap, cache.as_deref()))
            .await
            .map_err(|e| Status::internal(format!("status task failed: {e}")))?;
        answer
            .map(Response::new)
            .map_err(|e| Status::internal(format!("{e:#}")))
    }
}

/// The daemon's state now.
pub fn status(snap: &Snapshotter, cache: Option<&BlobCache>) -> anyhow::Result<StatusResponse> {
    let stats = cache.map(BlobCache::stats);
    // A blob's cached bytes, whichever origin's entry holds them.
    let mut cached_of: HashMap<&str, u64> = HashMap::new();
    for b in stats.iter().flat_map(|s| &s.blobs) {
        let c = cached_of.entry(b.digest.as_str()).or_default();
        *c = (*c).max(b.cached_bytes);
    }
    let devices = metrics()
        .devices()
        .into_iter()
        .map(|(path, d)| pb::Device {
            path,
            snapshot: d.device,
            frontend: d.frontend,
            image: d.image,
            mode: d.mode,
            reads: d.counters.reads.get(),
            bytes_read: d.counters.read_bytes.get(),
            writes: d.counters.writes.get(),
            bytes_written: d.counters.write_bytes.get(),
            eio: d.counters.eio.get(),
            remote_bytes: d.remote_blobs.iter().map(|(_, size)| size).sum(),
            remote_cached_bytes: d
                .remote_blobs
                .iter()
                .map(|(digest, size)| {
                    cached_of
                        .get(digest.as_str())
                        .copied()
                        .unwrap_or(0)
                        .min(*size)
                })
                .sum(),
        })
        .collect();
    let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
    for info in snap
        .list(&[])
        .map_err(|e| anyhow::anyhow!("listing snapshots: {e}"))?
    {
        let kind = match info.kind {
            Kind::Active => "active",
            Kind::View => "view",
            Kind::Committed => "committed",
            Kind::Unknown => "unknown",
        };
        *kinds.entry(kind).or_default() += 1;
    }
    Ok(StatusResponse {
        devices,
        snapshots: kinds
            .into_iter()
            .map(|(kind, count)| pb::SnapshotCount {
                kind: kind.to_owned(),
                count,
            })
            .collect(),
        cache: stats.map(|s| pb::Cache {
            dir: s.dir.display().to_string(),
            limit_bytes: s.limit_bytes,
            cached_bytes: s.cached_bytes,
            blobs: s.blobs.len() as u64,
            hit_reads: s.hit_reads,
            miss_reads: s.miss_reads,
            hit_bytes: s.hit_bytes,
            fetched_bytes: s.fetched_bytes,
            evicted_bytes: s.evicted_bytes,
        }),
        registries: metrics()
            .registries()
            .into_iter()
            .map(|(host, last_error)| pb::Registry { host, last_error })
            .collect(),
    })
}

/// Asks the daemon on `socket` for its status.
pub async fn ask_status(socket: &std::path::Path) -> anyhow::Result<StatusResponse> {
    use anyhow::Context as _;
    let path = socket.to_owned();
    // The URI is unused: the connector dials the socket.
    let channel = tonic::transport::Endpoint::try_from("http://[::1]:0")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            tokio::net::UnixStream::connect(path.clone())
        }))
        .await
        .with_context(|| {
            format!(
                "connecting to {} (is ovbd serve running?)",
                socket.display()
            )
        })?;
    let answer = pb::control_client::ControlClient::new(channel)
        .status(StatusRequest {})
        .await
        .with_context(|| format!("asking {} for the status", socket.display()))?;
    Ok(answer.into_inner())
}

/// `ovbd status`'s table.
pub fn format_status(s: &StatusResponse) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:<9} {:<5} {:<4} {:>12} {:>7}  IMAGE",
        "DEVICE", "SNAPSHOT", "FRONT", "MODE", "BYTES READ", "CACHED"
    );
    for d in &s.devices {
        let cached = if d.remote_bytes == 0 {
            "local".to_owned()
        } else {
            format!(
                "{:.1}%",
                100.0 * d.remote_cached_bytes as f64 / d.remote_bytes as f64
            )
        };
        let _ = writeln!(
            out,
            "{:<14} {:<9} {:<5} {:<4} {:>12} {:>7}  {}",
            d.path, d.snapshot, d.frontend, d.mode, d.bytes_read, cached, d.image
        );
    }
    let kinds: Vec<String> = s
        .snapshots
        .iter()
        .map(|k| format!("{} {}", k.count, k.kind))
        .collect();
    let _ = writeln!(
        out,
        "\nsnapshots: {}",
        if kinds.is_empty() {
            "none".to_owned()
        } else {
            kinds.join(", ")
        }
    );
    if let Some(c) = &s.cache {
        let _ = writeln!(
            out,
            "cache: {} of {} bytes in {} blobs ({}); {} hits, {} misses, {} bytes fetched, {} evicted",
            c.cached_bytes, c.limit_bytes, c.blobs, c.dir, c.hit_reads, c.miss_reads,
            c.fetched_bytes, c.evicted_bytes
        );
    }
    for r in &s.registries {
        let err = if r.last_error.is_empty() {
            "ok"
        } else {
            &r.last_error
        };
        let _ = writeln!(out, "registry {}: {err}", r.host);
    }
    out
}
