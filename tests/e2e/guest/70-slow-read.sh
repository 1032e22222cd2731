#!/usr/bin/env bash
# Guest test: a stuck layer source stalls nobody else. Device A's layer file sits on a
# device-mapper device that is then suspended (its reads hang until it is resumed); device B,
# served by the same process, must keep reading while A's read hangs, and A itself must keep
# serving ranges that do not need the stuck source.
set -euo pipefail

fail() {
    echo "FAIL: $*" >&2
    exit 1
}
pass() { echo "  pass: $*"; }

[[ ${OVBD_GUEST:-} == 1 ]] || fail "not inside the test guest (run via tests/e2e/run-guest-tests.sh)"
ovbd=${OVBD_REPO:?}/target/debug/ovbd
blob=$OVBD_REPO/tests/fixtures/hello-world-oci/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d
modprobe ublk_drv
modprobe dm-mod

work=$(mktemp -d /tmp/slow.XXXXXX)
# A private copy: a host cargo build during the run must not swap the binary under us.
cp "$ovbd" "$work/ovbd"
ovbd=$work/ovbd
loopdev=
cleanup() {
    set +e
    # Let whatever still waits on the stuck source drain.
    dmsetup resume ovbd-slow 2>/dev/null
    for id in $("$ovbd" device list --json 2>/dev/null | tr -d ' \n' | grep -o '"id":[0-9]*' | cut -d: -f2); do
        timeout 60 "$ovbd" device detach "$id" >/dev/null 2>&1
    done
    mountpoint -q "$work/slowfs" && umount "$work/slowfs"
    dmsetup remove ovbd-slow 2>/dev/null
    [[ -n $loopdev ]] && losetup -d "$loopdev"
    rm -rf "$work"
}
trap cleanup EXIT

# A dense 64 MiB layer: written through a device, then committed (uncompressed).
"$ovbd" layer create "$work/w.data" "$work/w.index" --vsize-gb 1
cat >"$work/w.json" <<JSON
{"upper":{"data":"$work/w.data","index":"$work/w.index"}}
JSON
w=$("$ovbd" device attach --background "$work/w.json")
dd if=/dev/urandom of="$w" bs=1M count=64 oflag=direct status=none
"$ovbd" device detach "${w#/dev/ublkb}"
"$ovbd" layer commit "$work/w.data" "$work/w.index" "$work/dense.commit"

# A filesystem holding device A's copy of that layer, on a device-mapper device we can suspend.
truncate -s 128M "$work/slow.img"
mkfs.ext4 -q "$work/slow.img"
mkdir -p "$work/slowfs"
mount -o loop "$work/slow.img" "$work/slowfs"
cp "$work/dense.commit" "$work/slowfs/layer"
umount "$work/slowfs"
loopdev=$(losetup -f --show "$work/slow.img")
dmsetup create ovbd-slow --table "0 $(blockdev --getsz "$loopdev") linear $loopdev 0"
dmsetup mknodes ovbd-slow # no udev in the guest
mount -o ro /dev/mapper/ovbd-slow "$work/slowfs"

cat >"$work/a.json" <<JSON
{"lowers":[{"file":"$work/slowfs/layer"}]}
JSON
cat >"$work/b.json" <<JSON
{"lowers":[{"file":"$work/dense.commit"}]}
JSON
devs=$("$ovbd" device attach --background "$work/a.json" "$work/b.json")
a=$(sed -n 1p <<<"$devs")
b=$(sed -n 2p <<<"$devs")
# Only A's first MiB in the page cache, then A's source gets stuck.
sync
echo 3 >/proc/sys/vm/drop_caches
dd if="$a" of=/dev/null bs=1M count=1 iflag=direct status=none
dmsetup suspend --nolockfs --noflush ovbd-slow
pass "attached $a and $b in one server; A's first MiB warm, then A's source suspended"

# Stall A: a read far into the disk needs the stuck source.
start=$(date +%s)
dd if="$a" of=/dev/null bs=1M skip=32 count=24 iflag=direct status=none &
stalled=$!
sleep 2
kill -0 $stalled 2>/dev/null || fail "the read of A's cold range finished: the source is not stuck, test is void"

# B reads 16 MiB while A's reader is stuck on its source.
timeout 120 dd if="$b" of=/dev/null bs=1M count=16 iflag=direct status=none || fail "reading B failed or hung while A was stalled"
kill -0 $stalled 2>/dev/null || fail "A's stalled reader finished before B: the test proves nothing (B took $(($(date +%s) - start)) s)"
pass "B read 16 MiB while A's reader was stuck on its source"

# A itself still serves its warm range on other tags.
timeout 120 dd if="$a" of=/dev/null bs=1M count=1 iflag=direct status=none || fail "A's warm range stalled behind its cold read"
kill -0 $stalled 2>/dev/null || fail "A's stalled reader finished before A's warm re-read: void"
pass "A re-read its warm MiB on other tags while one of its reads waited"

# Resume the source: the stalled read completes with correct data.
dmsetup resume ovbd-slow
timeout 300 bash -c "while kill -0 $stalled 2>/dev/null; do sleep 0.5; done" || fail "A's read never completed after the source resumed"
wait $stalled || fail "A's stalled read failed"
cmp <(dd if="$a" bs=1M count=64 iflag=direct status=none) <(dd if="$b" bs=1M count=64 iflag=direct status=none) ||
    fail "A and B (same layer) differ"
pass "A's stalled read completed once the source recovered; A and B agree"

for d in $a $b; do
    timeout 60 "$ovbd" device detach "${d#/dev/ublkb}" || fail "detach $d"
done
ls /dev/ublkb* /dev/ublkc* >/dev/null 2>&1 && fail "ublk devices left: $(ls /dev/ublk*)"
pass "detached, nothing left"
