#!/usr/bin/env bash
# Guest smoke test: the guest kernel is the 6.12 backports kernel, ublk_drv loads and creates
# /dev/ublk-control, and ext4 on a loop device works (mkfs, mount, write, remount, read back).
# Runs inside the test VM (tests/e2e/run-guest-tests.sh); exits non-zero on the first failed check.
set -euo pipefail

fail() {
    echo "FAIL: $*" >&2
    exit 1
}
pass() { echo "  pass: $*"; }

[[ ${OVBD_GUEST:-} == 1 ]] || fail "not inside the test guest (run via tests/e2e/run-guest-tests.sh)"

kver=$(uname -r)
[[ $kver =~ ^6\.12\. ]] || fail "kernel is $kver, expected 6.12.x"
pass "kernel $kver"

[[ -s /lib/modules/$kver/modules.dep ]] || fail "no modules.dep for $kver (module tree not mounted)"
modprobe ublk_drv || fail "modprobe ublk_drv"
[[ -d /sys/module/ublk_drv ]] || fail "ublk_drv not loaded after modprobe"
[[ -c /dev/ublk-control ]] || fail "/dev/ublk-control missing or not a character device"
pass "ublk_drv loaded, /dev/ublk-control present"

work=$(mktemp -d /tmp/smoke.XXXXXX)
mnt=$work/mnt
cleanup() {
    mountpoint -q "$mnt" && umount "$mnt"
    rm -rf "$work"
}
trap cleanup EXIT
mkdir "$mnt"

truncate -s 64M "$work/fs.img"
mkfs.ext4 -q -F "$work/fs.img" || fail "mkfs.ext4"
mount -o loop "$work/fs.img" "$mnt" || fail "mount -o loop (ext4)"
[[ $(findmnt -n -o FSTYPE "$mnt") == ext4 ]] || fail "mount is not ext4"
[[ $(findmnt -n -o SOURCE "$mnt") == /dev/loop* ]] || fail "mount is not backed by a loop device"
head -c 1M /dev/urandom >"$work/data"
cp "$work/data" "$mnt/data"
echo "hello from the ovbd test guest" >"$mnt/hello"
umount "$mnt"

# Remount so the data is read back from the device, not the page cache of the first mount.
mount -o loop,ro "$work/fs.img" "$mnt" || fail "remount -o loop,ro"
cmp "$work/data" "$mnt/data" || fail "data read back differs"
[[ $(<"$mnt/hello") == "hello from the ovbd test guest" ]] || fail "hello file read back differs"
umount "$mnt"
pass "ext4 on loop: mkfs, mount, write, remount, read back"
