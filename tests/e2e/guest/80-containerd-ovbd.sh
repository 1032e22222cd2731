#!/usr/bin/env bash
# 80-containerd-ovbd: `ovbd serve` as containerd's proxy snapshotter, end to end, in the test guest:
# a private containerd 1.6 + local registry (tests/e2e/containerd/env.bash) with the OverlayBD hello-world
# and a multi-layer plain OCI busybox image, then (tests/e2e/containerd/ovbd.bash, in this order):
#   a. hello-world:obd pulls through ovbd and /hello prints "Hello from Docker!";
#   n. the socket is also registered as "overlaybd": GC of that name keeps ovbd's snapshots;
#   b. busybox (plain OCI) runs through ovbd's overlayfs fallback and the tree a container sees is
#      identical to containerd's own overlayfs snapshotter's (the reference half needs no ovbd);
#   c. label overlaybd.writable=dir: a task writes a file, a second task on the same snapshot reads it;
#   f. a dir-mode container committed is an OverlayBD layer; g. rootfs mode dev;
#   h. ovbd convert of the busybox image, pushed, pulled through ovbd and run: same tree and xattrs as the
#      original under containerd's overlayfs, same manifest when converted twice;
#   e. kill -9 of ovbd serve under a running container, restart: the rootfs still reads and writes, and
#      `ctr snapshots ls` matches the snapshot directories on disk;
#   d. (last: it removes everything) image rm --sync + GC leave no snapshot, directory, mount or ublk device.
# Each part prints pass/FAIL; the test fails if any part does (or if `ovbd serve` does not exist).
set -uo pipefail
# shellcheck source=lib/common.bash
. "$OVBD_REPO/tests/e2e/guest/lib/common.bash"
# shellcheck source=../containerd/env.bash
. "$OVBD_REPO/tests/e2e/containerd/env.bash"
# shellcheck source=../containerd/ovbd.bash
. "$OVBD_REPO/tests/e2e/containerd/ovbd.bash"

# TCG is slow: generous readiness and ctr timeouts.
E2E_READY_TIMEOUT=${E2E_READY_TIMEOUT:-120}
E2E_CTR_TIMEOUT=${E2E_CTR_TIMEOUT:-240}
export E2E_PARTS_DIR=$WORK/parts
t0=$SECONDS

# Storage that overlayfs can use as an upper layer: /tmp and /var/tmp are tmpfs in the guest (the root is
# an overlay). containerd lives in $WORK (/tmp); the ovbd root in its own dir under /var/tmp.
ovbd_root_parent= && e2e_tmpdir ovbd_root_parent /var/tmp
ovbd_serve_setup "$OVBD" "$ovbd_root_parent/root" "$WORK/ovbd/ovbd.sock"
registry_start "$WORK/registry"
ctrd_start "$WORK/ctrd" "$OVBD_SOCK"
push_hello_obd
build_busybox_image "$WORK" v1
note "busybox:v1 = $BUSYBOX_DIGEST"
if [[ -n $OVBD_SERVE_MISSING ]]; then
    echo "FAIL: $OVBD_SERVE_MISSING; every part that needs it fails" >&2
elif ! ovbd_serve_start; then
    OVBD_SERVE_MISSING="ovbd serve did not start (log above)"
fi
took "$t0" "setup"

run_part a "OverlayBD hello-world through ovbd: /hello" part_a
run_part n "the socket under a second name: its GC keeps the first name's snapshots" part_n
run_part b "plain OCI busybox through ovbd = containerd's overlayfs" part_b
run_part c "rootfs mode dir by label: write, new task reads back" part_c
run_part f "dir-mode container committed through ovbd is an OverlayBD layer" part_f
run_part g "rootfs mode dev by label: the block device is the rootfs" part_g
run_part h "ovbd convert busybox, push, pull + run through ovbd = original" part_h
run_part e "kill -9 ovbd serve under a running container, restart" part_e
run_part d "image rm + GC leave no snapshot, dir, mount or device" part_d
took "$t0" "total"
parts_summary
