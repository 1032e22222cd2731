#!/usr/bin/env bash
# Guest test: discards through the ublk device shrink committed layers.
# Two identical RW runs over the ext4_64 base (same ~100 MiB of files copied in, then half of them deleted);
# run "trim" does `fstrim` before unmounting, run "plain" does not.  Both are committed: the trimmed layer
# must be smaller (by at least half of the deleted bytes), carry zeroed index entries, and base + trimmed
# layer must still read every remaining file correctly (and none of the deleted ones) with e2fsck clean.
# Runs inside the test VM (tests/e2e/run-guest-tests.sh); exits non-zero on the first failed check.
set -euo pipefail
# shellcheck source=lib/common.bash
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"

base=$(extract_base "$WORK")
mnt=$WORK/mnt
mkdir "$mnt"

# The files both runs write: 40 files of 1.5-3.5 MiB in 4 directories, random contents.
src=$WORK/src
RANDOM=30
for i in $(seq 0 39); do
    mkdir -p "$src/d$((i % 4))"
    head -c $(((3 << 19) + RANDOM * 64 + i)) /dev/urandom >"$src/d$((i % 4))/f$i.bin"
done
(cd "$src" && find . -type f -printf '%P\n' | sort) >"$WORK/all"
# Delete the odd-numbered half.
grep -E 'f[0-9]*[13579]\.bin$' "$WORK/all" >"$WORK/deleted"
grep -vxF -f "$WORK/deleted" "$WORK/all" >"$WORK/kept"
deleted_bytes=$(cd "$src" && xargs stat -c %s <"$WORK/deleted" | awk '{ s += $1 } END { print s }')
(cd "$src" && xargs sha256sum <"$WORK/kept") >"$WORK/manifest"
note "source: $(wc -l <"$WORK/all") files, $(du -sm --apparent-size "$src" | cut -f1) MiB; deleting $(wc -l <"$WORK/deleted") ($((deleted_bytes >> 20)) MiB)"

# run NAME TRIM: one RW session over the base, committed to $WORK/NAME.layer.
run() {
    local name=$1 trim=$2 dev t0=$SECONDS
    "$OVBD" layer create "$WORK/$name.data" "$WORK/$name.index" --vsize-gb 0 || fail "layer create $name"
    write_config "$WORK/$name.json" --upper "$WORK/$name.data" "$WORK/$name.index" "$base"
    dev=$(attach "$WORK/$name.json")
    [[ $(cat "/sys/block/${dev#/dev/}/queue/discard_max_bytes") -gt 0 ]] || fail "$dev does not advertise discard"
    mount "$dev" "$mnt" || fail "mount $dev"
    cp -r "$src/." "$mnt/"
    sync
    (cd "$mnt" && xargs rm <"$WORK/deleted")
    sync
    if ((trim)); then
        local out
        out=$(timeout 300 fstrim -v "$mnt") || fail "fstrim $mnt"
        note "$name: $out"
    fi
    umount "$mnt"
    e2fsck_clean "$dev"
    detach_dev "$dev"
    "$OVBD" layer commit "$WORK/$name.data" "$WORK/$name.index" "$WORK/$name.layer" || fail "layer commit $name"
    rm -f "$WORK/$name.data" "$WORK/$name.index"
    took $t0 "run $name"
}
run plain 0
run trim 1

field() { "$OVBD" layer inspect --json "$1" | jq -r ".lsmt.$2"; }
plain_size=$(stat -c %s "$WORK/plain.layer")
trim_size=$(stat -c %s "$WORK/trim.layer")
plain_data=$(field "$WORK/plain.layer" data_bytes)
trim_data=$(field "$WORK/trim.layer" data_bytes)
plain_zero=$(field "$WORK/plain.layer" zeroed_entries)
trim_zero=$(field "$WORK/trim.layer" zeroed_entries)
echo "  layer without fstrim: $plain_size bytes (data $plain_data bytes, $plain_zero zeroed entries)"
echo "  layer with fstrim:    $trim_size bytes (data $trim_data bytes, $trim_zero zeroed entries)"
((trim_size < plain_size)) || fail "the trimmed layer ($trim_size bytes) is not smaller than the plain one ($plain_size)"
((trim_data + deleted_bytes / 2 < plain_data)) ||
    fail "fstrim saved only $((plain_data - trim_data)) data bytes of $deleted_bytes deleted"
((trim_zero > 0)) || fail "the trimmed layer has no zeroed index entries"
pass "fstrim shrank the committed layer by $(((plain_size - trim_size) >> 20)) MiB ($((deleted_bytes >> 20)) MiB deleted)"

# base + trimmed layer, read-only: the kept files are intact, the deleted ones gone, nothing else.
write_config "$WORK/ro.json" "$base" "$WORK/trim.layer"
dev=$(attach "$WORK/ro.json")
mount -o ro "$dev" "$mnt" || fail "mount -o ro $dev"
out=$(cd "$mnt" && sha256sum --quiet -c "$WORK/manifest" 2>&1) || fail "remaining files differ:"$'\n'"$out"
diff "$WORK/kept" <(cd "$mnt" && find . -path ./lost+found -prune -o -type f -printf '%P\n' | sort) ||
    fail "base + trimmed layer does not hold exactly the kept files"
umount "$mnt"
e2fsck_clean "$dev"
detach_dev "$dev"
pass "base + trimmed layer: $(wc -l <"$WORK/kept") remaining files match, deleted ones gone, e2fsck clean"

assert_no_ublk
