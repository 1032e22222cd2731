//! `ovbd-e2e-cri`: a small CRI (Kubernetes Container Runtime Interface, v1) client for ovbd's end-to-end
//! tests. There is no crictl on the test machines; this talks CRI gRPC to containerd's CRI plugin over
//! its unix socket, as the kubelet does.
//!
//! ```text
//! ovbd-e2e-cri pull   --endpoint SOCK [--username U] IMAGE  PullImage (password: $OVBD_E2E_CRI_PASSWORD): prints the image id and the wall time
//! ovbd-e2e-cri images --endpoint SOCK                     ListImages
//! ovbd-e2e-cri rmi    --endpoint SOCK IMAGE               RemoveImage
//! ovbd-e2e-cri run    --endpoint SOCK --image IMAGE [--name N] [--timeout S] [--env K=V] -- CMD...
//! ```
//!
//! `run` is a one-container pod: RunPodSandbox (host network), PullImage if the image is missing,
//! CreateContainer, StartContainer, ContainerStatus until the container has exited; then it prints the
//! container's stdout (taken from its CRI log file; stderr goes to stderr), StopPodSandbox +
//! RemovePodSandbox (always, on errors too) and exits with the container's exit code. What it does goes
//! to stderr as `[cri] ...` lines, so stdout is the container's output alone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;

#[derive(Parser)]
#[command(
    name = "ovbd-e2e-cri",
    about = "A small CRI v1 client (pull, run, images, rmi) for ovbd's e2e tests",
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Conn {
    /// The CRI runtime's unix socket (containerd's gRPC address)
    #[arg(long, value_name = "SOCK")]
    endpoint: PathBuf,
    /// Timeout of each CRI call, seconds (PullImage included)
    #[arg(long, value_name = "S", default_value_t = 300)]
    rpc_timeout: u64,
}

#[derive(Subcommand)]
enum Cmd {
    /// PullImage: prints the image id and the wall time
    Pull {
        #[command(flatten)]
        conn: Conn,
        /// Sent as the PullImage's AuthConfig username, with the password in
        /// $OVBD_E2E_CRI_PASSWORD (a pod's pull secret)
        #[arg(long, value_name = "USER")]
        username: Option<String>,
        image: String,
    },
    /// ListImages: one line per image (id, size, tags, digests)
    Images {
        #[command(flatten)]
        conn: Conn,
    },
    /// RemoveImage
    Rmi {
        #[command(flatten)]
        conn: Conn,
        image: String,
    },
    /// Runs CMD in a one-container pod (host network), prints its stdout, exits with its exit code
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    conn: Conn,
    /// The container's image (pulled if the runtime does not have it)
    #[arg(long)]
    image: String,
    /// Pod and container name (a unique pod uid is added)
    #[arg(long, default_value = "ovbd-e2e")]
    name: String,
    /// Pod namespace (the Kubernetes one, in the pod's metadata)
    #[arg(long, default_value = "ovbd-e2e")]
    pod_namespace: String,
    /// Seconds to wait for the container to exit (then it is stopped and this fails)
    #[arg(long, value_name = "S", default_value_t = 120)]
    timeout: u64,
    /// Environment variables of the container (repeatable)
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    envs: Vec<String>,
    /// Pod log directory (default: a fresh temp dir, removed at the end)
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// Print the container's log file as it is (CRI format) instead of its stdout
    #[arg(long)]
    raw_log: bool,
    /// The command and its arguments
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

fn say(msg: impl AsRef<str>) {
    eprintln!("[cri] {}", msg.as_ref());
}

struct Clients {
    image: ImageServiceClient<Channel>,
    runtime: RuntimeServiceClient<Channel>,
    rpc_timeout: Duration,
}

async fn connect(conn: &Conn) -> Result<Clients> {
    let path = conn.endpoint.clone();
    if !path.exists() {
        bail!("CRI endpoint {} does not exist", path.display());
    }
    // The URI is ignored: every connection goes to the unix socket.
    let channel = Endpoint::try_from("http://[::]")?
        .connect_with_connector(service_fn(move |_: Uri| UnixStream::connect(path.clone())))
        .await
        .with_context(|| format!("connecting to {}", conn.endpoint.display()))?;
    Ok(Clients {
        image: ImageServiceClient::new(channel.clone()),
        runtime: RuntimeServiceClient::new(channel),
        rpc_timeout: Duration::from_secs(conn.rpc_timeout),
    })
}

impl Clients {
    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.rpc_timeout);
        r
    }

    /// The runtime's version; also checks that the CRI v1 services answer on the socket.
    async fn version(&mut self) -> Result<cri::VersionResponse> {
        let req = self.req(cri::VersionRequest {
            version: "v1".into(),
        });
        let v = self
            .runtime
            .version(req)
            .await
            .map_err(|s| rpc_err("Version", s))?;
        Ok(v.into_inner())
    }

    async fn image_status(&mut self, image: &str) -> Result<Option<cri::Image>> {
        let req = self.req(cri::ImageStatusRequest {
            image: Some(spec(image)),
            verbose: false,
        });
        let r = self
            .image
            .image_status(req)
            .await
            .map_err(|s| rpc_err("ImageStatus", s))?;
        Ok(r.into_inner().image)
    }

    async fn pull(
        &mut self,
        image: &str,
        sandbox: Option<&cri::PodSandboxConfig>,
        auth: Option<cri::AuthConfig>,
    ) -> Result<String> {
        let req = self.req(cri::PullImageRequest {
            image: Some(spec(image)),
            auth,
            sandbox_config: sandbox.cloned(),
        });
        let r = self
            .image
            .pull_image(req)
            .await
            .map_err(|s| rpc_err(&format!("PullImage {image}"), s))?;
        Ok(r.into_inner().image_ref)
    }
}

fn spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_string(),
        annotations: HashMap::new(),
    }
}

fn rpc_err(what: &str, s: tonic::Status) -> anyhow::Error {
    anyhow!("CRI {what} failed: {:?}: {}", s.code(), s.message())
}

async fn cmd_pull(conn: Conn, username: Option<String>, image: String) -> Result<u8> {
    let auth = username.map(|username| cri::AuthConfig {
        username,
        password: std::env::var("OVBD_E2E_CRI_PASSWORD").unwrap_or_default(),
        ..Default::default()
    });
    let mut c = connect(&conn).await?;
    let t0 = Instant::now();
    let id = c.pull(&image, None, auth).await?;
    println!(
        "pulled {image}: image id {id} in {:.3} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(0)
}

async fn cmd_images(conn: Conn) -> Result<u8> {
    let mut c = connect(&conn).await?;
    let req = c.req(cri::ListImagesRequest { filter: None });
    let r = c
        .image
        .list_images(req)
        .await
        .map_err(|s| rpc_err("ListImages", s))?;
    let images = r.into_inner().images;
    for i in &images {
        println!(
            "{} size={} tags={} digests={}",
            i.id,
            i.size,
            i.repo_tags.join(","),
            i.repo_digests.join(",")
        );
    }
    say(format!("{} image(s)", images.len()));
    Ok(0)
}

async fn cmd_rmi(conn: Conn, image: String) -> Result<u8> {
    let mut c = connect(&conn).await?;
    let req = c.req(cri::RemoveImageRequest {
        image: Some(spec(&image)),
    });
    c.image
        .remove_image(req)
        .await
        .map_err(|s| rpc_err(&format!("RemoveImage {image}"), s))?;
    println!("removed {image}");
    Ok(0)
}

fn node_ns(pid: cri::NamespaceMode) -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
        pid: pid as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{:08x}", std::process::id(), nanos)
}

async fn cmd_run(a: RunArgs) -> Result<u8> {
    let mut c = connect(&a.conn).await?;
    let v = c.version().await?;
    say(format!(
        "runtime {} {} (CRI {})",
        v.runtime_name, v.runtime_version, v.runtime_api_version
    ));

    // The log directory must outlive the pod: the runtime writes the container's log there.
    let tmp;
    let log_dir = match &a.log_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            std::fs::canonicalize(d)?
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("ovbd-e2e-cri.")
                .tempdir()
                .context("creating a temp log dir")?;
            tmp.path().to_path_buf()
        }
    };
    let uid = format!("{}-{}", a.name, unique_suffix());
    let sandbox_config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: a.name.clone(),
            uid: uid.clone(),
            namespace: a.pod_namespace.clone(),
            attempt: 0,
        }),
        // The host network comes with the host's UTS namespace: the runtime refuses a hostname, and
        // mounts a file with the node's hostname over the image's /etc/hostname.
        hostname: String::new(),
        log_directory: log_dir.to_string_lossy().into_owned(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(node_ns(cri::NamespaceMode::Pod)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };

    let t0 = Instant::now();
    let req = c.req(cri::RunPodSandboxRequest {
        config: Some(sandbox_config.clone()),
        runtime_handler: String::new(),
    });
    let pod_id = c
        .runtime
        .run_pod_sandbox(req)
        .await
        .map_err(|s| rpc_err("RunPodSandbox", s))?
        .into_inner()
        .pod_sandbox_id;
    say(format!(
        "pod sandbox {pod_id} (name {}, uid {uid}, host network) in {:.3} s",
        a.name,
        t0.elapsed().as_secs_f64()
    ));

    let result = run_in_pod(&mut c, &a, &pod_id, &sandbox_config, &log_dir).await;

    // Always: stop and remove the pod (its containers go with it).
    let mut cleanup_err = None;
    let req = c.req(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod_id.clone(),
    });
    match c.runtime.stop_pod_sandbox(req).await {
        Ok(_) => say(format!("stopped pod sandbox {pod_id}")),
        Err(s) => cleanup_err = Some(rpc_err("StopPodSandbox", s)),
    }
    let req = c.req(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod_id.clone(),
    });
    match c.runtime.remove_pod_sandbox(req).await {
        Ok(_) => say(format!("removed pod sandbox {pod_id}")),
        Err(s) => {
            let e = rpc_err("RemovePodSandbox", s);
            cleanup_err = Some(match cleanup_err {
                Some(prev) => prev.context(e.to_string()),
                None => e,
            });
        }
    }
    match (result, cleanup_err) {
        (Err(e), Some(ce)) => Err(e.context(format!("(cleanup failed too: {ce:#})"))),
        (Err(e), None) => Err(e),
        (Ok(_), Some(ce)) => Err(ce),
        (Ok(code), None) => Ok(code),
    }
}

/// Pull (if needed), create, start, wait, print the log. Returns the exit code (0..=255).
async fn run_in_pod(
    c: &mut Clients,
    a: &RunArgs,
    pod_id: &str,
    sandbox_config: &cri::PodSandboxConfig,
    log_dir: &Path,
) -> Result<u8> {
    let image_ref = match c.image_status(&a.image).await? {
        Some(img) => {
            say(format!("image {} present: {}", a.image, img.id));
            img.id
        }
        None => {
            let t = Instant::now();
            let id = c.pull(&a.image, Some(sandbox_config), None).await?;
            say(format!(
                "pulled {}: {id} in {:.3} s",
                a.image,
                t.elapsed().as_secs_f64()
            ));
            id
        }
    };

    let mut envs = Vec::new();
    for e in &a.envs {
        let (k, v) = e
            .split_once('=')
            .ok_or_else(|| anyhow!("--env {e:?}: not KEY=VALUE"))?;
        envs.push(cri::KeyValue {
            key: k.into(),
            value: v.into(),
        });
    }
    let log_path = format!("{}.log", a.name);
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: a.name.clone(),
            attempt: 0,
        }),
        image: Some(spec(&image_ref)),
        command: a.cmd.clone(),
        envs,
        log_path: log_path.clone(),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(node_ns(cri::NamespaceMode::Container)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let t = Instant::now();
    let req = c.req(cri::CreateContainerRequest {
        pod_sandbox_id: pod_id.to_string(),
        config: Some(config),
        sandbox_config: Some(sandbox_config.clone()),
    });
    let cid = c
        .runtime
        .create_container(req)
        .await
        .map_err(|s| rpc_err("CreateContainer", s))?
        .into_inner()
        .container_id;
    say(format!(
        "created container {cid} in {:.3} s",
        t.elapsed().as_secs_f64()
    ));

    let t = Instant::now();
    let req = c.req(cri::StartContainerRequest {
        container_id: cid.clone(),
    });
    c.runtime
        .start_container(req)
        .await
        .map_err(|s| rpc_err("StartContainer", s))?;
    say(format!(
        "started container: {} in {:.3} s",
        shell_words(&a.cmd),
        t.elapsed().as_secs_f64()
    ));

    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let status = loop {
        let req = c.req(cri::ContainerStatusRequest {
            container_id: cid.clone(),
            verbose: false,
        });
        let st = c
            .runtime
            .container_status(req)
            .await
            .map_err(|s| rpc_err("ContainerStatus", s))?;
        let st = st
            .into_inner()
            .status
            .ok_or_else(|| anyhow!("ContainerStatus of {cid}: no status"))?;
        if st.state == cri::ContainerState::ContainerExited as i32 {
            break st;
        }
        if Instant::now() >= deadline {
            let req = c.req(cri::StopContainerRequest {
                container_id: cid.clone(),
                timeout: 0,
            });
            let stop = c.runtime.stop_container(req).await;
            print_log(&log_dir.join(&log_path), a.raw_log);
            bail!(
                "container {cid} still {} after {} s (stopped it: {})",
                state_name(st.state),
                a.timeout,
                if stop.is_ok() { "ok" } else { "failed" }
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    say(format!(
        "container exited with code {} ({}{}) after {:.3} s",
        status.exit_code,
        status.reason,
        if status.message.is_empty() {
            String::new()
        } else {
            format!(": {}", status.message)
        },
        t.elapsed().as_secs_f64()
    ));
    let file = if status.log_path.is_empty() {
        log_dir.join(&log_path)
    } else {
        PathBuf::from(&status.log_path)
    };
    print_log(&file, a.raw_log);
    // The exit status of a process is 0..=255; a runtime that reports anything else (e.g. -1) fails.
    u8::try_from(status.exit_code).or(Ok(255))
}

fn state_name(s: i32) -> &'static str {
    match cri::ContainerState::from_i32(s) {
        Some(cri::ContainerState::ContainerCreated) => "created",
        Some(cri::ContainerState::ContainerRunning) => "running",
        Some(cri::ContainerState::ContainerExited) => "exited",
        _ => "unknown",
    }
}

fn shell_words(v: &[String]) -> String {
    v.iter()
        .map(|w| {
            if !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/._-=:,+@".contains(c))
            {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_log(path: &Path, raw: bool) {
    match std::fs::read(path) {
        Ok(data) => {
            use std::io::Write;
            if raw {
                let _ = std::io::stdout().write_all(&data);
                return;
            }
            let (out, err) = parse_cri_log(&data);
            let _ = std::io::stdout().write_all(&out);
            let _ = std::io::stdout().flush();
            let _ = std::io::stderr().write_all(&err);
        }
        Err(e) => say(format!("no container log at {}: {e}", path.display())),
    }
}

/// Splits a CRI log file (lines `TIMESTAMP STREAM TAG MESSAGE`, TAG `F` for a full line or `P` for a
/// partial one that continues on the next line of the same stream) into the stdout and stderr bytes.
fn parse_cri_log(data: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for line in data.split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        let mut f = line.splitn(4, |&b| b == b' ');
        let (_ts, stream, tag) = (f.next(), f.next(), f.next().unwrap_or(b"F"));
        let msg = f.next().unwrap_or(b"");
        let dst = match stream {
            Some(b"stdout") => &mut out,
            Some(b"stderr") => &mut err,
            _ => continue,
        };
        dst.extend_from_slice(msg);
        // The tag may carry more flags after a colon; P = partial.
        if tag.split(|&b| b == b':').next() != Some(b"P") {
            dst.push(b'\n');
        }
    }
    (out, err)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Pull {
            conn,
            username,
            image,
        } => cmd_pull(conn, username, image).await,
        Cmd::Images { conn } => cmd_images(conn).await,
        Cmd::Rmi { conn, image } => cmd_rmi(conn, image).await,
        Cmd::Run(a) => cmd_run(a).await,
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ovbd-e2e-cri: error: {e:#}");
            // 125, like `docker run`, for "the run itself failed" rather than the container's own status
            ExitCode::from(125)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_cri_log;

    #[test]
    fn cri_log_format() {
        let log = b"2024-01-01T00:00:00.000000001Z stdout F hello world\n\
2024-01-01T00:00:00.000000002Z stderr F oops\n\
2024-01-01T00:00:00.000000003Z stdout P part one \n\
2024-01-01T00:00:00.000000004Z stdout F and two\n\
2024-01-01T00:00:00.000000005Z stdout F \n";
        let (out, err) = parse_cri_log(log);
        assert_eq!(out, b"hello world\npart one and two\n\n");
        assert_eq!(err, b"oops\n");
    }
}
