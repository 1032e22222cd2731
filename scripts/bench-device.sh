#!/usr/bin/env bash
# Device benchmark: builds the release binary, then runs tests/e2e/bench/device-bench.sh: fio 4k randread
# and 1M sequential read (iodepth 16, direct) on ovbd's devices (uncompressed and ZFile layers over a
# 1 GiB image) and on a loop device over the same image exported raw, in interleaved rounds; prints the
# medians and the ratios to loop.  Prints figures, asserts none.
#
# Usage: scripts/bench-device.sh [--host | --guest]
#   --host    (default) on this machine: the fuse frontend (FUSE + loop) vs loop
#   --guest   in the QEMU test guest (tests/e2e/vm/guest-run.sh): ublk and fuse vs loop, and fuse vs ublk.
#             Absolute numbers under TCG mean little; compare the ratios.
# Environment: OVBD_BENCH_RUNS (interleaved rounds, default 3), OVBD_BENCH_RUNTIME (seconds per fio run,
# default 10 on the host, 20 in the guest), OVBD_BENCH_MIB (image data, default 1024), OVBD_BENCH_FRONTENDS,
# OVBD_BENCH_FS, OVBD_BENCH_PERF (see device-bench.sh), OVBD_LOOP_DIRECT_IO=0|1 (the fuse frontend's loop
# device); --guest: OVBD_BENCH_MEM (guest MiB, default 6144), OVBD_VM_CPUS (default 2).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

mode=host
case ${1:-} in
    -h | --help)
        sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
        exit 0
        ;;
    --host | "") ;;
    --guest) mode=guest ;;
    *)
        echo "bench-device: unknown argument $1 (see --help)" >&2
        exit 2
        ;;
esac

cargo build --release --bin ovbd
if [[ $mode == host ]]; then
    exec env OVBD_BIN="$repo/target/release/ovbd" bash tests/e2e/bench/device-bench.sh
fi
# (guest-run.sh passes every OVBD_* variable through.)
exec tests/e2e/vm/guest-run.sh -v --timeout "${OVBD_VM_TIMEOUT:-3600}" --mem "${OVBD_BENCH_MEM:-6144}" \
    --env OVBD_REPO="$repo" --env OVBD_BIN="$repo/target/release/ovbd" \
    --env OVBD_BENCH_RUNTIME="${OVBD_BENCH_RUNTIME:-20}" -- bash tests/e2e/bench/device-bench.sh
