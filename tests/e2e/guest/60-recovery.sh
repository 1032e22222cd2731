#!/usr/bin/env bash
# Guest test: the device server is killed with SIGKILL while a filesystem on its device is
# mounted and busy. With UBLK_F_USER_RECOVERY (6.12 has it) the device stays, its I/O waits,
# and `ovbd device attach --recover` re-attaches it: the mounted filesystem keeps working and
# nothing written is lost. Without recovery, deleting the orphaned device must fail the waiting
# I/O rather than hang the machine.
set -euo pipefail

fail() {
    echo "FAIL: $*" >&2
    exit 1
}
pass() { echo "  pass: $*"; }

[[ ${OVBD_GUEST:-} == 1 ]] || fail "not inside the test guest (run via tests/e2e/run-guest-tests.sh)"
ovbd=${OVBD_REPO:?}/target/debug/ovbd
[[ -x $ovbd ]] || fail "$ovbd not built"
modprobe ublk_drv

work=$(mktemp -d /tmp/recovery.XXXXXX)
# A private copy: a host cargo build during the run must not swap the binary under us.
cp "$ovbd" "$work/ovbd"
ovbd=$work/ovbd
mnt=$work/mnt
mkdir -p "$mnt"
cleanup() {
    set +e
    mountpoint -q "$mnt" && umount -l "$mnt"
    for id in $("$ovbd" device list --json 2>/dev/null | grep -o '"id": [0-9]*' | grep -o '[0-9]*'); do
        "$ovbd" device detach "$id" >/dev/null 2>&1
    done
    rm -rf "$work"
}
trap cleanup EXIT

tar xzf "$OVBD_REPO/tests/fixtures/ext4_64.tar.gz" -C "$work"
server_pid() { "$ovbd" device list --json | tr -d ' \n' | grep -o '"pid":[0-9]*' | head -1 | cut -d: -f2; }

new_rw_config() { # NAME -> config path
    local n=$1
    "$ovbd" layer create "$work/$n.data" "$work/$n.index" --vsize-gb 0
    cat >"$work/$n.json" <<JSON
{"lowers":[{"file":"$work/ext4_64"}],"upper":{"data":"$work/$n.data","index":"$work/$n.index"},"resultFile":"$work/$n.result"}
JSON
    echo "$work/$n.json"
}

## 1. kill -9 while busy, then recover: the mount keeps working.
cfg=$(new_rw_config a)
dev=$("$ovbd" device attach --background "$cfg")
id=${dev#/dev/ublkb}
grep -qx success "$work/a.result" || fail "resultFile: $(cat "$work/a.result")"
mount "$dev" "$mnt"
head -c 8M /dev/urandom >"$mnt/before"
sync
want=$(sha256sum <"$mnt/before")
# Busy writer while the server dies.
(dd if=/dev/urandom of="$mnt/during" bs=64k count=256 conv=fsync 2>/dev/null; echo $? >"$work/writer.rc") &
writer=$!
sleep 0.5
pid=$(server_pid)
[[ -n $pid ]] || fail "no server pid in device list"
kill -9 "$pid"
sleep 1
[[ -b $dev ]] || fail "$dev vanished after the server was killed (expected USER_RECOVERY to keep it)"
"$ovbd" device list | grep -q "orphaned (recoverable)" || fail "device list does not show the orphaned device: $("$ovbd" device list)"
pass "server killed -9: $dev kept by the driver, I/O waits"

# Re-attach: same id, same config.
dev2=$(timeout 60 "$ovbd" device attach --background --recover --id "$id" "$cfg") || fail "recover failed"
[[ $dev2 == "$dev" ]] || fail "recovered as $dev2, expected $dev"
timeout 120 bash -c "while kill -0 $writer 2>/dev/null; do sleep 0.2; done" || fail "writer still blocked 120 s after recovery"
[[ $(cat "$work/writer.rc") == 0 ]] || fail "the writer running across the crash failed (rc $(cat "$work/writer.rc"))"
[[ $(sha256sum <"$mnt/before") == "$want" ]] || fail "data written before the crash changed"
head -c 4M /dev/urandom >"$mnt/after"
sync
want_after=$(sha256sum <"$mnt/after")
want_during=$(sha256sum <"$mnt/during")
umount "$mnt"
e2fsck -fn "$dev" >"$work/fsck" 2>&1 || fail "e2fsck after recovery: $(cat "$work/fsck")"
"$ovbd" device detach "$id"
[[ ! -e $dev ]] || fail "$dev left after detach"
pass "recovered: the mounted fs kept working, the writer across the crash finished, e2fsck clean"

# What was written survives a commit: attach the committed layer read-only and compare.
"$ovbd" layer commit "$work/a.data" "$work/a.index" "$work/a.commit"
cat >"$work/ro.json" <<JSON
{"lowers":[{"file":"$work/ext4_64"},{"file":"$work/a.commit"}]}
JSON
rodev=$("$ovbd" device attach --background "$work/ro.json")
mount -o ro "$rodev" "$mnt"
[[ $(sha256sum <"$mnt/before") == "$want" && $(sha256sum <"$mnt/during") == "$want_during" && $(sha256sum <"$mnt/after") == "$want_after" ]] ||
    fail "committed layer lost data written around the crash"
umount "$mnt"
"$ovbd" device detach "${rodev#/dev/ublkb}"
pass "before/during/after files intact in the committed layer"

## 2. kill -9 while busy, no recovery: deleting the orphan fails the waiting I/O, no hang.
cfg=$(new_rw_config b)
dev=$("$ovbd" device attach --background "$cfg")
id=${dev#/dev/ublkb}
mount "$dev" "$mnt"
(dd if=/dev/zero of="$mnt/big" bs=1M count=64 conv=fsync 2>/dev/null; echo $? >"$work/writer2.rc") &
writer=$!
sleep 0.5
kill -9 "$(server_pid)"
sleep 1
timeout 60 "$ovbd" device detach "$id" || fail "deleting the orphaned device hung or failed (rc $?)"
timeout 60 bash -c "while kill -0 $writer 2>/dev/null; do sleep 0.2; done" || fail "writer still blocked after the device was deleted"
timeout 60 umount -l "$mnt" || fail "umount hung"
timeout 30 bash -c "while [[ -e $dev || -e /dev/ublkc$id ]]; do sleep 0.2; done" || fail "device nodes left behind"
pass "orphan deleted: blocked writer released (rc $(cat "$work/writer2.rc" 2>/dev/null || echo gone)), no hang, nothing left"

ls /dev/ublkb* /dev/ublkc* >/dev/null 2>&1 && fail "ublk devices left: $(ls /dev/ublk*)"
pass "no ublk devices left"
