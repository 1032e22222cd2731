#!/usr/bin/env bash
# The main job end to end on a built-in default: a local registry holding upstream's hello-world
# OverlayBD image, a private containerd with ovbd as its proxy snapshotter, and
#   ctr image pull --snapshotter ovbd ...  +  ctr run --snapshotter ovbd ... /hello
# It runs on this machine with the device frontend ovbd picks (`[device] frontend = "auto"`): ublk where
# the kernel has it, else FUSE + a loop device; the frontend used is printed.
#
#   scripts/demo.sh            (as root) natively, frontend auto
#   scripts/demo.sh --guest    inside the QEMU test guest (tests/e2e/vm/), which has ublk
# Environment: OVBD_DEMO_FRONTEND=auto|ublk|fuse (default auto), OVBD_DEMO_BIN (default
# target/release/ovbd).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

case ${1:-} in
    -h | --help)
        sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
        exit 0
        ;;
    --here) ;; # (internal: already set up and built; used inside the guest)
    --guest)
        scripts/setup.sh
        cargo build --release -q
        echo "demo: running in the test guest (tests/e2e/vm)"
        exec tests/e2e/vm/guest-run.sh --timeout 900 --env OVBD_DEMO_BIN="$repo/target/release/ovbd" \
            --env OVBD_DEMO_FRONTEND="${OVBD_DEMO_FRONTEND:-auto}" -- "$repo/scripts/demo.sh" --here
        ;;
    "")
        scripts/setup.sh
        cargo build --release -q
        ;;
    *)
        echo "demo: unknown argument $1 (see --help)" >&2
        exit 2
        ;;
esac

# shellcheck source=../tests/e2e/containerd/env.bash
. tests/e2e/containerd/env.bash
# shellcheck source=../tests/e2e/containerd/ovbd.bash
. tests/e2e/containerd/ovbd.bash
# ublk where the kernel can load it; without it "auto" takes FUSE + loop.
modprobe ublk_drv 2>/dev/null || true
modprobe overlay 2>/dev/null || true
bin=${OVBD_DEMO_BIN:-$repo/target/release/ovbd}
frontend=${OVBD_DEMO_FRONTEND:-auto}

work= && e2e_tmpdir work /var/tmp
step() { printf '\n== %s\n' "$*"; }
# Block devices ovbd serves now: ublk devices, and loop devices over a file under its root (fuse).
ovbd_block_devices() {
    find /dev -maxdepth 1 -name 'ublkb*'
    losetup -n -l -O NAME,BACK-FILE 2>/dev/null | awk -v r="$work/ovbd-root/" 'index($2, r) == 1 { print $1 }'
}

step "local registry with the sample image (upstream's hello-world, converted to OverlayBD)"
registry_start "$work/registry"
push_hello_obd
echo "pushed $HELLO_OBD_REF"

step "ovbd serve ([device] frontend = \"$frontend\") + a private containerd using it as [proxy_plugins.ovbd]"
OVBD_SERVE_EXTRA_CONFIG=$(printf '[device]\nfrontend = "%s"' "$frontend") \
    OVBD_SERVE_LOG_LEVEL=info ovbd_serve_setup "$bin" "$work/ovbd-root" "$work/ovbd/ovbd.sock"
ovbd_serve_start
ctrd_start "$work/ctrd" "$OVBD_SOCK"

step "ctr image pull --snapshotter ovbd $HELLO_OBD_REF"
$CTR image pull --plain-http --snapshotter ovbd "$HELLO_OBD_REF" >/dev/null 2>&1
$CTR snapshots --snapshotter ovbd ls
used=$(sed -n 's/.*device frontend: \([a-z]*\).*/\1/p' "$OVBD_SERVE_LOG" | tail -n 1)
case $used in
    ublk) echo "device frontend: ublk (the kernel's ublk driver; devices are /dev/ublkbN)" ;;
    fuse) echo "device frontend: fuse (the image is a file on ovbd's FUSE mount, on a loop device /dev/loopN)" ;;
    *) echo "device frontend: not found in $OVBD_SERVE_LOG" ;;
esac

step "ctr run --rm --snapshotter ovbd $HELLO_OBD_REF demo /hello"
$CTR run --rm --snapshotter ovbd "$HELLO_OBD_REF" demo /hello

step "while a container runs: its image is a ${used:-block} device, ext4 mounted read-only (overlayfs on top)"
$CTR run -d --snapshotter ovbd --mount "$E2E_BB_MOUNT" "$HELLO_OBD_REF" demo2 /busybox sleep 60 >/dev/null
sleep 1
devs=$(ovbd_block_devices | paste -sd'|')
[[ -n $devs ]] && grep -E " ($devs) " /proc/self/mountinfo | awk '{print $5, $9, $10}' || true
$CTR task kill -s KILL demo2 >/dev/null 2>&1 || true
sleep 1
$CTR task rm -f demo2 >/dev/null 2>&1 || true
$CTR container rm demo2 >/dev/null

step "ctr image rm --sync: containerd's GC removes every snapshot, device and mount"
$CTR image rm --sync "$HELLO_OBD_REF" >/dev/null
echo "snapshots left: $($CTR snapshots --snapshotter ovbd ls | tail -n +2 | wc -l), ovbd block devices left: $(ovbd_block_devices | wc -l)"
echo "demo: done (device frontend: ${used:-unknown})"
