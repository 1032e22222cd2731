#!/usr/bin/env bash
# Installs what building and testing ovbd needs on a fresh Debian bookworm machine.
# Idempotent: only missing packages are installed. Run as root (or with sudo available).
set -euo pipefail

packages=(
    protobuf-compiler # protoc: containerd-snapshots' gRPC build
    libclang-dev      # libclang: libublk's bindgen
    clang
    e2fsprogs         # mkfs.ext4, e2fsck, debugfs: tests check the filesystems in images
    libext2fs-dev     # libext2fs: ovbd convert writes ext4 in user space through it
    qemu-system-x86   # the test guest (this kernel has no ublk)
    busybox-static    # the test guest's initramfs
    kmod cpio xz-utils
    fio               # device benchmarks (host and guest)
    jq                # guest test 10-device: finds the device test binary in cargo's JSON
    containerd runc   # tests/e2e/containerd: a private containerd 1.6 (ctr included)
    docker-registry   # tests/e2e/containerd: the local registry
    skopeo            # tests/e2e/containerd: pushes OCI layouts to it
    containernetworking-plugins # tests/e2e/containerd CRI mode (ctrd_start_cri): the loopback CNI plugin
    curl file python3 # tests/e2e/containerd: registry readiness, busybox check, image builder
    python3-tomlkit python3-venv # deploy/k8s: containerd-config.py; the manifest validator's venv
    # scripts/bench-coldstart.sh's peers: ctr-remote, and the Go sources + toolchain that
    # tests/e2e/bench/peers.sh builds containerd-stargz-grpc from (offline)
    stargz-snapshotter golang-github-containerd-stargz-snapshotter-dev golang-go
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
    sudo=()
    ((EUID == 0)) || sudo=(sudo)
    echo "setup: installing ${missing[*]}"
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# deploy/k8s's manifests are checked against the Kubernetes API schemas this package bundles (offline).
k8s_venv=/opt/ovbd-k8s-venv
[[ -x $k8s_venv/bin/kubernetes-validate ]] || {
    echo "setup: installing kubernetes-validate in $k8s_venv"
    sudo=()
    ((EUID == 0)) || sudo=(sudo)
    "${sudo[@]}" /usr/bin/python3 -m venv "$k8s_venv"
    "${sudo[@]}" "$k8s_venv/bin/pip" install -q kubernetes-validate==1.37.0
}

command -v cargo >/dev/null || {
    echo "setup: cargo not found; install a Rust toolchain (rustup) first" >&2
    exit 1
}
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt 2>/dev/null || true
echo "setup: ok"
