#!/usr/bin/env bash
# `ovbd serve` as containerd's proxy snapshotter ON THE HOST (no ublk here): the plain OCI parts of the
# end-to-end test (tests/e2e/guest/80-containerd-ovbd.sh runs all of them in the test guest):
#   b. busybox (plain OCI, 3 layers) pulls and runs through ovbd's overlayfs fallback, and the tree a
#      container sees is identical to the one under containerd's own overlayfs snapshotter;
#   d. ctr image rm --sync (containerd's GC) leaves no ovbd snapshot, directory or mount behind.
#
#   tests/e2e/containerd/host-ovbd.sh          (as root; binary: $OVBD_BIN or target/debug/ovbd)
#
# Exit 0 = every part passed. E2E_KEEP=1 keeps the work dir (logs of ovbd serve, containerd, registry).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=env.bash
. "$here/env.bash"
# shellcheck source=ovbd.bash
. "$here/ovbd.bash"
((EUID == 0)) || e2e_fail "run as root (containerd, mounts)"

bin=${OVBD_BIN:-$E2E_REPO/target/debug/ovbd}
work= && e2e_tmpdir work
mkdir -p "$work/bin"
# A private copy: a cargo build during the run would otherwise swap the binary under us.
[[ -x $bin ]] && cp "$bin" "$work/bin/ovbd"
export E2E_PARTS_DIR=$work/parts
ovbd_serve_setup "$work/bin/ovbd" "$work/ovbd-root" "$work/ovbd/ovbd.sock"
registry_start "$work/registry"
ctrd_start "$work/ctrd" "$OVBD_SOCK"
build_busybox_image "$work" v1
[[ -z $OVBD_SERVE_MISSING ]] && { ovbd_serve_start || OVBD_SERVE_MISSING="ovbd serve did not start (log above)"; }

run_part b "plain OCI busybox through ovbd = containerd's overlayfs" part_b
run_part d "image rm + GC leave nothing behind" part_d
parts_summary
