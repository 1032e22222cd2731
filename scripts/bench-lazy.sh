#!/usr/bin/env bash
# Lazy-pull benchmark: runs the lazy-pull guest test (tests/e2e/guest/85-lazy-pull.sh) with release
# binaries and a larger image in the QEMU test guest, and prints its figures: wall time and blob bytes
# fetched (from the registry's access log) of `ovbd rpull` + `ctr run` reading one small file vs a full
# overlayfs pull + run of the OCI original, same guest run. Asserts nothing about the figures.
#
# Usage: scripts/bench-lazy.sh
# Environment: OVBD_LAZY_LARGE_MIB (size of the image's big incompressible file, default 256).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

case ${1:-} in
    -h | --help)
        sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
        exit 0
        ;;
esac

cargo build --release --bin ovbd
cargo build --release -p ovbd-e2e-cri
export OVBD_BIN=$repo/target/release/ovbd E2E_CRI_CLIENT=$repo/target/release/ovbd-e2e-cri
export OVBD_LAZY_LARGE_MIB=${OVBD_LAZY_LARGE_MIB:-256} OVBD_GUEST_TEST_TIMEOUT=${OVBD_GUEST_TEST_TIMEOUT:-1800}
export OVBD_VM_PASS_ENV="${OVBD_VM_PASS_ENV:-} E2E_CRI_CLIENT"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
tests/e2e/run-guest-tests.sh 85-lazy-pull | tee "$out"
echo
echo "==== lazy-pull benchmark (release binaries, $OVBD_LAZY_LARGE_MIB MiB file)"
grep -A2 '^==== lazy pull vs full pull' "$out" || {
    echo "bench-lazy.sh: the guest run printed no figures" >&2
    exit 1
}
