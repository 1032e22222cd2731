#!/usr/bin/env bash
# ovbd with other containerd versions ON THE HOST, natively through the fuse frontend: for each Debian
# SUITE (trixie: containerd 1.7, sid: 2.x; default: both, one after the other), fetch-containerd.sh fetches
# its containerd (extracted into target/vm/containerd/SUITE, not installed), which runs privately (own root,
# state, socket, CRI on) with the deploy snippet of its config version, and the parts of versions.bash run:
# a n b m e c r d, plus p t on 2.x. runc, the CNI loopback plugin and the registry are the host's.
#
#   cargo build --workspace --bins && tests/e2e/containerd/host-versions.sh [SUITE...]     (as root)
#
# Knobs: OVBD_BIN (target/debug/ovbd), E2E_CRI_CLIENT (target/debug/ovbd-e2e-cri), E2E_KEEP=1 keeps the
# work dir (logs of ovbd serve, containerd, registry). Everything started is stopped, and every mount and
# loop device of the run removed, at exit, whatever failed. Exit 0 = every part of every suite passed.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
((EUID == 0)) || {
    echo "FAIL: run as root (containerd, mounts)" >&2
    exit 1
}

# Several suites: one run (process) each, so each has its own containerd, registry, ovbd and exit hooks.
if (($# != 1)); then
    suites=("$@") rc=0
    ((${#suites[@]})) || suites=(trixie sid)
    for suite in "${suites[@]}"; do
        "${BASH_SOURCE[0]}" "$suite" || rc=1
    done
    exit "$rc"
fi
suite=$1
bindir=$("$here/fetch-containerd.sh" "$suite") || {
    echo "FAIL: fetch-containerd.sh $suite" >&2
    exit 1
}
# Its containerd, ctr and shim first; runc stays the host's.
PATH=$bindir:$PATH
# shellcheck source=env.bash
. "$here/env.bash"
# shellcheck source=ovbd.bash
. "$here/ovbd.bash"
# shellcheck source=versions.bash
. "$here/versions.bash"
# Interrupted: exit through the EXIT trap, which stops and removes everything of the run.
trap 'exit 130' INT
trap 'exit 143' TERM

bin=${OVBD_BIN:-$E2E_REPO/target/debug/ovbd}
[[ -x $bin ]] || e2e_fail "$bin not built: cargo build --workspace --bins (or set OVBD_BIN)"
[[ -x $E2E_CRI_CLIENT ]] || e2e_fail "$E2E_CRI_CLIENT not built: cargo build -p ovbd-e2e-cri (or set E2E_CRI_CLIENT)"
WORK= && e2e_tmpdir WORK
mkdir -p "$WORK/bin"
# Private copies: a cargo build during the run would otherwise swap the binaries under us.
cp "$bin" "$WORK/bin/ovbd" && cp "$E2E_CRI_CLIENT" "$WORK/bin/ovbd-e2e-cri" || e2e_fail "copying the binaries"
OVBD=$WORK/bin/ovbd E2E_CRI_CLIENT=$WORK/bin/ovbd-e2e-cri
OVBD_SERVE_EXTRA_CONFIG=$'[device]\nfrontend = "fuse"'
echo "==== containerd of $suite on the host (fuse frontend)"
ctrd_versions_main "$suite"
