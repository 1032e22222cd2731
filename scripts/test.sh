#!/usr/bin/env bash
# Runs every test: lint, the Rust unit/integration/property tests on the host, the containerd end to
# end on the host (fuse frontend), that the fuzz targets build, and the guest tests (ublk, which this
# kernel may lack) in the QEMU test VM. Exits non-zero if anything fails.
#
# The guest is one single-threaded emulator: it runs in the background, from as soon as the binaries
# it needs are built (the daemon's; its host-side preparation builds the device tests), while the
# host steps use the other core; its log is printed when it ends.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

t0=$SECONDS
step() { printf '\n==> [%d s] %s\n' "$((SECONDS - t0))" "$*"; }

step "setup"
scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "build (binaries)"
cargo build --workspace --bins

step "guest tests (QEMU, backports kernel with ublk): started in the background"
guest_log=$(mktemp)
guest_pid=
# Its own process group (setsid): on failure the emulator goes with the script.
stop_guest() {
    [[ -n $guest_pid ]] && kill -- "-$guest_pid" 2>/dev/null
    rm -f "$guest_log"
}
trap stop_guest EXIT
setsid tests/e2e/run-guest-tests.sh >"$guest_log" 2>&1 &
guest_pid=$!
# Its host-side preparation runs cargo too: let it finish before cargo is busy with clippy.
until grep -q "test(s) in one guest" "$guest_log" || ! kill -0 "$guest_pid" 2>/dev/null; do
    sleep 1
done

step "build (test binaries)"
cargo test --workspace --no-run

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "deploy/k8s: manifests against the Kubernetes API schemas (offline), containerd config merge"
/opt/ovbd-k8s-venv/bin/kubernetes-validate --strict --quiet deploy/k8s/ovbd.yaml
deploy/k8s/test-containerd-config.sh

step "cargo test (host)"
cargo test --workspace

step "containerd end to end on the host through the fuse frontend (OverlayBD + plain OCI, dir/dev modes, convert, lazy pull, faults, block cache, background download, CRI pod, kill -9 + restart, GC; containerd 1.6, 1.7 and 2.x; no ublk needed)"
tests/e2e/containerd/host-ovbd.sh
tests/e2e/containerd/host-versions.sh trixie sid
tests/e2e/containerd/cri-selftest.sh

# While the guest finishes (it ends last): the fuzz targets must keep building against the parsers.
step "fuzz targets build (cargo check in fuzz/)"
(cd fuzz && cargo check --locked)

step "guest tests (QEMU, backports kernel with ublk): devices, recovery, containerd end to end on ublk"
guest_rc=0
wait "$guest_pid" || guest_rc=$?
guest_pid=
cat "$guest_log"
((guest_rc == 0)) || {
    echo "guest tests failed (exit $guest_rc)" >&2
    exit 1
}
step "done"

echo
echo "all tests passed"
