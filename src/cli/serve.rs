//! `ovbd serve`: the snapshotter daemon on its unix socket.

use crate::config::Config;
use crate::snapshotter::{grpc_server, Snapshotter};
use anyhow::{Context, Result};
use containerd_snapshots::tonic::transport::Server;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

pub fn serve(cfg: Config) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(run(cfg))
}

async fn run(cfg: Config) -> Result<()> {
    // SIGTERM and SIGINT stop the daemon cleanly from here on, also while it is starting:
    // their default action would kill it with its FUSE frontend mounted and nothing attached.
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let socket = cfg.socket.clone();
    let control_socket = cfg.control_socket_path();
    let metrics_address = cfg.metrics.listen_address()?;
    let cri_proxy = cfg.cri_proxy.clone();
    // Lazy pulling: remote layers are read from their registry through the block cache.
    let remote = Arc::new(
        crate::source::remote::RegistrySource::from_config(&cfg)
            .context("setting up the registry source and block cache")?,
    );
    let for_snapshotter = remote.clone();
    let snap = Arc::new(
        tokio::task::spawn_blocking(move || -> Result<Snapshotter> {
            let captured = for_snapshotter.captured_credentials();
            let s = Snapshotter::open(cfg)?
                .with_remote(for_snapshotter)
                .with_cri_pulls(captured);
            s.reconcile().context("reconciling state at start")?;
            Ok(s)
        })
        .await??,
    );
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if let Some(addr) = metrics_address {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding [metrics] address {addr}"))?;
        log::info!("serving metrics on http://{addr}/metrics");
        tokio::spawn(crate::metrics::serve_metrics(
            listener,
            remote.cache().clone(),
        ));
    }
    if let Some(dir) = control_socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let control_listener = bind_published(&control_socket)?;
    let control_published = socket_identity(&control_socket);
    let control = Server::builder()
        .add_service(crate::control::control_server(
            snap.clone(),
            Some(remote.cache().clone()),
        ))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(
            control_listener,
        ));
    let control = tokio::spawn(async move {
        if let Err(e) = control.await {
            log::warn!("serving the control socket: {e}");
        }
    });
    log::info!("serving the control API on {}", control_socket.display());
    let listener = bind_published(&socket)?;
    let published = socket_identity(&socket);
    log::info!(
        "serving the containerd Snapshots API on {}",
        socket.display()
    );
    let incoming = accepted_connections(listener);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
        log::info!("shutting down");
        let _ = stop.send(true);
    };
    let proxy = match &cri_proxy.listen {
        Some(listen) => Some(
            serve_cri_proxy(listen, &cri_proxy.upstream, &remote, stopped)
                .with_context(|| format!("[cri_proxy] listen {}", listen.display()))?,
        ),
        None => None,
    };
    let keeper = snap.clone();
    let served = Server::builder()
        .add_service(grpc_server(snap))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    // Devices stay attached: with USER_RECOVERY the kernel keeps them for the next start,
    // which re-attaches them in place (running containers keep their rootfs); FUSE ones are
    // kept by the holder process likewise, and must not be torn down as we drop them.
    keeper.hand_over_devices();
    // A socket nobody listens on reads as "connection refused"; gone, it reads as not running.
    // Unless a newer daemon has already put its own there.
    if published.is_some() && socket_identity(&socket) == published {
        let _ = std::fs::remove_file(&socket);
    }
    control.abort();
    if control_published.is_some() && socket_identity(&control_socket) == control_published {
        let _ = std::fs::remove_file(&control_socket);
    }
    if let Some(proxy) = proxy {
        match proxy.await {
            Ok(Err(e)) => log::warn!("serving the CRI image-service proxy: {e}"),
            Err(e) => log::warn!("the CRI image-service proxy task: {e}"),
            Ok(Ok(())) => {}
        }
    }
    served.context("serving gRPC")?;
    // Devices outlive us (below): record the blocks fetched so far as cached for the next start.
    if let Err(e) = remote.flush() {
        log::warn!("flushing the block cache: {e}");
    }
    Ok(())
}

/// Serves `[cri_proxy]` on `listen` (root-only) until `stopped` turns true: the kubelet's
/// image service, forwarded to containerd's CRI at `upstream`.
fn serve_cri_proxy(
    listen: &Path,
    upstream: &Path,
    remote: &crate::source::remote::RegistrySource,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<Result<(), containerd_snapshots::tonic::transport::Error>>> {
    if let Some(dir) = listen.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let proxy =
        crate::cri_proxy::ImageProxy::new(upstream.to_owned(), remote.captured_credentials())
            .context("setting up the upstream CRI client")?;
    let listener = bind_published(listen)?;
    log::info!(
        "serving the CRI image service on {} (forwarded to {})",
        listen.display(),
        upstream.display()
    );
    let incoming = accepted_connections(listener);
    Ok(tokio::spawn(
        Server::builder()
            .add_service(proxy.into_service())
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stopped.wait_for(|s| *s).await;
            }),
    ))
}

/// Binds the unix socket `socket` so that the path appears only once it listens, and only as
/// root's: bound in a private directory, chmod'ed, then renamed over the path (and over a stale
/// socket left by a killed daemon). containerd polls a missing socket every 10 ms: it would
/// catch the instant between bind and listen, get "connection refused" and back off for seconds.
fn bind_published(socket: &Path) -> Result<tokio::net::UnixListener> {
    let dir = socket.parent().unwrap_or(Path::new("."));
    let private = dir.join(format!(".ovbd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private); // a previous daemon's with our pid
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| format!("creating {}", private.display()))?;
    let staged = private.join("s");
    let bound = tokio::net::UnixListener::bind(&staged)
        .with_context(|| format!("binding {} (for {})", staged.display(), socket.display()))
        .and_then(|listener| {
            // Whoever talks to the socket can mount anything.
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
                .and_then(|()| std::fs::rename(&staged, socket))
                .with_context(|| {
                    format!("publishing {} as {}", staged.display(), socket.display())
                })?;
            Ok(listener)
        });
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Which file `path` is (device, inode), if any.
fn socket_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The connections accepted on `listener`. A failed accept (EMFILE when out of descriptors,
/// ECONNABORTED) is logged and retried: tonic ends the whole server on the first accept error,
/// which would leave containerd dialing a dead socket for good.
fn accepted_connections(
    listener: tokio::net::UnixListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::UnixStream>> {
    async_stream::stream! {
        let mut failed_accepts = 0u64;
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    // Tests wait for this line: containerd's connection is up.
                    log::debug!("accepted a connection on the snapshotter socket");
                    if failed_accepts > 0 {
                        log::info!("accepting connections again after {failed_accepts} failed accepts");
                        failed_accepts = 0;
                    }
                    yield Ok(conn)
                }
                Err(e) => {
                    // One line per episode: out of descriptors lasts until some close.
                    if failed_accepts == 0 {
                        log::warn!("accepting a connection on the snapshotter socket: {e} (retrying)");
                    }
                    failed_accepts += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
}
