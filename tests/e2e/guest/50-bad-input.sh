#!/usr/bin/env bash
# Guest test: bad input to `ovbd device attach`.
#   a. a lower that is a truncated copy of the hello-world blob: attach fails (non-zero, no hang), the
#      resultFile says failed:... naming the file, no device is left (also as the 2nd of two configs).
#   b. a copy of the blob with bytes flipped inside the compressed block that holds /hello's first data
#      block (found through ext4 -> LSMT index -> ZFile jump table): attach succeeds; reading that block of
#      the device (dd iflag=direct) fails with EIO within a timeout, other blocks of the same device still
#      read right, and a healthy device in the same server keeps reading correctly meanwhile.
#   c. configs that are not JSON, name a missing file, have no layers, or a missing upper: clear errors,
#      no device left.
# Runs inside the test VM (tests/e2e/run-guest-tests.sh); exits non-zero on the first failed check.
set -euo pipefail
# shellcheck source=lib/common.bash
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"

# attach_must_fail WHAT EXPECT CONFIG...: attach (with --background, then in the foreground) must exit
# non-zero (not time out), say EXPECT (a grep -E pattern) on stderr, and leave no device.
attach_must_fail() {
    local what=$1 expect=$2 rc=0 bg
    shift 2
    for bg in --background ""; do
        rc=0
        timeout 60 "$OVBD" device attach $bg "$@" >"$WORK/out" 2>"$WORK/err" || rc=$?
        ((rc != 124)) || fail "$what: attach $bg hung (timed out after 60 s)"
        ((rc != 0)) || fail "$what: attach $bg succeeded: $(cat "$WORK/out")"
        grep -qE "$expect" "$WORK/err" || fail "$what: attach $bg error does not match /$expect/:"$'\n'"$(cat "$WORK/err")"
        # In the foreground, devices that came up before the failure were printed (and then torn down).
        if [[ -n $bg || $# == 1 ]]; then
            [[ ! -s $WORK/out ]] || fail "$what: attach $bg printed a device: $(cat "$WORK/out")"
        fi
        shopt -s nullglob
        local left=(/dev/ublkb* /dev/ublkc*)
        shopt -u nullglob
        ((${#left[@]} == 0)) || fail "$what: attach $bg failed but left ${left[*]}"
        [[ $("$OVBD" device list --json | jq length) == 0 ]] || fail "$what: ovbd device list shows a device"
    done
    note "$what: exit $rc: $(grep -m1 '^ovbd:' "$WORK/err" | head -c 300)"
}

# u64 FILE OFFSET / u32 FILE OFFSET: little-endian integers.
u64() { od -An -tu8 -j "$2" -N8 "$1" | tr -d ' '; }
u32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }

# ---- a. truncated blob.
blob_size=$(stat -c %s "$HELLO_BLOB")
head -c $((blob_size * 2 / 3)) "$HELLO_BLOB" >"$WORK/truncated.blob"
write_config "$WORK/trunc.json" --result "$WORK/trunc.result" "$WORK/truncated.blob"
attach_must_fail "truncated blob" "truncated\.blob" "$WORK/trunc.json"
res=$(<"$WORK/trunc.result")
[[ $res == failed:* ]] || fail "resultFile for the truncated blob says '$res', expected failed:..."
[[ $res == *"$WORK/truncated.blob"* ]] || fail "resultFile does not name the truncated file: '$res'"
pass "truncated blob: attach fails, resultFile '$(head -c 160 <<<"$res")...'"

# The same config after a good one in one attach: the good device is torn down again.
write_config "$WORK/good0.json" --result "$WORK/good0.result" "$HELLO_BLOB"
attach_must_fail "good + truncated" "truncated\.blob" "$WORK/good0.json" "$WORK/trunc.json"
res=$(<"$WORK/good0.result")
[[ $res == failed:* ]] || fail "the good config's device was torn down again, but its resultFile says '$res'"
pass "good config + truncated one in one attach: fails, nothing left attached, both resultFiles say failed:"

# ---- b. a corrupted compressed block.
# Where /hello's first block lives: ext4 block (from the flattened image) -> virtual byte offset V.
"$OVBD" image export "$HELLO_BLOB" "$WORK/flat.img" || fail "ovbd image export"
fs_bs=$(dumpe2fs -h "$WORK/flat.img" 2>/dev/null | awk -F: '/^Block size/ { gsub(/ /, "", $2); print $2 }')
fs_blk=$(debugfs -R 'bmap /hello 0' "$WORK/flat.img" 2>/dev/null)
[[ $fs_bs =~ ^[0-9]+$ && $fs_blk =~ ^[0-9]+$ && $fs_blk -gt 0 ]] || fail "cannot locate /hello: block size '$fs_bs', block '$fs_blk'"
V=$((fs_blk * fs_bs))
# LSMT: find the index entry mapping V; P = its byte offset inside the (decompressed) LSMT file.
"$OVBD" layer decompress "$HELLO_BLOB" "$WORK/raw.lsmt" || fail "ovbd layer decompress"
lsmt_size=$(stat -c %s "$WORK/raw.lsmt")
idx_off=$(u64 "$WORK/raw.lsmt" $((lsmt_size - 4096 + 32)))
idx_n=$(u64 "$WORK/raw.lsmt" $((lsmt_size - 4096 + 40)))
vsec=$((V / 512))
P=
while read -r lo hi; do
    lo=$((16#$lo)) hi=$((16#$hi))
    off=$((lo & ((1 << 50) - 1)))
    len=$(((lo >> 50) & 0x3fff))
    moff=$((hi & ((1 << 55) - 1)))
    zeroed=$(((hi >> 55) & 1))
    if ((zeroed == 0 && off <= vsec && vsec < off + len)); then
        P=$(((moff + vsec - off) * 512))
        break
    fi
done < <(od -An -tx8 -v -j "$idx_off" -N $((idx_n * 16)) "$WORK/raw.lsmt")
[[ -n $P ]] || fail "no LSMT index entry maps virtual offset $V"
cmp -n "$fs_bs" <(tail -c +$((P + 1)) "$WORK/raw.lsmt") <(tail -c +$((V + 1)) "$WORK/flat.img") ||
    fail "LSMT offset $P does not hold /hello's first block"
# ZFile (at the PAX payload offset): block P / block_size; its compressed bytes start after the header
# (512) + dict + the lengths of the blocks before it (jump table entries include the 4-byte CRC).
zoff=$("$OVBD" layer inspect --json "$HELLO_BLOB" | jq -r .payload_offset)
z_idx=$(u64 "$HELLO_BLOB" $((zoff + 40)))
z_n=$(u64 "$HELLO_BLOB" $((zoff + 48)))
z_bs=$(u32 "$HELLO_BLOB" $((zoff + 72)))
z_dict=$(u32 "$HELLO_BLOB" $((zoff + 84)))
blk=$((P / z_bs))
((blk < z_n)) || fail "ZFile block $blk out of range ($z_n blocks)"
read -r before this < <(od -An -tu4 -v -j $((zoff + z_idx)) -N $((4 * (blk + 1))) "$HELLO_BLOB" |
    tr -s ' ' '\n' | awk 'NF { n++; if (n <= '"$blk"') s += $1; else t = $1 } END { print s + 0, t }')
start=$((zoff + 512 + z_dict + before))
flip=$((start + this / 2))
note "/hello block 0: fs block $fs_blk -> virtual $V -> LSMT offset $P -> ZFile block $blk at blob offset $start ($this bytes); flipping 4 bytes at $flip"
cp "$HELLO_BLOB" "$WORK/corrupt.blob"
for k in 0 1 2 3; do
    b=$(od -An -tu1 -j $((flip + k)) -N1 "$WORK/corrupt.blob" | tr -d ' ')
    printf '%b' "$(printf '\\%03o' $((b ^ 0xff)))" | dd of="$WORK/corrupt.blob" bs=1 seek=$((flip + k)) conv=notrunc status=none
done
cmp -s "$HELLO_BLOB" "$WORK/corrupt.blob" && fail "the corrupted copy equals the original"
if "$OVBD" layer inspect "$WORK/corrupt.blob" >/dev/null 2>"$WORK/inspect.err"; then
    fail "ovbd layer inspect (which checks every block CRC) accepts the corrupted copy"
fi
note "layer inspect on the corrupted copy: $(head -c 200 "$WORK/inspect.err")"

write_config "$WORK/healthy.json" --result "$WORK/healthy.result" "$HELLO_BLOB"
write_config "$WORK/corrupt.json" --result "$WORK/corrupt.result" "$WORK/corrupt.blob"
mapfile -t devs < <(attach "$WORK/healthy.json" "$WORK/corrupt.json")
good=${devs[0]} bad=${devs[1]}
[[ $(<"$WORK/corrupt.result") == success ]] || fail "corrupt.result: $(<"$WORK/corrupt.result")"
pass "attach of the corrupted copy succeeds (headers and indexes are intact): $bad, healthy $good"

# Read the damaged block directly while the healthy device is read in a loop.
(
    for _ in $(seq 1 20); do
        dd if="$good" bs="$fs_bs" skip="$fs_blk" count=1 iflag=direct status=none | cmp -s - <(dd if="$WORK/flat.img" bs="$fs_bs" skip="$fs_blk" count=1 status=none) || exit 1
    done
) &
reader=$!
rc=0
timeout 60 dd if="$bad" of="$WORK/bad.out" bs="$fs_bs" skip="$fs_blk" count=1 iflag=direct status=none 2>"$WORK/dd.err" || rc=$?
((rc != 124)) || fail "reading the corrupted block of $bad hung (60 s)"
((rc != 0)) || fail "reading the corrupted block of $bad succeeded ($(stat -c %s "$WORK/bad.out") bytes) instead of failing"
grep -q "Input/output error" "$WORK/dd.err" || fail "reading the corrupted block failed without EIO: $(cat "$WORK/dd.err")"
[[ ! -s $WORK/bad.out ]] || fail "dd wrote $(stat -c %s "$WORK/bad.out") bytes of the corrupted block"
wait "$reader" || fail "the healthy device $good read wrong or failed while $bad returned EIO"
pass "direct read of the corrupted block: EIO ($(head -n1 "$WORK/dd.err")); healthy $good read right meanwhile"

# The rest of the corrupted device still reads right (the superblock's 4 KiB and a window elsewhere),
# a buffered read of /hello through a mount fails with EIO too, and the healthy device still serves.
cmp <(dd if="$bad" bs=1M count=4 iflag=direct status=none) <(head -c 4M "$WORK/flat.img") ||
    fail "the first 4 MiB of $bad read wrong"
mkdir "$WORK/mnt"
mount -o ro "$bad" "$WORK/mnt" || fail "mount -o ro $bad"
rc=0
timeout 60 cat "$WORK/mnt/hello" >/dev/null 2>"$WORK/cat.err" || rc=$?
((rc != 124)) || fail "cat /hello on $bad hung"
if ((rc == 0)) || ! grep -q "Input/output error" "$WORK/cat.err"; then
    fail "cat /hello on $bad: exit $rc, $(cat "$WORK/cat.err")"
fi
umount "$WORK/mnt"
[[ $(debugfs -R 'cat /hello' "$good" 2>/dev/null | sha256sum | cut -d' ' -f1) == "$HELLO_SHA" ]] ||
    fail "/hello on the healthy $good is wrong after the errors"
[[ $("$OVBD" device list --json | jq '[.[] | select(.state == "serving")] | length') == 2 ]] || fail "not both devices serving"
pass "rest of $bad reads right; cat /hello on it fails with EIO; healthy /hello still $HELLO_SHA"
detach_dev "$bad"
detach_dev "$good"
assert_no_ublk

# ---- c. configs that are not configs.
printf '{"lowers": [ {"file": ' >"$WORK/notjson.json"
attach_must_fail "config not JSON" "notjson\.json" "$WORK/notjson.json"
pass "a config that is not JSON: attach fails naming it"

attach_must_fail "missing config file" "no-such-config\.json" "$WORK/no-such-config.json"
pass "a config file that does not exist: attach fails naming it"

write_config "$WORK/missing.json" --result "$WORK/missing.result" "$WORK/no-such-layer.blob"
attach_must_fail "missing lower" "no-such-layer\.blob" "$WORK/missing.json"
res=$(<"$WORK/missing.result")
[[ $res == failed:* && $res == *no-such-layer.blob* ]] || fail "resultFile for a missing lower: '$res'"
pass "a lower that does not exist: attach fails, resultFile '$res'"

printf '{"lowers": [], "resultFile": "%s"}\n' "$WORK/empty.result" >"$WORK/empty.json"
attach_must_fail "no layers" "neither lowers nor an upper" "$WORK/empty.json"
[[ $(<"$WORK/empty.result") == failed:* ]] || fail "resultFile for a config without layers: $(<"$WORK/empty.result")"
pass "a config with no layers: attach fails"

write_config "$WORK/noupper.json" --upper "$WORK/no-such.data" "$WORK/no-such.index" --result "$WORK/noupper.result" "$HELLO_BLOB"
attach_must_fail "missing upper" "no-such\.(data|index)" "$WORK/noupper.json"
[[ $(<"$WORK/noupper.result") == failed:* ]] || fail "resultFile for a missing upper: $(<"$WORK/noupper.result")"
pass "an upper that does not exist: attach fails"

# A lower that is not a layer at all (an ext4 image).
truncate -s 16M "$WORK/plain.img"
mkfs.ext4 -q -F "$WORK/plain.img"
write_config "$WORK/notlayer.json" --result "$WORK/notlayer.result" "$WORK/plain.img"
attach_must_fail "lower is not a layer" "plain\.img" "$WORK/notlayer.json"
pass "a lower that is not a layer: attach fails"

assert_no_ublk
