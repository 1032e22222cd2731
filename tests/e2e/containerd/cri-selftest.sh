#!/usr/bin/env bash
# Self-test of the harness's CRI mode (env.bash ctrd_start_cri + tests/e2e/cri-client) on the host: a
# private registry and a private containerd with its CRI plugin on, whose CRI snapshotter is containerd's
# builtin overlayfs here (no ublk on the host; the guest test uses ovbd), with
# disable_snapshot_annotations = false. Through CRI gRPC (ovbd-e2e-cri):
#   1. PullImage of the multi-layer busybox image (from the local registry over plain http);
#   2. a pod (host network, local pause image) runs `cat /etc/hostname`: the node's hostname comes out
#      (the CRI plugin mounts the pod's hostname file over the image's /etc/hostname);
#   3. a pod runs /usr/local/bin/hello.sh and reads files of the image's 2nd and 3rd layers (rootfs from
#      the snapshotter), and a container's exit code comes back as the client's;
#   4. the snapshots the CRI plugin made carry the CRI labels (containerd.io/snapshot/cri.*), and no pod or
#      container is left behind; RemoveImage.
#
#   cargo build -p ovbd-e2e-cri && tests/e2e/containerd/cri-selftest.sh     (as root)
#
# Knobs: E2E_CRI_CLIENT (default target/debug/ovbd-e2e-cri), CTRD_CRI_SNAPSHOTTER (overlayfs), E2E_KEEP=1
# keeps the work dir (containerd and registry logs). Exit 0 = pass.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=env.bash
. "$here/env.bash"

((EUID == 0)) || e2e_fail "run as root (containerd, mounts)"
[[ -x $E2E_CRI_CLIENT ]] || e2e_fail "$E2E_CRI_CLIENT not built: cargo build -p ovbd-e2e-cri (or set E2E_CRI_CLIENT)"
passed=0
ok() {
    echo "  pass: $*"
    passed=$((passed + 1))
}

work= && e2e_tmpdir work
# A private copy of the client: a cargo build during the run would otherwise swap it under us.
mkdir -p "$work/bin"
cp "$E2E_CRI_CLIENT" "$work/bin/ovbd-e2e-cri"
E2E_CRI_CLIENT=$work/bin/ovbd-e2e-cri
t0=$SECONDS
registry_start "$work/registry"
CTRD_CRI_SNAPSHOTTER=${CTRD_CRI_SNAPSHOTTER:-overlayfs}
ctrd_start_cri "$work/ctrd"
build_busybox_image "$work" v1
e2e_log "busybox:v1 is $BUSYBOX_DIGEST; setup took $((SECONDS - t0)) s"
snap=$CTRD_CRI_SNAPSHOTTER

# 1. PullImage
out=$(cri_pull "$BUSYBOX_REF") || e2e_fail "CRI PullImage $BUSYBOX_REF: $out"
echo "$out"
grep -q "image id sha256:" <<<"$out" || e2e_fail "pull printed: $out"
cri_client images >"$work/images.txt" || e2e_fail "CRI ListImages"
grep -qF "$BUSYBOX_REF" "$work/images.txt" || e2e_fail "ListImages lacks $BUSYBOX_REF: $(cat "$work/images.txt")"
ok "CRI PullImage $BUSYBOX_REF; ListImages shows it"

# 2. a pod: cat /etc/hostname. A host-network pod has the node's hostname, which the CRI plugin writes to
# the pod's hostname file and mounts over the image's /etc/hostname ("busybox-e2e").
out=$(cri_run --name cri-selftest "$BUSYBOX_REF" cat /etc/hostname) || e2e_fail "cri_run cat /etc/hostname: exit $? ($out)"
[[ $out == "$(cat /proc/sys/kernel/hostname)" ]] ||
    e2e_fail "cat /etc/hostname in the pod printed '$out', expected the host's hostname '$(cat /proc/sys/kernel/hostname)'"
ok "a pod (host network, sandbox image $CTRD_SANDBOX_IMAGE) ran 'cat /etc/hostname': $out (the node's)"

# 3. the rootfs is the image's (layers 2 and 3, through $snap), and exit codes come back
out=$(cri_run "$BUSYBOX_REF" /bin/sh -c 'hello.sh; cat /data/opaque/new.txt; ls /data/opaque; test ! -e /data/gone.txt && echo gone') ||
    e2e_fail "cri_run hello.sh: exit $? ($out)"
expected="hello from the busybox image
only file left in the opaque dir
new.txt
gone"
[[ $out == "$expected" ]] || e2e_fail "the pod printed:
$out
expected:
$expected"
ok "the container's rootfs is the image's (hello.sh, opaque dir, whiteout) through $snap"
rc=0
out=$(cri_run "$BUSYBOX_REF" /bin/sh -c 'echo to-stdout; echo to-stderr >&2; exit 7' 2>"$work/stderr.txt") || rc=$?
((rc == 7)) || e2e_fail "exit code: $rc, expected 7"
[[ $out == to-stdout ]] || e2e_fail "stdout: '$out'"
grep -qx to-stderr "$work/stderr.txt" || e2e_fail "stderr lacks the container's line: $(cat "$work/stderr.txt")"
ok "a container's exit code (7) is the client's; stdout and stderr kept apart"

# 4. CRI snapshot labels reached the snapshotter's records; nothing left behind; RemoveImage
keys=$($CTR_CRI snapshots --snapshotter "$snap" ls | awk 'NR > 1 { print $1 }')
[[ -n $keys ]] || e2e_fail "no $snap snapshots in namespace k8s.io"
labelled=0
for k in $keys; do
    if $CTR_CRI snapshots --snapshotter "$snap" info "$k" | grep -q '"containerd.io/snapshot/cri.layer-digest"'; then
        labelled=$((labelled + 1))
    fi
done
((labelled >= 4)) || e2e_fail "only $labelled snapshots carry containerd.io/snapshot/cri.layer-digest (keys: $keys)"
ok "$labelled committed $snap snapshots carry the CRI labels (disable_snapshot_annotations = false)"
left=$($CTR_CRI containers ls -q)
[[ -z $left ]] || e2e_fail "containers left in k8s.io: $left"
left=$($CTR_CRI tasks ls -q)
[[ -z $left ]] || e2e_fail "tasks left in k8s.io: $left"
cri_client rmi "$BUSYBOX_REF" >/dev/null || e2e_fail "CRI RemoveImage $BUSYBOX_REF"
! cri_client images | grep -qF "$BUSYBOX_REF" || e2e_fail "$BUSYBOX_REF still listed after RemoveImage"
ok "every pod and container removed; CRI RemoveImage $BUSYBOX_REF"

echo "cri-selftest: $passed passed, 0 failed ($((SECONDS - t0)) s)"
