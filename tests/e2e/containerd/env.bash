# shellcheck shell=bash disable=SC2034  # (it sets variables for the scripts that source it)
# Library for end-to-end tests that need a real containerd: a PRIVATE containerd 1.6 (own root, state and
# socket), a local registry, sample images, and a way to compare the file trees containers see.
# Sourced, not run (the name does not match the guest runner's *.sh glob).  bash only.  See README.md here.
#
#   ctrd_start DIR [SNAPSHOTTER_SOCKET]   containerd with its config/root/state/socket under DIR; with a
#                                         socket, a proxy snapshotter named "ovbd" (or $CTRD_PROXY_NAME)
#   ctrd_start_cri DIR [SNAPSHOTTER_SOCKET]   the same with containerd's CRI plugin on (host-network pods,
#                                         loopback CNI, a local pause image pushed to $REGISTRY); its
#                                         snapshotter: $CTRD_CRI_SNAPSHOTTER (default "ovbd" with a socket,
#                                         else overlayfs). E2E_CRI=1 makes ctrd_start do this.
#   cri_run [RUN_OPTS] IMAGE CMD...       runs CMD in a one-container pod through CRI (ovbd-e2e-cri run):
#                                         prints its stdout, returns its exit code
#   cri_pull IMAGE, cri_client SUBCMD ARGS...   CRI PullImage / any ovbd-e2e-cri subcommand
#   ctrd_stop                             kill its tasks, stop it and its shims, unmount under DIR
#   registry_start DIR [HOST:PORT]        docker-registry with storage under DIR (default 127.0.0.1:5000)
#   registry_stop
#   registry_blob_bytes                   bytes sent for blob GETs so far (E2E_REGISTRY_ACCESSLOG=1)
#   push_hello_obd                        fixture tag amd64-converted -> $REGISTRY/hello-world:obd
#   push_hello_plain DIR                  fixture tag amd64 (plain OCI)  -> $REGISTRY/hello-world:plain
#   build_busybox_image DIR TAG           multi-layer busybox OCI layout in DIR -> $REGISTRY/busybox:TAG
#   tree_digest ROOT [EXCLUDE...]         stable listing of a tree (see tree-digest.sh)
#   ctr_tree_digest SNAPSHOTTER IMAGE [EXCLUDE...]   the same listing, taken inside a container
#   ctr_image_mount / ctr_view_mount      read-only views of an image (overlayfs) / a snapshot (any)
#   e2e_on_exit CMD...                    run CMD at exit (last registered runs first)
#   e2e_tmpdir VAR [PARENT]               VAR = a fresh dir, removed at exit
#
# Everything started here is stopped, and everything mounted under the given dirs unmounted, at exit:
# the library installs an EXIT trap that runs its own cleanup first and then whatever EXIT trap was set
# before it was sourced (so source it AFTER tests/e2e/guest/lib/common.bash). If you set an EXIT trap
# after sourcing this, call `e2e_cleanup` from it.

[[ -n ${_E2E_CTRD_ENV_LOADED:-} ]] && return 0
_E2E_CTRD_ENV_LOADED=1

E2E_CTRD_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
E2E_REPO=${OVBD_REPO:-$(cd "$E2E_CTRD_LIB/../../.." && pwd)}
E2E_HELLO_LAYOUT=$E2E_REPO/tests/fixtures/hello-world-oci
# python3 from the system, not a user's shim (the test guest sees the host's /, read-only)
E2E_PYTHON=${E2E_PYTHON:-$(command -v /usr/bin/python3 || command -v python3)}
E2E_BUSYBOX=${E2E_BUSYBOX:-/bin/busybox}
# `ctr run --mount "$E2E_BB_MOUNT" IMAGE ID /busybox APPLET ARGS...` gives images without a shell (the
# hello-world ones) a static busybox. Its name must stay "busybox": it picks the applet by argv[0].
E2E_BB_MOUNT="type=bind,src=$E2E_BUSYBOX,dst=/busybox,options=rbind:ro"
# Timeouts (seconds); raise them under TCG.
E2E_READY_TIMEOUT=${E2E_READY_TIMEOUT:-60}
E2E_CTR_TIMEOUT=${E2E_CTR_TIMEOUT:-300}
CTRD_PROXY_NAME=${CTRD_PROXY_NAME:-ovbd}
# The second name of the same socket in containerd's config (nerdctl on 1.x needs `overlaybd`); empty: none.
CTRD_PROXY_ALIAS=${CTRD_PROXY_ALIAS-overlaybd}
# CRI mode (ctrd_start_cri): the CRI client (tests/e2e/cri-client: cargo build -p ovbd-e2e-cri) and the
# CNI plugin binaries (Debian's containernetworking-plugins).
E2E_CRI_CLIENT=${E2E_CRI_CLIENT:-$E2E_REPO/target/debug/ovbd-e2e-cri}
E2E_CNI_BIN_DIR=${E2E_CNI_BIN_DIR:-/usr/lib/cni}

e2e_log() { echo "[e2e] $*" >&2; }
e2e_fail() {
    echo "FAIL: $*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------------- cleanup

_e2e_exit_cmds=()
e2e_on_exit() { _e2e_exit_cmds+=("$*"); }

# Runs (once) every registered exit command, newest first.
e2e_cleanup() {
    local i
    for ((i = ${#_e2e_exit_cmds[@]} - 1; i >= 0; i--)); do
        eval "${_e2e_exit_cmds[i]}" || true
    done
    _e2e_exit_cmds=()
}

# The EXIT trap set before this file was sourced (trap -p prints: trap -- 'CMD' EXIT).
# shellcheck disable=SC2120  # (its $3 is the output of trap -p, set with set --)
_e2e_prev_trap_cmd() {
    local t
    t=$(trap -p EXIT)
    [[ -n $t ]] || return 0
    eval "set -- $t"
    printf '%s' "$3"
}
_e2e_prev_exit_trap=$(_e2e_prev_trap_cmd)
_e2e_exit_trap() {
    local rc=$?
    set +e
    e2e_cleanup
    if [[ -n $_e2e_prev_exit_trap ]]; then
        (exit "$rc")
        eval "$_e2e_prev_exit_trap"
    fi
    exit "$rc"
}
trap _e2e_exit_trap EXIT

# e2e_umount_under DIR: unmounts everything mounted at or below DIR, deepest first (lazily if busy).
e2e_umount_under() {
    local dir m
    dir=$(realpath -m "$1")
    while read -r m; do
        [[ -n $m ]] || continue
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || e2e_log "could not unmount $m"
    done < <(findmnt -rn -o TARGET | awk -v d="$dir" '$0 == d || index($0, d "/") == 1' | sort -r)
}

# e2e_mounts_under DIR: prints the mount points at or below DIR (nothing if none).
e2e_mounts_under() {
    local dir
    dir=$(realpath -m "$1")
    findmnt -rn -o TARGET | awk -v d="$dir" '$0 == d || index($0, d "/") == 1'
}

# e2e_kill_wait PID [SECS]: SIGTERM, wait up to SECS (10), then SIGKILL.
e2e_kill_wait() {
    local pid=$1 secs=${2:-10} i
    kill -0 "$pid" 2>/dev/null || return 0
    kill "$pid" 2>/dev/null
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    e2e_log "pid $pid survived SIGKILL"
}

# e2e_wait SECS DESC CMD...: retries CMD every 0.2 s until it succeeds; fails (returns 1) after SECS.
e2e_wait() {
    local secs=$1 desc=$2 end
    shift 2
    end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= end)); then
            e2e_log "timed out after ${secs}s waiting for $desc"
            return 1
        fi
        sleep 0.2
    done
}

# e2e_tmpdir VAR [PARENT]: sets VAR to a fresh directory (under PARENT, default ${TMPDIR:-/tmp}), unmounted
# below and removed at exit (kept, with a note, when E2E_KEEP=1). Not `$(e2e_tmpdir)`: a command
# substitution is a subshell, and the exit hook would be registered there.
e2e_tmpdir() {
    local _d
    _d=$(mktemp -d "${2:-${TMPDIR:-/tmp}}/ovbd-e2e.XXXXXX") || e2e_fail "mktemp under ${2:-${TMPDIR:-/tmp}}"
    if [[ ${E2E_KEEP:-} == 1 ]]; then
        e2e_on_exit "e2e_umount_under '$_d'; e2e_log 'kept $_d'"
    else
        e2e_on_exit "e2e_umount_under '$_d'; rm -rf '$_d'"
    fi
    printf -v "$1" '%s' "$_d"
}

# ------------------------------------------------------------------------------------------- containerd

# ctrd_start DIR [SNAPSHOTTER_SOCKET]
# Writes DIR/config.toml (root DIR/root, state DIR/state, socket DIR/containerd.sock, runc + cgroupfs, CRI
# and unused snapshotters/runtimes disabled; with SNAPSHOTTER_SOCKET a proxy snapshotter
# [proxy_plugins.$CTRD_PROXY_NAME]), starts containerd (log DIR/containerd.log), waits until it answers.
# Exports CTRD_DIR CTRD_ADDR CTRD_PID CTRD_NS CTR (= "ctr --address ... --namespace ..."), and
# CONTAINERD_ADDRESS / CONTAINERD_NAMESPACE so a bare `ctr` talks to it too.
# containerd 1.6 keeps shim sockets, runc state and FIFOs under /run/containerd whatever its config says;
# shim sockets are keyed by the containerd address and runc state by namespace, so the namespace is made
# unique per run ($CTRD_NS, default e2e-<pid>) and concurrent runs on one host do not collide.
ctrd_start() {
    if [[ ${E2E_CRI:-} == 1 ]]; then
        ctrd_start_cri "$@"
        return
    fi
    _ctrd_start "" "$@"
}

# _ctrd_start CRI DIR [SNAPSHOTTER_SOCKET]: ctrd_start (CRI empty) or ctrd_start_cri (CRI = 1).
_ctrd_start() {
    local cri=$1 dir=$2 snap_sock=${3:-}
    [[ -n $dir ]] || e2e_fail "usage: ctrd_start${cri:+_cri} DIR [SNAPSHOTTER_SOCKET]"
    [[ -z ${CTRD_PID:-} ]] || e2e_fail "ctrd_start: a containerd is already running (pid $CTRD_PID)"
    local b
    for b in containerd ctr runc containerd-shim-runc-v2; do
        command -v "$b" >/dev/null || e2e_fail "$b not installed (scripts/setup.sh installs containerd and runc)"
    done
    mkdir -p "$dir" || e2e_fail "mkdir $dir"
    dir=$(realpath "$dir")
    CTRD_DIR=$dir
    CTRD_ADDR=$dir/containerd.sock
    ((${#CTRD_ADDR} < 100)) || e2e_fail "ctrd_start: socket path too long for a unix socket: $CTRD_ADDR"
    CTRD_NS=${CTRD_NS:-e2e-$$}
    mkdir -p "$dir/root" "$dir/state" "$dir/opt"
    # containerd 2.x reads config version 3 (its CRI plugin split in cri.v1.images / cri.v1.runtime);
    # ovbd's sections come from the deploy snippet for that version, so the e2e tests what users copy.
    CTRD_MAJOR=$(containerd --version | awk '{ v = $3; sub(/^v/, "", v); split(v, p, "."); print p[1] }')
    [[ $CTRD_MAJOR =~ ^[0-9]+$ ]] || e2e_fail "ctrd_start: cannot tell containerd's version from: $(containerd --version)"
    local cfgv=2 snippet=$E2E_REPO/deploy/containerd-ovbd.toml
    if ((CTRD_MAJOR >= 2)); then
        cfgv=3 snippet=$E2E_REPO/deploy/containerd-ovbd.v3.toml
    fi
    export CTRD_MAJOR
    local disabled_cri='
  "io.containerd.grpc.v1.cri",'
    CTRD_CRI=$cri
    export CTRD_CRI
    if [[ -n $cri ]]; then
        disabled_cri=
        _cri_prepare "$dir" "$snap_sock"
    fi
    {
        cat <<EOF
version = $cfgv
root = "$dir/root"
state = "$dir/state"
oom_score = 0
disabled_plugins = [$disabled_cri
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "$CTRD_ADDR"

[ttrpc]
  address = "$CTRD_ADDR.ttrpc"

[debug]
  level = "${CTRD_LOG_LEVEL:-info}"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$dir/opt"
  [plugins."io.containerd.runtime.v2.task"]
    platforms = ["linux/amd64"]
EOF
        [[ -z $cri ]] || _cri_config "$dir" "$cfgv" "$snap_sock"
        if [[ -n $snap_sock ]]; then
            echo
            _ctrd_snippet "$snippet" "$snap_sock" "${CTRD_CRI_SNAPSHOTTER:-$CTRD_PROXY_NAME}"
        fi
    } >"$dir/config.toml"
    if [[ -n $snap_sock ]] && ! grep -qF "address = \"$snap_sock\"" "$dir/config.toml"; then
        e2e_fail "ctrd_start: $snippet no longer has ovbd's default socket /run/ovbd/ovbd.sock to replace"
    fi

    containerd --config "$dir/config.toml" >>"$dir/containerd.log" 2>&1 &
    CTRD_PID=$!
    e2e_on_exit ctrd_stop
    CTR="ctr --address $CTRD_ADDR --namespace $CTRD_NS"
    export CTRD_DIR CTRD_ADDR CTRD_PID CTRD_NS CTR
    export CONTAINERD_ADDRESS=$CTRD_ADDR CONTAINERD_NAMESPACE=$CTRD_NS
    if ! e2e_wait "$E2E_READY_TIMEOUT" "containerd at $CTRD_ADDR" _ctrd_ready; then
        tail -n 30 "$dir/containerd.log" >&2
        e2e_fail "containerd did not start (log: $dir/containerd.log)"
    fi
    if [[ -n $cri ]] && ! e2e_wait "$E2E_READY_TIMEOUT" "the CRI plugin at $CTRD_ADDR" _cri_ready; then
        ctrd_log_tail 30
        cri_client images >&2 || true
        e2e_fail "containerd's CRI plugin did not come up (log: $dir/containerd.log)"
    fi
    e2e_log "containerd pid $CTRD_PID at $CTRD_ADDR, namespace $CTRD_NS${snap_sock:+, proxy snapshotter $CTRD_PROXY_NAME -> $snap_sock}${cri:+, CRI (snapshotter $CTRD_CRI_SNAPSHOTTER, sandbox image $CTRD_SANDBOX_IMAGE)}"
}

# ------------------------------------------------------------------------------------------- CRI mode

# ctrd_start_cri DIR [SNAPSHOTTER_SOCKET]: ctrd_start with containerd's CRI plugin enabled (same private
# root, state and socket; CRI is served on the containerd socket: $CRI_ENDPOINT = $CTRD_ADDR), set up so
# that a pod runs with nothing from the internet:
#   * [plugins."io.containerd.grpc.v1.cri".containerd] snapshotter = $CTRD_CRI_SNAPSHOTTER (default: the
#     proxy plugin's name $CTRD_PROXY_NAME when a socket is given, else "overlayfs") and
#     disable_snapshot_annotations = false (the CRI labels containerd.io/snapshot/cri.* reach the
#     snapshotter's Prepare: what a remote snapshotter needs to pull lazily);
#   * restrict_oom_score_adj = true (root here has no CAP_SYS_RESOURCE), runc v2 with cgroupfs, no
#     SELinux/AppArmor, the streaming server on 127.0.0.1 with a kernel-chosen port (concurrent runs);
#   * CNI: a loopback-only conflist in DIR/cni/net.d, plugins from $E2E_CNI_BIN_DIR (/usr/lib/cni). Pods
#     are meant to use the host network (ovbd-e2e-cri run does): CNI is not called for them;
#   * registry hosts in DIR/certs.d (config_path, read at each pull): $REGISTRY over plain http
#     (cri_registry_http HOST:PORT adds another);
#   * sandbox_image = $CTRD_SANDBOX_IMAGE, default $REGISTRY/e2e-pause:v1, built here (mkimage.py pause:
#     a static busybox that sleeps forever) and pushed: call registry_start first. The CRI plugin pulls
#     it, through its snapshotter, at the first RunPodSandbox.
# Waits until the CRI services answer (ovbd-e2e-cri images), so $E2E_CRI_CLIENT must be built
# (cargo build -p ovbd-e2e-cri). Exports what ctrd_start does, plus CRI_ENDPOINT CTRD_CRI_SNAPSHOTTER
# CTRD_SANDBOX_IMAGE and CTR_CRI (= $CTR in the CRI plugin's containerd namespace, k8s.io).
ctrd_start_cri() {
    _ctrd_start 1 "$@"
}

# _cri_prepare DIR SNAPSHOTTER_SOCKET: checks; the CNI conf dir, the registry hosts dir, the pause image.
_cri_prepare() {
    local dir=$1 snap_sock=$2
    [[ -x $E2E_CRI_CLIENT ]] ||
        e2e_fail "ctrd_start_cri: $E2E_CRI_CLIENT not built (cargo build -p ovbd-e2e-cri), or set E2E_CRI_CLIENT"
    [[ -x $E2E_CNI_BIN_DIR/loopback ]] ||
        e2e_fail "ctrd_start_cri: no $E2E_CNI_BIN_DIR/loopback (apt-get install containernetworking-plugins)"
    if [[ -z ${CTRD_CRI_SNAPSHOTTER:-} ]]; then
        CTRD_CRI_SNAPSHOTTER=overlayfs
        [[ -z $snap_sock ]] || CTRD_CRI_SNAPSHOTTER=$CTRD_PROXY_NAME
    fi
    mkdir -p "$dir/cni/net.d" "$dir/certs.d"
    cat >"$dir/cni/net.d/10-ovbd-e2e-loopback.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "ovbd-e2e-loopback",
  "plugins": [{ "type": "loopback" }]
}
EOF
    [[ -z ${REGISTRY:-} ]] || cri_registry_http "$REGISTRY" "$dir"
    if [[ -z ${CTRD_SANDBOX_IMAGE:-} ]]; then
        [[ -n ${REGISTRY:-} ]] ||
            e2e_fail "ctrd_start_cri: no registry for the pause image (registry_start first, or set CTRD_SANDBOX_IMAGE)"
        "$E2E_PYTHON" "$E2E_CTRD_LIB/mkimage.py" pause "$dir/pause-oci" v1 --busybox "$E2E_BUSYBOX" >/dev/null ||
            e2e_fail "mkimage.py pause"
        push_oci_layout "$dir/pause-oci" v1 e2e-pause:v1
        CTRD_SANDBOX_IMAGE=$REGISTRY/e2e-pause:v1
    fi
    CRI_ENDPOINT=$dir/containerd.sock
    CTR_CRI="ctr --address $CRI_ENDPOINT --namespace k8s.io"
    export CTRD_CRI_SNAPSHOTTER CTRD_SANDBOX_IMAGE CRI_ENDPOINT CTR_CRI
}

# _ctrd_snippet FILE SOCKET CRI_SNAPSHOTTER: the deploy snippet FILE as part of our config (to stdout):
# without its version line, its socket replaced by SOCKET, the proxy plugin named $CTRD_PROXY_NAME (and
# the same socket again as $CTRD_PROXY_ALIAS), the CRI snapshotter CRI_SNAPSHOTTER.
_ctrd_snippet() {
    awk -v sock="$2" -v name="$CTRD_PROXY_NAME" -v alias="$CTRD_PROXY_ALIAS" -v crisnap="$3" '
        # The proxy plugin section, kept to be printed again under the second name (README: nerdctl).
        function flush() { if (blk != "" && alias != "" && alias != name) { sub(/proxy_plugins\.[A-Za-z0-9_.-]*/, "proxy_plugins." alias, blk); print blk } blk = ""; inplug = 0 }
        /^[ \t]*\[/ { cri = ($0 ~ /cri/); if (inplug) flush() }
        /^version[ \t]*=/ { next }
        { gsub(/"\/run\/ovbd\/ovbd\.sock"/, "\"" sock "\"") }
        /^[ \t]*\[proxy_plugins\.ovbd\]/ { sub(/proxy_plugins\.ovbd/, "proxy_plugins." name); inplug = 1 }
        /^[ \t]*snapshotter[ \t]*=[ \t]*"ovbd"/ { sub(/"ovbd"/, "\"" (cri ? crisnap : name) "\"") }
        inplug && !/^[ \t]*(#|$)/ { blk = blk $0 "\n" }
        { print }
        END { if (inplug) flush() }' "$1"
}

# _cri_config DIR CONFIG_VERSION SNAPSHOTTER_SOCKET: the CRI plugin's part of DIR/config.toml (to stdout);
# its snapshotter table only without a socket (with one, the deploy snippet has it).
_cri_config() {
    if [[ $2 == 3 ]]; then
        _cri_config_v3 "$@"
        return
    fi
    cat <<EOF

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$CTRD_SANDBOX_IMAGE"
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
EOF
    [[ -n $3 ]] || cat <<EOF
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "$CTRD_CRI_SNAPSHOTTER"
    disable_snapshot_annotations = false
EOF
    cat <<EOF
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$E2E_CNI_BIN_DIR"
    conf_dir = "$1/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$1/certs.d"
EOF
}

# _cri_config_v3 DIR 3 SNAPSHOTTER_SOCKET: the same in containerd 2.x's plugin names.
_cri_config_v3() {
    cat <<EOF

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["$E2E_CNI_BIN_DIR"]
    conf_dir = "$1/cni/net.d"
    max_conf_num = 1
[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "$CTRD_SANDBOX_IMAGE"
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "$1/certs.d"
EOF
    [[ -n $3 ]] || cat <<EOF
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "$CTRD_CRI_SNAPSHOTTER"
  disable_snapshot_annotations = false
EOF
}

_cri_ready() {
    kill -0 "$CTRD_PID" 2>/dev/null || return 0 # died: stop waiting (the next step fails)
    "$E2E_CRI_CLIENT" images --endpoint "$CRI_ENDPOINT" --rpc-timeout 5
}

# cri_registry_http HOST:PORT [CTRD_DIR]: lets the CRI plugin pull from HOST:PORT over plain http (a
# hosts.toml under CTRD_DIR/certs.d, default $CTRD_DIR; read at each pull, so it works after ctrd_start_cri).
cri_registry_http() {
    local host=$1 dir=${2:-${CTRD_DIR:-}}
    [[ -n $host && -n $dir ]] || e2e_fail "usage: cri_registry_http HOST:PORT [CTRD_DIR]"
    mkdir -p "$dir/certs.d/$host"
    cat >"$dir/certs.d/$host/hosts.toml" <<EOF
server = "http://$host"

[host."http://$host"]
  capabilities = ["pull", "resolve"]
EOF
}

# cri_client SUBCMD ARGS...: `ovbd-e2e-cri SUBCMD --endpoint $CRI_ENDPOINT ARGS...` (pull, run, images,
# rmi) under a timeout ($E2E_CTR_TIMEOUT + 30 s).
cri_client() {
    [[ -n ${CRI_ENDPOINT:-} ]] || e2e_fail "cri_client: no CRI containerd (ctrd_start_cri first)"
    local sub=$1
    shift
    timeout -k 10 "$((E2E_CTR_TIMEOUT + 30))" "$E2E_CRI_CLIENT" "$sub" --endpoint "$CRI_ENDPOINT" "$@"
}

# cri_pull IMAGE: CRI PullImage (through $CTRD_CRI_SNAPSHOTTER, with the CRI snapshot labels).
cri_pull() {
    cri_client pull "$1"
}

# cri_run [RUN_OPTS...] IMAGE CMD...: `ovbd-e2e-cri run`: a pod (host network) with one container that
# runs CMD in IMAGE (pulled first if missing), waited for (up to $E2E_CTR_TIMEOUT s); prints the
# container's stdout (its stderr and the client's progress lines go to stderr) and returns its exit code
# (125: the run itself failed). The pod is stopped and removed afterwards. RUN_OPTS (before IMAGE) go to
# `ovbd-e2e-cri run`: --name N, --env K=V, --timeout S, --log-dir D, --raw-log.
# The CRI plugin bind-mounts the pod's own /etc/hostname, /etc/hosts and /etc/resolv.conf over the
# image's, and a host-network pod has the node's hostname: `cri_run IMAGE cat /etc/hostname` prints the
# host's hostname (`hostname`), not the image's file. Read another file to see the image's rootfs.
#   out=$(cri_run "$REGISTRY/lazy:obd" cat /etc/hostname)
cri_run() {
    local opts=()
    while [[ ${1:-} == --* ]]; do
        opts+=("$1")
        shift
        case ${opts[-1]} in
        --raw-log | --*=*) ;;
        *) # an option with a value
            opts+=("$1")
            shift
            ;;
        esac
    done
    [[ $# -ge 2 ]] || e2e_fail "usage: cri_run [RUN_OPTS...] IMAGE CMD..."
    local image=$1
    shift
    cri_client run --image "$image" --timeout "$E2E_CTR_TIMEOUT" "${opts[@]}" -- "$@"
}

_ctrd_ready() {
    kill -0 "$CTRD_PID" 2>/dev/null || return 0 # died: stop waiting (checked below)
    ctr --address "$CTRD_ADDR" version >/dev/null 2>&1
}

# The pids of processes whose command line has the argument ARG (exactly).
_pids_with_arg() {
    local p
    for p in /proc/[0-9]*; do
        [[ -r $p/cmdline ]] || continue
        if tr '\0' '\n' <"$p/cmdline" 2>/dev/null | grep -qxF -- "$1"; then
            echo "${p#/proc/}"
        fi
    done
}

# ctrd_stop: kills and deletes every task and container of every namespace, stops containerd and any shim
# it left (found by our socket address on their command line; the processes they run are killed first),
# unmounts what is mounted under CTRD_DIR. Leaves CTRD_DIR's files in place (log included).
ctrd_stop() {
    [[ -n ${CTRD_PID:-} ]] || return 0
    local ns id pid kids
    if kill -0 "$CTRD_PID" 2>/dev/null; then
        for ns in $(timeout 20 ctr --address "$CTRD_ADDR" namespaces ls -q 2>/dev/null); do
            for id in $(timeout 20 ctr --address "$CTRD_ADDR" -n "$ns" tasks ls -q 2>/dev/null); do
                timeout 30 ctr --address "$CTRD_ADDR" -n "$ns" tasks rm -f "$id" >/dev/null 2>&1 ||
                    e2e_log "could not delete task $ns/$id"
            done
            for id in $(timeout 20 ctr --address "$CTRD_ADDR" -n "$ns" containers ls -q 2>/dev/null); do
                timeout 30 ctr --address "$CTRD_ADDR" -n "$ns" containers rm "$id" >/dev/null 2>&1 ||
                    e2e_log "could not delete container $ns/$id"
            done
        done
    fi
    e2e_kill_wait "$CTRD_PID" 15
    # Shims outlive containerd; so do the containers they run.
    for pid in $(_pids_with_arg "$CTRD_ADDR"); do
        [[ $pid == "$$" ]] && continue
        kids=$(cat /proc/"$pid"/task/*/children 2>/dev/null)
        for id in $kids; do kill -9 "$id" 2>/dev/null; done
        e2e_log "killing leftover shim $pid"
        e2e_kill_wait "$pid" 5
    done
    e2e_umount_under "$CTRD_DIR"
    rmdir "/run/containerd/runc/$CTRD_NS" 2>/dev/null
    # The CRI plugin's namespace is the same for every run: removed only when empty (no other run in it).
    [[ -z ${CTRD_CRI:-} ]] || rmdir /run/containerd/runc/k8s.io 2>/dev/null
    unset CTRD_PID CONTAINERD_ADDRESS CONTAINERD_NAMESPACE CRI_ENDPOINT CTRD_CRI
    return 0
}

# ctrd_restart: stops containerd only (tasks keep running under their shims) and starts it again with the
# same config.
ctrd_restart() {
    [[ -n ${CTRD_PID:-} ]] || e2e_fail "ctrd_restart: containerd is not running"
    e2e_kill_wait "$CTRD_PID" 15
    containerd --config "$CTRD_DIR/config.toml" >>"$CTRD_DIR/containerd.log" 2>&1 &
    CTRD_PID=$!
    export CTRD_PID
    e2e_wait "$E2E_READY_TIMEOUT" "containerd restart" _ctrd_ready || e2e_fail "containerd did not restart"
    if [[ -n ${CTRD_CRI:-} ]]; then
        e2e_wait "$E2E_READY_TIMEOUT" "the CRI plugin after the restart" _cri_ready || e2e_fail "CRI did not come back"
    fi
}

# ctrd_log_tail [N]: the last N (40) lines of containerd's log, to stderr.
ctrd_log_tail() {
    [[ -n ${CTRD_DIR:-} && -f $CTRD_DIR/containerd.log ]] || return 0
    echo "--- tail of $CTRD_DIR/containerd.log" >&2
    tail -n "${1:-40}" "$CTRD_DIR/containerd.log" >&2
}

# ctr_do CMD...: runs `$CTR CMD...` with a timeout ($E2E_CTR_TIMEOUT); its output goes to stdout/stderr.
# A foreground `run` goes through ctr_run_logged (the container's output from a file, not ctr's FIFOs).
ctr_do() {
    if [[ ${1:-} == run && " $* " != *" -d "* && " $* " != *" --detach "* ]]; then
        shift
        ctr_run_logged "$@"
        return
    fi
    # shellcheck disable=SC2086
    timeout -k 10 "$E2E_CTR_TIMEOUT" $CTR "$@"
}

# ctr_run_logged ARGS...: `ctr run ARGS...` (ARGS as after `run`, in the foreground), the container's
# stdout and stderr going to a file the shim writes (--log-uri), printed once it ends. ctr's own copy
# through FIFOs can lose all the output of a container that exits at once: CI saw `ctr run ... /hello`
# exit 0 having printed nothing (and `ctr task exec` likewise, part e). ctr_do uses it for every
# foreground run.
ctr_run_logged() {
    local log rc=0
    log=$(mktemp "${TMPDIR:-/tmp}/ovbd-e2e-run.XXXXXX") || return 1
    # shellcheck disable=SC2086
    timeout -k 10 "$E2E_CTR_TIMEOUT" $CTR run --log-uri "file://$log" "$@" || rc=$?
    cat "$log"
    rm -f "$log"
    return "$rc"
}

# ctr_pull REF [SNAPSHOTTER]: `ctr image pull --plain-http` (progress output to a log, shown on failure).
ctr_pull() {
    local ref=$1 snap=${2:-} out rc=0
    out=$(ctr_do image pull --plain-http ${snap:+--snapshotter "$snap"} "$ref" 2>&1) || rc=$?
    if ((rc != 0)); then
        echo "$out" | tail -n 20 >&2
        e2e_log "ctr image pull ${snap:+--snapshotter $snap }$ref failed (exit $rc)"
        return "$rc"
    fi
}

# ctr_tree_digest SNAPSHOTTER IMAGE [EXCLUDE...]: runs tree-digest.sh with the image's own /bin/sh inside a
# throw-away container (ctr run --rm) and prints the listing of its root filesystem.
ctr_tree_digest() {
    local snap=$1 image=$2
    shift 2
    ctr_do run --rm --snapshotter "$snap" "$image" "e2e-digest-$$-$RANDOM" \
        /bin/sh -c "$(cat "$E2E_CTRD_LIB/tree-digest.sh")" tree-digest / "$@"
}

# ---------------------------------------------------------------------------------------------- registry

# registry_blob_bytes: bytes the registry has sent in answers to blob GETs so far (needs
# E2E_REGISTRY_ACCESSLOG=1 before registry_start: the access log, combined format, in registry.log).
registry_blob_bytes() {
    awk '$6 == "\"GET" && $7 ~ /^\/v2\/.*\/blobs\// && $10 ~ /^[0-9]+$/ { n += $10 } END { printf "%.0f\n", n }' \
        "$REGISTRY_DIR/registry.log"
}

# registry_start DIR [HOST:PORT]: docker-registry (distribution 2.8) with filesystem storage under DIR,
# listening on HOST:PORT (default $E2E_REGISTRY_ADDR or 127.0.0.1:5000; with no explicit address, a busy
# port 5000 on the host moves it to the next free port up to 5099). Exports REGISTRY (host:port) and
# REGISTRY_PID; waits until /v2/ answers.
registry_start() {
    local dir=$1 addr=${2:-${E2E_REGISTRY_ADDR:-}} port
    [[ -n $dir ]] || e2e_fail "usage: registry_start DIR [HOST:PORT]"
    [[ -z ${REGISTRY_PID:-} ]] || e2e_fail "registry_start: a registry is already running (pid $REGISTRY_PID)"
    command -v docker-registry >/dev/null || e2e_fail "docker-registry not installed (scripts/setup.sh)"
    if [[ -z $addr ]]; then
        for ((port = 5000; port < 5100; port++)); do
            _port_busy 127.0.0.1 "$port" || break
        done
        ((port < 5100)) || e2e_fail "registry_start: no free port in 127.0.0.1:5000-5099"
        addr=127.0.0.1:$port
    elif _port_busy "${addr%:*}" "${addr##*:}"; then
        e2e_fail "registry_start: $addr is already in use"
    fi
    mkdir -p "$dir/storage" || e2e_fail "mkdir $dir/storage"
    dir=$(realpath "$dir")
    local accesslog_off=true
    [[ -n ${E2E_REGISTRY_ACCESSLOG:-} ]] && accesslog_off=false
    cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: $accesslog_off
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: $addr
EOF
    echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$dir/policy.json" # for skopeo
    docker-registry serve "$dir/config.yml" >>"$dir/registry.log" 2>&1 &
    REGISTRY_PID=$!
    REGISTRY=$addr
    REGISTRY_DIR=$dir
    export REGISTRY REGISTRY_PID REGISTRY_DIR
    e2e_on_exit registry_stop
    if ! e2e_wait "$E2E_READY_TIMEOUT" "registry at $addr" _registry_ready; then
        tail -n 20 "$dir/registry.log" >&2
        e2e_fail "registry did not start (log: $dir/registry.log)"
    fi
    kill -0 "$REGISTRY_PID" 2>/dev/null || {
        tail -n 20 "$dir/registry.log" >&2
        e2e_fail "registry exited (log: $dir/registry.log)"
    }
    e2e_log "registry pid $REGISTRY_PID at $REGISTRY"
}

_port_busy() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

_registry_ready() {
    kill -0 "$REGISTRY_PID" 2>/dev/null || return 0
    curl -fsS -o /dev/null "http://$REGISTRY/v2/"
}

registry_stop() {
    [[ -n ${REGISTRY_PID:-} ]] || return 0
    e2e_kill_wait "$REGISTRY_PID" 10
    unset REGISTRY_PID
}

# ------------------------------------------------------------------------------------------------ images

# push_oci_layout LAYOUT TAG REPO:TAG: skopeo copy oci:LAYOUT:TAG docker://$REGISTRY/REPO:TAG (plain http).
push_oci_layout() {
    local layout=$1 tag=$2 dest=$3 out
    [[ -n ${REGISTRY:-} ]] || e2e_fail "push_oci_layout: no registry (registry_start first)"
    command -v skopeo >/dev/null || e2e_fail "skopeo not installed (scripts/setup.sh)"
    # A private policy (accept anything), so the host's /etc/containers/policy.json does not matter.
    out=$(timeout 300 skopeo --policy "$REGISTRY_DIR/policy.json" copy --quiet --preserve-digests --dest-tls-verify=false \
        "oci:$layout:$tag" "docker://$REGISTRY/$dest" 2>&1) ||
        e2e_fail "skopeo copy oci:$layout:$tag docker://$REGISTRY/$dest: $out"
    e2e_log "pushed $layout:$tag as $REGISTRY/$dest"
}

# push_hello_obd: the converted OverlayBD hello-world (fixture tag amd64-converted) as
# $REGISTRY/hello-world:obd; sets HELLO_OBD_REF.
push_hello_obd() {
    push_oci_layout "$E2E_HELLO_LAYOUT" amd64-converted hello-world:obd
    HELLO_OBD_REF=$REGISTRY/hello-world:obd
    export HELLO_OBD_REF
}

# push_hello_plain DIR: the plain hello-world (fixture tag amd64, Docker media types) rewritten to OCI
# media types in DIR/hello-plain and pushed as $REGISTRY/hello-world:plain; sets HELLO_PLAIN_REF.
push_hello_plain() {
    local dir=$1
    [[ -n $dir ]] || e2e_fail "usage: push_hello_plain DIR"
    "$E2E_PYTHON" "$E2E_CTRD_LIB/mkimage.py" from-docker "$E2E_HELLO_LAYOUT" amd64 "$dir/hello-plain" plain \
        >/dev/null || e2e_fail "mkimage.py from-docker"
    push_oci_layout "$dir/hello-plain" plain hello-world:plain
    HELLO_PLAIN_REF=$REGISTRY/hello-world:plain
    export HELLO_PLAIN_REF
}

# build_busybox_image DIR TAG: builds the multi-layer busybox image (mkimage.py busybox: 3 layers with
# applet symlinks, modes, owners, setuid/sticky, symlinks, a hardlink, whiteouts, an opaque dir) as the OCI
# layout DIR/busybox-oci, pushes it as $REGISTRY/busybox:TAG, sets BUSYBOX_REF and BUSYBOX_DIGEST (the
# manifest digest; deterministic for a given busybox binary).
build_busybox_image() {
    local dir=$1 tag=$2 digest
    [[ -n $dir && -n $tag ]] || e2e_fail "usage: build_busybox_image DIR TAG"
    [[ -x $E2E_BUSYBOX ]] || e2e_fail "$E2E_BUSYBOX missing (apt-get install busybox-static)"
    if command -v file >/dev/null; then
        file -L "$E2E_BUSYBOX" | grep -q 'statically linked' || e2e_fail "$E2E_BUSYBOX is not statically linked"
    fi
    mkdir -p "$dir" || e2e_fail "mkdir $dir"
    digest=$("$E2E_PYTHON" "$E2E_CTRD_LIB/mkimage.py" busybox "$dir/busybox-oci" "$tag" --busybox "$E2E_BUSYBOX") ||
        e2e_fail "mkimage.py busybox"
    push_oci_layout "$dir/busybox-oci" "$tag" "busybox:$tag"
    BUSYBOX_REF=$REGISTRY/busybox:$tag
    BUSYBOX_DIGEST=$digest
    export BUSYBOX_REF BUSYBOX_DIGEST
}

# ------------------------------------------------------------------------------------------------- trees

# tree_digest ROOT [EXCLUDE...]: the stable listing of ROOT (see tree-digest.sh: path, type, mode, uid:gid,
# size, link count, mtime, sha256 / symlink target / hardlink group; mount points not crossed).
tree_digest() {
    sh "$E2E_CTRD_LIB/tree-digest.sh" "$@"
}

# tree_diff NAME_A FILE_A NAME_B FILE_B: 0 if the listings are identical; else prints a unified diff.
tree_diff() {
    diff -u --label "$1" "$2" --label "$3" "$4" >&2
}

# ctr_image_mount SNAPSHOTTER IMAGE TARGET: `ctr image mount` (a read-only view of the unpacked image) at
# TARGET; unmounted (and the view removed) at exit, or earlier with ctr_image_unmount TARGET.
# ctr 1.6 reads the snapshotter of `image mount` from a global flag that does not exist, so it always uses
# overlayfs: for other snapshotters use ctr_view_mount.
ctr_image_mount() {
    local snap=$1 image=$2 target=$3
    [[ $snap == overlayfs ]] || {
        e2e_log "ctr_image_mount: ctr 1.6 would mount $image from overlayfs, not $snap; use ctr_view_mount"
        return 1
    }
    mkdir -p "$target"
    ctr_do image mount --snapshotter "$snap" "$image" "$target" >/dev/null || return 1
    e2e_on_exit "ctr_image_unmount '$target'"
}

ctr_image_unmount() {
    mountpoint -q "$1" 2>/dev/null || return 0
    ctr_do image unmount --rm "$1" >/dev/null 2>&1 || umount "$1" 2>/dev/null || umount -l "$1"
}

# ctr_gc_root_view SNAPSHOTTER KEY PARENT: `ctr snapshots view KEY PARENT`, labelled a GC root. A view
# made with ctr belongs to no image, container or lease, and ctr cannot label it as it makes it: a GC pass
# that an earlier deletion scheduled can collect it before the label lands (it did in CI, between view and
# mounts). The label then fails with "not found", and the view is made again.
ctr_gc_root_view() {
    local snap=$1 key=$2 parent=$3 try
    for try in 1 2 3; do
        ctr_do snapshots --snapshotter "$snap" view "$key" "$parent" >/dev/null || return 1
        ctr_do snapshots --snapshotter "$snap" label "$key" containerd.io/gc.root=e2e >/dev/null && return 0
        e2e_log "view $key was collected before it was labelled a GC root (attempt $try)"
    done
    return 1
}

# ctr_view_mount SNAPSHOTTER PARENT TARGET: a read-only view of the committed snapshot PARENT (an image's
# chain ID) through `ctr snapshots view` + `mounts`, mounted at TARGET; unmounted and removed at exit, or
# earlier with ctr_view_unmount SNAPSHOTTER TARGET.
ctr_view_mount() {
    local snap=$1 parent=$2 target=$3 key cmd
    key=e2e-view-$(basename "$target")-$$
    mkdir -p "$target"
    ctr_gc_root_view "$snap" "$key" "$parent" || return 1
    e2e_on_exit "ctr_view_unmount '$snap' '$target'"
    cmd=$(ctr_do snapshots --snapshotter "$snap" mounts "$target" "$key") || return 1
    [[ $cmd == mount\ * ]] || {
        e2e_log "ctr snapshots mounts printed: $cmd"
        return 1
    }
    eval "$cmd"
}

ctr_view_unmount() {
    local snap=$1 target=$2
    if mountpoint -q "$target" 2>/dev/null; then umount "$target" 2>/dev/null || umount -l "$target"; fi
    ctr_do snapshots --snapshotter "$snap" rm "e2e-view-$(basename "$target")-$$" >/dev/null 2>&1 || true
}

# layout_chain_id LAYOUT TAG: the chain ID of the image TAG in the OCI layout LAYOUT (the name containerd
# gives its top committed snapshot).
layout_chain_id() {
    "$E2E_PYTHON" - "$1" "$2" <<'EOF'
import hashlib, json, sys
root, tag = sys.argv[1], sys.argv[2]
def blob(d):
    return json.load(open(f"{root}/blobs/sha256/{d.split(':', 1)[1]}"))
idx = json.load(open(f"{root}/index.json"))
m = next(m for m in idx["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
chain = None
for d in blob(blob(m["digest"])["config"]["digest"])["rootfs"]["diff_ids"]:
    chain = d if chain is None else "sha256:" + hashlib.sha256(f"{chain} {d}".encode()).hexdigest()
print(chain)
EOF
}
