# shellcheck shell=bash disable=SC2034  # (it sets variables for the scripts that source it)
# `ovbd serve` under the containerd harness: start/kill/restart the snapshotter, and the end-to-end checks
# (parts) shared by tests/e2e/guest/80-containerd-ovbd.sh (in the test guest: ublk frontend) and
# tests/e2e/containerd/host-ovbd.sh (on the host: fuse frontend, loop devices). Sourced after env.bash.
# The part bodies are the same for both frontends: "ovbd's block devices" are /dev/ublkbN or the loop
# devices backed by files on ovbd's FUSE mount under its root (ovbd_block_devices).
#
#   ovbd_serve_setup BIN ROOT SOCKET [MODE]   write the config (ROOT, SOCKET, rootfs_mode MODE=overlayfs)
#   (OVBD_SERVE_REGISTRY_CONFIG: keys added to its [registry] section, which allows the local registry;
#    OVBD_SERVE_EXTRA_CONFIG: TOML tables appended to the config ovbd_serve_setup writes)
#   ovbd_serve_start / ovbd_serve_stop / ovbd_serve_kill9     (pid kept in a file: survives subshells)
#   run_part NAME DESCRIPTION FUNCTION        run one part, print "pass: NAME" or "FAIL: NAME"
#   parts_summary                             "N passed, M failed"; returns 1 if any failed
#   ovbd_block_devices                        ovbd's block devices now (either frontend)
#   lazy_images_setup DIR [MIB]               the images of the lazy parts (l k p s w)
#   part_a .. part_z                          the checks (see each; u l k p s w z: host-ovbd.sh only)
#
# Each part is a function returning 0 (pass) or 1 (fail, after saying why) and never exits the script, so
# one failing part does not hide the others. The parts run in the main shell (no subshell): they start
# containers and restart ovbd, and the cleanup must know about it.

[[ -n ${_E2E_OVBD_LOADED:-} ]] && return 0
_E2E_OVBD_LOADED=1
[[ -n ${_E2E_CTRD_ENV_LOADED:-} ]] || {
    echo "ovbd.bash: source tests/e2e/containerd/env.bash first" >&2
    exit 2
}

# What a container-rootfs label looks like (spec §4.3).
LABEL_WRITABLE=containerd.io/snapshot/overlaybd.writable
# The snapshotter the parts test: containerd's name for the proxy plugin. (Pointing it at a builtin one,
# E2E_SNAP=overlayfs, exercises the parts' ctr mechanics without ovbd; their ovbd-specific checks fail.)
E2E_SNAP=${E2E_SNAP:-$CTRD_PROXY_NAME}

# ----------------------------------------------------------------------------------------------- daemon

# ovbd_serve_setup BIN ROOT SOCKET [MODE]: remembers the binary and writes $OVBD_SERVE_DIR/ovbd.toml.
# Sets OVBD_SERVE_MISSING to a message when BIN has no `serve` subcommand (the parts then fail with it).
# OVBD_SERVE_DIR defaults to the directory of SOCKET.
ovbd_serve_setup() {
    OVBD_SERVE_BIN=$1 OVBD_ROOT=$2 OVBD_SOCK=$3
    local mode=${4:-overlayfs}
    OVBD_SERVE_DIR=${OVBD_SERVE_DIR:-$(dirname "$OVBD_SOCK")}
    mkdir -p "$OVBD_SERVE_DIR" "$OVBD_ROOT"
    OVBD_SERVE_CONFIG=$OVBD_SERVE_DIR/ovbd.toml
    OVBD_SERVE_LOG=$OVBD_SERVE_DIR/ovbd-serve.log
    OVBD_SERVE_PIDFILE=$OVBD_SERVE_DIR/ovbd-serve.pid
    cat >"$OVBD_SERVE_CONFIG" <<EOF
root = "$OVBD_ROOT"
socket = "$OVBD_SOCK"
rootfs_mode = "$mode"
log_level = "${OVBD_SERVE_LOG_LEVEL:-debug}"
[registry]
# The local registry (registry_start: \$E2E_REGISTRY_ADDR, else 127.0.0.1, port 5000-5099) is loopback:
# lazily pulled layers reach it only if it is allowed.
allow_hosts = ["${E2E_REGISTRY_ADDR:-127.0.0.1}"]
${OVBD_SERVE_REGISTRY_CONFIG:-}
${OVBD_SERVE_EXTRA_CONFIG:-}
EOF
    OVBD_SERVE_MISSING=
    if [[ ! -x $OVBD_SERVE_BIN ]]; then
        OVBD_SERVE_MISSING="$OVBD_SERVE_BIN does not exist (cargo build first)"
    elif ! "$OVBD_SERVE_BIN" serve --help >/dev/null 2>&1; then
        OVBD_SERVE_MISSING="'ovbd serve' does not exist yet in $OVBD_SERVE_BIN (the snapshotter has not landed)"
    fi
    # Stopped, then loop devices a dead one left on its FUSE mount detached, before anything is unmounted
    # under its root (exit hooks run newest first).
    e2e_on_exit "e2e_umount_under '$OVBD_ROOT'"
    e2e_on_exit ovbd_detach_leftover_loops
    e2e_on_exit ovbd_serve_stop
    export OVBD_ROOT OVBD_SOCK OVBD_SERVE_CONFIG OVBD_SERVE_LOG
}

ovbd_serve_pid() { [[ -s ${OVBD_SERVE_PIDFILE:-} ]] && cat "$OVBD_SERVE_PIDFILE"; }

# ovbd_serve_start: starts `ovbd serve --config ...` in the background (log appended to $OVBD_SERVE_LOG),
# waits for its socket. Returns 1 (with the log tail) if it does not come up.
ovbd_serve_start() {
    [[ -z $OVBD_SERVE_MISSING ]] || {
        echo "  $OVBD_SERVE_MISSING" >&2
        return 1
    }
    local pid
    echo "=== ovbd serve start $(date +%T)" >>"$OVBD_SERVE_LOG"
    "$OVBD_SERVE_BIN" serve --config "$OVBD_SERVE_CONFIG" >>"$OVBD_SERVE_LOG" 2>&1 &
    pid=$!
    disown "$pid" # no "Killed" job notice from bash after part e's kill -9
    echo "$pid" >"$OVBD_SERVE_PIDFILE"
    if ! e2e_wait "$E2E_READY_TIMEOUT" "ovbd serve socket $OVBD_SOCK" _ovbd_serve_ready "$pid" ||
        ! kill -0 "$pid" 2>/dev/null; then
        echo "  ovbd serve did not come up (pid $pid):" >&2
        ovbd_serve_log_tail 30
        return 1
    fi
    # containerd dials a proxy snapshotter lazily and backs off after a failed dial (up to a few
    # seconds): wait until it reaches us, so the first real request does not meet the backoff.
    # (containerd 2.x dials only when a request needs the snapshotter, with no backoff to meet.)
    if [[ -n ${CTR:-} && ${CTRD_MAJOR:-1} -lt 2 ]] && ! e2e_wait "$E2E_READY_TIMEOUT" "containerd reaching ovbd serve" _ovbd_serve_reachable; then
        echo "  containerd cannot reach ovbd serve on $OVBD_SOCK" >&2
        return 1
    fi
    e2e_log "ovbd serve pid $pid on $OVBD_SOCK (root $OVBD_ROOT)"
}

# containerd dials on its own schedule, backing off for up to 3 s after a failed dial, and a
# `ctr snapshots ls` with no snapshots is answered from its own database: so wait until this
# start of ovbd serve has logged containerd's connection (at debug, the level tests run at).
_ovbd_serve_reachable() {
    case ${OVBD_SERVE_LOG_LEVEL:-debug} in
        debug | trace)
            awk '/^=== ovbd serve start/ { n = 0 } /accepted a connection on the snapshotter socket/ { n++ }
                END { exit n == 0 }' "$OVBD_SERVE_LOG" && return 0
            # containerd 1.7's gRPC redials a lost snapshotter only for a request: make one (containerd asks
            # the snapshotter for each snapshot's usage); the next poll sees the connection.
            # shellcheck disable=SC2086  # $CTR is a command line
            timeout 10 $CTR snapshots --snapshotter "$CTRD_PROXY_NAME" usage >/dev/null 2>&1
            return 1
            ;;
        *) # shellcheck disable=SC2086  # $CTR is a command line
            $CTR snapshots --snapshotter "$CTRD_PROXY_NAME" ls >/dev/null 2>&1 ;;
    esac
}

_ovbd_serve_ready() {
    kill -0 "$1" 2>/dev/null || return 0
    [[ -S $OVBD_SOCK ]]
}

# ovbd_serve_stop: SIGTERM (then SIGKILL after 30 s).
ovbd_serve_stop() {
    local pid
    pid=$(ovbd_serve_pid) || return 0
    e2e_kill_wait "$pid" 30
    rm -f "$OVBD_SERVE_PIDFILE"
}

# ovbd_serve_kill9: kill -9 and wait until it is gone.
ovbd_serve_kill9() {
    local pid i
    pid=$(ovbd_serve_pid) || return 1
    kill -9 "$pid" 2>/dev/null
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    rm -f "$OVBD_SERVE_PIDFILE"
    echo "=== ovbd serve pid $pid killed with SIGKILL $(date +%T)" >>"$OVBD_SERVE_LOG"
    ! kill -0 "$pid" 2>/dev/null
}

ovbd_serve_log_tail() {
    local pid
    if pid=$(ovbd_serve_pid); then
        if kill -0 "$pid" 2>/dev/null; then
            echo "--- ovbd serve pid $pid is running" >&2
        else
            echo "--- ovbd serve pid $pid is GONE (its log ends below)" >&2
        fi
    fi
    [[ -s ${OVBD_SERVE_LOG:-} ]] || return 0
    echo "--- tail of $OVBD_SERVE_LOG" >&2
    tail -n "${1:-40}" "$OVBD_SERVE_LOG" >&2
}

# ------------------------------------------------------------------------------------------ part runner

_parts_passed=()
_parts_failed=()

# run_part NAME DESCRIPTION FUNCTION [ARGS...]
run_part() {
    local name=$1 desc=$2 t0=$SECONDS rc=0
    shift 2
    echo "=== part $name: $desc"
    "$@" || rc=$?
    if ((rc == 0)); then
        echo "pass: part $name ($((SECONDS - t0)) s)"
        _parts_passed+=("$name")
    else
        echo "FAIL: part $name ($((SECONDS - t0)) s)"
        _parts_failed+=("$name")
        ovbd_serve_log_tail 25
        ctrd_log_tail 15
    fi
    return 0
}

parts_summary() {
    echo "=== parts passed: ${_parts_passed[*]:-none}; failed: ${_parts_failed[*]:-none}"
    echo "${#_parts_passed[@]} passed, ${#_parts_failed[@]} failed"
    ((${#_parts_failed[@]} == 0))
}

# Helpers for parts: each prints why and returns 1 on failure.
nok() {
    echo "  FAIL: $*" >&2
    return 1
}
ok() { echo "  ok: $*"; }

# try DESC CMD...: runs CMD, output in $OUT; on failure says so (with the output) and returns 1.
try() {
    local desc=$1 rc=0
    shift
    OUT=$("$@" 2>&1) || rc=$?
    if ((rc != 0)); then
        echo "  FAIL: $desc (exit $rc)" >&2
        [[ -n $OUT ]] && sed 's/^/    | /' <<<"$OUT" | tail -n 30 >&2
        return 1
    fi
}

need_serve() {
    [[ -z $OVBD_SERVE_MISSING ]] || nok "$OVBD_SERVE_MISSING"
}

# ovbd_snapshot_keys: `ctr snapshots --snapshotter "$E2E_SNAP" ls` keys (retried while containerd's proxy
# client is in its reconnect backoff after an ovbd restart).
ovbd_snapshot_keys() {
    local i out
    for ((i = 0; i < 60; i++)); do
        if out=$(ctr_do snapshots --snapshotter "$E2E_SNAP" ls 2>&1); then
            tail -n +2 <<<"$out" | awk '{print $1}'
            return 0
        fi
        sleep 1
    done
    echo "$out" >&2
    return 1
}

# ovbd_snapshot_dirs: the snapshot directories under the ovbd root.
ovbd_snapshot_dirs() {
    [[ -d $OVBD_ROOT/snapshots ]] || return 0
    find "$OVBD_ROOT/snapshots" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort
}

# ovbd_block_devices: the block devices ovbd serves now, for either frontend: ublk ones (/dev/ublkbN; the
# guest has no other ublk user) and loop devices whose backing file is on ovbd's FUSE mount under
# $OVBD_ROOT (the fuse frontend: <root>/fuse/<image>; a loop keeps that path after the mount is gone).
ovbd_block_devices() {
    local d f backing root
    for d in /dev/ublkb*; do [[ -e $d ]] && echo "$d"; done
    root=$(realpath -m "$OVBD_ROOT")
    for f in /sys/block/loop*/loop/backing_file; do
        backing=$(cat "$f" 2>/dev/null) || continue
        if [[ $backing == "$root"/* ]]; then
            d=${f#/sys/block/}
            echo "/dev/${d%%/*}"
        fi
    done
    return 0
}

# OVBD_BLOCK_DEVICE_RE: an extended regex matching the name of a block device of either frontend.
OVBD_BLOCK_DEVICE_RE='/dev/(ublkb|loop)[0-9]+'

# ovbd_frontend_mounts: ovbd's own FUSE mount under $OVBD_ROOT (the fuse frontend's, <root>/fuse), if any.
ovbd_frontend_mounts() {
    e2e_mounts_under "$OVBD_ROOT/fuse"
}

# ovbd_mounts_under_root: the mounts under $OVBD_ROOT other than the frontend's own FUSE mount (which
# stays while ovbd serve runs): snapshot mounts.
ovbd_mounts_under_root() {
    e2e_mounts_under "$OVBD_ROOT" | grep -vxF -- "$(realpath -m "$OVBD_ROOT/fuse")"
    return 0
}

# ovbd_detach_leftover_loops: detaches the loop devices still backed by a file under $OVBD_ROOT (left when
# ovbd serve died without detaching them; a clean stop leaves none).
ovbd_detach_leftover_loops() {
    local d
    for d in $(ovbd_block_devices); do
        [[ $d == /dev/loop* ]] || continue
        e2e_log "detaching leftover loop device $d ($(cat "/sys/block/${d#/dev/}/loop/backing_file" 2>/dev/null))"
        losetup -d "$d" 2>/dev/null || e2e_log "could not detach $d"
    done
}

# ctrd_sync_gc IMAGE: a synchronous GC pass of containerd (a throw-away tag of IMAGE removed with
# `ctr image rm --sync`, which waits for the GC it triggers).
ctrd_sync_gc() {
    ctr_do image tag --force "$1" "$1-e2e-gc" >/dev/null && ctr_do image rm --sync "$1-e2e-gc" >/dev/null
}

# rm_all_containers: deletes every task and container of our namespace.
rm_all_containers() {
    local id
    for id in $(ctr_do tasks ls -q 2>/dev/null); do
        ctr_do tasks rm -f "$id" >/dev/null 2>&1 || echo "  could not delete task $id" >&2
    done
    for id in $(ctr_do containers ls -q 2>/dev/null); do
        ctr_do containers rm "$id" >/dev/null 2>&1 || echo "  could not delete container $id" >&2
    done
}

# ---------------------------------------------------------------------------------------------- parts

# a. the OverlayBD hello-world: pulled through ovbd, /hello runs and prints "Hello from Docker!" — in
#    three containers back to back (each `ctr run --rm` removes its snapshot while the next is prepared
#    over the same image device).
part_a() {
    need_serve || return 1
    try "ctr image pull --snapshotter ovbd --plain-http $HELLO_OBD_REF" ctr_pull "$HELLO_OBD_REF" "$E2E_SNAP" || return 1
    ok "pulled $HELLO_OBD_REF with --snapshotter $E2E_SNAP"
    local i
    for i in 1 2 3; do
        try "ctr run --rm --snapshotter ovbd $HELLO_OBD_REF /hello (container $i)" \
            ctr_do run --rm --snapshotter "$E2E_SNAP" "$HELLO_OBD_REF" "e2e-a$i" /hello || return 1
        grep -q "Hello from Docker!" <<<"$OUT" || nok "/hello printed: $OUT" || return 1
    done
    ok "/hello printed \"Hello from Docker!\" in 3 containers in a row"
    try "rootfs mount as seen in a container" ctr_do run --rm --snapshotter "$E2E_SNAP" --mount "$E2E_BB_MOUNT" \
        "$HELLO_OBD_REF" e2e-a4 /busybox awk '$5 == "/" {print $9, $10}' /proc/self/mountinfo || return 1
    echo "  ... rootfs: $OUT; ovbd block devices now: $(ovbd_block_devices | tr '\n' ' ')"
}

# n. the same socket under a second name ($CTRD_PROXY_ALIAS, as nerdctl on containerd 1.x needs it): a
#    snapshot made and removed under that name, then a GC pass (containerd then removes every snapshot
#    that name's List shows and its own records lack) leaves the first name's snapshots as they were, and
#    its image still runs. After part a (its image's snapshots are the ones kept).
part_n() {
    need_serve || return 1
    [[ -n $CTRD_PROXY_ALIAS && $CTRD_PROXY_ALIAS != "$E2E_SNAP" ]] ||
        nok "no second name registered (CTRD_PROXY_ALIAS=${CTRD_PROXY_ALIAS:-})" || return 1
    local alias=$CTRD_PROXY_ALIAS before
    try "ctr snapshots --snapshotter $E2E_SNAP ls" ctr_do snapshots --snapshotter "$E2E_SNAP" ls || return 1
    before=$(sort <<<"$OUT")
    (($(wc -l <<<"$before") > 1)) || nok "no snapshot of $E2E_SNAP to keep (run part a first)" || return 1
    try "prepare + remove a snapshot under $alias" \
        ctr_do snapshots --snapshotter "$alias" prepare e2e-n-probe || return 1
    try "remove it" ctr_do snapshots --snapshotter "$alias" rm e2e-n-probe || return 1
    try "ctr image tag" ctr_do image tag "$HELLO_OBD_REF" "$HELLO_OBD_REF-n" || return 1
    try "ctr image rm --sync (a GC pass)" ctr_do image rm --sync "$HELLO_OBD_REF-n" || return 1
    try "ctr snapshots --snapshotter $E2E_SNAP ls" ctr_do snapshots --snapshotter "$E2E_SNAP" ls || return 1
    [[ $(sort <<<"$OUT") == "$before" ]] ||
        nok "GC under $alias changed $E2E_SNAP's snapshots: before: $before; after: $OUT" || return 1
    ok "GC under $alias kept $E2E_SNAP's $(($(wc -l <<<"$before") - 1)) snapshots"
    try "ctr snapshots --snapshotter $alias ls" ctr_do snapshots --snapshotter "$alias" ls || return 1
    (($(wc -l <<<"$OUT") <= 1)) || nok "$alias lists snapshots it never made: $OUT" || return 1
    try "ctr run --rm $HELLO_OBD_REF /hello" \
        ctr_do run --rm --snapshotter "$E2E_SNAP" "$HELLO_OBD_REF" e2e-n /hello || return 1
    grep -q "Hello from Docker!" <<<"$OUT" || nok "/hello printed: $OUT" || return 1
    ok "$alias lists nothing; /hello still runs under $E2E_SNAP"
}

# b. the plain OCI busybox image: the listing of its tree in a container is identical under
#    containerd's own overlayfs snapshotter (reference) and under ovbd (overlayfs fallback).
part_b() {
    local dir=$E2E_PARTS_DIR/b
    mkdir -p "$dir"
    try "ctr image pull --snapshotter overlayfs $BUSYBOX_REF" ctr_pull "$BUSYBOX_REF" overlayfs || return 1
    ctr_tree_digest overlayfs "$BUSYBOX_REF" >"$dir/overlayfs.list" 2>"$dir/overlayfs.err" ||
        nok "tree digest of $BUSYBOX_REF under overlayfs: $(cat "$dir/overlayfs.err")" || return 1
    [[ $(wc -l <"$dir/overlayfs.list") -gt 50 ]] || nok "reference listing too short: $(cat "$dir/overlayfs.list")" || return 1
    ok "reference (containerd overlayfs): $(wc -l <"$dir/overlayfs.list") entries," \
        "digest $(sha256sum <"$dir/overlayfs.list" | cut -c1-16)"
    need_serve || return 1
    try "ctr image pull --snapshotter $E2E_SNAP $BUSYBOX_REF" ctr_pull "$BUSYBOX_REF" "$E2E_SNAP" || return 1
    ok "pulled $BUSYBOX_REF with --snapshotter $E2E_SNAP"
    try "run hello.sh through ovbd" \
        ctr_do run --rm --snapshotter "$E2E_SNAP" "$BUSYBOX_REF" e2e-b /usr/local/bin/hello.sh || return 1
    [[ $OUT == "hello from the busybox image" ]] || nok "hello.sh printed: $OUT" || return 1
    ok "busybox ran through ovbd"
    ctr_tree_digest "$E2E_SNAP" "$BUSYBOX_REF" >"$dir/ovbd.list" 2>"$dir/ovbd.err" ||
        nok "tree digest of $BUSYBOX_REF under ovbd: $(cat "$dir/ovbd.err")" || return 1
    tree_diff overlayfs "$dir/overlayfs.list" ovbd "$dir/ovbd.list" ||
        nok "the tree under ovbd differs from the tree under containerd's overlayfs (diff above)" || return 1
    ok "tree digest identical to containerd's overlayfs snapshotter's ($(wc -l <"$dir/ovbd.list") entries)"
}

# c. rootfs mode `dir` by snapshot label: a container writes a file and exits; a second task of the same
#    container (same snapshot) reads it back; its / is the ext4 of a writable block layer.
part_c() {
    need_serve || return 1
    try "pull $HELLO_OBD_REF through ovbd" ctr_pull "$HELLO_OBD_REF" "$E2E_SNAP" || return 1
    # ctr 1.6: `container create` (and `run`) take --snapshotter-label; the label reaches the snapshotter
    # (prefix containerd.io/snapshot/). `task start` (attached) deletes the task when it exits, so the
    # container can be started again on the same snapshot.
    # The task's exit code carries the result (the number of lines in /e2e-state; 100 if / is not ext4):
    # ctr 1.6 now and then loses the output of a task that exits at once.
    try "ctr container create --snapshotter-label $LABEL_WRITABLE=dir" \
        ctr_do container create --snapshotter "$E2E_SNAP" --snapshotter-label "$LABEL_WRITABLE=dir" \
        --mount "$E2E_BB_MOUNT" -- "$HELLO_OBD_REF" e2e-c /busybox sh -c 'echo run >>/e2e-state
            /busybox cat /e2e-state; /busybox stat -f -c "fs=%T" /
            [ "$(/busybox stat -f -c %T /)" = ext2/ext3 ] || exit 100
            exit "$(/busybox grep -c run /e2e-state)"' || return 1
    local rc=0
    OUT=$(ctr_do task start e2e-c 2>&1) || rc=$?
    ((rc == 1)) || nok "first task exited $rc (want 1: one line in /e2e-state, / ext4; 100: not ext4): $OUT" ||
        return 1
    ok "first task wrote /e2e-state; / is ext4 (busybox: ext2/ext3)${OUT:+: ${OUT//$'\n'/ }}"
    rc=0
    OUT=$(ctr_do task start e2e-c 2>&1) || rc=$?
    ((rc == 2)) || nok "second task exited $rc (want 2: two lines in /e2e-state, / ext4; 100: not ext4): $OUT" ||
        return 1
    ok "second task on the same snapshot read the first one's write back${OUT:+: ${OUT//$'\n'/ }}"
    try "ctr container rm e2e-c" ctr_do container rm e2e-c || return 1
}

# f. an image layer built through the snapshotter: a container in dir mode writes a file, its snapshot
#    is committed, and the result is an OverlayBD layer (sealed) that a view of it mounts with the
#    image's content plus the new file.
part_f() {
    need_serve || return 1
    local dir=$E2E_PARTS_DIR/f
    mkdir -p "$dir/mnt"
    try "pull $HELLO_OBD_REF through ovbd" ctr_pull "$HELLO_OBD_REF" "$E2E_SNAP" || return 1
    try "a dir-mode container writes /built.txt" \
        ctr_do run --snapshotter "$E2E_SNAP" --snapshotter-label "$LABEL_WRITABLE=dir" --mount "$E2E_BB_MOUNT" \
        "$HELLO_OBD_REF" e2e-f /busybox sh -c 'echo built-by-ovbd >/built.txt; /busybox sync' || return 1
    # ctr names a container's snapshot after the container.
    try "commit the container's snapshot" ctr_do snapshots --snapshotter "$E2E_SNAP" commit e2e-f-layer e2e-f || return 1
    # Snapshots made with `ctr snapshots` belong to no image, container or lease: the GC pass a deletion
    # schedules would collect them. So they are GC roots (labelled) before the container is removed.
    try "label the layer a GC root" \
        ctr_do snapshots --snapshotter "$E2E_SNAP" label e2e-f-layer containerd.io/gc.root=e2e-f || return 1
    try "view of the new layer (a GC root)" ctr_gc_root_view "$E2E_SNAP" e2e-f-view e2e-f-layer || return 1
    ctr_do container rm e2e-f >/dev/null 2>&1 || true
    try "info of the committed layer" ctr_do snapshots --snapshotter "$E2E_SNAP" info e2e-f-layer || return 1
    local rel
    rel=$(grep -o '"containerd.io/snapshot/overlaybd.localcommitpath": *"[^"]*"' <<<"$OUT" | sed 's/.*: *"//; s/"$//')
    [[ -n $rel && -f $OVBD_ROOT/snapshots/$rel ]] || nok "no OverlayBD layer file recorded for the commit: $OUT" || return 1
    try "ovbd layer inspect of the new layer" "$OVBD_SERVE_BIN" layer inspect "$OVBD_ROOT/snapshots/$rel" || return 1
    ok "committed as an OverlayBD layer: snapshots/$rel"
    try "mounts of the view" ctr_do snapshots --snapshotter "$E2E_SNAP" mounts "$dir/mnt" e2e-f-view || return 1
    local mount_cmd=$OUT
    [[ $mount_cmd == mount\ * ]] || nok "unexpected mounts output: $mount_cmd" || return 1
    eval "$mount_cmd" || nok "mounting the view failed: $mount_cmd" || return 1
    local built hello=no
    built=$(cat "$dir/mnt/built.txt" 2>/dev/null)
    [[ -x $dir/mnt/hello ]] && hello=yes
    umount "$dir/mnt"
    [[ $built == built-by-ovbd && $hello == yes ]] || nok "view shows built.txt=$built, /hello=$hello" || return 1
    ok "the view of the new layer has the image's /hello and the container's /built.txt"
    try "remove view and layer" ctr_do snapshots --snapshotter "$E2E_SNAP" rm e2e-f-view e2e-f-layer || return 1
}

# h. ovbd convert: the busybox image (3 plain OCI layers: whiteouts, an opaque dir, a hardlink, symlinks,
#    modes, owners, xattrs) converted to OverlayBD and pushed to the local registry (twice: same manifest
#    digest), pulled through ovbd and run (so is upstream's hello-world source, converted); the tree a container sees (block layers: ext4 with /lost+found)
#    and the xattrs of a view are identical to containerd's overlayfs view of the original.
part_h() {
    need_serve || return 1
    local dir=$E2E_PARTS_DIR/h ref=$REGISTRY/busybox:obd first second chain
    mkdir -p "$dir"
    try "ovbd convert $BUSYBOX_REF $ref" timeout 600 "$OVBD_SERVE_BIN" convert --json "$BUSYBOX_REF" "$ref" ||
        return 1
    echo "$OUT" >"$dir/convert.json"
    first=$(grep -o '"manifest": *"[^"]*"' "$dir/convert.json" | grep -o 'sha256:[0-9a-f]*')
    try "ovbd convert $BUSYBOX_REF again (to a layout)" \
        timeout 600 "$OVBD_SERVE_BIN" convert --json "$BUSYBOX_REF" "oci:$dir/again:obd" || return 1
    second=$(grep -o '"manifest": *"[^"]*"' <<<"$OUT" | grep -o 'sha256:[0-9a-f]*')
    [[ -n $first && $first == "$second" ]] || nok "converting twice gave $first and $second" || return 1
    ok "converted and pushed as $ref: manifest $first (the same when converted again)"

    # Upstream's plain hello-world source (Docker media types), converted by ovbd and run through ovbd.
    local hello=$REGISTRY/hello-world:ovbd-converted
    try "ovbd convert of the hello-world source" \
        timeout 600 "$OVBD_SERVE_BIN" convert "oci:$E2E_HELLO_LAYOUT:amd64" "$hello" || return 1
    try "ctr image pull --snapshotter $E2E_SNAP $hello" ctr_pull "$hello" "$E2E_SNAP" || return 1
    try "run /hello from it" ctr_do run --rm --snapshotter "$E2E_SNAP" "$hello" e2e-h-hello /hello || return 1
    grep -q "Hello from Docker!" <<<"$OUT" || nok "/hello printed: $OUT" || return 1
    ok "hello-world converted by ovbd runs through ovbd: Hello from Docker!"

    if [[ ! -s $E2E_PARTS_DIR/b/overlayfs.list ]]; then
        mkdir -p "$E2E_PARTS_DIR/b"
        try "ctr image pull --snapshotter overlayfs $BUSYBOX_REF" ctr_pull "$BUSYBOX_REF" overlayfs || return 1
        ctr_tree_digest overlayfs "$BUSYBOX_REF" >"$E2E_PARTS_DIR/b/overlayfs.list" ||
            nok "tree digest of $BUSYBOX_REF under overlayfs" || return 1
    fi
    try "ctr image pull --snapshotter $E2E_SNAP $ref" ctr_pull "$ref" "$E2E_SNAP" || return 1
    try "run hello.sh from the converted image" \
        ctr_do run --rm --snapshotter "$E2E_SNAP" "$ref" e2e-h /usr/local/bin/hello.sh || return 1
    [[ $OUT == "hello from the busybox image" ]] || nok "hello.sh printed: $OUT" || return 1
    ctr_tree_digest "$E2E_SNAP" "$ref" >"$dir/converted-all.list" 2>"$dir/converted.err" ||
        nok "tree digest of $ref under ovbd: $(cat "$dir/converted.err")" || return 1
    grep -q '^\./lost+found d ' "$dir/converted-all.list" ||
        nok "no /lost+found: the converted layers were not served as ext4 block layers" || return 1
    grep -v '^\./lost+found[ /]' "$dir/converted-all.list" >"$dir/converted.list"
    tree_diff "overlayfs (original)" "$E2E_PARTS_DIR/b/overlayfs.list" "ovbd (converted)" "$dir/converted.list" ||
        nok "the converted image's tree differs from the original's under overlayfs (diff above)" || return 1
    ok "tree digest identical to the original's under containerd's overlayfs ($(wc -l <"$dir/converted.list") entries)"

    # xattrs: busybox in a container cannot list them, so compare read-only views on the host side.
    chain=$(layout_chain_id "$dir/again" obd) || nok "chain ID of the converted image" || return 1
    ctr_image_mount overlayfs "$BUSYBOX_REF" "$dir/ref-mnt" || nok "ctr image mount (overlayfs)" || return 1
    ctr_view_mount "$E2E_SNAP" "$chain" "$dir/obd-mnt" || nok "view of $ref ($chain) through $E2E_SNAP" || return 1
    "$E2E_PYTHON" "$E2E_CTRD_LIB/xattr-list.py" "$dir/ref-mnt" >"$dir/ref.xattrs" &&
        "$E2E_PYTHON" "$E2E_CTRD_LIB/xattr-list.py" "$dir/obd-mnt" ./lost+found >"$dir/obd.xattrs" ||
        nok "listing xattrs failed" || return 1
    [[ -x $dir/obd-mnt/usr/local/bin/hello.sh ]] || nok "the view of $ref has no /usr/local/bin/hello.sh" || return 1
    ctr_image_unmount "$dir/ref-mnt"
    ctr_view_unmount "$E2E_SNAP" "$dir/obd-mnt"
    grep -q '^\./data/xattrs.txt user.e2e=' "$dir/ref.xattrs" ||
        nok "the reference lost the image's xattrs: $(cat "$dir/ref.xattrs")" || return 1
    tree_diff "overlayfs xattrs" "$dir/ref.xattrs" "converted xattrs" "$dir/obd.xattrs" ||
        nok "xattrs differ (diff above)" || return 1
    ok "xattrs identical ($(wc -l <"$dir/obd.xattrs") attributes)"
}

# g. rootfs mode dev by label: the snapshot's mount is the writable block device itself (type ext4),
#    which containerd mounts as the rootfs.
part_g() {
    need_serve || return 1
    try "pull $HELLO_OBD_REF through ovbd" ctr_pull "$HELLO_OBD_REF" "$E2E_SNAP" || return 1
    try "ctr run --snapshotter-label $LABEL_WRITABLE=dev" \
        ctr_do run --rm --snapshotter "$E2E_SNAP" --snapshotter-label "$LABEL_WRITABLE=dev" --mount "$E2E_BB_MOUNT" \
        "$HELLO_OBD_REF" e2e-g /busybox sh -c '/hello | /busybox head -2; /busybox grep " / / " /proc/self/mountinfo' ||
        return 1
    grep -q "Hello from Docker!" <<<"$OUT" || nok "/hello in dev mode printed: $OUT" || return 1
    grep -Eq " - ext4 $OVBD_BLOCK_DEVICE_RE " <<<"$OUT" || nok "rootfs is not an ovbd block device: $OUT" || return 1
    ok "dev mode: rootfs is $(grep -Eo "ext4 $OVBD_BLOCK_DEVICE_RE" <<<"$OUT"), /hello ran"
}

# e. kill -9 of `ovbd serve` while a container runs on an OverlayBD image; restart it: the container's
#    rootfs keeps working (page cache dropped, so reads reach the device), and the snapshots containerd
#    lists through ovbd match the snapshot directories on disk.
part_e() {
    need_serve || return 1
    # The execs write what they print to a file in a host directory bind-mounted into the container:
    # twice in CI, under load, containerd 2.1's `ctr task exec` exited 0 having passed on nothing of
    # its process's output (a read error would have printed one), so its stdout is no witness here.
    local dir=$E2E_PARTS_DIR/e
    rm -rf "$dir" && mkdir -p "$dir" || nok "mkdir $dir" || return 1
    try "pull $HELLO_OBD_REF through ovbd" ctr_pull "$HELLO_OBD_REF" "$E2E_SNAP" || return 1
    try "ctr run -d --snapshotter $E2E_SNAP ... sleep" \
        ctr_do run -d --snapshotter "$E2E_SNAP" --mount "$E2E_BB_MOUNT" \
        --mount "type=bind,src=$dir,dst=/e2e-io,options=rbind:rw" "$HELLO_OBD_REF" e2e-e /busybox sleep 100000 ||
        return 1
    try "exec before" ctr_do task exec --exec-id before e2e-e /busybox sh -c \
        '{ /busybox sha256sum /hello; echo written-before >/e2e-before; } >/e2e-io/before 2>&1' || return 1
    local before
    before=$(cat "$dir/before" 2>&1)
    [[ $before == [0-9a-f]*" /hello" ]] || nok "sha256sum /hello printed: $before" || return 1
    ok "container running: $before"
    # containerd removes the snapshots of deleted containers in its GC: let it do so now, while ovbd runs,
    # or a GC falling in the kill window leaves them on disk (not ovbd's state: containerd's pending work).
    try "a synchronous GC pass before the kill" ctrd_sync_gc "$HELLO_OBD_REF" || return 1
    ovbd_serve_kill9 || nok "ovbd serve did not die on SIGKILL" || return 1
    ok "ovbd serve killed with SIGKILL"
    ovbd_serve_start || return 1
    sync
    echo 3 >/proc/sys/vm/drop_caches
    try "exec after the restart" ctr_do task exec --exec-id after e2e-e /busybox sh -c \
        '{ /busybox sha256sum /hello; /busybox cat /e2e-before; echo written-after >/e2e-after;
           /busybox cat /e2e-after; } >/e2e-io/after 2>&1' || return 1
    OUT=$(cat "$dir/after" 2>&1)
    [[ $OUT == "$before"$'\nwritten-before\nwritten-after' ]] ||
        nok "after the restart the container saw: $OUT (want $before, written-before, written-after)" || return 1
    ok "after the restart: /hello reads the same (page cache dropped), earlier and new writes are there"
    local keys dirs nk nd
    keys=$(ovbd_snapshot_keys) || nok "ctr snapshots --snapshotter $E2E_SNAP ls failed after the restart" || return 1
    dirs=$(ovbd_snapshot_dirs)
    nk=$(grep -c . <<<"$keys")
    nd=$(grep -c . <<<"$dirs")
    ((nk == nd && nk > 0)) || nok "ctr lists $nk ovbd snapshots ($(tr '\n' ' ' <<<"$keys")) but" \
        "$OVBD_ROOT/snapshots has $nd directories ($(tr '\n' ' ' <<<"$dirs"))" || return 1
    grep -qx e2e-e <<<"$keys" || nok "the running container's snapshot e2e-e is not listed: $keys" || return 1
    ok "ctr snapshots ls (ovbd) lists $nk snapshots = $nd snapshot directories on disk"
    try "stop e2e-e" ctr_do task rm -f e2e-e || return 1
    try "rm e2e-e" ctr_do container rm e2e-e || return 1
}

# d. removing every container and image (`ctr image rm --sync`, which waits for containerd's GC; the GC
#    calls the snapshotter's Walk, Remove for each orphan, then Cleanup) leaves nothing: no ovbd snapshot,
#    no snapshot directory, no mount under the ovbd root (but the fuse frontend's own), no ovbd block device.
part_d() {
    need_serve || return 1
    rm_all_containers
    local refs ref i keys dirs mounts devs
    refs=$(ctr_do image ls -q) || nok "ctr image ls" || return 1
    for ref in $refs; do
        try "ctr image rm --sync $ref" ctr_do image rm --sync "$ref" || return 1
    done
    ok "removed every container and image ($(wc -w <<<"$refs") images) with ctr image rm --sync"
    # GC has run by now; allow the snapshotter's asynchronous parts (device teardown) a little time.
    for ((i = 0; i < 60; i++)); do
        keys=$(ovbd_snapshot_keys) || keys="(ctr snapshots ls failed)"
        dirs=$(ovbd_snapshot_dirs)
        mounts=$(ovbd_mounts_under_root)
        devs=$(ovbd_block_devices)
        [[ -z $keys$dirs$mounts$devs ]] && break
        sleep 1
    done
    [[ -z $keys ]] || nok "ovbd snapshots left: $(tr '\n' ' ' <<<"$keys")" || return 1
    [[ -z $dirs ]] || nok "snapshot directories left in $OVBD_ROOT/snapshots: $(tr '\n' ' ' <<<"$dirs")" || return 1
    [[ -z $mounts ]] || nok "mounts left under $OVBD_ROOT: $(tr '\n' ' ' <<<"$mounts")" || return 1
    [[ -z $devs ]] || nok "ovbd block devices left: $(tr '\n' ' ' <<<"$devs")" || return 1
    ok "no snapshot, snapshot directory, mount or ovbd block device left (after ${i} s)"
}

# ------------------------------------------------------------------------------------------ lazy pulls

# lazy_images_setup DIR [LARGE_MIB]: the images of the lazy parts, in the local registry: the 4-layer
# busybox with a LARGE_MIB (64) MiB incompressible /data/large.bin as plain OCI ($LAZY_OCI_REF) and
# converted by `ovbd convert` ($LAZY_OBD_REF, layer blobs $LAZY_OBD_BYTES bytes, `convert --json` output in
# $LAZY_OBD_CONVERT_JSON); a second one (32 MiB, other blobs) converted for CRI ($LAZY_CRI_REF,
# $LAZY_CRI_BYTES bytes). On failure LAZY_SETUP_MISSING says why (the lazy parts then fail with it).
lazy_images_setup() {
    local dir=$1 mib=${2:-64}
    LAZY_SETUP_MISSING=
    _lazy_images_setup "$dir" "$mib" || LAZY_SETUP_MISSING=${LAZY_SETUP_MISSING:-"lazy_images_setup failed"}
    export LAZY_OCI_REF LAZY_OBD_REF LAZY_OBD_BYTES LAZY_OBD_CONVERT_JSON LAZY_CRI_REF LAZY_CRI_BYTES LAZY_SETUP_MISSING
}

_lazy_images_setup() {
    local dir=$1 mib=$2
    [[ -z $OVBD_SERVE_MISSING ]] || {
        LAZY_SETUP_MISSING=$OVBD_SERVE_MISSING
        return 1
    }
    mkdir -p "$dir"
    "$E2E_PYTHON" "$E2E_CTRD_LIB/mkimage.py" busybox "$dir/lazy-oci" v1 --busybox "$E2E_BUSYBOX" --large "$mib" \
        >/dev/null || return 1
    push_oci_layout "$dir/lazy-oci" v1 lazy:oci
    LAZY_OCI_REF=$REGISTRY/lazy:oci LAZY_OBD_REF=$REGISTRY/lazy:obd
    "$OVBD_SERVE_BIN" convert --json "$LAZY_OCI_REF" "$LAZY_OBD_REF" >"$dir/convert.json" 2>"$dir/convert.log" || {
        LAZY_SETUP_MISSING="ovbd convert $LAZY_OCI_REF: $(tail -n 5 "$dir/convert.log")"
        return 1
    }
    LAZY_OBD_BYTES=$(_convert_layer_bytes "$dir/convert.json")
    LAZY_OBD_CONVERT_JSON=$dir/convert.json
    # Big enough that the busybox binary a pod runs (its layer is fetched whole) is a small part of it.
    "$E2E_PYTHON" "$E2E_CTRD_LIB/mkimage.py" busybox "$dir/lazy-oci" v2 --busybox "$E2E_BUSYBOX" --large 32 \
        >/dev/null || return 1
    push_oci_layout "$dir/lazy-oci" v2 lazy:oci2
    LAZY_CRI_REF=$REGISTRY/lazy:cri
    "$OVBD_SERVE_BIN" convert --json "$REGISTRY/lazy:oci2" "$LAZY_CRI_REF" >"$dir/convert2.json" 2>"$dir/convert2.log" || {
        LAZY_SETUP_MISSING="ovbd convert lazy:oci2: $(tail -n 5 "$dir/convert2.log")"
        return 1
    }
    LAZY_CRI_BYTES=$(_convert_layer_bytes "$dir/convert2.json")
    e2e_log "lazy images: $LAZY_OBD_REF ($LAZY_OBD_BYTES bytes of layers), $LAZY_CRI_REF ($LAZY_CRI_BYTES bytes)"
}

# The bytes of the layer blobs `ovbd convert --json` reports.
_convert_layer_bytes() {
    grep -o '"size": *[0-9]*' "$1" | awk '{ s += $2 } END { print s + 0 }'
}

need_lazy_images() {
    [[ -z ${LAZY_SETUP_MISSING-unset} ]] || nok "no lazy images: ${LAZY_SETUP_MISSING:-lazy_images_setup was not called}"
}

# l. lazy pull: `ovbd rpull` of $LAZY_OBD_REF + `ctr run --snapshotter ovbd` of `cat /etc/hostname` print
#    what the full pull of $LAZY_OCI_REF under containerd's overlayfs prints, while the registry sends
#    less than a tenth of the image's layer bytes; the snapshots are remote layers (no layer file in their
#    directories); all of /data/large.bin read on demand has the original's sha256. Prints the lazy-pull
#    figures (wall time and blob bytes of both pulls + runs; scripts/bench-lazy.sh shows them). Needs the
#    registry's access log (E2E_REGISTRY_ACCESSLOG=1 before registry_start) and lazy_images_setup.
part_l() {
    need_serve || return 1
    need_lazy_images || return 1
    local b0 s0 ref_out bytes full_bytes full_s lazy_s want d n_remote=0
    b0=$(registry_blob_bytes) s0=$(date +%s.%N)
    try "ctr image pull $LAZY_OCI_REF (overlayfs)" ctr_pull "$LAZY_OCI_REF" overlayfs || return 1
    try "ctr run $LAZY_OCI_REF cat /etc/hostname (overlayfs)" \
        ctr_do run --rm "$LAZY_OCI_REF" e2e-l-ref cat /etc/hostname || return 1
    full_s=$(_seconds_since "$s0") full_bytes=$(($(registry_blob_bytes) - b0))
    ref_out=$OUT
    b0=$(registry_blob_bytes) s0=$(date +%s.%N)
    try "ovbd rpull $LAZY_OBD_REF" \
        "$OVBD_SERVE_BIN" rpull --address "$CTRD_ADDR" --namespace "$CTRD_NS" "$LAZY_OBD_REF" || return 1
    try "ctr run --snapshotter $E2E_SNAP $LAZY_OBD_REF cat /etc/hostname" \
        ctr_do run --rm --snapshotter "$E2E_SNAP" "$LAZY_OBD_REF" e2e-l cat /etc/hostname || return 1
    lazy_s=$(_seconds_since "$s0")
    bytes=$(($(registry_blob_bytes) - b0))
    _lazy_figures "$full_s" "$full_bytes" "$lazy_s" "$bytes"
    [[ -n $OUT && $OUT == "$ref_out" ]] || nok "ovbd printed '$OUT', overlayfs '$ref_out'" || return 1
    ((bytes * 10 < LAZY_OBD_BYTES)) ||
        nok "rpull + run fetched $bytes bytes of a $LAZY_OBD_BYTES-byte image: the layers were downloaded" || return 1
    ok "rpull + run: the same output ($OUT) with $bytes of $LAZY_OBD_BYTES bytes fetched" \
        "($(awk -v a="$bytes" -v b="$LAZY_OBD_BYTES" 'BEGIN { printf "%.2f", 100 * a / b }')%)"
    for d in "$OVBD_ROOT"/snapshots/*/; do
        if [[ -d $d/fs && -z $(ls -A "$d/fs") ]] && grep -qs '"digest"' "$d/block/config.v1.json"; then
            n_remote=$((n_remote + 1))
        fi
    done
    ((n_remote >= 1)) || nok "no snapshot is a remote layer (a config naming a blob, no layer file)" || return 1
    ok "$n_remote snapshots are remote layers (no layer file)"
    try "sha256sum /data/large.bin (overlayfs)" \
        ctr_do run --rm "$LAZY_OCI_REF" e2e-l-ref-sum sha256sum /data/large.bin || return 1
    want=${OUT%% *}
    b0=$(registry_blob_bytes)
    try "sha256sum /data/large.bin through ovbd" \
        ctr_do run --rm --snapshotter "$E2E_SNAP" "$LAZY_OBD_REF" e2e-l-sum sha256sum /data/large.bin || return 1
    [[ -n $want && ${OUT%% *} == "$want" ]] || nok "sha256 through ovbd: '${OUT%% *}', original '$want'" || return 1
    ok "/data/large.bin read on demand: sha256 ${want:0:16}... as the original ($(($(registry_blob_bytes) - b0)) bytes fetched)"
}

# _seconds_since T0: seconds (2 decimals) since T0 (`date +%s.%N`).
_seconds_since() {
    awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'
}

# _lazy_figures FULL_S FULL_BYTES LAZY_S LAZY_BYTES: the lazy-pull benchmark lines (figures, no assertion).
_lazy_figures() {
    local ratio pct
    ratio=$(awk -v a="$1" -v b="$3" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
    pct=$(awk -v a="$4" -v b="$LAZY_OBD_BYTES" 'BEGIN { printf "%.2f", 100 * a / b }')
    echo "==== lazy pull vs full pull, same run: image $LAZY_OBD_BYTES bytes of layer blobs"
    echo "  full (overlayfs): $1 s, $2 bytes | lazy (ovbd rpull): $3 s, $4 bytes ($pct% of the image)"
    echo "  speed-up ${ratio}x (goal >= 3x), fetched $pct% (goal <= 5%)"
}

# _ctr_has_image REF: the image is in our namespace.
_ctr_has_image() {
    ctr_do image ls -q 2>/dev/null | grep -qxF -- "$1"
}

# _rpull_once REF: `ovbd rpull` REF into our namespace unless it is there already.
_rpull_once() {
    _ctr_has_image "$1" && return 0
    try "ovbd rpull $1" "$OVBD_SERVE_BIN" rpull --address "$CTRD_ADDR" --namespace "$CTRD_NS" "$1"
}

# o. metrics and status: with a container running on the lazily pulled $LAZY_OBD_REF that read
#    /data/large.bin twice (page cache dropped between: the second read is served by the block cache), a
#    scrape of $OVBD_METRICS_ADDR/metrics shows device bytes read, Prepare calls answered OK, block cache
#    hits and registry requests; `ovbd status --json` lists the container's devices with bytes read and the
#    cache's hits. Both are printed. Needs [metrics] address = $OVBD_METRICS_ADDR and lazy_images_setup.
part_o() {
    need_serve || return 1
    need_lazy_images || return 1
    [[ -n ${OVBD_METRICS_ADDR:-} ]] || nok "no [metrics] address (OVBD_METRICS_ADDR) in the config" || return 1
    local text status n sum
    _rpull_once "$LAZY_OBD_REF" || return 1
    try "ctr run -d --snapshotter $E2E_SNAP $LAZY_OBD_REF sleep" \
        ctr_do run -d --snapshotter "$E2E_SNAP" "$LAZY_OBD_REF" e2e-o sleep 100000 || return 1
    try "sha256sum /data/large.bin" ctr_do task exec --exec-id o1 e2e-o sha256sum /data/large.bin || return 1
    sync
    echo 3 >/proc/sys/vm/drop_caches
    try "sha256sum /data/large.bin again" ctr_do task exec --exec-id o2 e2e-o sha256sum /data/large.bin || return 1
    try "scrape http://$OVBD_METRICS_ADDR/metrics" curl -fsS "http://$OVBD_METRICS_ADDR/metrics" || return 1
    text=$OUT
    # The sum of the samples whose line starts with $1.
    _o_sum() { awk -v p="$1" 'index($0, p) == 1 { s += $NF } END { printf "%d", s }' <<<"$text"; }
    n=$(_o_sum 'ovbd_device_read_bytes_total{')
    ((n > 64 << 20)) || nok "device bytes read: $n (a 64 MiB file was read)" || return 1
    ok "devices read $n bytes"
    n=$(_o_sum 'ovbd_grpc_calls_total{method="prepare",code="OK"}')
    ((n > 0)) || nok "Prepare calls answered OK: $n" || return 1
    ok "$n Prepare calls answered OK"
    n=$(_o_sum 'ovbd_cache_hits_total')
    ((n > 0)) || nok "block cache hits: $n" || return 1
    ok "$n block cache hits, $(_o_sum 'ovbd_cache_misses_total') misses"
    n=$(_o_sum 'ovbd_registry_requests_total{')
    ((n > 0)) || nok "registry requests: $n" || return 1
    ok "$n registry requests"
    grep -E '^ovbd_(device_(reads|read_bytes)_total|grpc_calls_total\{method="(prepare|commit)"|cache_(hits|misses|size_bytes)|registry_(requests|bytes)_total|snapshots_total|lazy_pull_first_byte_seconds_(count|sum))' \
        <<<"$text" | sed 's/^/    metrics| /'
    try "ovbd status --json" "$OVBD_SERVE_BIN" status --config "$OVBD_SERVE_CONFIG" --json || return 1
    status=$OUT
    n=$(jq '[.devices[] | select(.bytes_read > 0)] | length' <<<"$status")
    ((n > 0)) || nok "ovbd status: no device with bytes read: $status" || return 1
    n=$(jq '.cache.hit_reads' <<<"$status")
    ((n > 0)) || nok "ovbd status: cache hits $n" || return 1
    ok "ovbd status --json: devices with bytes read, $n cache hits"
    try "ovbd status" "$OVBD_SERVE_BIN" status --config "$OVBD_SERVE_CONFIG" || return 1
    sed 's/^/    status| /' <<<"$OUT"
    try "stop e2e-o" ctr_do task rm -f e2e-o || return 1
    try "rm e2e-o" ctr_do container rm e2e-o || return 1
}

# p. CRI: containerd's CRI plugin (its snapshotter ovbd, disable_snapshot_annotations = false) pulls
#    $LAZY_CRI_REF lazily (less than a tenth of its layer bytes fetched) and runs a pod that reads a file of
#    the image; the CRI snapshots are ovbd's. Then the image and the sandbox image are removed through CRI
#    (so part d's GC leaves nothing of them). Needs ctrd_start_cri and what part l needs.
part_p() {
    need_serve || return 1
    need_lazy_images || return 1
    [[ -n ${CTRD_CRI:-} && -n ${CRI_ENDPOINT:-} ]] || nok "containerd runs without its CRI plugin (ctrd_start_cri)" ||
        return 1
    local b0 bytes want rc=0
    mkdir -p "$E2E_PARTS_DIR"
    try "ctr image pull $LAZY_OCI_REF (overlayfs)" ctr_pull "$LAZY_OCI_REF" overlayfs || return 1
    try "the original's readme.txt" ctr_do run --rm "$LAZY_OCI_REF" e2e-p-ref cat /usr/share/doc/e2e/readme.txt ||
        return 1
    want=$OUT
    # The sandbox image (plain OCI, pulled whole) first: the bytes measured are the lazy image's.
    try "CRI PullImage $CTRD_SANDBOX_IMAGE" cri_pull "$CTRD_SANDBOX_IMAGE" || return 1
    b0=$(registry_blob_bytes)
    # The pod's stdout only (the client's progress goes to stderr, kept for a failure).
    OUT=$(cri_run "$LAZY_CRI_REF" cat /usr/share/doc/e2e/readme.txt 2>"$E2E_PARTS_DIR/p-cri.err") ||
        nok "a CRI pod on $LAZY_CRI_REF (exit $?): $(tail -n 20 "$E2E_PARTS_DIR/p-cri.err")" || rc=1
    bytes=$(($(registry_blob_bytes) - b0))
    if ((rc == 0)); then
        [[ -n $OUT && $OUT == "$want" ]] || nok "the pod read '$OUT', the original has '$want'" || rc=1
    fi
    if ((rc == 0)); then
        ((bytes * 10 < LAZY_CRI_BYTES)) ||
            nok "the CRI pull + pod fetched $bytes bytes of a $LAZY_CRI_BYTES-byte image: the layers were downloaded" ||
            rc=1
    fi
    ((rc == 0)) && ok "a CRI pod read the image's readme.txt after a lazy pull ($bytes of $LAZY_CRI_BYTES bytes fetched)"
    # shellcheck disable=SC2086  # $CTR_CRI is a command line
    if ((rc == 0)) && try "CRI snapshots through $E2E_SNAP" $CTR_CRI snapshots --snapshotter "$E2E_SNAP" ls; then
        (($(grep -c . <<<"$OUT") > 1)) || nok "no $E2E_SNAP snapshot in namespace k8s.io" || rc=1
        ((rc == 0)) && ok "$(($(grep -c . <<<"$OUT") - 1)) snapshots of namespace k8s.io are $E2E_SNAP's"
    fi
    # Whatever happened: no CRI image left for part d.
    try "CRI RemoveImage $LAZY_CRI_REF" cri_client rmi "$LAZY_CRI_REF" || rc=1
    try "CRI RemoveImage $CTRD_SANDBOX_IMAGE" cri_client rmi "$CTRD_SANDBOX_IMAGE" || rc=1
    return "$rc"
}

# u. upstream's own converted hello-world ($HELLO_OBD_REF: made by overlaybd's tools) pulled lazily with
#    `ovbd rpull`, into a namespace of its own, runs /hello; its image is removed again (GC, --sync).
part_u() {
    need_serve || return 1
    local ns=e2e-upstream-$$ rc=0
    # ctr_do (and the logged run it makes) in that namespace: CTR is dynamically scoped.
    local CTR="ctr --address $CTRD_ADDR --namespace $ns"
    try "ovbd rpull $HELLO_OBD_REF (namespace $ns)" \
        "$OVBD_SERVE_BIN" rpull --address "$CTRD_ADDR" --namespace "$ns" "$HELLO_OBD_REF" || return 1
    if try "ctr run /hello after ovbd rpull" ctr_do run --rm --snapshotter "$E2E_SNAP" "$HELLO_OBD_REF" e2e-u /hello; then
        grep -q "Hello from Docker!" <<<"$OUT" || nok "upstream's hello-world printed: $OUT" || rc=1
    else
        rc=1
    fi
    ((rc == 0)) && ok "upstream's converted hello-world, pulled lazily with ovbd rpull, ran /hello: Hello from Docker!"
    try "image rm --sync in $ns" ctr_do image rm --sync "$HELLO_OBD_REF" || rc=1
    rmdir "/run/containerd/runc/$ns" 2>/dev/null
    return "$rc"
}

# k. the block cache outlives ovbd serve: a container on $LAZY_OBD_REF (rpulled) reads /etc/hostname, ovbd
#    serve stops (SIGTERM) and starts again, a second container reads it again with 0 blob bytes fetched.
part_k() {
    need_serve || return 1
    need_lazy_images || return 1
    local want b0 bytes
    _rpull_once "$LAZY_OBD_REF" || return 1
    try "ctr run cat /etc/hostname" ctr_do run --rm --snapshotter "$E2E_SNAP" "$LAZY_OBD_REF" e2e-k1 cat /etc/hostname ||
        return 1
    want=$OUT
    ovbd_serve_stop || nok "stopping ovbd serve" || return 1
    ovbd_serve_start || nok "ovbd serve did not restart" || return 1
    b0=$(registry_blob_bytes)
    try "ctr run after the restart" ctr_do run --rm --snapshotter "$E2E_SNAP" "$LAZY_OBD_REF" e2e-k2 cat /etc/hostname ||
        return 1
    bytes=$(($(registry_blob_bytes) - b0))
    [[ -n $OUT && $OUT == "$want" ]] || nok "after the restart: '$OUT', before: '$want'" || return 1
    ((bytes == 0)) || nok "after a restart of ovbd serve the same read fetched $bytes bytes" || return 1
    ok "after a restart of ovbd serve the same read is served from the block cache (0 bytes fetched)"
}

# s. a frozen registry (SIGSTOP): on $LAZY_CRI_REF (rpulled; /etc/hostname read first, nothing reads its
#    /data/large.bin elsewhere), a container starts on cached files, reading an uncached part of
#    /data/large.bin fails with an I/O error within the registry deadline ($OVBD_REGISTRY_DEADLINE s, the
#    [registry] timeout_secs the caller configured) while a cached file still reads and another device
#    (hello-world, pulled whole) runs a container; once the registry is back, the same read works.
part_s() {
    need_serve || return 1
    need_lazy_images || return 1
    local deadline=${OVBD_REGISTRY_DEADLINE:-} want s0 took_fault rc=0 dd_rc=0 err cached hello held=1
    [[ $deadline =~ ^[0-9]+$ ]] || nok "OVBD_REGISTRY_DEADLINE (the [registry] timeout_secs) is not set" || return 1
    try "pull $HELLO_OBD_REF through ovbd" ctr_pull "$HELLO_OBD_REF" "$E2E_SNAP" || return 1
    _rpull_once "$LAZY_CRI_REF" || return 1
    try "ctr run cat /etc/hostname" ctr_do run --rm --snapshotter "$E2E_SNAP" "$LAZY_CRI_REF" e2e-s0 cat /etc/hostname ||
        return 1
    want=$OUT
    kill -STOP "$REGISTRY_PID" || nok "freezing the registry" || return 1
    s0=$SECONDS
    # A long-running container keeps the image's device attached while we read through it.
    if ctr_do run -d --snapshotter "$E2E_SNAP" "$LAZY_CRI_REF" e2e-s-hold sleep 3600 >/dev/null; then
        err=$(ctr_do task exec --exec-id e1 e2e-s-hold dd if=/data/large.bin of=/dev/null bs=1M skip=20 count=4 2>&1) || dd_rc=$?
        took_fault=$((SECONDS - s0))
        cached=$(ctr_do task exec --exec-id e2 e2e-s-hold cat /etc/hostname 2>&1)
        hello=$(ctr_do run --rm --snapshotter "$E2E_SNAP" "$HELLO_OBD_REF" e2e-s-hello /hello 2>&1)
    else
        held=0
    fi
    kill -CONT "$REGISTRY_PID"
    if ((held == 0)); then
        nok "starting a container with the registry frozen (its files were cached: it should start)"
        return 1
    fi
    if ((dd_rc == 0)); then
        nok "reading uncached data with the registry frozen succeeded?" || rc=1
    elif ! grep -qi "error" <<<"$err"; then
        nok "dd with the registry frozen: exit $dd_rc, but: $err" || rc=1
    elif ((took_fault > deadline * 3 + 30)); then
        nok "the failing read took ${took_fault}s (deadline ${deadline}s)" || rc=1
    elif [[ -z $want || $cached != "$want" ]]; then
        nok "a cached file did not read while the registry was frozen: '$cached' (want '$want')" || rc=1
    elif ! grep -q "Hello from Docker!" <<<"$hello"; then
        nok "another device did not work while the registry was frozen: $hello" || rc=1
    else
        ok "registry frozen: uncached read failed in ${took_fault}s (${err//$'\n'/ }), cached files still read, another device ran /hello"
        if try "the same read after the registry came back" \
            ctr_do task exec --exec-id e3 e2e-s-hold dd if=/data/large.bin of=/dev/null bs=1M skip=20 count=4; then
            ok "registry back: the same read works"
        else
            rc=1
        fi
    fi
    ctr_do task rm -f e2e-s-hold >/dev/null 2>&1 || nok "removing task e2e-s-hold" || rc=1
    ctr_do container rm e2e-s-hold >/dev/null 2>&1 || nok "removing container e2e-s-hold" || rc=1
    return "$rc"
}

# w. background download ([download] enable, no delay, no rate limit; ovbd serve restarted with it): after
#    a container on $LAZY_OBD_REF (rpulled), ovbd downloads each of its remote layers (the lowers of its
#    device config with a blob digest and an empty layer directory) whole into its directory, each with its
#    blob's sha256 (a layer digest `ovbd convert --json` printed). The image's top layer (its own) must be
#    one of them; its lower layers are busybox:obd's (part h), local if h pulled that first (ovbd binds a
#    snapshot to its chain ID, across namespaces): host-ovbd.sh runs h after w, so all 4 are remote. The
#    config is restored (download off) and ovbd serve restarted after.
part_w() {
    need_serve || return 1
    need_lazy_images || return 1
    local digests d f i n_done rc=0
    local -A remote=()
    mapfile -t digests < <(grep -o '"digest": *"sha256:[0-9a-f]*"' "$LAZY_OBD_CONVERT_JSON" | grep -o 'sha256:[0-9a-f]*')
    ((${#digests[@]} == 4)) || nok "$LAZY_OBD_CONVERT_JSON lists ${#digests[@]} layer digests, not 4" || return 1
    _rpull_once "$LAZY_OBD_REF" || return 1
    # (a layer's block/config.v1.json is written when a device first stacks it)
    try "ctr run" ctr_do run --rm --snapshotter "$E2E_SNAP" "$LAZY_OBD_REF" e2e-w0 cat /etc/hostname || return 1
    # Every lower a device config stacks: its layer dir (empty: remote) and its blob's digest.
    while read -r d f; do
        [[ -d $d && -z $(ls -A "$d") ]] && printf '%s\n' "${digests[@]}" | grep -qxF -- "$f" && remote[$d]=$f
    done < <(jq -r '.lowers[]? | select(.dir and .digest) | "\(.dir) \(.digest)"' "$OVBD_ROOT"/snapshots/*/block/config.v1.json 2>/dev/null)
    printf '%s\n' "${remote[@]}" | grep -qxF -- "${digests[-1]}" ||
        nok "the top layer ${digests[-1]} of $LAZY_OBD_REF is not a remote layer (remote: ${remote[*]})" || return 1
    grep -qx 'enable = false' "$OVBD_SERVE_CONFIG" || nok "no '[download] enable = false' in $OVBD_SERVE_CONFIG" || return 1
    ovbd_serve_stop || nok "stopping ovbd serve" || return 1
    cp "$OVBD_SERVE_CONFIG" "$OVBD_SERVE_CONFIG.no-download"
    sed -i 's/^enable = false$/enable = true\ndelay_secs = 0\nmax_mbps = 0/' "$OVBD_SERVE_CONFIG"
    ovbd_serve_start || nok "ovbd serve did not restart with [download] enable" || rc=1
    ((rc == 0)) && { try "ctr run (download)" ctr_do run --rm --snapshotter "$E2E_SNAP" "$LAZY_OBD_REF" e2e-w cat /etc/hostname || rc=1; }
    for ((i = 0; rc == 0 && i < 180; i++)); do
        n_done=0
        for d in "${!remote[@]}"; do
            f=$d/overlaybd.commit
            [[ -s $f && $(sha256sum "$f" | cut -d' ' -f1) == "${remote[$d]#sha256:}" ]] && n_done=$((n_done + 1))
        done
        ((n_done == ${#remote[@]})) && break
        sleep 2
    done
    if ((rc == 0)); then
        ((n_done == ${#remote[@]})) ||
            nok "background download: $n_done of ${#remote[@]} remote layers downloaded" \
                "($(grep -i download "$OVBD_SERVE_LOG" | tail -n 5))" || rc=1
        ((rc == 0)) && ok "background download: all ${#remote[@]} remote layers of $LAZY_OBD_REF (of its" \
            "${#digests[@]}) downloaded whole, each with its blob's sha256"
    fi
    ovbd_serve_stop || nok "stopping ovbd serve" || rc=1
    cp "$OVBD_SERVE_CONFIG.no-download" "$OVBD_SERVE_CONFIG"
    ovbd_serve_start || nok "ovbd serve did not restart without download" || rc=1
    return "$rc"
}

# i. Kubernetes pull secrets through [cri_proxy]: $LAZY_OBD_REF's repository behind a token-auth front
#    (a Bearer realm that wants Basic alice:<password>). Pulled through containerd's CRI with the auth, a
#    pod's lazy read fails (ovbd has no credentials: 401 in its log); ovbd restarted with [cri_proxy] and the
#    image pulled with the auth through ovbd's CRI socket, a pod reads the image's readme.txt. Needs
#    ctrd_start_cri and lazy_images_setup.
part_i() {
    need_serve || return 1
    need_lazy_images || return 1
    [[ -n ${CTRD_CRI:-} && -n ${CRI_ENDPOINT:-} ]] || nok "containerd runs without its CRI plugin (ctrd_start_cri)" ||
        return 1
    local port front fpid image want rc=0 log0 proxy_sock=$OVBD_SERVE_DIR/cri-image.sock
    mkdir -p "$E2E_PARTS_DIR"
    for ((port = 5400; port < 5500; port++)); do
        _port_busy 127.0.0.1 "$port" || break
    done
    front=127.0.0.1:$port
    cat >"$E2E_PARTS_DIR/token-front.py" <<'PY'
import base64, http.client, http.server, os, sys
listen, upstream = sys.argv[1], sys.argv[2]
basic = "Basic " + base64.b64encode(b"alice:" + os.environ["FRONT_PASSWORD"].encode()).decode()
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): sys.stderr.write("%s %s %s\n" % (self.command, self.path, self.headers.get("Authorization", "-")[:6]))
    def reply(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers: self.send_header(k, v)
        self.send_header("Content-Length", str(len(body))); self.end_headers()
        if self.command != "HEAD": self.wfile.write(body)
    def handle_one(self):
        auth = self.headers.get("Authorization")
        if self.path.startswith("/token"):
            return self.reply(200, b'{"token":"e2e-token","expires_in":300}') if auth == basic else self.reply(401)
        if auth != "Bearer e2e-token":
            return self.reply(401, b"", [("WWW-Authenticate", 'Bearer realm="http://%s/token",service="e2e"' % listen)])
        c = http.client.HTTPConnection(upstream)
        hdrs = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")}
        c.request(self.command, self.path, headers=hdrs)
        r = c.getresponse(); body = r.read()
        keep = [(k, v) for k, v in r.getheaders() if k.lower() in ("content-type", "docker-content-digest", "content-range", "location")]
        if self.command == "HEAD":
            keep.append(("Content-Length", r.getheader("Content-Length", "0")))
            self.send_response(r.status)
            for k, v in keep: self.send_header(k, v)
            return self.end_headers()
        self.reply(r.status, body, keep)
    def do_POST(self):  # containerd's OAuth2 password grant
        form = dict(kv.split("=", 1) for kv in self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode().split("&") if "=" in kv)
        ok = self.path.startswith("/token") and form.get("username") == "alice" and form.get("password") == os.environ["FRONT_PASSWORD"]
        self.reply(200, b'{"access_token":"e2e-token","expires_in":300}') if ok else self.reply(401)
    do_GET = do_HEAD = handle_one
http.server.ThreadingHTTPServer((listen.split(":")[0], int(listen.split(":")[1])), H).serve_forever()
PY
    FRONT_PASSWORD=e2e-s3cret "$E2E_PYTHON" "$E2E_PARTS_DIR/token-front.py" "$front" "$REGISTRY" \
        2>"$E2E_PARTS_DIR/token-front.log" &
    fpid=$!
    e2e_on_exit "kill $fpid 2>/dev/null"
    e2e_wait "$E2E_READY_TIMEOUT" "token front $front" curl -s -o /dev/null "http://$front/v2/" ||
        nok "the token front did not start: $(tail -n 5 "$E2E_PARTS_DIR/token-front.log")" || return 1
    [[ $(curl -s -o /dev/null -w '%{http_code}' "http://$front/v2/") == 401 ]] ||
        nok "the token front lets anonymous requests through" || rc=1
    cri_registry_http "$front"
    image=$front/${LAZY_OBD_REF#"$REGISTRY"/}
    want="ovbd e2e busybox image"
    # Without the proxy: containerd pulls with the auth, ovbd has none for the lazy reads.
    log0=$(wc -l <"$OVBD_SERVE_LOG")
    try "CRI PullImage $image with auth (containerd's socket)" \
        env OVBD_E2E_CRI_PASSWORD=e2e-s3cret "$E2E_CRI_CLIENT" pull --endpoint "$CRI_ENDPOINT" --username alice "$image" ||
        rc=1
    if ((rc == 0)); then
        if OUT=$(cri_run "$image" cat /usr/share/doc/e2e/readme.txt 2>"$E2E_PARTS_DIR/k-noauth.err") && [[ $OUT == "$want" ]]; then
            nok "a pod read the private image lazily without its pull secret reaching ovbd" || rc=1
        # (Not `tail | grep -q` under pipefail: grep stops at the first match, and tail, still
        # writing a long debug log, dies of SIGPIPE and fails the test.)
        elif grep -q "401" < <(tail -n "+$log0" "$OVBD_SERVE_LOG"); then
            ok "without the proxy the lazy read fails: $(tail -n "+$log0" "$OVBD_SERVE_LOG" | grep -m1 -o '[^ ]*token from.*401[^(]*')"
        else
            nok "the pod failed, but ovbd's log names no 401: $(tail -n 5 "$E2E_PARTS_DIR/k-noauth.err")" || rc=1
        fi
    fi
    try "CRI RemoveImage $image" cri_client rmi "$image"
    # With the proxy: ovbd restarted as the image service, the pull secret reaches the lazy reads.
    if ((rc == 0)); then
        printf '[cri_proxy]\nlisten = "%s"\nupstream = "%s"\n' "$proxy_sock" "$CRI_ENDPOINT" >>"$OVBD_SERVE_CONFIG"
        ovbd_serve_stop
        ovbd_serve_start || nok "ovbd serve with [cri_proxy] did not start" || rc=1
    fi
    if ((rc == 0)); then
        [[ $(stat -c %a "$proxy_sock") == 600 ]] || nok "$proxy_sock is not 0600" || rc=1
        try "CRI PullImage $image with auth through ovbd's CRI socket" \
            env OVBD_E2E_CRI_PASSWORD=e2e-s3cret "$E2E_CRI_CLIENT" pull --endpoint "$proxy_sock" --username alice "$image" ||
            rc=1
    fi
    if ((rc == 0)); then
        OUT=$(cri_run "$image" cat /usr/share/doc/e2e/readme.txt 2>"$E2E_PARTS_DIR/k-auth.err") ||
            nok "a pod on $image after the pull through the proxy: $(tail -n 20 "$E2E_PARTS_DIR/k-auth.err")" || rc=1
        ((rc == 0)) && { [[ $OUT == "$want" ]] || nok "the pod read '$OUT', want '$want'" || rc=1; }
        ((rc == 0)) && ok "with the pull secret captured by ovbd's CRI proxy a pod read '$OUT';" \
            "$(grep -c 'with the credentials of a CRI PullImage' "$OVBD_SERVE_LOG") authentications with it" \
            "($(grep -m1 -o 'keeping its auth.*' "$OVBD_SERVE_LOG"))"
        ! grep -q e2e-s3cret "$OVBD_SERVE_LOG" || nok "ovbd's log holds the password" || rc=1
    fi
    try "CRI RemoveImage $image" cri_client rmi "$image"
    cri_client rmi "$CTRD_SANDBOX_IMAGE" >/dev/null 2>&1
    kill "$fpid" 2>/dev/null
    return "$rc"
}

# z. `ovbd serve` stops (SIGTERM) cleanly: no FUSE mount or other mount under its root, no ovbd block
#    device left. Last: it leaves ovbd stopped.
part_z() {
    need_serve || return 1
    local pid mounts devs
    pid=$(ovbd_serve_pid) || nok "ovbd serve is not running" || return 1
    kill "$pid" 2>/dev/null || nok "kill $pid" || return 1
    if ! e2e_wait 60 "ovbd serve (pid $pid) to exit" _pid_gone "$pid"; then
        _threads_where "$pid"
        nok "ovbd serve did not exit on SIGTERM" || return 1
    fi
    rm -f "$OVBD_SERVE_PIDFILE"
    mounts=$(e2e_mounts_under "$OVBD_ROOT")
    devs=$(ovbd_block_devices)
    [[ -z $mounts ]] || nok "mounts left under $OVBD_ROOT: $(tr '\n' ' ' <<<"$mounts")" || return 1
    [[ -z $devs ]] || nok "block devices left: $(tr '\n' ' ' <<<"$devs")" || return 1
    ok "ovbd serve exited on SIGTERM leaving no mount under its root and no block device"
}

_pid_gone() { ! kill -0 "$1" 2>/dev/null; }

# _threads_where PID: each thread's name, state and kernel wait channel (and kernel stack), to stderr.
_threads_where() {
    local t
    for t in /proc/"$1"/task/*; do
        echo "  thread ${t##*/} $(cat "$t/comm" 2>/dev/null): $(awk '/^State/ {print $2}' "$t/status" 2>/dev/null)" \
            "wchan $(cat "$t/wchan" 2>/dev/null)" >&2
        sed 's/^/      /' "$t/stack" 2>/dev/null | head -n 8 >&2
    done
}

# r. prefetch (upstream's acceleration layer): an image of its own (busybox + a 16 MiB /data/large.bin no
#    other part has) converted with `ovbd convert --priority-list` naming /data/large.bin, pushed, pulled
#    lazily with ovbd rpull. A long-running container attaches the device; ovbd's log reports the replay
#    of the list (at least the file's bytes read), and then reading the file through the container fetches
#    nothing from the registry and has the original's sha256. The acceleration layer's trace is kept where
#    containerd would unpack it (<snapshot>/fs/trace). Then `ovbd record-trace` of a sha256sum of the file
#    in that image: pulled lazily, the device replays exactly the recorded reads and the file reads with
#    nothing fetched. Needs ovbd serve and a registry.
part_r() {
    need_serve || return 1
    local dir=$E2E_PARTS_DIR/r oci_ref obd_ref want line i b0 fetched
    mkdir -p "$dir"
    try "mkimage busybox + 16 MiB large.bin" \
        "$E2E_PYTHON" "$E2E_CTRD_LIB/mkimage.py" busybox "$dir/oci" v1 --busybox "$E2E_BUSYBOX" --large 16 ||
        return 1
    push_oci_layout "$dir/oci" v1 prefetch:oci
    oci_ref=$REGISTRY/prefetch:oci obd_ref=$REGISTRY/prefetch:accel
    printf '/data/large.bin\n' >"$dir/list"
    try "ovbd convert --priority-list" \
        "$OVBD_SERVE_BIN" convert --json --priority-list "$dir/list" "$oci_ref" "$obd_ref" || return 1
    grep -q '"acceleration_layer"' <<<"$OUT" || nok "convert --json names no acceleration layer: $OUT" || return 1
    try "ctr pull $oci_ref (overlayfs)" ctr_pull "$oci_ref" overlayfs || return 1
    try "sha256sum /data/large.bin (overlayfs)" \
        ctr_do run --rm "$oci_ref" e2e-r-ref sha256sum /data/large.bin || return 1
    want=${OUT%% *}
    _rpull_once "$obd_ref" || return 1
    try "ctr run -d --snapshotter $E2E_SNAP $obd_ref sleep" \
        ctr_do run -d --snapshotter "$E2E_SNAP" "$obd_ref" e2e-r sleep 100000 || return 1
    # The replay runs on its own after attach: wait (bounded) for its report in the log.
    for ((i = 0; i < 120; i++)); do
        line=$(grep -a 'prefetch of' "$OVBD_SERVE_LOG" | tail -n 1)
        [[ -n $line ]] && break
        line=$(grep -a 'prefetch not replayed' "$OVBD_SERVE_LOG" | tail -n 1)
        [[ -n $line ]] && break
        sleep 1
    done
    [[ $line == *"prefetch of"* ]] || nok "no prefetch report in the log: '${line:-nothing}'" || return 1
    [[ $line =~ ([0-9]+)\ bytes ]] && ((BASH_REMATCH[1] >= 16 << 20)) ||
        nok "the prefetch read less than the 16 MiB file: $line" || return 1
    ok "prefetch replayed: ${line##*: }"
    ls "$OVBD_ROOT"/snapshots/*/fs/trace >/dev/null 2>&1 || nok "no snapshot keeps the trace in fs/trace" || return 1
    b0=$(registry_blob_bytes)
    try "sha256sum /data/large.bin through ovbd" \
        ctr_do task exec --exec-id r1 e2e-r sha256sum /data/large.bin || return 1
    fetched=$(($(registry_blob_bytes) - b0))
    [[ -n $want && ${OUT%% *} == "$want" ]] || nok "sha256 through ovbd: '${OUT%% *}', original '$want'" || return 1
    ((fetched == 0)) || nok "reading the prefetched file fetched $fetched bytes" || return 1
    ok "/data/large.bin was prefetched: read with 0 bytes fetched, sha256 ${want:0:16}... as the original"
    try "stop e2e-r" ctr_do task rm -f e2e-r || return 1
    try "rm e2e-r" ctr_do container rm e2e-r || return 1

    # `ovbd record-trace`: the same image (its list layer replaced) with the trace of a sha256sum of the
    # file; pulled lazily, its device replays exactly the recorded reads, and the file then reads with
    # nothing fetched.
    local trace_ref=$REGISTRY/prefetch:trace records before
    try "ovbd record-trace" "$OVBD_SERVE_BIN" record-trace --json "$obd_ref" "$trace_ref" -- \
        sha256sum /data/large.bin || return 1
    [[ $OUT =~ \"records\":\ ([0-9]+) ]] || nok "record-trace printed no record count: $OUT" || return 1
    records=${BASH_REMATCH[1]}
    [[ $OUT == *"$want"* ]] || nok "sha256sum did not run in the image: $OUT" || return 1
    ok "record-trace: $records reads recorded while sha256sum ran, pushed as $trace_ref"
    before=$(grep -ac 'prefetch of' "$OVBD_SERVE_LOG")
    _rpull_once "$trace_ref" || return 1
    try "ctr run -d --snapshotter $E2E_SNAP $trace_ref sleep" \
        ctr_do run -d --snapshotter "$E2E_SNAP" "$trace_ref" e2e-r2 sleep 100000 || return 1
    for ((i = 0; i < 120; i++)); do
        (($(grep -ac 'prefetch of' "$OVBD_SERVE_LOG") > before)) && break
        sleep 1
    done
    line=$(grep -a 'prefetch of' "$OVBD_SERVE_LOG" | tail -n 1)
    [[ $line == *": $records reads, "*", 0 failed, 0 skipped"* ]] ||
        nok "the replay is not the $records recorded reads: '${line:-nothing}'" || return 1
    ok "the recorded trace replayed: ${line##*: }"
    b0=$(registry_blob_bytes)
    try "sha256sum /data/large.bin through ovbd (traced)" \
        ctr_do task exec --exec-id r2 e2e-r2 sha256sum /data/large.bin || return 1
    fetched=$(($(registry_blob_bytes) - b0))
    [[ ${OUT%% *} == "$want" ]] || nok "sha256 through ovbd (traced): '${OUT%% *}'" || return 1
    ((fetched == 0)) || nok "reading the traced file fetched $fetched bytes" || return 1
    ok "/data/large.bin was prefetched by the recorded trace: 0 bytes fetched"
    try "stop e2e-r2" ctr_do task rm -f e2e-r2 || return 1
    try "rm e2e-r2" ctr_do container rm e2e-r2 || return 1
}
