#!/usr/bin/env bash
# `ovbd serve` as containerd's proxy snapshotter ON THE HOST, natively: no ublk here, so ovbd serves its
# block devices through its fuse frontend (loop devices over files on its FUSE mount <root>/fuse). The
# containerd end-to-end test of tests/e2e/guest/80-containerd-ovbd.sh (the same part bodies, from ovbd.bash)
# plus the lazy pulls (rpull, CRI, faults, cache, background download), with a private containerd (CRI
# plugin on) and local registry:
#   u. upstream's own converted hello-world (overlaybd's tools), pulled lazily with ovbd rpull, runs /hello;
#   a. the OverlayBD hello-world pulls through ovbd and /hello runs, 3 containers in a row;
#   n. the socket is also registered as "overlaybd": GC of that name keeps ovbd's snapshots;
#   b. busybox (plain OCI) runs through ovbd's overlayfs fallback, tree identical to containerd's overlayfs;
#   c. label overlaybd.writable=dir: a task writes a file, a second task on the same snapshot reads it;
#   f. a dir-mode container committed is an OverlayBD layer;  g. rootfs mode dev: the loop device is /;
#   h. ovbd convert of busybox, pushed, pulled through ovbd and run: same tree and xattrs as the original;
#   l. ovbd rpull + run: lazy (under a tenth of the layer bytes fetched), remote layers, a 64 MiB file read
#      on demand has the original's sha256;
#      and prints the lazy-pull figures (wall time and blob bytes of the full and the lazy pull + run);
#   k. a second container after ovbd serve restarts reads from the block cache (0 bytes fetched);
#   p. a CRI pod (CRI plugin, snapshotter ovbd) on a lazily pulled OverlayBD image reads a file of it;
#   s. registry frozen (SIGSTOP): an uncached read fails with EIO within the deadline while cached files
#      read and another device runs a container; once the registry is back the read works;
#   w. background download ([download] enable): every remote layer lands whole, with its blob's sha256;
#   o. a scrape of /metrics and `ovbd status` show device bytes read, Prepare calls, cache hits;
#   r. prefetch: an image converted with --priority-list (upstream's acceleration layer) pulled lazily; the
#      listed file is replayed into the block cache when the device attaches, then reads fetch nothing; the
#      same with a trace `ovbd record-trace` recorded of a command reading the file;
#   i. Kubernetes pull secrets: a token-auth front; without [cri_proxy] the lazy read fails (401), with it
#      (ovbd restarted as the kubelet's image service) a pod reads the private image's file;
#   d. (after the others: it removes everything) image rm --sync + GC leave no snapshot, directory, mount
#      or block device.
#   e. kill -9 of ovbd serve under a running container, restart: the container's rootfs keeps working
#      (the fuse frontend's holder process keeps the FUSE connection; the next daemon re-serves it).
#   z. (last) ovbd serve exits on SIGTERM leaving no FUSE mount and no loop device.
#
#   cargo build --workspace --bins && tests/e2e/containerd/host-ovbd.sh     (as root)
#
# Knobs: OVBD_BIN (target/debug/ovbd), E2E_CRI_CLIENT (target/debug/ovbd-e2e-cri), OVBD_LAZY_LARGE_MIB (64),
# E2E_PARTS="a n b ..." (a subset, in that order; d always runs, after them, z last; k s w rpull what they need), E2E_KEEP=1 keeps the work dir
# (logs of ovbd serve, containerd, registry). Everything started is stopped, and every mount and loop
# device of the run removed, at exit, whatever failed. Exit 0 = every part passed.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=env.bash
. "$here/env.bash"
# shellcheck source=ovbd.bash
. "$here/ovbd.bash"
((EUID == 0)) || e2e_fail "run as root (containerd, mounts)"
# Interrupted: exit through the EXIT trap, which stops and removes everything of the run.
trap 'exit 130' INT
trap 'exit 143' TERM
t0=$SECONDS

bin=${OVBD_BIN:-$E2E_REPO/target/debug/ovbd}
work= && e2e_tmpdir work
mkdir -p "$work/bin"
# Private copies: a cargo build during the run would otherwise swap the binaries under us.
[[ -x $bin ]] && cp "$bin" "$work/bin/ovbd"
[[ -x $E2E_CRI_CLIENT ]] || e2e_fail "$E2E_CRI_CLIENT not built: cargo build -p ovbd-e2e-cri (or set E2E_CRI_CLIENT)"
cp "$E2E_CRI_CLIENT" "$work/bin/ovbd-e2e-cri"
E2E_CRI_CLIENT=$work/bin/ovbd-e2e-cri
export E2E_PARTS_DIR=$work/parts
# No background download of lazily pulled layers (but in part w): it would add to the bytes parts l, k and p
# measure. A short registry deadline for part s (the default is 30 s).
OVBD_METRICS_ADDR=127.0.0.1:$((20000 + RANDOM % 20000))
OVBD_SERVE_EXTRA_CONFIG=$'[device]\nfrontend = "fuse"\n[download]\nenable = false\n[metrics]\naddress = "'$OVBD_METRICS_ADDR'"'
export OVBD_REGISTRY_DEADLINE=8
OVBD_SERVE_REGISTRY_CONFIG=$'timeout_secs = '$OVBD_REGISTRY_DEADLINE$'\nstall_timeout_secs = 2\nretries = 3'
ovbd_serve_setup "$work/bin/ovbd" "$work/ovbd-root" "$work/ovbd/ovbd.sock"
E2E_REGISTRY_ACCESSLOG=1 registry_start "$work/registry"
ctrd_start_cri "$work/ctrd" "$OVBD_SOCK"
push_hello_obd
build_busybox_image "$work" v1
lazy_images_setup "$work/lazy" "${OVBD_LAZY_LARGE_MIB:-64}"
[[ -z $OVBD_SERVE_MISSING ]] && { ovbd_serve_start || OVBD_SERVE_MISSING="ovbd serve did not start (log above)"; }
e2e_log "setup took $((SECONDS - t0)) s"

declare -A desc=(
    [u]="upstream's converted hello-world, lazily pulled with ovbd rpull: /hello"
    [a]="OverlayBD hello-world through ovbd: /hello"
    [n]="the socket under a second name: its GC keeps the first name's snapshots"
    [b]="plain OCI busybox through ovbd = containerd's overlayfs"
    [c]="rootfs mode dir by label: write, new task reads back"
    [f]="dir-mode container committed through ovbd is an OverlayBD layer"
    [g]="rootfs mode dev by label: the block device is the rootfs"
    [h]="ovbd convert busybox, push, pull + run through ovbd = original"
    [e]="kill -9 ovbd serve under a running container, restart"
    [l]="lazy pull: ovbd rpull + run fetches a small fraction, reads on demand"
    [k]="after a restart of ovbd serve, reads come from the block cache"
    [p]="CRI pod on a lazily pulled OverlayBD image"
    [s]="registry frozen: uncached read fails in time, cached ones and other devices work"
    [w]="background download: every remote layer whole, digest-checked"
    [o]="metrics scrape and ovbd status follow the work"
    [i]="pull secret via [cri_proxy] reaches lazy reads (token registry)"
    [r]="prefetch: a priority-list acceleration layer is replayed into the cache at attach"
    [d]="image rm + GC leave no snapshot, dir, mount or device"
    [z]="ovbd serve stops clean: no FUSE mount, no loop device"
)
# d removes everything: after the others; z stops ovbd: last.
parts=() last=()
# h after w: h pulls busybox:obd whole, whose lower layers are lazy:obd's (w checks they download).
# i before l: once lazy:obd is read its blocks are cached (by digest), and a pod reads them without the pull
# secret. (So l's figures here start with some blocks cached; scripts/bench-lazy.sh runs l alone.)
for part in ${E2E_PARTS:-u a n b c f g i l p k s o w r h e z}; do
    [[ -n ${desc[$part]:-} ]] || e2e_fail "no part '$part' (parts: ${!desc[*]})"
    case $part in d) ;; z) last=(z) ;; *) parts+=("$part") ;; esac
done
for part in "${parts[@]}" d "${last[@]}"; do
    run_part "$part" "${desc[$part]}" "part_$part"
done
e2e_log "host run (fuse frontend) took $((SECONDS - t0)) s"
parts_summary
