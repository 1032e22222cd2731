#!/usr/bin/env bash
# Guest test: writable layers through the ublk device, committed and stacked.
#   1. RW layer (layer create --vsize-gb 0) over the empty ext4_64 base: mount rw, write ~200 MiB of files
#      (varied sizes, nested dirs, a sparse file, an empty file) hashed on tmpfs before they are copied in,
#      sync, umount, e2fsck -fn clean, detach, `layer commit` (plain and -z).
#   2. base + layer1 read-only: every file matches; e2fsck clean.
#   3. RW layer over base + layer1: new files, deletions, an overwrite; commit layer2 (plain and -z).
#   4. base + layer1 + layer2 read-only, and base + layer1(-z) + layer2(-z, as a {"dir":...} lower):
#      new and untouched files match, deleted ones are gone, no stray files, e2fsck clean.
# Runs inside the test VM (tests/e2e/run-guest-tests.sh); exits non-zero on the first failed check.
set -euo pipefail
# shellcheck source=lib/common.bash
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"

base=$(extract_base "$WORK")
mnt=$WORK/mnt
mkdir "$mnt"

# Files are generated on tmpfs first (few processes: under TCG each one costs ~80 ms), hashed there, and
# copied onto the device, so the manifests hold the hashes of what was written, not of what the device
# returns.  rand_split DIR TOTAL PIECE: TOTAL random bytes cut into PIECE-byte files DIR/faaa, faab, ...
rand_split() {
    mkdir -p "$1"
    head -c "$2" /dev/urandom | split -a 3 -b "$3" - "$1/f"
}

# hash_tree SRC: sha256sum manifest lines ("HASH  relative/path") for every file under SRC.
hash_tree() { (cd "$1" && find . -type f -printf '%P\n' | sort | xargs -d '\n' sha256sum); }

# verify_tree MANIFEST: every file in MANIFEST matches under $mnt, and $mnt holds no other file.
verify_tree() {
    local manifest=$1 out
    out=$(cd "$mnt" && sha256sum --quiet -c "$manifest" 2>&1) ||
        fail "sha256sum -c against $(basename "$manifest") failed:"$'\n'"$(head -n 20 <<<"$out")"
    diff <(cut -c67- "$manifest" | sort) <(cd "$mnt" && find . -path ./lost+found -prune -o -type f -printf '%P\n' | sort) ||
        fail "the files under the mount are not exactly those of $(basename "$manifest")"
}

# rw_session CONFIG: attach CONFIG (writable) and mount it on $mnt; prints the device.
rw_session() {
    local dev
    dev=$(attach "$1")
    [[ $(blockdev --getro "$dev") == 0 ]] || fail "$dev (writable config) is read-only"
    mount "$dev" "$mnt" || fail "mount $dev (rw)"
    echo "$dev"
}

# end_rw DEV: sync, umount, e2fsck clean, detach.
end_rw() {
    sync
    umount "$mnt" || fail "umount $mnt"
    e2fsck_clean "$1"
    detach_dev "$1"
}

# check_ro MANIFEST LOWER...: attach LOWERs read-only, mount, verify MANIFEST exactly, e2fsck, detach.
check_ro() {
    local manifest=$1 dev
    shift
    write_config "$WORK/ro.json" --result "$WORK/ro.result" "$@"
    dev=$(attach "$WORK/ro.json")
    [[ $(blockdev --getro "$dev") == 1 ]] || fail "$dev (no upper) is not read-only"
    mount -o ro "$dev" "$mnt" || fail "mount -o ro $dev"
    verify_tree "$manifest"
    umount "$mnt"
    e2fsck_clean "$dev"
    detach_dev "$dev"
}

layer_info() { "$OVBD" layer inspect --json "$1" | jq -r '"\(.lsmt.data_entries) data entries, \(.lsmt.data_bytes) data bytes, file \(.payload_size + .payload_offset) bytes"'; }

# ---- 1. RW layer 1 over the base.
t0=$SECONDS
"$OVBD" layer create "$WORK/up1.data" "$WORK/up1.index" --vsize-gb 0 || fail "layer create up1"
write_config "$WORK/rw1.json" --upper "$WORK/up1.data" "$WORK/up1.index" --result "$WORK/rw1.result" "$base"
dev=$(rw_session "$WORK/rw1.json")
[[ $(blockdev --getsize64 "$dev") == $((64 << 30)) ]] || fail "RW device size is not the base's 64 GiB"
src=$WORK/src1
mkdir -p "$src/big"
head -c $((64 << 20)) /dev/urandom >"$src/big/a.bin"
head -c $(((33 << 20) + 123)) /dev/urandom >"$src/big/b.bin"
rand_split "$src/mid" $((50 << 20)) 5123456
for d in $(seq 1 6); do
    for e in $(seq 1 3); do
        rand_split "$src/tree/d$d/e$e" $((2 << 20)) $((13000 + (d * 3 + e) * 4999))
    done
done
: >"$src/empty"
# A sparse file: 256 MiB with 1 MiB of data at 100 MiB.
truncate -s 256M "$src/sparse.img"
head -c 1M /dev/urandom | dd of="$src/sparse.img" bs=1M seek=100 conv=notrunc status=none
m1=$WORK/manifest1
hash_tree "$src" >"$m1"
cp -a "$src/." "$mnt/"
total=$(du -sm --apparent-size --exclude=sparse.img "$src" | cut -f1)
nfiles=$(wc -l <"$m1")
rm -rf "$src"
end_rw "$dev"
took $t0 "layer 1: write $nfiles files, $total MiB, e2fsck, detach"
pass "RW layer 1 over ext4_64: $nfiles files ($total MiB + a 256 MiB sparse file) written, e2fsck -fn clean"

t0=$SECONDS
"$OVBD" layer commit "$WORK/up1.data" "$WORK/up1.index" "$WORK/layer1" || fail "layer commit layer1"
"$OVBD" layer commit -z "$WORK/up1.data" "$WORK/up1.index" "$WORK/layer1.z" || fail "layer commit -z layer1.z"
took $t0 "commit layer1 + layer1.z"
[[ $("$OVBD" layer inspect --json "$WORK/layer1.z" | jq -r '.wrapper + " " + .zfile.algorithm') == "pax lz4" ]] ||
    fail "layer1.z is not a PAX-wrapped LZ4 ZFile"
pass "committed layer1 ($(layer_info "$WORK/layer1")) and layer1.z ($(layer_info "$WORK/layer1.z"))"
rm -f "$WORK/up1.data" "$WORK/up1.index"

# ---- 2. base + layer1 read-only.
t0=$SECONDS
check_ro "$m1" "$base" "$WORK/layer1"
took $t0 "verify base + layer1"
pass "base + layer1 read-only: all $nfiles files match, nothing else, e2fsck clean"

# ---- 3. RW layer 2 over base + layer1: add, delete, overwrite.
t0=$SECONDS
"$OVBD" layer create "$WORK/up2.data" "$WORK/up2.index" --vsize-gb 0 || fail "layer create up2"
write_config "$WORK/rw2.json" --upper "$WORK/up2.data" "$WORK/up2.index" "$base" "$WORK/layer1"
dev=$(rw_session "$WORK/rw2.json")
verify_tree "$m1"
m2=$WORK/manifest2
src=$WORK/src2
for i in 0 1 2 3; do
    rand_split "$src/new/n$i" $((3 << 20)) $((70000 + i * 33333))
done
mkdir -p "$src/big"
head -c $((16 << 20)) /dev/urandom >"$src/big/c.bin"
# big/a.bin (from layer 1) is overwritten with new, shorter contents.
head -c $((5 << 20)) /dev/urandom >"$src/big/a.bin"
hash_tree "$src" >"$m2"
cp -a "$src/." "$mnt/"
rm -rf "$src"
deleted=(big/b.bin mid/faac mid/faah tree/d3 tree/d5/e1/faam empty)
for p in "${deleted[@]}"; do
    [[ -e $mnt/$p ]] || fail "$p (to delete) does not exist"
    rm -r "${mnt:?}/$p"
done
# Expected: layer 1's manifest minus the deleted and overwritten paths, plus layer 2's files.
grep -vE '  (big/b\.bin|mid/faac|mid/faah|tree/d3/.*|tree/d5/e1/faam|empty|big/a\.bin)$' "$m1" >>"$m2"
verify_tree "$m2"
end_rw "$dev"
took $t0 "layer 2: write, delete, overwrite, e2fsck, detach"
"$OVBD" layer commit "$WORK/up2.data" "$WORK/up2.index" "$WORK/layer2" || fail "layer commit layer2"
mkdir "$WORK/layer2.dir"
"$OVBD" layer commit -z "$WORK/up2.data" "$WORK/up2.index" "$WORK/layer2.dir/overlaybd.commit" ||
    fail "layer commit -z layer2.dir/overlaybd.commit"
pass "RW layer 2 over base + layer1: $(grep -c . "$m2") files expected; committed layer2 ($(layer_info "$WORK/layer2"))"
rm -f "$WORK/up2.data" "$WORK/up2.index"

# ---- 4. Three-layer stacks, read-only.
t0=$SECONDS
check_ro "$m2" "$base" "$WORK/layer1" "$WORK/layer2"
for p in "${deleted[@]}"; do
    if grep -qE "  $p(/|$)" "$m2"; then fail "deleted $p is still in the expected manifest"; fi
done
took $t0 "verify base + layer1 + layer2"
pass "base + layer1 + layer2 read-only: new, overwritten and untouched files match; ${#deleted[@]} deleted paths gone; e2fsck clean"

t0=$SECONDS
check_ro "$m2" "$base" "$WORK/layer1.z" "$WORK/layer2.dir"
took $t0 "verify base + layer1.z + layer2.dir"
pass "base + layer1 (-z, ZFile+tar) + layer2 (-z, {\"dir\":...} lower) read-only: same files, e2fsck clean"

# A committed layer on the compressed lower, once more writable: a quick write over the -z stack works.
"$OVBD" layer create "$WORK/up3.data" "$WORK/up3.index" --vsize-gb 0 || fail "layer create up3"
write_config "$WORK/rw3.json" --upper "$WORK/up3.data" "$WORK/up3.index" "$base" "$WORK/layer1.z" "$WORK/layer2.dir"
dev=$(rw_session "$WORK/rw3.json")
head -c 1M /dev/urandom >"$WORK/top.bin"
cp "$WORK/top.bin" "$mnt/top.bin"
(cd "$WORK" && sha256sum top.bin) >>"$m2"
end_rw "$dev"
"$OVBD" layer commit "$WORK/up3.data" "$WORK/up3.index" "$WORK/layer3" || fail "layer commit layer3"
check_ro "$m2" "$base" "$WORK/layer1.z" "$WORK/layer2.dir" "$WORK/layer3"
pass "a fourth layer over the compressed lowers: written, committed, verified"

assert_no_ublk
