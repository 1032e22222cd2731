#!/usr/bin/env bash
# Guest test: upstream's hello-world OverlayBD layer (PAX tar + ZFile + LSMT) served read-only by
# `ovbd device attach`: the ext4 inside mounts, /hello has the right hash, e2fsck finds exactly upstream's
# own flaw and nothing else, the device is read-only (writes fail), its bytes equal `ovbd image export`'s,
# `ovbd device list` shows it, and detach leaves no ublk device behind.
# Runs inside the test VM (tests/e2e/run-guest-tests.sh); exits non-zero on the first failed check.
set -euo pipefail
# shellcheck source=lib/common.bash
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"

write_config "$WORK/config.json" --result "$WORK/result" "$HELLO_BLOB"
dev=$(attach "$WORK/config.json")
[[ $dev =~ ^/dev/ublkb[0-9]+$ ]] || fail "attach printed '$dev', expected one /dev/ublkbN"
id=${dev#/dev/ublkb}
[[ -b $dev && -c /dev/ublkc$id ]] || fail "$dev or /dev/ublkc$id missing after attach"
[[ $(<"$WORK/result") == success ]] || fail "resultFile says '$(<"$WORK/result")', expected success"
pass "attached $dev, resultFile: success"

size=$(blockdev --getsize64 "$dev")
((size == 64 << 30)) || fail "$dev is $size bytes, expected 64 GiB"
[[ $(blockdev --getro "$dev") == 1 ]] || fail "blockdev --getro $dev is not 1"
pass "64 GiB, read-only (blockdev --getro = 1)"

# A direct write must fail: the kernel refuses to open a read-only disk for writing.
if dd if=/dev/zero of="$dev" bs=4096 count=1 oflag=direct status=none 2>"$WORK/dd.err"; then
    fail "a direct write to read-only $dev succeeded"
fi
pass "dd oflag=direct write fails: $(head -n1 "$WORK/dd.err")"

# ovbd device list: serving, read-only, this config.
list=$("$OVBD" device list)
line=$(awk -v id="$id" '$1 == id' <<<"$list")
[[ -n $line ]] || fail "ovbd device list does not show device $id:"$'\n'"$list"
read -r _ l_dev l_pid l_rw l_state _ <<<"$line"
[[ $l_dev == "$dev" && $l_rw == ro && $l_state == serving ]] ||
    fail "ovbd device list: '$line', expected $dev ro serving"
kill -0 "$l_pid" 2>/dev/null || fail "ovbd device list names server pid $l_pid, which is not running"
json=$("$OVBD" device list --json)
[[ $(jq -r --argjson id "$id" '.[] | select(.id == $id) | "\(.block) \(.writable) \(.state)"' <<<"$json") == "$dev false serving" ]] ||
    fail "ovbd device list --json: $json"
pass "ovbd device list (and --json): $dev ro serving, pid $l_pid"

mnt=$WORK/mnt
mkdir "$mnt"
mount -o ro "$dev" "$mnt" || fail "mount -o ro $dev"
[[ $(findmnt -n -o FSTYPE "$mnt") == ext4 ]] || fail "$dev is not mounted as ext4"
sum=$(sha256sum <"$mnt/hello" | cut -d' ' -f1)
[[ $sum == "$HELLO_SHA" ]] || fail "/hello sha256 is $sum, expected $HELLO_SHA"
pass "mount -o ro: /hello sha256 $sum"
umount "$mnt"

# e2fsck: exactly upstream's complaint about /lost+found's HTREE, exit 4.
expected="4
Problem in HTREE directory inode 11: block #2 not referenced
Invalid HTREE directory inode 11 (/lost+found).  Clear HTree index? no
DEV: ********** WARNING: Filesystem still has errors **********"
t0=$SECONDS
report=$(e2fsck_report "$dev")
took $t0 "e2fsck"
[[ $report == "$expected" ]] ||
    fail "e2fsck -fn $dev (exit code, then non-progress lines) differs from upstream's known complaint:"$'\n'"$report"$'\n'"--- expected:"$'\n'"$expected"
pass "e2fsck -fn: exit 4, only upstream's /lost+found HTREE complaint"

# The device's bytes are the flattened image's: compare the first 256 MiB (superblock, group
# descriptors, inode tables, /hello) and a window around the backup superblock at 128 MiB * 3^k.
t0=$SECONDS
"$OVBD" image export "$HELLO_BLOB" "$WORK/flat.img" || fail "ovbd image export"
took $t0 "ovbd image export"
t0=$SECONDS
cmp -n $((256 << 20)) <(dd if="$dev" bs=1M count=256 iflag=direct status=none) "$WORK/flat.img" ||
    fail "the first 256 MiB of $dev differ from ovbd image export's"
for mib in 384 1152 3456 10368 31104; do
    cmp <(dd if="$dev" bs=1M skip=$mib count=4 iflag=direct status=none) \
        <(dd if="$WORK/flat.img" bs=1M skip=$mib count=4 status=none) ||
        fail "$dev differs from ovbd image export's at $mib MiB"
done
rm -f "$WORK/flat.img"
took $t0 "compare"
pass "device bytes equal ovbd image export's (first 256 MiB + 5 windows of 4 MiB)"

pid=$l_pid
detach_dev "$dev"
wait_gone "$pid" 30 || fail "the device server (pid $pid) is still running after detach"
pass "detached; server exited"
[[ -z $("$OVBD" device list --json | jq '.[]') ]] || fail "ovbd device list still shows devices after detach"
assert_no_ublk
