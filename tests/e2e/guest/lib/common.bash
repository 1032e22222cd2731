# shellcheck shell=bash disable=SC2034  # (variables are for the sourcing tests)
# Shared helpers for the ovbd device tests in tests/e2e/guest/*.sh (sourced, not run: the name does not
# match the runner's *.sh glob).  Runs inside the test guest only.
#
# Provides: fail/pass/note, $OVBD (a private copy of $OVBD_BIN, default target/debug/ovbd),
# $HELLO_BLOB/$HELLO_SHA/$EXT4_TGZ, $WORK (a fresh work dir under /tmp, removed on exit), write_config,
# attach, detach_dev, e2fsck_report/e2fsck_clean, extract_base, assert_no_ublk, and an EXIT trap that
# unmounts everything under $WORK, detaches every device this test attached, stops its servers and then
# removes $WORK.  Tests add their own cleanup with `on_cleanup CMD`.

fail() {
    echo "FAIL: $*" >&2
    exit 1
}
pass() { echo "  pass: $*"; }
note() { echo "  ... $*"; }

[[ ${OVBD_GUEST:-} == 1 ]] || fail "not inside the test guest (run via tests/e2e/run-guest-tests.sh)"
: "${OVBD_REPO:?OVBD_REPO is not set (run via tests/e2e/run-guest-tests.sh)}"

ovbd_built=${OVBD_BIN:-$OVBD_REPO/target/debug/ovbd}
[[ -x $ovbd_built ]] || fail "$ovbd_built not built (run cargo build on the host first)"
HELLO_BLOB=$OVBD_REPO/tests/fixtures/hello-world-oci/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d
HELLO_SHA=d3f7d10e296e5c626ea78539cb38cd8dffd043bea3627da35ce3b20c0ac68014
EXT4_TGZ=$OVBD_REPO/tests/fixtures/ext4_64.tar.gz
[[ -s $HELLO_BLOB && -s $EXT4_TGZ ]] || fail "fixtures missing under $OVBD_REPO/tests/fixtures"

modprobe ublk_drv || fail "modprobe ublk_drv"
[[ -c /dev/ublk-control ]] || fail "/dev/ublk-control missing"

# Nothing else may be attached when a test starts, or the final "no ublk devices left" check means nothing.
shopt -s nullglob
leftover=(/dev/ublkb* /dev/ublkc*)
((${#leftover[@]} == 0)) || fail "ublk devices present before the test started: ${leftover[*]}"
shopt -u nullglob

WORK=$(mktemp -d "/tmp/$(basename "$0" .sh).XXXXXX")
# Run a private copy: the host's target/ is live in the guest, and a `cargo build` there during the test
# would otherwise swap the binary between two steps (or under an exec).
mkdir "$WORK/bin"
cp "$ovbd_built" "$WORK/bin/ovbd" || fail "copying $ovbd_built"
OVBD=$WORK/bin/ovbd
# Device records (for `ovbd device list/detach`) and server logs stay inside the test's work dir.
export OVBD_RUN_DIR=$WORK/run

_cleanups=()
on_cleanup() { _cleanups+=("$*"); }

# Every ublk device present now (ids).
ublk_ids() {
    local c
    for c in /sys/class/ublk-char/ublkc*; do
        [[ -e $c ]] && echo "${c##*/ublkc}"
    done
    return 0
}

# Server pids of the devices in our run dir.
server_pids() {
    local f
    for f in "$OVBD_RUN_DIR"/devices/*.json; do
        [[ -e $f ]] && sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$f"
    done | sort -u
}

_cleanup() {
    local rc=$? i m id pid
    set +e
    for ((i = ${#_cleanups[@]} - 1; i >= 0; i--)); do
        eval "${_cleanups[i]}"
    done
    # Unmount anything under $WORK, deepest first.
    while read -r m; do
        umount "$m" 2>/dev/null || umount -l "$m"
    done < <(findmnt -rn -o TARGET | grep -F "$WORK/" | sort -r)
    local pids
    pids=$(server_pids)
    for id in $(ublk_ids); do
        timeout 60 "$OVBD" device detach "$id" >/dev/null 2>&1
    done
    for pid in $pids; do
        kill "$pid" 2>/dev/null
    done
    if ((rc != 0)); then
        for f in "$OVBD_RUN_DIR"/logs/*.log; do
            [[ -s $f ]] || continue
            echo "--- tail of $f" >&2
            tail -n 30 "$f" >&2
        done
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap _cleanup EXIT

# write_config OUT [--upper DATA INDEX] [--result FILE] LOWER...
# Writes an overlaybd config.v1.json; LOWERs bottom to top (a directory becomes {"dir":...}).
write_config() {
    local out=$1 upper_data='' upper_index='' result=''
    shift
    while (($#)); do
        case $1 in
            --upper)
                upper_data=$2 upper_index=$3
                shift 3
                ;;
            --result)
                result=$2
                shift 2
                ;;
            *) break ;;
        esac
    done
    local lowers=() l
    for l in "$@"; do
        if [[ -d $l ]]; then
            lowers+=("{\"dir\":\"$l\"}")
        else
            lowers+=("{\"file\":\"$l\"}")
        fi
    done
    {
        printf '{"lowers":[%s]' "$(
            IFS=,
            echo "${lowers[*]}"
        )"
        [[ -n $upper_data ]] && printf ',"upper":{"index":"%s","data":"%s"}' "$upper_index" "$upper_data"
        [[ -n $result ]] && printf ',"resultFile":"%s"' "$result"
        printf '}\n'
    } >"$out"
}

# attach CONFIG...: attaches in the background, prints the device paths (one per line); fails the test
# if attach fails.
attach() {
    local out
    # The background server logs to $OVBD_RUN_DIR/logs (shown when a test fails); info level by default.
    out=$(OVBD_LOG=${OVBD_LOG:-info} timeout 120 "$OVBD" device attach --background "$@") ||
        fail "ovbd device attach $* (exit $?)"
    [[ -n $out ]] || fail "ovbd device attach $* printed no device"
    echo "$out"
}

# detach_dev /dev/ublkbN|N: detaches and checks both nodes are gone.
detach_dev() {
    local id=${1#/dev/ublkb}
    timeout 90 "$OVBD" device detach "$id" || fail "ovbd device detach $id"
    [[ ! -e /dev/ublkb$id && ! -e /dev/ublkc$id ]] || fail "/dev/ublk[bc]$id still present after detach"
}

# wait_gone PID [SECS]: waits for a process to exit.
wait_gone() {
    local pid=$1 secs=${2:-30} i
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    return 1
}

# e2fsck_report DEV: runs e2fsck -fn; prints its exit code on the first line, then the lines that are not
# progress/summary noise (version banner, "Pass N:", the final statistics line, blank lines), with the
# device path replaced by DEV.
e2fsck_report() {
    local dev=$1 out rc=0
    out=$(timeout 300 e2fsck -fn "$dev" 2>&1) || rc=$?
    echo "$rc"
    grep -vE '^(e2fsck [0-9.]+ \(.*\)|Pass [0-9A-Z]+: .*|.*: [0-9]+/[0-9]+ files \(.*\), [0-9]+/[0-9]+ blocks|)$' <<<"$out" |
        sed "s|$dev|DEV|g" || true
}

# e2fsck_clean DEV: e2fsck -fn must exit 0 and report nothing.
e2fsck_clean() {
    local rep
    rep=$(e2fsck_report "$1")
    [[ $rep == 0 ]] || fail "e2fsck -fn $1 is not clean: $rep"
}

# extract_base DIR: extracts the empty 64 GiB ext4 base layer; prints its path.
extract_base() {
    tar -xzf "$EXT4_TGZ" -C "$1" || fail "extracting $EXT4_TGZ"
    [[ -s $1/ext4_64 ]] || fail "no ext4_64 in $EXT4_TGZ"
    echo "$1/ext4_64"
}

# assert_no_ublk: no ublk block or char device is left.
assert_no_ublk() {
    local left=()
    shopt -s nullglob
    left=(/dev/ublkb* /dev/ublkc*)
    shopt -u nullglob
    ((${#left[@]} == 0)) || fail "ublk devices left: ${left[*]}"
    pass "no /dev/ublkb* or /dev/ublkc* left"
}

# timer: `t0=$SECONDS; ...; took $t0 WHAT`
took() { note "$2: $((SECONDS - $1)) s"; }
