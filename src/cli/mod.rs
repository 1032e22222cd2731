//! The command line: clap types and dispatch here, one file per verb beside it. The work lives
//! in the library's modules; nothing below the CLI imports it.

mod convert;
mod device;
mod layer;
mod rpull;
mod serve;

use crate::snapshotter::MAX_VSIZE_GB;
use crate::{config, oci};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "ovbd",
    version,
    about = "OverlayBD images for containerd: layers, devices, snapshotter"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Inspect, convert and build single layers.
    #[command(subcommand)]
    Layer(LayerCmd),
    /// Whole images (stacks of layers).
    #[command(subcommand)]
    Image(ImageCmd),
    /// Block devices (ublk) serving images.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Convert an OCI/Docker image to an OverlayBD image. SRC and DST are registry references
    /// (`host/repo:tag`) or OCI layouts (`oci:DIR:TAG`).
    Convert {
        src: String,
        dst: String,
        /// Virtual disk size in GiB (1 to 262144: 256 TiB).
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=MAX_VSIZE_GB))]
        vsize: u64,
        #[arg(long, value_enum, default_value = "lz4")]
        algo: Algo,
        /// ZFile block size in bytes: 4096, 8192, 16384, 32768 or 65536.
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// Platform to pick from a multi-platform source: os/arch[/variant].
        #[arg(long, default_value = "linux/amd64")]
        platform: String,
        #[command(flatten)]
        registry: RegistryArgs,
        /// Scratch directory (default $TMPDIR).
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// Print a JSON summary (digests, sizes, seconds) on stdout.
        #[arg(long)]
        json: bool,
        /// A priority list (one absolute path a line, as upstream's `ctr record-trace
        /// --priority_list`): pushed as an acceleration layer on top, its files prefetched when
        /// the image's device is attached.
        #[arg(long)]
        priority_list: Option<PathBuf>,
    },
    /// Run CMD once in OverlayBD image SRC, record which blocks it reads, and write DST: SRC
    /// with upstream's acceleration layer holding that trace on top, so the next cold start
    /// prefetches them (as upstream's `ctr record-trace`). Needs root: the image is attached as
    /// a block device here and CMD runs as root in its filesystem (its own root and /dev; /proc
    /// with runc's read-only and masked paths; new mount, PID, network, UTS, IPC and cgroup
    /// namespaces; Docker's default capabilities less MKNOD, SETFCAP and NET_RAW; a seccomp
    /// filter refusing user namespaces, keyrings, bpf and io_uring as Docker's does; a cgroup of
    /// its own with a memory and a process limit; the image config's Env and WorkingDir); its
    /// writes are dropped, and may take `--scratch-mb` of disk.
    RecordTrace {
        src: String,
        dst: String,
        /// Kill CMD after this many seconds (the trace holds what it read until then).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
        time: u64,
        /// Platform to pick from a multi-platform source: os/arch[/variant].
        #[arg(long, default_value = "linux/amd64")]
        platform: String,
        #[command(flatten)]
        registry: RegistryArgs,
        /// Scratch directory (default $TMPDIR): every layer blob is downloaded there.
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// Block device frontend for the run: ublk, fuse or auto.
        #[arg(long, value_enum, default_value_t = config::FrontendChoice::Auto)]
        frontend: config::FrontendChoice,
        /// The device's read-ahead in KiB: as `[device] read_ahead_kb` of the daemons that
        /// will run the image, so the trace holds what their devices read.
        #[arg(long, default_value_t = 128)]
        read_ahead_kb: u32,
        /// Print a JSON summary (digests, records, how CMD ended) on stdout.
        #[arg(long)]
        json: bool,
        /// Memory CMD's processes may hold together, in MiB (their page cache and tmpfs
        /// files included, swap too where the kernel counts it): past it the kernel kills one.
        #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(16..=1 << 24))]
        memory_mb: u64,
        /// Processes (and threads) CMD may have at once: forks past it fail.
        #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(8..=1 << 22))]
        pids: u64,
        /// Disk CMD's writes may take in the scratch layer (they are dropped afterwards), in
        /// MiB: writes past it fail (ENOSPC).
        #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(16..=1 << 24))]
        scratch_mb: u64,
        /// Run CMD without the memory, process and scratch limits (no cgroup is made).
        #[arg(long, conflicts_with_all = ["memory_mb", "pids", "scratch_mb"])]
        no_limits: bool,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Pull an OverlayBD image lazily into containerd: only manifest and config are fetched;
    /// ovbd reads the layers' blocks from the registry when a container does.
    Rpull {
        reference: String,
        /// containerd's socket.
        #[arg(long, default_value = "/run/containerd/containerd.sock")]
        address: PathBuf,
        #[arg(long, short, default_value = "default")]
        namespace: String,
        #[arg(long, default_value = "ovbd")]
        snapshotter: String,
        #[arg(long, default_value = "linux/amd64")]
        platform: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Run the containerd snapshotter (proxy plugin) daemon.
    Serve {
        /// Configuration file (default /etc/ovbd/config.toml; see config/ovbd.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// What a running `ovbd serve` serves (devices, snapshots, cache, registries), asked on
    /// its control socket.
    Status {
        /// The daemon's configuration file (for `control_socket`; default
        /// /etc/ovbd/config.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The control socket (default: the configuration's).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Keeps a FUSE frontend's connection across daemon restarts. Started by `ovbd serve` (with
    /// the connection as stdin), or on its own before any daemon (Kubernetes: its own
    /// DaemonSet), waiting on SOCKET (the daemon's `<root>/fuse.holder`) to be given it.
    #[command(hide = true)]
    FuseHolder {
        #[arg(long)]
        socket: PathBuf,
        /// The connection is stdin (a daemon spawned us): exit once it is gone.
        #[arg(long)]
        from_stdin: bool,
    },
}

/// How `convert` and `rpull` reach registries.
#[derive(clap::Args)]
struct RegistryArgs {
    /// Registries spoken to over plain http (host[:port]); loopback ones always are.
    #[arg(long)]
    insecure: Vec<String>,
    /// Reach registries as `ovbd serve` does: the [registry] section of this configuration
    /// file (mirrors, proxy, allow_hosts, auth_realms, timeouts, retries); defaults without.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Serve the images described by overlaybd `config.v1.json` files as block devices
    /// (printed one per line), all from one process.
    Attach {
        #[arg(required = true)]
        configs: Vec<PathBuf>,
        /// Return once the device is up; a background process serves it.
        #[arg(long)]
        background: bool,
        /// Device id (default: the kernel picks): N of /dev/ublkbN, or with --recover of
        /// /dev/loopN on fuse.
        #[arg(long)]
        id: Option<u32>,
        /// Re-attach device --id whose server died, with the config it had: ublk needs
        /// UBLK_F_USER_RECOVERY; fuse re-serves the connection the device's `ovbd fuse-holder`
        /// process kept (one per device).
        #[arg(long)]
        recover: bool,
        /// Block device frontend: ublk (/dev/ublkbN), fuse (/dev/loopN over a file on a FUSE
        /// mount the server owns), or auto (ublk when /dev/ublk-control exists, else fuse).
        #[arg(long, value_enum, default_value_t = config::FrontendChoice::Auto)]
        frontend: config::FrontendChoice,
    },
    /// List devices attached by ovbd.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop and delete a device: its id as `ovbd device list` shows it, or its path
    /// (/dev/ublkbN, /dev/loopN).
    Detach { id: String },
}

#[derive(Clone, Copy, ValueEnum)]
enum Algo {
    Lz4,
    Zstd,
}

#[derive(Subcommand)]
enum LayerCmd {
    /// Show what a layer blob or file is: wrapper, ZFile, LSMT header and index; checks every
    /// block CRC.
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Strip the tar wrapper and ZFile compression: write the raw LSMT.
    Decompress { blob: PathBuf, out: PathBuf },
    /// ZFile-compress a raw LSMT and wrap it in the PAX tar (as `overlaybd-commit -z -t`).
    Compress {
        lsmt: PathBuf,
        out: PathBuf,
        #[arg(long, value_enum, default_value = "lz4")]
        algo: Algo,
        /// ZFile block size in bytes: 4096, 8192, 16384, 32768 or 65536.
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// Write the bare ZFile, without the tar wrapper.
        #[arg(long)]
        no_tar: bool,
    },
    /// Create an empty writable layer (as `overlaybd-create`).
    Create {
        data: PathBuf,
        index: PathBuf,
        /// Virtual size in GiB (0: inherit from the lowers when stacked; at most 262144).
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(0..=MAX_VSIZE_GB))]
        vsize_gb: u64,
        /// Sparse mode: writes in place instead of appended.
        #[arg(long)]
        sparse: bool,
        #[arg(long)]
        parent_uuid: Option<String>,
    },
    /// Seal a writable layer in place: append its index and a trailer to DATA.
    Seal { data: PathBuf, index: PathBuf },
    /// Commit a writable layer to a compact read-only layer (as `overlaybd-commit`).
    Commit {
        data: PathBuf,
        index: PathBuf,
        out: PathBuf,
        #[arg(long)]
        uuid: Option<String>,
        /// Defaults to the writable layer's own parent UUID.
        #[arg(long)]
        parent_uuid: Option<String>,
        /// Also ZFile-compress (LZ4, 4 KiB) and PAX-wrap the result: a registry layer blob.
        #[arg(short = 'z', long)]
        compress: bool,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Write the flattened virtual disk of LAYERS (bottom to top) to OUT as a sparse raw file.
    Export {
        #[arg(required = true, num_args = 2..)]
        paths: Vec<PathBuf>,
    },
}

/// Entry point of the `ovbd` binary.
pub fn main() {
    let cli = Cli::parse();
    // The daemon logs at its configured level and format; tools only warn, as text.
    let (level, format) = match &cli.cmd {
        Cmd::Serve { config } => config::Config::load(config.as_deref())
            .map(|c| (c.log_level, c.log_format))
            .unwrap_or_else(|_| ("info".into(), config::LogFormat::Text)),
        _ => ("warn".into(), config::LogFormat::Text),
    };
    init_logging(&level, format);
    if let Err(e) = run(cli) {
        eprintln!("ovbd: {e:#}");
        std::process::exit(1);
    }
}

/// tracing-subscriber on stderr; `log::` records are bridged in and carry the current span.
/// Filter: OVBD_LOG, else RUST_LOG, else `level`; one that does not parse is skipped (with a
/// warning once logging is up) for the next.
fn init_logging(level: &str, format: config::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let mut skipped = Vec::new();
    let mut filter = None;
    let sources = [
        ("OVBD_LOG", std::env::var("OVBD_LOG").ok()),
        ("RUST_LOG", std::env::var("RUST_LOG").ok()),
        ("log_level", Some(level.to_string())),
    ];
    for (name, directives) in sources {
        let Some(directives) = directives else {
            continue;
        };
        match EnvFilter::try_new(&directives) {
            Ok(f) => {
                filter = Some(f);
                break;
            }
            Err(e) => skipped.push(format!("{name}={directives:?} ({e})")),
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter.unwrap_or_else(|| EnvFilter::new("info")))
        .with_writer(std::io::stderr);
    // try_init: the log bridge is installed by the `tracing-log` feature.
    let _ = match format {
        config::LogFormat::Text => builder.try_init(),
        config::LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
    for s in skipped {
        let msg = format!("bad log filter {s}: using the next of OVBD_LOG, RUST_LOG, log_level");
        // The filter taken may hide warnings: this one is said anyway.
        if tracing::enabled!(tracing::Level::WARN) {
            tracing::warn!("{msg}");
        } else {
            eprintln!("ovbd: {msg}");
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    use ovbd_format::zfile::{Algorithm, ZFileOptions};
    let zopts = |algo: Algo, block_size| ZFileOptions {
        algorithm: match algo {
            Algo::Lz4 => Algorithm::Lz4,
            Algo::Zstd => Algorithm::Zstd,
        },
        block_size,
    };
    match cli.cmd {
        Cmd::Layer(LayerCmd::Inspect { file, json }) => layer::inspect(&file, json),
        Cmd::Layer(LayerCmd::Decompress { blob, out }) => layer::decompress(&blob, &out),
        Cmd::Layer(LayerCmd::Compress {
            lsmt,
            out,
            algo,
            block_size,
            no_tar,
        }) => layer::compress(&lsmt, &out, zopts(algo, block_size), !no_tar),
        Cmd::Layer(LayerCmd::Create {
            data,
            index,
            vsize_gb,
            sparse,
            parent_uuid,
        }) => layer::create(
            &data,
            &index,
            vsize_gb << 30,
            sparse,
            parent_uuid.as_deref(),
        ),
        Cmd::Layer(LayerCmd::Seal { data, index }) => layer::seal(&data, &index),
        Cmd::Layer(LayerCmd::Commit {
            data,
            index,
            out,
            uuid,
            parent_uuid,
            compress,
        }) => layer::commit(
            &data,
            &index,
            &out,
            uuid.as_deref(),
            parent_uuid.as_deref(),
            compress.then(ZFileOptions::default),
        ),
        Cmd::Device(DeviceCmd::Attach {
            configs,
            background,
            id,
            recover,
            frontend,
        }) => device::attach(&configs, background, id, recover, frontend),
        Cmd::Device(DeviceCmd::List { json }) => device::list(json),
        Cmd::Convert {
            src,
            dst,
            vsize,
            algo,
            block_size,
            platform,
            registry,
            workdir,
            json,
            priority_list,
        } => convert::run(
            &src,
            &dst,
            crate::convert::ConvertOptions {
                vsize: vsize << 30,
                zfile: zopts(algo, block_size),
                platform: platform.parse()?,
                registry: registry.options()?,
                workdir,
                priority_list,
            },
            json,
        ),
        Cmd::RecordTrace {
            src,
            dst,
            time,
            platform,
            registry,
            workdir,
            frontend,
            read_ahead_kb,
            json,
            memory_mb,
            pids,
            scratch_mb,
            no_limits,
            cmd,
        } => {
            // A signal stops CMD and lets the recording take down its device and mounts.
            let set = block_stop_signals()?;
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stopping = stop.clone();
            std::thread::Builder::new()
                .name("record-signals".into())
                .spawn(move || {
                    let mut sig = 0;
                    // SAFETY: waiting on the blocked set.
                    if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                        eprintln!("ovbd record-trace: signal {sig}: stopping");
                        stopping.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                })?;
            let opts = crate::convert::record::RecordOptions {
                platform: platform.parse()?,
                registry: registry.options()?,
                workdir,
                time: std::time::Duration::from_secs(time),
                frontend,
                read_ahead_kb,
                stop,
                limits: (!no_limits).then_some(crate::convert::record::Limits {
                    memory_mib: memory_mb,
                    pids,
                }),
                scratch_limit: (!no_limits).then_some(scratch_mb << 20),
            };
            let s = crate::convert::record::record_trace(&src, &dst, &cmd, &opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                eprintln!(
                    "{}: {} reads ({} bytes) recorded while {} ran ({}); {} written with acceleration layer {} ({:.1} s)",
                    s.source, s.records, s.bytes, cmd[0], s.command, s.destination,
                    s.acceleration_layer, s.seconds
                );
            }
            Ok(())
        }
        Cmd::Rpull {
            reference,
            address,
            namespace,
            snapshotter,
            platform,
            registry,
        } => rpull::run(
            &reference,
            rpull::RpullOptions {
                address,
                namespace,
                snapshotter,
                platform: platform.parse()?,
                registry: registry.options()?,
            },
        ),
        Cmd::Serve { config } => {
            let cfg = config::Config::load(config.as_deref())?;
            serve::serve(cfg)
        }
        Cmd::Status {
            config,
            socket,
            json,
        } => {
            let socket = match socket {
                Some(s) => s,
                None => config::Config::load(config.as_deref())?.control_socket_path(),
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            let status = rt.block_on(crate::control::ask_status(&socket))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", crate::control::format_status(&status));
            }
            Ok(())
        }
        Cmd::FuseHolder { socket, from_stdin } => {
            crate::device::fuse_holder::run(&socket, from_stdin)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("fuse holder on {}", socket.display()))
        }
        Cmd::Device(DeviceCmd::Detach { id }) => device::detach(&id),
        Cmd::Image(ImageCmd::Export { mut paths }) => {
            let out = paths.pop().unwrap_or_default();
            layer::export(&paths, &out)
        }
    }
}

impl RegistryArgs {
    /// `--insecure` hosts, and the `[registry]` section of `--config` (defaults without).
    fn options(self) -> Result<oci::RegistryOptions> {
        let config = match &self.config {
            Some(path) => config::Config::load(Some(path))?.registry,
            None => config::RegistryConfig::default(),
        };
        Ok(oci::RegistryOptions {
            insecure: self.insecure,
            docker_config: None,
            config,
        })
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread and the threads it starts (call it first
/// thing), for one thread to `sigwait` on the returned set and stop the work in order.
fn block_stop_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigset manipulation on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc)).context("blocking signals");
        }
        Ok(set)
    }
}
