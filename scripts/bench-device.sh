#!/usr/bin/env bash
# Device benchmark: builds the release binary, then runs tests/e2e/bench/device-bench.sh in the QEMU test
# guest (tests/e2e/vm/guest-run.sh): fio 4k randread and 1M sequential read on the ublk device (uncompressed
# and ZFile layers) and on a loop device over the same image exported raw, with the ublk/loop ratios.
# Prints figures, asserts none.  Absolute numbers under TCG mean little; compare the ratios.
#
# Usage: scripts/bench-device.sh
# Environment: OVBD_BENCH_RUNTIME (seconds per fio run, default 20), OVBD_BENCH_MIB (image data, default
# 1024), OVBD_BENCH_MEM (guest MiB, default 6144), OVBD_VM_CPUS (default 2).
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
exec tests/e2e/vm/guest-run.sh -v --timeout "${OVBD_VM_TIMEOUT:-1800}" --mem "${OVBD_BENCH_MEM:-6144}" \
    --env OVBD_REPO="$repo" --env OVBD_BIN="$repo/target/release/ovbd" \
    --env OVBD_BENCH_RUNTIME="${OVBD_BENCH_RUNTIME:-20}" --env OVBD_BENCH_MIB="${OVBD_BENCH_MIB:-1024}" \
    -- bash tests/e2e/bench/device-bench.sh
