#!/usr/bin/env bash
# 86-containerd-1.7: ovbd with Debian trixie's containerd 1.7 and deploy/containerd-ovbd.toml: the lean
# run of tests/e2e/containerd/versions.bash (full pull, plain OCI, converted image, CRI, rpull, restart, GC).
# host-prepare: tests/e2e/containerd/fetch-containerd.sh trixie
set -uo pipefail
# shellcheck source=lib/common.bash
. "$OVBD_REPO/tests/e2e/guest/lib/common.bash"
# shellcheck source=../containerd/versions.bash
. "$OVBD_REPO/tests/e2e/containerd/versions.bash"
ctrd_versions_main trixie
