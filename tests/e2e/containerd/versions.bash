# shellcheck shell=bash
# The lean containerd-version run of tests/e2e/containerd/host-versions.sh (on the host, fuse frontend):
# Debian SUITE's containerd (fetched by fetch-containerd.sh into target/vm/containerd/SUITE, extracted, not
# installed) with ovbd's deploy snippet for its config version, CRI on, and these parts:
#   a. the OverlayBD hello-world: full `ctr image pull --snapshotter ovbd` + /hello;
#   n. the socket is also registered as "overlaybd": GC of that name keeps ovbd's snapshots;
#   b. a plain OCI image (3 layers) through ovbd's overlayfs fallback = containerd's own overlayfs;
#   m. that image converted by ovbd (multi-layer OverlayBD), pulled with ctr, runs, same tree;
#   e. kill -9 of ovbd serve under a running container, restart;
#   c. CRI: a pod on a converted image, pulled lazily by the CRI plugin (2.x: through the transfer service);
#   p. (2.x) a plain `ctr image pull --snapshotter ovbd` is lazy: the registry sends a small part of the blobs;
#   t. (2.x) CRI pulls through the transfer service: without ovbd in its unpack_config, a CRI pull fails;
#   r. `ovbd rpull` + ctr run;
#   d. image rm --sync + GC leave no snapshot, directory, mount or device.
# Sourced after env.bash and ovbd.bash, with SUITE's containerd first on PATH, $WORK (the run's work dir)
# and $OVBD (the ovbd binary) set: ctrd_versions_main SUITE.

# ctrd_versions_main SUITE: runs the parts against the containerd on PATH; returns non-zero if any fails.
# OVBD_SERVE_EXTRA_CONFIG (TOML tables) is added to ovbd's config ([download] is turned off here).
ctrd_versions_main() {
    local suite=$1
    export E2E_PARTS_DIR=$WORK/parts
    local t0=$SECONDS
    e2e_log "containerd of $suite: $(containerd --version)"

    # No background download: it would add to the bytes the lazy parts measure.
    OVBD_SERVE_EXTRA_CONFIG=${OVBD_SERVE_EXTRA_CONFIG:+$OVBD_SERVE_EXTRA_CONFIG$'\n'}$'[download]\nenable = false'
    ovbd_serve_setup "$OVBD" "$WORK/ovbd-root" "$WORK/ovbd/ovbd.sock"
    [[ -z $OVBD_SERVE_MISSING ]] || e2e_fail "$OVBD_SERVE_MISSING"
    E2E_REGISTRY_ACCESSLOG=1 registry_start "$WORK/registry"
    ctrd_start_cri "$WORK/ctrd" "$OVBD_SOCK"
    ovbd_serve_start || e2e_fail "ovbd serve did not start"
    push_hello_obd
    build_busybox_image "$WORK" v1
    _versions_lazy_image v8 8 lazy-cri
    ((CTRD_MAJOR >= 2)) && _versions_lazy_image v12 12 lazy-plain
    e2e_log "setup took $((SECONDS - t0)) s"

    run_part a "OverlayBD hello-world: full ctr pull + /hello" part_a
    run_part n "the socket under a second name: its GC keeps the first name's snapshots" part_n
    run_part b "plain OCI busybox through ovbd = containerd's overlayfs" part_b
    run_part m "busybox converted by ovbd (3 OverlayBD layers): ctr pull + run, same tree" _versions_part_m
    # (before CRI and rpull: part e matches our namespace's snapshots with every directory in the root)
    run_part e "kill -9 ovbd serve under a running container, restart" part_e
    run_part c "CRI: a pod on a converted image, pulled lazily" _versions_part_c
    if ((CTRD_MAJOR >= 2)); then
        run_part p "plain ctr image pull --snapshotter ovbd is lazy (containerd 2.x)" _versions_part_p
        run_part t "CRI pulls through the transfer service (containerd 2.x)" _versions_part_t
    fi
    run_part r "ovbd rpull + ctr run" _versions_part_r
    _versions_rm_cri_images
    run_part d "image rm + GC leave no snapshot, dir, mount or device" part_d
    e2e_log "$suite ($(containerd --version | awk '{ print $3 }')) took $((SECONDS - t0)) s"
    parts_summary
}

# _versions_lazy_image TAG MIB NAME: busybox with a MIB-MiB file (new blobs per TAG) converted by ovbd as
# $REGISTRY/NAME:obd; sets LAZY_<NAME>_REF and LAZY_<NAME>_BYTES (its layer blobs' bytes).
_versions_lazy_image() {
    local tag=$1 mib=$2 name=$3 var
    "$E2E_PYTHON" "$E2E_CTRD_LIB/mkimage.py" busybox "$WORK/lazy-oci" "$tag" --busybox "$E2E_BUSYBOX" --large "$mib" \
        >/dev/null || e2e_fail "mkimage.py busybox --large $mib"
    push_oci_layout "$WORK/lazy-oci" "$tag" "$name:oci"
    "$OVBD" convert --json "$REGISTRY/$name:oci" "$REGISTRY/$name:obd" >"$WORK/$name.json" 2>"$WORK/$name.log" ||
        e2e_fail "ovbd convert $name: $(tail -n 5 "$WORK/$name.log")"
    var=${name//-/_}
    printf -v "LAZY_${var^^}_REF" '%s' "$REGISTRY/$name:obd"
    printf -v "LAZY_${var^^}_BYTES" '%s' "$(grep -o '"size": *[0-9]*' "$WORK/$name.json" | awk '{ s += $2 } END { print s + 0 }')"
}

_versions_part_m() {
    need_serve || return 1
    local ref=$REGISTRY/busybox:obd dir=$E2E_PARTS_DIR/m
    mkdir -p "$dir"
    try "ovbd convert $BUSYBOX_REF $ref" timeout 600 "$OVBD" convert "$BUSYBOX_REF" "$ref" || return 1
    try "ctr image pull --snapshotter $E2E_SNAP $ref" ctr_pull "$ref" "$E2E_SNAP" || return 1
    try "run hello.sh" ctr_do run --rm --snapshotter "$E2E_SNAP" "$ref" e2e-m /usr/local/bin/hello.sh || return 1
    [[ $OUT == "hello from the busybox image" ]] || nok "hello.sh printed: $OUT" || return 1
    ctr_tree_digest "$E2E_SNAP" "$ref" ./lost+found >"$dir/converted.list" 2>"$dir/err" ||
        nok "tree digest of $ref: $(cat "$dir/err")" || return 1
    [[ -s $E2E_PARTS_DIR/b/overlayfs.list ]] || nok "no reference listing (part b failed?)" || return 1
    tree_diff "overlayfs (original)" "$E2E_PARTS_DIR/b/overlayfs.list" "ovbd (converted)" "$dir/converted.list" ||
        nok "the converted image's tree differs from the original's (diff above)" || return 1
    ok "converted busybox runs; tree identical to the original's ($(wc -l <"$dir/converted.list") entries)"
}

# c. CRI pulls (snapshot annotations on; on 2.x through the transfer service, which needs the snippet's
#    unpack_config) and runs a pod; the pull is lazy.
_versions_part_c() {
    need_serve || return 1
    local b0 bytes out
    b0=$(registry_blob_bytes)
    out=$(cri_run "$LAZY_LAZY_CRI_REF" cat /usr/share/doc/e2e/readme.txt) || nok "CRI pod on $LAZY_LAZY_CRI_REF: $out" || return 1
    bytes=$(($(registry_blob_bytes) - b0))
    [[ -n $out ]] || nok "the pod printed nothing" || return 1
    ((bytes < LAZY_LAZY_CRI_BYTES / 2)) ||
        nok "CRI fetched $bytes of $LAZY_LAZY_CRI_BYTES bytes: the layers were downloaded" || return 1
    ok "CRI pod read readme.txt ($out); $bytes of $LAZY_LAZY_CRI_BYTES blob bytes fetched"
}

# p. containerd 2.x: a plain ctr pull through the transfer service, with the snippet's exports, is lazy.
_versions_part_p() {
    need_serve || return 1
    local b0 bytes
    b0=$(registry_blob_bytes)
    try "ctr image pull --snapshotter $E2E_SNAP $LAZY_LAZY_PLAIN_REF" ctr_pull "$LAZY_LAZY_PLAIN_REF" "$E2E_SNAP" || return 1
    try "ctr run cat /etc/hostname" ctr_do run --rm --snapshotter "$E2E_SNAP" "$LAZY_LAZY_PLAIN_REF" e2e-p cat /etc/hostname ||
        return 1
    bytes=$(($(registry_blob_bytes) - b0))
    [[ -n $OUT ]] || nok "cat /etc/hostname printed nothing" || return 1
    ((bytes < LAZY_LAZY_PLAIN_BYTES / 2)) ||
        nok "the plain pull + run fetched $bytes of $LAZY_LAZY_PLAIN_BYTES bytes: the layers were downloaded" || return 1
    ok "plain ctr pull + run fetched $bytes of $LAZY_LAZY_PLAIN_BYTES blob bytes"
}

# t. containerd 2.x: CRI pulls through the transfer service. With ovbd's entry taken out of the transfer
#    service's unpack_config (containerd restarted on that config), a CRI pull into ovbd fails: the local
#    pull path would not look at that table. The config is restored (and containerd restarted) after.
_versions_part_t() {
    need_serve || return 1
    local cfg=$CTRD_DIR/config.toml out rc=0
    cp "$cfg" "$cfg.full" || return 1
    awk -v name="$E2E_SNAP" '
        function flush() { if (blk !~ ("snapshotter = \"" name "\"")) printf "%s", blk; blk = ""; inblk = 0 }
        /^[ \t]*\[/ { if (inblk) flush(); if ($0 ~ /unpack_config\]\]/) inblk = 1 }
        inblk { blk = blk $0 "\n"; next }
        { print }
        END { if (inblk) flush() }' "$cfg.full" >"$cfg" || return 1
    (($(grep -c 'unpack_config\]\]' "$cfg.full") == $(grep -c 'unpack_config\]\]' "$cfg") + 1)) ||
        nok "could not take $E2E_SNAP out of unpack_config: $(grep -A2 'unpack_config\]\]' "$cfg")" || return 1
    ctrd_restart
    out=$(cri_pull "$LAZY_LAZY_PLAIN_REF" 2>&1) || rc=$?
    cp "$cfg.full" "$cfg" && ctrd_restart
    ((rc != 0)) ||
        nok "CRI pulled into $E2E_SNAP with no unpack_config entry for it: not through the transfer service" || return 1
    # (CRI's own wrapper says "failed to pull and unpack image" whatever failed: not a sign.)
    grep -q "no unpack platforms" <<<"$out" ||
        nok "the CRI pull failed, but not for want of an unpack platform: $out" || return 1
    ok "without $E2E_SNAP in unpack_config the CRI pull fails: $(grep -o 'no unpack platforms[^"]*' <<<"$out" | head -n 1)"
}

# r. ovbd rpull (lazy on every version) into a namespace of its own, then ctr run.
_versions_part_r() {
    need_serve || return 1
    local ns=e2e-rpull-$$ out
    try "ovbd rpull $LAZY_LAZY_CRI_REF" "$OVBD" rpull --address "$CTRD_ADDR" --namespace "$ns" "$LAZY_LAZY_CRI_REF" ||
        return 1
    out=$(timeout "$E2E_CTR_TIMEOUT" ctr --address "$CTRD_ADDR" --namespace "$ns" run --rm --snapshotter "$E2E_SNAP" \
        "$LAZY_LAZY_CRI_REF" e2e-r cat /usr/share/doc/e2e/readme.txt 2>&1) || nok "ctr run after rpull: $out" || return 1
    [[ -n $out ]] || nok "ctr run after rpull printed nothing" || return 1
    ok "rpull + ctr run: $out"
    timeout 120 ctr --address "$CTRD_ADDR" --namespace "$ns" image rm --sync "$LAZY_LAZY_CRI_REF" >/dev/null ||
        nok "image rm in $ns" || return 1
    # (runc's state dir of that namespace: containerd keeps it whatever its config says)
    rmdir "/run/containerd/runc/$ns" 2>/dev/null
    return 0
}

# Part d removes the images of our namespace: the CRI ones (k8s.io) go first.
_versions_rm_cri_images() {
    local ref
    # shellcheck disable=SC2086  # $CTR_CRI is a command line
    for ref in $(timeout 60 $CTR_CRI image ls -q 2>/dev/null); do
        timeout 120 $CTR_CRI image rm --sync "$ref" >/dev/null 2>&1 || e2e_log "could not remove CRI image $ref"
    done
}
