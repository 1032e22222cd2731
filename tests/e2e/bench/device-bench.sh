#!/usr/bin/env bash
# Device benchmark: read throughput of ovbd's block devices against a loop device over the same image,
# all in one run.  Started by scripts/bench-device.sh, on the host (frontend fuse) or inside the test VM
# (frontends ublk and fuse).  Prints figures and ratios; asserts nothing about them (it fails only if
# something does not work).
#
# Image: the empty ext4_64 base + one layer holding 1 GiB (OVBD_BENCH_MIB) written by fio through an ovbd
# device onto its second GiB (50% compressible buffers), committed with `ovbd layer commit`.  Targets:
#   F-plain   base + the uncompressed committed layer, on frontend F (ublk, fuse)
#   F-zfile   base + the same layer ZFile-compressed (LZ4, 4 KiB blocks, PAX tar; `ovbd layer compress`,
#             the second half of `layer commit -z`)
#   F-hole    an image of one empty layer (`ovbd layer create` + `layer commit`), on frontend F: every read
#             is a hole, answered with zeros and no layer I/O, so this is the frontend's own floor (for
#             fuse: the round trip through /dev/fuse and the loop device), which no read path can beat
#   fuse-pcache  fuse-plain with `[device] fuse_page_cache = true` (the loop device without direct I/O:
#             repeated reads are answered from the FUSE file's page cache, not by ovbd)
#   loop      `ovbd image export` of base + layer (a sparse raw file) on a loop device with direct I/O
#             (losetup --direct-io=on), as the fuse frontend's own loop device
# Every file lives on an ext4 inside a tmpfs (in RAM: the disk is not measured).  fio reads only the
# written GiB: 4k randread and 1M sequential read (io_uring, iodepth 16, direct), OVBD_BENCH_RUNTIME
# seconds each after a 2 s ramp.  The machine may be noisy: OVBD_BENCH_RUNS rounds (default 3), each round
# running every workload on every target in turn, so drift hits all alike; the table shows medians.
#
# Environment: OVBD_BIN (default target/release/ovbd), OVBD_BENCH_FRONTENDS (default: "ublk fuse" in the
# guest, "fuse" on the host), OVBD_BENCH_RUNS, OVBD_BENCH_RUNTIME (default 10), OVBD_BENCH_MIB (default
# 1024), OVBD_BENCH_FS=ext4|tmpfs (where the files sit, default ext4: it has non-blocking reads, which ovbd
# uses to answer cached data at once; tmpfs has not), OVBD_BENCH_PERF (names of runs to profile with perf,
# e.g. "read-1m-fuse-plain read-1m-loop").
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)

fail() {
    echo "FAIL: $*" >&2
    exit 1
}
pass() { echo "  pass: $*"; }
note() { echo "  ... $*"; }
took() { note "$2: $((SECONDS - $1)) s"; }

((EUID == 0)) || fail "run as root (loop devices, mounts)"
command -v fio >/dev/null || fail "fio is not installed (scripts/setup.sh)"
command -v jq >/dev/null || fail "jq is not installed"
ovbd_built=${OVBD_BIN:-$repo/target/release/ovbd}
[[ -x $ovbd_built ]] || fail "$ovbd_built not built (cargo build --release)"
EXT4_TGZ=$repo/tests/fixtures/ext4_64.tar.gz
[[ -s $EXT4_TGZ ]] || fail "$EXT4_TGZ missing"

if [[ ${OVBD_GUEST:-} == 1 ]]; then
    where="guest, $(nproc) vCPU"
    modprobe ublk_drv || fail "modprobe ublk_drv"
    frontends=(${OVBD_BENCH_FRONTENDS:-ublk fuse})
else
    where="host, $(nproc) CPU"
    frontends=(${OVBD_BENCH_FRONTENDS:-fuse})
fi
runtime=${OVBD_BENCH_RUNTIME:-10}
mib=${OVBD_BENCH_MIB:-1024}
runs=${OVBD_BENCH_RUNS:-3}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/device-bench.XXXXXX")
# A private copy: a `cargo build` during the run must not swap the binary between two steps.
mkdir "$WORK/bin"
cp "$ovbd_built" "$WORK/bin/ovbd"
OVBD=$WORK/bin/ovbd
# Device records and server logs stay inside the work dir.
export OVBD_RUN_DIR=$WORK/run
attached=() loops=()

cleanup() {
    local rc=$? d m
    set +e
    for d in "${attached[@]}"; do
        timeout 90 "$OVBD" device detach "$d" >/dev/null 2>&1
    done
    for d in "${loops[@]}"; do
        losetup -d "$d" 2>/dev/null
    done
    if ((rc != 0)); then
        for f in "$OVBD_RUN_DIR"/logs/*.log; do
            [[ -s $f ]] && { echo "--- tail of $f" >&2; tail -n 30 "$f" >&2; }
        done
    fi
    while read -r m; do
        umount "$m" 2>/dev/null || umount -l "$m"
    done < <(findmnt -rn -o TARGET | grep -F "$WORK/" | sort -r)
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT

# write_config OUT [--upper DATA INDEX] LOWER...: an overlaybd config.v1.json, lowers bottom to top.
write_config() {
    local out=$1 upper='' l lowers=()
    shift
    if [[ $1 == --upper ]]; then
        upper=$(printf ',"upper":{"data":"%s","index":"%s"}' "$2" "$3")
        shift 3
    fi
    for l in "$@"; do lowers+=("{\"file\":\"$l\"}"); done
    printf '{"lowers":[%s]%s}\n' "$(IFS=, && echo "${lowers[*]}")" "$upper" >"$out"
}

# attach FRONTEND CONFIG...: one background server for the configs; prints the device paths.
attach() {
    local frontend=$1 out
    shift
    out=$(OVBD_LOG=${OVBD_LOG:-info} timeout 120 "$OVBD" device attach --background --frontend "$frontend" "$@") ||
        fail "ovbd device attach --frontend $frontend $* (exit $?)"
    [[ -n $out ]] || fail "ovbd device attach $* printed no device"
    echo "$out"
}

detach() {
    timeout 90 "$OVBD" device detach "$1" || fail "ovbd device detach $1"
    local a=() d
    for d in "${attached[@]}"; do [[ $d == "$1" ]] || a+=("$d"); done
    attached=("${a[@]}")
}

note "binary: $OVBD_BIN ($("$OVBD" --version)); fio $(fio --version); $where, $(free -m | awk '/^Mem:/ { print $2 }') MiB RAM"
note "$(uname -r); frontends: ${frontends[*]} (+ loop); $runs rounds of ${runtime} s runs over $mib MiB"

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
note "image files on $(findmnt -no FSTYPE --target "$store")" # (stat -f says ext2/ext3 for ext4)
tar -xzf "$EXT4_TGZ" -C "$store" || fail "extracting $EXT4_TGZ"
base=$store/ext4_64
[[ -s $base ]] || fail "no ext4_64 in $EXT4_TGZ"

# ---- Build the layer: fio writes $mib MiB at offset 1 GiB of an RW device over the base.
t0=$SECONDS
"$OVBD" layer create "$store/up.data" "$store/up.index" --vsize-gb 0
write_config "$WORK/rw.json" --upper "$store/up.data" "$store/up.index" "$base"
dev=$(attach "${frontends[0]}" "$WORK/rw.json")
attached+=("$dev")
fio --name=fill --filename="$dev" --rw=write --bs=1M --ioengine=io_uring --iodepth=8 --direct=1 \
    --offset=1g --size="${mib}m" --buffer_compress_percentage=50 --refill_buffers --output-format=json \
    >"$WORK/fill.json" || fail "fio fill"
note "fill: $(jq -r '.jobs[0].write | "\(.bw_bytes / 1048576 | floor) MiB/s"' "$WORK/fill.json") written through ${frontends[0]} ($dev)"
detach "$dev"
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
"$OVBD" layer create "$store/empty.data" "$store/empty.index" --vsize-gb $(((1024 + mib + 1023) / 1024)) ||
    fail "layer create (empty)"
"$OVBD" layer commit "$store/empty.data" "$store/empty.index" "$store/empty" || fail "layer commit (empty)"
write_config "$WORK/hole.json" "$store/empty"
declare -A target=()
order=()
for f in "${frontends[@]}"; do
    mapfile -t devs < <(attach "$f" "$WORK/plain.json" "$WORK/zfile.json" "$WORK/hole.json")
    ((${#devs[@]} == 3)) || fail "attach --frontend $f gave ${#devs[@]} devices"
    attached+=("${devs[@]}")
    target[$f-plain]=${devs[0]} target[$f-zfile]=${devs[1]} target[$f-hole]=${devs[2]}
    order+=("$f-plain" "$f-zfile" "$f-hole")
done
# fuse with `[device] fuse_page_cache = true`: its loop device reads through the page cache.
if [[ " ${frontends[*]} " == *" fuse "* ]]; then
    dev=$(OVBD_LOOP_DIRECT_IO=0 attach fuse "$WORK/plain.json") || fail "attach fuse-pcache"
    attached+=("$dev")
    target[fuse-pcache]=$dev
    order+=(fuse-pcache)
fi
loopdev=$(losetup -r --direct-io=on -f --show "$store/flat.img") || fail "losetup"
loops+=("$loopdev")
target[loop]=$loopdev
order+=(loop)
note "targets: $(for t in "${order[@]}"; do printf '%s=%s ' "$t" "${target[$t]}"; done)"

# Same bytes on all of them (start, middle and end of the written range).
for t in "${order[@]}"; do
    [[ $t == loop || $t == *-hole ]] && continue
    for at in 1024 $((1024 + mib / 2)) $((1024 + mib - 4)); do
        cmp <(dd if="${target[loop]}" bs=1M skip=$at count=4 iflag=direct status=none) \
            <(dd if="${target[$t]}" bs=1M skip=$at count=4 iflag=direct status=none) ||
            fail "loop and $t differ at $at MiB"
    done
done
same=()
for t in "${order[@]}"; do [[ $t == *-hole ]] || same+=("$t"); done
pass "${same[*]} return the same bytes"
for t in "${order[@]}"; do
    [[ $t == *-hole ]] || continue
    cmp -n $((4 << 20)) <(dd if="${target[$t]}" bs=1M skip=1024 count=4 iflag=direct status=none) /dev/zero ||
        fail "$t does not read zeros"
done

# run_fio NAME DEV RW BS: prints "IOPS MiB/s mean-latency-us".
run_fio() {
    local name=$1 dev=$2 rw=$3 bs=$4 prof=()
    # OVBD_BENCH_PERF="read-1m-fuse-plain ...": profile those runs (perf record -a), report on stderr.
    [[ " ${OVBD_BENCH_PERF:-} " == *" $name "* ]] && prof=(perf record -q -a -o "$WORK/$name.perf" --)
    "${prof[@]}" fio --name="$name" --filename="$dev" --rw="$rw" --bs="$bs" --ioengine=io_uring --iodepth=16 --direct=1 \
        --time_based --runtime="$runtime" --ramp_time=2 --offset=1g --size="${mib}m" --norandommap \
        --randrepeat=0 --output-format=json >"$WORK/$name.json" || fail "fio $name"
    if ((${#prof[@]})); then
        perf report -q -i "$WORK/$name.perf" --stdio --no-children --sort dso,sym 2>/dev/null |
            grep -v '^$' | grep -v '^ *|' | grep -v '^ *-' | head -n 40 | sed "s/^/  perf $name: /" >&2
        rm -f "$WORK/$name.perf"
    fi
    jq -r '.jobs[0].read | "\(.iops | floor) \(.bw_bytes / 1048576 * 10 | floor / 10) \(.clat_ns.mean / 1000 | floor)"' "$WORK/$name.json"
}

workloads=(randread-4k read-1m)
declare -A rw=([randread-4k]=randread [read-1m]=read) bs=([randread-4k]=4k [read-1m]=1m)
declare -A all=() # "w,t" -> one "IOPS MiB/s clat" line per round
for ((r = 1; r <= runs; r++)); do
    for w in "${workloads[@]}"; do
        for t in "${order[@]}"; do
            out=$(run_fio "$w-$t" "${target[$t]}" "${rw[$w]}" "${bs[$w]}")
            all[$w,$t]+="$out"$'\n'
            note "round $r $w $t: $out"
        done
    done
done

# median COLUMN LINES: the median of one column (the middle one; the mean of the two middle ones).
median() {
    awk -v c="$1" 'NF { print $c }' <<<"$2" | sort -g |
        awk '{ v[n++] = $1 } END { m = int(n / 2); print (n % 2 ? v[m] : (v[m - 1] + v[m]) / 2) }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

declare -A med=()
for w in "${workloads[@]}"; do
    for t in "${order[@]}"; do
        med[$w,$t]="$(median 1 "${all[$w,$t]}") $(median 2 "${all[$w,$t]}") $(median 3 "${all[$w,$t]}")"
    done
done
# The figure a ratio compares: IOPS for 4k random reads, MiB/s for 1M sequential reads.
fig() {
    local iops bw _
    read -r iops bw _ <<<"${med[$1,$2]}"
    [[ $1 == randread-4k ]] && echo "$iops" || echo "$bw"
}
has_ublk=0 && [[ -n ${target[ublk-plain]:-} ]] && has_ublk=1

echo
echo "==== ovbd devices vs loop, same run ($where; $(uname -r); fio io_uring, iodepth 16, direct=1;"
echo "     median of $runs interleaved rounds of ${runtime} s, over ${mib} MiB)"
hdr=$(printf '%-12s %-11s %9s %9s %9s %8s' workload target IOPS MiB/s "clat-us" "vs loop")
((has_ublk)) && hdr+=$(printf ' %8s' "vs ublk")
echo "$hdr"
for w in "${workloads[@]}"; do
    for t in "${order[@]}"; do
        read -r iops bw lat <<<"${med[$w,$t]}"
        line=$(printf '%-12s %-11s %9s %9s %9s %8s' "$w" "$t" "$iops" "$bw" "$lat" "$(ratio "$(fig "$w" "$t")" "$(fig "$w" loop)")")
        if ((has_ublk)) && [[ $t == fuse-* ]]; then
            line+=$(printf ' %8s' "$(ratio "$(fig "$w" "$t")" "$(fig "$w" "ublk-${t#fuse-}")")")
        fi
        echo "$line"
    done
done
echo "(vs loop / vs ublk: IOPS ratio for randread-4k, MiB/s ratio for read-1m; MiB = 2^20 bytes;"
echo " *-hole: the frontend's floor, the same reads of an image with no data: no layer I/O at all)"

for d in "${attached[@]}"; do
    detach "$d"
done
losetup -d "$loopdev"
loops=()
