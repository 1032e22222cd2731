#!/usr/bin/env bash
# Guest test: at start `ovbd serve` deletes ublk devices it made that no snapshot needs any more
# (kept by the kernel for recovery after the daemon died), and leaves other ublk devices alone,
# also one whose id it once recorded but which the driver now reports with another server.
set -euo pipefail

fail() {
    echo "FAIL: $*" >&2
    exit 1
}
pass() { echo "  pass: $*"; }

[[ ${OVBD_GUEST:-} == 1 ]] || fail "not inside the test guest (run via tests/e2e/run-guest-tests.sh)"
work=$(mktemp -d /tmp/orphans.XXXXXX)
ovbd=$work/ovbd
cp "${OVBD_REPO:?}/target/debug/ovbd" "$ovbd" # a host build must not swap it mid-test
blob=$OVBD_REPO/tests/fixtures/hello-world-oci/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d
modprobe ublk_drv
serve_pid=
cleanup() {
    set +e
    [[ -n $serve_pid ]] && kill "$serve_pid" && wait "$serve_pid"
    for id in $("$ovbd" device list --json 2>/dev/null | tr -d ' \n' | grep -o '"id":[0-9]*' | cut -d: -f2); do
        "$ovbd" device detach "$id" >/dev/null 2>&1
    done
    rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/cfg.json" <<JSON
{"lowers":[{"file":"$blob"}]}
JSON
# Two devices whose server dies: the kernel keeps both for recovery.
mapfile -t devs < <("$ovbd" device attach --background "$work/cfg.json" "$work/cfg.json")
server=$("$ovbd" device list --json | tr -d ' \n' | grep -o '"pid":[0-9]*' | head -1 | cut -d: -f2)
kill -9 "$server"
sleep 1
ours=${devs[0]#/dev/ublkb}
theirs=${devs[1]#/dev/ublkb}
[[ -e /sys/class/ublk-char/ublkc$ours && -e /sys/class/ublk-char/ublkc$theirs ]] || fail "devices not kept after the server died"

# The snapshotter recorded the first as its own (its server's pid and its size, as the driver
# reports them); no snapshot needs it. The record of the second names another server: its id was
# reused by another program after a restart, so it must be left alone.
mkdir -p "$work/root/devices"
sectors=$(cat "/sys/block/ublkb$ours/size")
echo "{\"pid\":$server,\"sectors\":$sectors}" >"$work/root/devices/$ours"
echo "{\"pid\":$((server + 1)),\"sectors\":$sectors}" >"$work/root/devices/$theirs"
cat >"$work/ovbd.toml" <<TOML
root = "$work/root"
socket = "$work/ovbd.sock"
TOML
"$ovbd" serve --config "$work/ovbd.toml" >"$work/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 100); do [[ -S $work/ovbd.sock ]] && break; sleep 0.1; done
[[ -S $work/ovbd.sock ]] || fail "ovbd serve did not start: $(cat "$work/serve.log")"
timeout 30 bash -c "while [[ -e /sys/class/ublk-char/ublkc$ours ]]; do sleep 0.2; done" ||
    fail "our orphaned /dev/ublkb$ours was not deleted: $(cat "$work/serve.log")"
[[ ! -e $work/root/devices/$ours ]] || fail "the record of the deleted device stayed"
[[ -e /sys/class/ublk-char/ublkc$theirs ]] || fail "a ublk device that is not ours was deleted"
[[ ! -e $work/root/devices/$theirs ]] || fail "the stale record of device $theirs stayed"
pass "serve deleted its orphaned device $ours and kept device $theirs"

"$ovbd" device detach "$theirs"
[[ ! -e /sys/class/ublk-char/ublkc$theirs ]] || fail "detach of the other device"
pass "nothing left"
