#!/usr/bin/env bash
# 87-containerd-2.x: ovbd with Debian sid's containerd 2.x and deploy/containerd-ovbd.v3.toml: the lean run
# of tests/e2e/containerd/versions.bash, plus a plain `ctr image pull --snapshotter ovbd` that is lazy.
# host-prepare: tests/e2e/containerd/fetch-containerd.sh sid
set -uo pipefail
# shellcheck source=lib/common.bash
. "$OVBD_REPO/tests/e2e/guest/lib/common.bash"
# shellcheck source=../containerd/versions.bash
. "$OVBD_REPO/tests/e2e/containerd/versions.bash"
ctrd_versions_main sid
