#!/usr/bin/env bash
# The main job end to end on a built-in default: a local registry holding upstream's hello-world
# OverlayBD image, a private containerd with ovbd as its proxy snapshotter, and
#   ctr image pull --snapshotter ovbd ...  +  ctr run --snapshotter ovbd ... /hello
# Where this kernel has no ublk, the whole job runs inside the test guest (tests/e2e/vm/).
#
#   scripts/demo.sh            (as root)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

if [[ ${1:-} != --here ]]; then
    scripts/setup.sh
    cargo build --release -q
    if modprobe ublk_drv 2>/dev/null && [[ -c /dev/ublk-control ]]; then
        exec "$0" --here
    fi
    echo "demo: this kernel has no ublk; running the demo in the test guest (tests/e2e/vm)"
    exec tests/e2e/vm/guest-run.sh --timeout 900 --env OVBD_DEMO_BIN="$repo/target/release/ovbd" -- "$repo/scripts/demo.sh" --here
fi

# shellcheck source=../tests/e2e/containerd/env.bash
. tests/e2e/containerd/env.bash
# shellcheck source=../tests/e2e/containerd/ovbd.bash
. tests/e2e/containerd/ovbd.bash
modprobe ublk_drv
modprobe overlay 2>/dev/null || true
bin=${OVBD_DEMO_BIN:-$repo/target/release/ovbd}

work= && e2e_tmpdir work /var/tmp
step() { printf '\n== %s\n' "$*"; }

step "local registry with the sample image (upstream's hello-world, converted to OverlayBD)"
registry_start "$work/registry"
push_hello_obd
echo "pushed $HELLO_OBD_REF"

step "ovbd serve + a private containerd using it as [proxy_plugins.ovbd]"
OVBD_SERVE_LOG_LEVEL=info ovbd_serve_setup "$bin" "$work/ovbd-root" "$work/ovbd/ovbd.sock"
ovbd_serve_start
ctrd_start "$work/ctrd" "$OVBD_SOCK"

step "ctr image pull --snapshotter ovbd $HELLO_OBD_REF"
$CTR image pull --plain-http --snapshotter ovbd "$HELLO_OBD_REF" >/dev/null 2>&1
$CTR snapshots --snapshotter ovbd ls

step "ctr run --rm --snapshotter ovbd $HELLO_OBD_REF demo /hello"
$CTR run --rm --snapshotter ovbd "$HELLO_OBD_REF" demo /hello

step "while a container runs: its image is a ublk device, ext4 mounted read-only (overlayfs on top)"
$CTR run -d --snapshotter ovbd --mount "$E2E_BB_MOUNT" "$HELLO_OBD_REF" demo2 /busybox sleep 60 >/dev/null
sleep 1
grep -E "ublkb" /proc/self/mountinfo | awk '{print $5, $9, $10}' || true
$CTR task kill -s KILL demo2 >/dev/null 2>&1 || true
sleep 1
$CTR task rm -f demo2 >/dev/null 2>&1 || true
$CTR container rm demo2 >/dev/null

step "ctr image rm --sync: containerd's GC removes every snapshot, device and mount"
$CTR image rm --sync "$HELLO_OBD_REF" >/dev/null
echo "snapshots left: $($CTR snapshots --snapshotter ovbd ls | tail -n +2 | wc -l), ublk devices left: $(find /dev -maxdepth 1 -name 'ublkb*' | wc -l)"
