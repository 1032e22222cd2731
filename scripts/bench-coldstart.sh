#!/usr/bin/env bash
# Cold-start benchmark: cold pull + first run through containerd of overlayfs (full pull), stargz (eStargz,
# containerd-stargz-grpc built offline from Debian's Go sources + Debian's ctr-remote), soci (Debian's
# soci-snapshotter) and ovbd (OverlayBD, with and without a trace), interleaved run by run on this host
# (ovbd's fuse frontend where there is no ublk). Prints medians (min-max) of seconds and registry bytes per
# workload and the ratios ovbd/peer against the goals; asserts nothing. As root, after scripts/setup.sh
# (which installs the peers' Debian packages; the first run builds them). Body: tests/e2e/bench/coldstart.sh.
#
# Usage: scripts/bench-coldstart.sh [-n RUNS] [-w "WORKLOADS"] [-s "SNAPSHOTTERS"]
#   -n RUNS          runs per workload and snapshotter (default 3; OVBD_BENCH_RUNS)
#   -w WORKLOADS     of: small python layers3 layers20 (default all; OVBD_BENCH_WORKLOADS)
#   -s SNAPSHOTTERS  of: overlayfs stargz soci ovbd ovbd-trace ovbd-cached (default all; OVBD_BENCH_SNAPSHOTTERS)
# Environment: OVBD_BENCH_SMALL_MIB (256), OVBD_BENCH_PYTHON_MIB (240), OVBD_BENCH_LAYERS_MIB (200) image
# sizes; OVBD_BENCH_IMAGE_CACHE (built images, default target/vm/coldstart-images);
# OVBD_BENCH_REGISTRY_STORAGE=tmpfs (the local registry's blobs in RAM, not on this host's disk, where
# their cold reads slow containerd's fsyncs as a remote registry's would not); E2E_KEEP=1 keeps logs.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

while (($#)); do
    case $1 in
        -h | --help)
            sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        -n) export OVBD_BENCH_RUNS=$2 && shift 2 ;;
        -w) export OVBD_BENCH_WORKLOADS=$2 && shift 2 ;;
        -s) export OVBD_BENCH_SNAPSHOTTERS=$2 && shift 2 ;;
        *)
            echo "bench-coldstart: unknown argument $1 (see --help)" >&2
            exit 2
            ;;
    esac
done

cargo build --release --bin ovbd
# The peers (containerd-stargz-grpc built offline, soci-snapshotter from sid, unpacked) are built here, not by
# setup.sh, so CI does not build them: cached under target/vm/peers, nothing done when they are there.
tests/e2e/bench/peers.sh >/dev/null
exec env OVBD_BIN="$repo/target/release/ovbd" bash tests/e2e/bench/coldstart.sh
