#!/usr/bin/env bash
# Guest benchmark: read throughput of the ublk device against a loop device over the same image.
# Runs inside the test VM (start it with scripts/bench-device.sh on the host).  Prints figures; asserts
# nothing about them (it fails only if something does not work).
#
# Image: the empty ext4_64 base + one layer holding 1 GiB (OVBD_BENCH_MIB) written by fio through the ublk
# device onto its second GiB (50% compressible buffers), committed with `ovbd layer commit`.  Variants:
#   ublk-plain  base + the uncompressed committed layer
#   ublk-zfile  base + the same layer ZFile-compressed (LZ4, 4 KiB blocks, PAX tar; `ovbd layer compress`,
#               the second half of `layer commit -z`)
#   loop        `ovbd image export` of base + layer (a sparse raw file) on a loop device
# Every file lives on tmpfs.  fio reads only the written GiB: 4k randread (io_uring, iodepth 16, direct) and
# 1M sequential read (io_uring, iodepth 16, direct), OVBD_BENCH_RUNTIME seconds each (default 20).
#
# Environment: OVBD_BIN (default target/release/ovbd), OVBD_BENCH_RUNTIME, OVBD_BENCH_MIB (default 1024),
# OVBD_BENCH_PERF (names of runs to profile with perf, e.g. "read-1m-ublk-plain read-1m-loop").
set -euo pipefail
export OVBD_BIN=${OVBD_BIN:-${OVBD_REPO:?}/target/release/ovbd}
# shellcheck source=../guest/lib/common.bash
source "$(dirname "${BASH_SOURCE[0]}")/../guest/lib/common.bash"

runtime=${OVBD_BENCH_RUNTIME:-20}
mib=${OVBD_BENCH_MIB:-1024}
command -v fio >/dev/null || fail "fio is not installed (on the host)"
note "binary: $OVBD_BIN ($("$OVBD" --version)); fio $(fio --version); $(nproc) vCPU, $(free -m | awk '/^Mem:/ { print $2 }') MiB RAM"

# All images on a tmpfs of our own (the guest's /tmp is capped at half the RAM). With
# OVBD_BENCH_FS=ext4 (the default) they sit on an ext4 inside it, as on a real host: ext4
# supports non-blocking reads (RWF_NOWAIT), which ovbd uses to serve cached data on the
# queue thread; tmpfs does not (every request then goes through the worker pool).
store=$WORK/store
mkdir "$store"
# (The raw export also holds the base layer's ~540 MB of ext4 metadata.)
mount -t tmpfs -o size=$(((mib * 3 + 1536) << 20)) tmpfs "$store"
if [[ ${OVBD_BENCH_FS:-ext4} == ext4 ]]; then
    mkdir "$WORK/backing"
    mount --move "$store" "$WORK/backing"
    truncate -s $(((mib * 3 + 1280) << 20)) "$WORK/backing/fs.img"
    mkfs.ext4 -q -E lazy_itable_init=0 "$WORK/backing/fs.img"
    mount -o loop "$WORK/backing/fs.img" "$store"
fi
note "image files on $(stat -f -c %T "$store")"
base=$(extract_base "$store")

# ---- Build the layer: fio writes $mib MiB at offset 1 GiB of an RW device over the base.
t0=$SECONDS
"$OVBD" layer create "$store/up.data" "$store/up.index" --vsize-gb 0
write_config "$WORK/rw.json" --upper "$store/up.data" "$store/up.index" "$base"
dev=$(attach "$WORK/rw.json")
fio --name=fill --filename="$dev" --rw=write --bs=1M --ioengine=io_uring --iodepth=8 --direct=1 \
    --offset=1g --size="${mib}m" --buffer_compress_percentage=50 --refill_buffers --output-format=json \
    >"$WORK/fill.json" || fail "fio fill"
note "fill: $(jq -r '.jobs[0].write | "\(.bw_bytes / 1048576 | floor) MiB/s"' "$WORK/fill.json") written through ublk"
detach_dev "$dev"
"$OVBD" layer commit "$store/up.data" "$store/up.index" "$store/layer" || fail "layer commit"
rm -f "$store/up.data" "$store/up.index"
"$OVBD" layer compress "$store/layer" "$store/layer.z" 2>/dev/null || fail "layer compress"
"$OVBD" image export "$base" "$store/layer" "$store/flat.img" || fail "image export"
took $t0 "build (fill, commit, compress, export)"
plain_size=$(stat -c %s "$store/layer")
z_size=$(stat -c %s "$store/layer.z")
note "layer: $((plain_size >> 20)) MiB uncompressed, $((z_size >> 20)) MiB ZFile ($((z_size * 100 / plain_size))%)"

# ---- Targets.
write_config "$WORK/plain.json" "$base" "$store/layer"
write_config "$WORK/zfile.json" "$base" "$store/layer.z"
mapfile -t devs < <(attach "$WORK/plain.json" "$WORK/zfile.json")
loopdev=$(losetup -r -f --show "$store/flat.img") || fail "losetup"
on_cleanup "losetup -d $loopdev"
declare -A target=([ublk-plain]=${devs[0]} [ublk-zfile]=${devs[1]} [loop]=$loopdev)
order=(ublk-plain ublk-zfile loop)

# Same bytes on all three (start, middle and end of the written range).
for t in ublk-zfile loop; do
    for at in 1024 $((1024 + mib / 2)) $((1024 + mib - 4)); do
        cmp <(dd if="${target[ublk-plain]}" bs=1M skip=$at count=4 iflag=direct status=none) \
            <(dd if="${target[$t]}" bs=1M skip=$at count=4 iflag=direct status=none) ||
            fail "ublk-plain and $t differ at $at MiB"
    done
done
pass "ublk-plain, ublk-zfile and loop return the same bytes"

# run_fio NAME DEV RW BS: prints "IOPS MiB/s mean-latency-us".
run_fio() {
    local name=$1 dev=$2 rw=$3 bs=$4 prof=()
    # OVBD_BENCH_PERF="read-1m-ublk-plain ...": profile those runs (perf record -a), report on stderr.
    [[ " ${OVBD_BENCH_PERF:-} " == *" $name "* ]] && prof=(perf record -q -a -o "$WORK/$name.perf" --)
    "${prof[@]}" fio --name="$name" --filename="$dev" --rw="$rw" --bs="$bs" --ioengine=io_uring --iodepth=16 --direct=1 \
        --time_based --runtime="$runtime" --ramp_time=2 --offset=1g --size="${mib}m" --norandommap \
        --randrepeat=0 --output-format=json >"$WORK/$name.json" || fail "fio $name"
    if ((${#prof[@]})); then
        perf report -q -i "$WORK/$name.perf" --stdio --no-children --sort dso,sym 2>/dev/null |
            grep -v '^$' | grep -v '^ *|' | grep -v '^ *-' | head -n 40 | sed "s/^/  perf $name: /" >&2
    fi
    jq -r '.jobs[0].read | "\(.iops | floor) \(.bw_bytes / 1048576 * 10 | floor / 10) \(.clat_ns.mean / 1000 | floor)"' "$WORK/$name.json"
}

declare -A res
for w in randread-4k read-1m; do
    for t in "${order[@]}"; do
        case $w in
            randread-4k) res[$w,$t]=$(run_fio "$w-$t" "${target[$t]}" randread 4k) ;;
            read-1m) res[$w,$t]=$(run_fio "$w-$t" "${target[$t]}" read 1m) ;;
        esac
        note "$w $t: ${res[$w,$t]}"
    done
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
echo
echo "==== ublk vs loop, same guest run ($(nproc) vCPU TCG; fio io_uring, iodepth 16, direct=1, ${runtime} s each, over ${mib} MiB)"
printf '%-12s %-12s %10s %10s %12s %10s\n' workload target IOPS MiB/s "clat µs" "vs loop"
for w in randread-4k read-1m; do
    read -r l_iops l_bw _ <<<"${res[$w,loop]}"
    for t in "${order[@]}"; do
        read -r iops bw lat <<<"${res[$w,$t]}"
        if [[ $w == randread-4k ]]; then
            r=$(ratio "$iops" "$l_iops")
        else
            r=$(ratio "$bw" "$l_bw")
        fi
        printf '%-12s %-12s %10s %10s %12s %10s\n' "$w" "$t" "$iops" "$bw" "$lat" "$r"
    done
done
echo "(vs loop: IOPS ratio for randread-4k, MiB/s ratio for read-1m)"

for d in "${devs[@]}"; do
    detach_dev "$d"
done
losetup -d "$loopdev"
_cleanups=()
assert_no_ublk
