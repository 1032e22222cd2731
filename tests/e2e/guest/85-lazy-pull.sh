#!/usr/bin/env bash
# 85-lazy-pull: lazy pulling end to end in the test guest (private containerd + local registry + ovbd serve).
#   1. a 4-layer busybox image whose top layer holds a 64 MiB incompressible /data/large.bin is pushed as
#      plain OCI (lazy:oci) and converted by `ovbd convert` to OverlayBD (lazy:obd);
#   2. reference: `ctr image pull` of lazy:oci with containerd's overlayfs + `ctr run` of `cat /etc/hostname`;
#   3. lazy: `ovbd rpull` of lazy:obd + `ctr run --snapshotter ovbd` of the same command: same output, and
#      the registry sent fewer bytes than the image holds (the layers were not downloaded);
#   4. the whole of /data/large.bin read through ovbd (blocks fetched on demand) has the sha256 of the
#      original, and the snapshots are remote layers (no layer file in their directories);
#   5. faults: with the registry frozen (SIGSTOP), reading an uncached part of /data/large.bin fails with an
#      I/O error within the configured deadline while cached files still read (the device does not hang)
#      and another device (upstream's hello-world OverlayBD image, pulled normally) runs a container;
#      once the registry is back, the same read works;
#   6. a second container reads /etc/hostname again after ovbd serve restarts: from the block cache;
#   7. CRI: containerd's CRI plugin (snapshotter ovbd, disable_snapshot_annotations = false) pulls another
#      converted image lazily (its layers are never downloaded) and runs a pod that reads a file of it;
#   8. background download ([download] enable, no delay): after a restart, a container on lazy:obd makes
#      ovbd download every remote layer whole into its directory, each file with its blob's sha256.
#   9. upstream's own converted hello-world (made by overlaybd's tools) pulled lazily with ovbd rpull runs /hello.
# Prints wall times and bytes fetched (registry access log) of both pulls: the lazy-pull benchmark figures.
set -uo pipefail
# shellcheck source=lib/common.bash
. "$OVBD_REPO/tests/e2e/guest/lib/common.bash"
# shellcheck source=../containerd/env.bash
. "$OVBD_REPO/tests/e2e/containerd/env.bash"
# shellcheck source=../containerd/ovbd.bash
. "$OVBD_REPO/tests/e2e/containerd/ovbd.bash"

E2E_READY_TIMEOUT=${E2E_READY_TIMEOUT:-120}
E2E_CTR_TIMEOUT=${E2E_CTR_TIMEOUT:-300}
large_mib=${OVBD_LAZY_LARGE_MIB:-64}
t0=$SECONDS

root_parent= && e2e_tmpdir root_parent /var/tmp
# A short read deadline for the fault part (the default is 30 s). No background download until part 8 (it is
# on by default): a download would add to the bytes fetched that parts 3 and 7 measure.
deadline=8
OVBD_SERVE_REGISTRY_CONFIG=$'timeout_secs = '$deadline$'\nstall_timeout_secs = 2\nretries = 3'
OVBD_SERVE_EXTRA_CONFIG=$'[download]\nenable = false'
ovbd_serve_setup "$OVBD" "$root_parent/root" "$WORK/ovbd/ovbd.sock"
[[ -z $OVBD_SERVE_MISSING ]] || fail "$OVBD_SERVE_MISSING"
E2E_REGISTRY_ACCESSLOG=1 registry_start "$WORK/registry"
ctrd_start_cri "$WORK/ctrd" "$OVBD_SOCK"
ovbd_serve_start || fail "ovbd serve did not start"

"$E2E_PYTHON" "$E2E_CTRD_LIB/mkimage.py" busybox "$WORK/lazy-oci" v1 --busybox "$E2E_BUSYBOX" --large "$large_mib" \
    >/dev/null || fail "mkimage.py busybox --large"
push_oci_layout "$WORK/lazy-oci" v1 lazy:oci
oci_ref=$REGISTRY/lazy:oci obd_ref=$REGISTRY/lazy:obd
"$OVBD" convert --json "$oci_ref" "$obd_ref" >"$WORK/convert.json" 2>"$WORK/convert.log" ||
    fail "ovbd convert $oci_ref $obd_ref: $(tail -n 5 "$WORK/convert.log")"
image_bytes=$(grep -o '"size": *[0-9]*' "$WORK/convert.json" | awk '{ s += $2 } END { print s + 0 }')
note "converted $oci_ref -> $obd_ref (layer blobs $image_bytes bytes)"
# Another image on another device for the fault part: upstream's hello-world, pulled normally (local layers).
push_hello_obd
# (9) first, in a namespace of its own: the normal pull below must not find its layer there already.
up_ctr="ctr --address $CTRD_ADDR --namespace e2e-upstream"
"$OVBD" rpull --address "$CTRD_ADDR" --namespace e2e-upstream "$HELLO_OBD_REF" 2>"$WORK/rpull-hello.log" ||
    fail "ovbd rpull $HELLO_OBD_REF: $(cat "$WORK/rpull-hello.log")"
# shellcheck disable=SC2086  # $up_ctr is a command line
hello_up=$(timeout 300 $up_ctr run --rm --snapshotter "$E2E_SNAP" "$HELLO_OBD_REF" up-hello /hello 2>&1) ||
    fail "ctr run of upstream's hello-world after ovbd rpull: $hello_up"
grep -q "Hello from Docker!" <<<"$hello_up" || fail "upstream's hello-world printed: $hello_up"
pass "upstream's converted hello-world, pulled lazily with ovbd rpull, runs /hello: Hello from Docker!"
ctr_pull "$HELLO_OBD_REF" "$E2E_SNAP" || fail "ctr image pull --snapshotter $E2E_SNAP $HELLO_OBD_REF"
# A second image for the CRI part (other content, so other blobs: nothing of it is cached then).
"$E2E_PYTHON" "$E2E_CTRD_LIB/mkimage.py" busybox "$WORK/lazy-oci" v2 --busybox "$E2E_BUSYBOX" --large 16 \
    >/dev/null || fail "mkimage.py busybox --large 16"
push_oci_layout "$WORK/lazy-oci" v2 lazy:oci2
cri_ref=$REGISTRY/lazy:cri
"$OVBD" convert "$REGISTRY/lazy:oci2" "$cri_ref" 2>"$WORK/convert2.log" ||
    fail "ovbd convert lazy:oci2: $(tail -n 5 "$WORK/convert2.log")"
took "$t0" "setup"

now() { date +%s.%N; }
cmd=(cat /etc/hostname)

# ---- reference: full pull with containerd's overlayfs snapshotter.
b0=$(registry_blob_bytes) s0=$(now)
ctr_pull "$oci_ref" overlayfs || fail "ctr image pull $oci_ref"
ref_out=$(ctr_do run --rm "$oci_ref" lazy-ref "${cmd[@]}") || fail "ctr run $oci_ref"
full_s=$(awk -v a="$s0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')
full_bytes=$(($(registry_blob_bytes) - b0))
note "full pull (overlayfs) + run: $full_s s, $full_bytes bytes of blobs"

# ---- lazy: ovbd rpull + run through ovbd.
b0=$(registry_blob_bytes) s0=$(now)
"$OVBD" rpull --address "$CTRD_ADDR" --namespace "$CTRD_NS" "$obd_ref" 2>"$WORK/rpull.log" ||
    fail "ovbd rpull $obd_ref: $(cat "$WORK/rpull.log")"
lazy_out=$(ctr_do run --rm --snapshotter "$E2E_SNAP" "$obd_ref" lazy-obd "${cmd[@]}") ||
    fail "ctr run --snapshotter $E2E_SNAP $obd_ref (serve log: $(ovbd_serve_log_tail 2>&1 | tail -n 20))"
lazy_s=$(awk -v a="$s0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')
lazy_bytes=$(($(registry_blob_bytes) - b0))
note "lazy pull (ovbd rpull) + run: $lazy_s s, $lazy_bytes bytes of blobs"
sed 's/^/  ... rpull: /' "$WORK/rpull.log"
[[ $lazy_out == "$ref_out" && -n $lazy_out ]] || fail "ovbd printed '$lazy_out', overlayfs '$ref_out'"
pass "the same output through ovbd after a lazy pull: $lazy_out"
((lazy_bytes < image_bytes / 2)) ||
    fail "the lazy pull fetched $lazy_bytes bytes of a $image_bytes-byte image: the layers were downloaded"
pass "lazy: $lazy_bytes of $image_bytes bytes fetched"

# ---- faults: a frozen registry gives EIO within the deadline, never a hang; cached data still reads.
kill -STOP "$REGISTRY_PID" || fail "freezing the registry"
s0=$SECONDS
# A long-running container keeps the image's device attached while we read through it.
ctr_do run -d --snapshotter "$E2E_SNAP" "$obd_ref" lazy-hold sleep 3600 >/dev/null || {
    kill -CONT "$REGISTRY_PID"
    fail "starting a container with the registry frozen (its files were cached: it should start)"
}
rc=0
err=$(ctr_do task exec --exec-id e1 lazy-hold dd if=/data/large.bin of=/dev/null bs=1M skip=40 count=4 2>&1) || rc=$?
took_fault=$((SECONDS - s0))
cached=$(ctr_do task exec --exec-id e2 lazy-hold cat /etc/hostname 2>&1)
hello=$(ctr_do run --rm --snapshotter "$E2E_SNAP" "$HELLO_OBD_REF" lazy-hello /hello 2>&1)
kill -CONT "$REGISTRY_PID"
((rc != 0)) || fail "reading uncached data with the registry frozen succeeded?"
grep -qi "error" <<<"$err" || fail "dd with the registry frozen: exit $rc, but: $err"
((took_fault <= deadline * 3 + 30)) || fail "the failing read took ${took_fault}s (deadline ${deadline}s)"
[[ $cached == "$ref_out" ]] || fail "a cached file did not read while the registry was frozen: $cached"
grep -q "Hello from Docker!" <<<"$hello" || fail "another device did not work while the registry was frozen: $hello"
pass "registry frozen: uncached read failed in ${took_fault}s (${err//$'\n'/ }), cached files still read, another device ran /hello"
ctr_do task exec --exec-id e3 lazy-hold dd if=/data/large.bin of=/dev/null bs=1M skip=40 count=4 >/dev/null 2>&1 ||
    fail "the same read after the registry came back"
pass "registry back: the same read works"
ctr_do task kill -s KILL lazy-hold >/dev/null 2>&1
for _ in $(seq 30); do ctr_do task rm lazy-hold >/dev/null 2>&1 && break; sleep 1; done
ctr_do container rm lazy-hold >/dev/null 2>&1 || true

# ---- the snapshots are remote layers (no layer file), and a full read of the big file is correct.
n_remote=0
for d in "$OVBD_ROOT"/snapshots/*/; do
    if [[ -d $d/fs && -z $(ls -A "$d/fs") ]] && grep -qs '"digest"' "$d/block/config.v1.json" 2>/dev/null; then
        n_remote=$((n_remote + 1))
    fi
done
((n_remote >= 1)) || fail "no device config names a remote blob"
want=$(ctr_do run --rm "$oci_ref" lazy-ref-sum sha256sum /data/large.bin | cut -d' ' -f1)
b0=$(registry_blob_bytes)
got=$(ctr_do run --rm --snapshotter "$E2E_SNAP" "$obd_ref" lazy-obd-sum sha256sum /data/large.bin | cut -d' ' -f1)
[[ -n $want && $got == "$want" ]] || fail "sha256 of /data/large.bin through ovbd: '$got', original '$want'"
pass "all of /data/large.bin ($large_mib MiB) read on demand: sha256 ${got:0:16}... as the original ($(($(registry_blob_bytes) - b0)) bytes fetched)"

# ---- a restart keeps the block cache: the same read fetches nothing.
ovbd_serve_stop || fail "stopping ovbd serve"
ovbd_serve_start || fail "ovbd serve did not restart"
b0=$(registry_blob_bytes)
again=$(ctr_do run --rm --snapshotter "$E2E_SNAP" "$obd_ref" lazy-obd-again "${cmd[@]}") ||
    fail "ctr run after the restart"
[[ $again == "$ref_out" ]] || fail "after the restart: '$again'"
after_restart=$(($(registry_blob_bytes) - b0))
((after_restart == 0)) || fail "after a restart of ovbd serve the same read fetched $after_restart bytes"
pass "after a restart of ovbd serve the same read is served from the block cache (0 bytes fetched)"

# ---- CRI: a lazy pull by containerd's CRI plugin, a pod reads a file of the image.
b0=$(registry_blob_bytes)
cri_out=$(cri_run "$cri_ref" cat /usr/share/doc/e2e/readme.txt) || fail "CRI pod on $cri_ref: $cri_out"
cri_bytes=$(($(registry_blob_bytes) - b0))
want_doc=$(ctr_do run --rm "$oci_ref" lazy-ref-doc cat /usr/share/doc/e2e/readme.txt)
[[ -n $cri_out && $cri_out == "$want_doc" ]] || fail "the CRI pod read '$cri_out', the original has '$want_doc'"
((cri_bytes < (16 << 20) / 2)) || fail "the CRI pull fetched $cri_bytes bytes: the layers were downloaded"
pass "CRI (snapshotter ovbd): a pod read the image's readme.txt after a lazy pull ($cri_bytes bytes of blobs fetched)"

# ---- background download: every remote layer of lazy:obd lands in its directory, digest-checked.
ovbd_serve_stop || fail "stopping ovbd serve"
sed -i 's/^enable = false$/enable = true\ndelay_secs = 0\nmax_mbps = 0/' "$OVBD_SERVE_CONFIG"
grep -qx 'delay_secs = 0' "$OVBD_SERVE_CONFIG" || fail "could not turn [download] on in $OVBD_SERVE_CONFIG"
ovbd_serve_start || fail "ovbd serve did not restart with [download] enable"
ctr_do run --rm --snapshotter "$E2E_SNAP" "$obd_ref" lazy-obd-dl "${cmd[@]}" >/dev/null || fail "ctr run (download)"
mapfile -t layer_digests < <(grep -o '"digest": *"sha256:[0-9a-f]*"' "$WORK/convert.json" | grep -o 'sha256:[0-9a-f]*')
((${#layer_digests[@]} == 4)) || fail "convert.json lists ${#layer_digests[@]} layer digests, not 4"
downloaded=0
for _ in $(seq 180); do
    downloaded=0
    for d in "${layer_digests[@]}"; do
        for f in "$OVBD_ROOT"/snapshots/*/fs/overlaybd.commit; do
            [[ -f $f && $(stat -c %s "$f") -gt 0 ]] || continue
            [[ $(sha256sum "$f" | cut -d' ' -f1) == "${d#sha256:}" ]] && downloaded=$((downloaded + 1)) && break
        done
    done
    ((downloaded == ${#layer_digests[@]})) && break
    sleep 2
done
((downloaded == ${#layer_digests[@]})) ||
    fail "background download: $downloaded of ${#layer_digests[@]} layers downloaded ($(ovbd_serve_log_tail 2>&1 | grep -i download | tail -n 5))"
pass "background download: all ${#layer_digests[@]} layers of $obd_ref downloaded whole, each with its blob's sha256"

ratio=$(awk -v a="$full_s" -v b="$lazy_s" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
pct=$(awk -v a="$lazy_bytes" -v b="$image_bytes" 'BEGIN { printf "%.2f", 100 * a / b }')
echo "==== lazy pull vs full pull, same guest run (TCG): image $image_bytes bytes of layer blobs"
echo "  full (overlayfs): $full_s s, $full_bytes bytes | lazy (ovbd): $lazy_s s, $lazy_bytes bytes ($pct% of the image)"
echo "  speed-up ${ratio}x (goal >= 3x), fetched $pct% (goal <= 5%)"
took "$t0" "total"
