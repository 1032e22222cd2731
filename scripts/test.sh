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

step "cargo test (host)"
cargo test --workspace

step "containerd end to end on the host through the fuse frontend (OverlayBD + plain OCI, dir/dev modes, convert, lazy pull, faults, block cache, background download, CRI pod, kill -9 + restart, GC; containerd 1.6, 1.7 and 2.x; no ublk needed)"
cargo build --workspace --bins
tests/e2e/containerd/host-ovbd.sh
tests/e2e/containerd/host-versions.sh trixie sid
tests/e2e/containerd/cri-selftest.sh

step "guest tests (QEMU, backports kernel with ublk): devices, recovery, containerd end to end on ublk"
tests/e2e/run-guest-tests.sh

echo
echo "all tests passed"
