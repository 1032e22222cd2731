#!/usr/bin/env bash
# Lazy-pull benchmark: runs the lazy-pull part (l) of tests/e2e/containerd/host-ovbd.sh on the host (fuse
# frontend) with release binaries and a larger image, and prints its figures: wall time and blob bytes
# fetched (from the registry's access log) of `ovbd rpull` + `ctr run` reading one small file vs a full
# overlayfs pull + run of the OCI original, same run. Asserts nothing about the figures. As root.
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
export OVBD_LAZY_LARGE_MIB=${OVBD_LAZY_LARGE_MIB:-256} E2E_PARTS=l
out=$(mktemp)
trap 'rm -f "$out"' EXIT
tests/e2e/containerd/host-ovbd.sh | tee "$out"
echo
echo "==== lazy-pull benchmark (release binaries, $OVBD_LAZY_LARGE_MIB MiB file, fuse frontend on the host)"
grep -A2 '^==== lazy pull vs full pull' "$out" || {
    echo "bench-lazy.sh: the run printed no figures" >&2
    exit 1
}
