#!/usr/bin/env bash
# Self-test of the containerd harness (env.bash) against containerd's builtin overlayfs snapshotter: needs
# no ovbd and no ublk, so it runs on the host (as root) as well as in the test guest.
#
#   tests/e2e/containerd/selftest.sh
#
# Starts a private registry and containerd, pushes hello-world (obd and plain) and the multi-layer busybox
# image, pulls them with `ctr image pull --plain-http`, runs /hello and busybox with
# `ctr run --rm --snapshotter overlayfs`, checks what the busybox container sees (whiteouts, opaque dir,
# modes, owners, links), checks the in-container tree listing against the host-side listing of the same
# image mounted with `ctr image mount`, and prints the listing and its sha256.
# Exit 0 = pass. Keep the work dir with E2E_KEEP=1 (containerd/registry logs are in it).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=env.bash
. "$here/env.bash"

((EUID == 0)) || e2e_fail "run as root (containerd, mounts)"
passed=0
ok() {
    echo "  pass: $*"
    passed=$((passed + 1))
}

work= && e2e_tmpdir work
t0=$SECONDS
registry_start "$work/registry"
ctrd_start "$work/ctrd"
push_hello_obd
push_hello_plain "$work"
build_busybox_image "$work" v1
bb_digest=$BUSYBOX_DIGEST
e2e_log "busybox:v1 is $bb_digest; setup took $((SECONDS - t0)) s"

# 1. plain hello-world: /hello
ctr_pull "$HELLO_PLAIN_REF" overlayfs || e2e_fail "pull $HELLO_PLAIN_REF"
out=$(ctr_do run --rm --snapshotter overlayfs "$HELLO_PLAIN_REF" "st-hello-$$" /hello) ||
    e2e_fail "ctr run $HELLO_PLAIN_REF /hello: $out"
grep -q "Hello from Docker!" <<<"$out" || e2e_fail "/hello printed: $out"
ok "hello-world:plain pulled and /hello printed \"Hello from Docker!\" (overlayfs)"

# 2. the OverlayBD hello-world unpacked by a plain snapshotter: just the layer blob in a file.
ctr_pull "$HELLO_OBD_REF" overlayfs || e2e_fail "pull $HELLO_OBD_REF"
out=$(ctr_do run --rm --snapshotter overlayfs \
    --mount "$E2E_BB_MOUNT" "$HELLO_OBD_REF" "st-obd-$$" /busybox ls -l /overlaybd.commit) || e2e_fail "ctr run $HELLO_OBD_REF: $out"
grep -q "overlaybd.commit" <<<"$out" || e2e_fail "no /overlaybd.commit in $HELLO_OBD_REF under overlayfs: $out"
ok "hello-world:obd pulled; under overlayfs its rootfs holds /overlaybd.commit (bind-mounted busybox ran)"

# 3. busybox: runs, and the tree is what the layers say.
ctr_pull "$BUSYBOX_REF" overlayfs || e2e_fail "pull $BUSYBOX_REF"
out=$(ctr_do run --rm --snapshotter overlayfs "$BUSYBOX_REF" "st-bb-$$" /usr/local/bin/hello.sh) ||
    e2e_fail "ctr run $BUSYBOX_REF hello.sh: $out"
[[ $out == "hello from the busybox image" ]] || e2e_fail "hello.sh printed: $out"
ok "busybox:v1 pulled and ran /usr/local/bin/hello.sh"

ctr_tree_digest overlayfs "$BUSYBOX_REF" >"$work/container.list" || e2e_fail "tree digest in a container"
expect() { grep -qxF -- "$1" "$work/container.list" || e2e_fail "listing lacks: $1"; }
absent() { ! grep -q -- "^$1 " "$work/container.list" || e2e_fail "listing has $1"; }
expect "./bin/sh l 0777 0:0 7 n1 1700000000 -> busybox"
expect "./data/secret f 0600 1000:1000 30 n1 1700000000 sha256=700bd34f4c6ab3228dd934689e414480908ed05fb401681e5faaeda531b6091b"
expect "./data/suid f 4755 0:0 11 n1 1700000000 sha256=53ce4ab5a9f0956fcf3df2b9edf40311ac71e14caff20d9acc9d7a17c5d08a1c"
expect "./data/sticky d 1777 0:0"
expect "./data/mode.txt f 0640 0:0 24 n1 1700000000 sha256=05f88d7b8584f7dbc4b278a7d9eb4721fc4aa2bc8946f5ab757ee58acad557d2"
expect "./data/hard2 f 0644 0:0 21 n2 1700000000 sha256=e0c2c2ea1c35c767fd431d72af0de1f52440af902b81b42216235de2b4dd4e55 hardlink=./data/hard1"
expect "./data/rel-link l 0777 0:0 31 n1 1700000000 -> ../usr/share/doc/e2e/readme.txt"
expect "./data/replaced.txt d 0755 0:0"
expect "./data/opaque/new.txt f 0644 0:0 33 n1 1700000000 sha256=$(printf 'only file left in the opaque dir\n' | sha256sum | cut -d' ' -f1)"
expect "./etc/hostname f 0644 0:0 12 n1 1700000000 sha256=$(printf 'busybox-e2e\n' | sha256sum | cut -d' ' -f1)"
expect "./data/big.bin f 0644 0:0 1048576 n1 1700000000 sha256=e8ebb54052c6dbcf8c508b05768f351b645d900fb4ca3e5dfb581adf7398a0c9"
absent ./data/gone.txt
absent ./data/old
absent ./data/opaque/a
absent ./data/opaque/b
absent ./data/replaced.txt/now-a-dir-not
grep -q '^\./data/.*\.wh\.' "$work/container.list" && e2e_fail "a whiteout file is visible"
ok "busybox:v1 tree in a container: whiteouts, opaque dir, modes, owners, symlinks, hardlink as built"

# 4. the same listing taken on the host over `ctr image mount` (container-only mount points left out)
ctr_image_mount overlayfs "$BUSYBOX_REF" "$work/mnt" || e2e_fail "ctr image mount $BUSYBOX_REF"
tree_digest "$work/mnt" >"$work/host.list"
ctr_image_unmount "$work/mnt"
grep -vE '^\./(proc|dev|sys|run) ' "$work/container.list" >"$work/container-image.list"
tree_diff container "$work/container-image.list" "host (ctr image mount)" "$work/host.list" ||
    e2e_fail "the listing in a container differs from the host's listing of the mounted image"
ok "listing in the container = listing on the host of the mounted image ($(wc -l <"$work/host.list") entries)"

echo "--- busybox:v1 ($bb_digest) as a container sees it (overlayfs):"
cat "$work/container.list"
echo "--- tree digest: $(sha256sum <"$work/container.list" | cut -d' ' -f1)"

# 5. image removal + GC leave no snapshot behind
for ref in "$HELLO_PLAIN_REF" "$HELLO_OBD_REF" "$BUSYBOX_REF"; do
    ctr_do image rm --sync "$ref" >/dev/null || e2e_fail "ctr image rm --sync $ref"
done
left=$(ctr_do snapshots --snapshotter overlayfs ls | tail -n +2)
[[ -z $left ]] || e2e_fail "snapshots left after ctr image rm --sync: $left"
dirs=$(find "$CTRD_DIR/root/io.containerd.snapshotter.v1.overlayfs/snapshots" -mindepth 1 -maxdepth 1 | wc -l)
((dirs == 0)) || e2e_fail "$dirs overlayfs snapshot directories left after GC"
ok "ctr image rm --sync: GC removed every snapshot and snapshot directory"

echo "selftest: $passed passed, 0 failed ($((SECONDS - t0)) s)"
