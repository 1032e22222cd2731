#!/usr/bin/env bash
# Runs every test: lint, the Rust unit/integration/property tests on the host, then the guest
# tests (ublk, which this kernel may lack) in the QEMU test VM. Exits non-zero if anything fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

step "setup"
scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "deploy/k8s: manifests against the Kubernetes API schemas (offline), containerd config merge"
/opt/ovbd-k8s-venv/bin/kubernetes-validate --strict --quiet deploy/k8s/ovbd.yaml
deploy/k8s/test-containerd-config.sh

step "cargo test (host)"
cargo test --workspace

step "containerd end to end on the host through the fuse frontend (OverlayBD + plain OCI, dir/dev modes, convert, lazy pull, CRI pod, kill -9 + restart, GC; no ublk needed)"
cargo build --workspace --bins
tests/e2e/containerd/host-ovbd.sh
tests/e2e/containerd/cri-selftest.sh

step "guest tests (QEMU, backports kernel with ublk): devices, recovery, containerd end to end"
tests/e2e/run-guest-tests.sh

echo
echo "all tests passed"
