#!/usr/bin/env bash
# Conversion benchmark: `ovbd convert` of a Debian-sized rootfs image vs `tar -x` of the same layer blobs to
# disk, in the same run. Prints figures and the throughput ratio (tar time / convert time); asserts none.
#
# The image: a debootstrap (minbase, plus $OVBD_BENCH_INCLUDE) of the system's own Debian suite from the
# mirror its apt sources name, packed as a gzip'ed OCI layout of $OVBD_BENCH_LAYERS layers (the rootfs split
# by top-level path, as a Dockerfile's RUN steps would add them). Cached under target/bench.
# Both sides read the same blobs from the page cache, write to the same filesystem and end with `sync`.
#
# Usage: scripts/bench-convert.sh
# Environment: OVBD_BENCH_RUNS (runs per side, default 3; the median is used), OVBD_BENCH_INCLUDE (extra
# packages, default python3,perl), OVBD_BENCH_LAYERS (1, 2 or 3, default 3), OVBD_BENCH_DIR (default target/bench).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

case ${1:-} in
    -h | --help)
        sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
        exit 0
        ;;
esac

runs=${OVBD_BENCH_RUNS:-3}
include=${OVBD_BENCH_INCLUDE:-python3,perl}
nlayers=${OVBD_BENCH_LAYERS:-3}
bench=${OVBD_BENCH_DIR:-$repo/target/bench}
((EUID == 0)) || {
    echo "bench-convert.sh: run as root (debootstrap, and tar -x keeping owners)" >&2
    exit 2
}
scripts/setup.sh >/dev/null
for tool in debootstrap bc; do # only the bench needs these
    command -v "$tool" >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool" >/dev/null
done
cargo build --release --bin ovbd
ovbd=$repo/target/release/ovbd

# The suite and mirror of the system's own apt sources (deb822, else one-line format).
apt_suite_and_mirror() {
    local codename
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    [[ -n $codename ]] || return 1
    local uri=
    if [[ -r /etc/apt/sources.list.d/debian.sources ]]; then
        uri=$(awk -v suite="$codename" '
            BEGIN { RS = ""; FS = "\n" }
            {
                u = ""; hit = 0
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/) { split(substr($i, 6), a, /[ \t]+/); for (k in a) if (a[k] != "") { u = a[k]; break } }
                    if ($i ~ /^Suites:/) { n = split(substr($i, 8), s, /[ \t]+/); for (j = 1; j <= n; j++) if (s[j] == suite) hit = 1 }
                }
                if (hit && u != "" && !done) { print u; done = 1 }
            }' /etc/apt/sources.list.d/debian.sources)
    fi
    if [[ -z $uri && -r /etc/apt/sources.list ]]; then
        uri=$(sed -e 's/\[[^]]*\]//' /etc/apt/sources.list | awk -v suite="$codename" '$1 == "deb" && $3 == suite { print $2; exit }')
    fi
    [[ -n $uri ]] || return 1
    echo "$codename $uri"
}

# ------------------------------------------------------------------------------------------------ image
rootfs=$bench/debian-rootfs
layout=$bench/debian-oci-$nlayers
mkdir -p "$bench"
if [[ ! -e $rootfs/.complete ]]; then
    read -r suite mirror < <(apt_suite_and_mirror) || {
        echo "bench-convert.sh: no Debian suite/mirror found in the system's apt sources" >&2
        exit 1
    }
    echo "debootstrap $suite (minbase + $include) into $rootfs"
    rm -rf "$rootfs" "$layout"
    debootstrap --variant=minbase --include="$include" "$suite" "$rootfs" "$mirror" >"$bench/debootstrap.log" 2>&1 || {
        tail -n 20 "$bench/debootstrap.log" >&2
        exit 1
    }
    # As a Docker image ships it: no package cache, no apt lists.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    touch "$rootfs/.complete"
fi
if [[ ! -e $layout/index.json ]]; then
    echo "packing $rootfs as an OCI layout ($nlayers layers) in $layout"
    rm -rf "$layout" "$bench/layers"
    mkdir -p "$bench/layers"
    # The rootfs split by top-level path, as RUN steps would add it: 3 layers = everything but /usr/lib and
    # /usr/share, then /usr/lib, then /usr/share; 2 = everything but /usr/share, then /usr/share; 1 = all.
    case $nlayers in
        1) parts=(".") ;;
        2) parts=("--exclude=./usr/share ." "./usr/share") ;;
        3) parts=("--exclude=./usr/share --exclude=./usr/lib ." "./usr/lib" "./usr/share") ;;
        *) echo "bench-convert.sh: OVBD_BENCH_LAYERS must be 1, 2 or 3" >&2 && exit 2 ;;
    esac
    for ((i = 0; i < nlayers; i++)); do
        # shellcheck disable=SC2086  # a list of tar arguments
        tar -C "$rootfs" --sort=name --numeric-owner --xattrs --xattrs-include='*' --format=pax \
            --pax-option=delete=atime,delete=ctime --exclude=./.complete -cf "$bench/layers/$i.tar" ${parts[i]}
    done
    python3 - "$bench/layers" "$layout" "$nlayers" <<'EOF'
import gzip, hashlib, json, os, shutil, sys
src, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
blobs = os.path.join(out, "blobs", "sha256")
os.makedirs(blobs, exist_ok=True)
def put(data):
    d = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, d), "wb") as f:
        f.write(data)
    return "sha256:" + d, len(data)
layers, diff_ids = [], []
for i in range(n):
    raw = open(os.path.join(src, f"{i}.tar"), "rb").read()
    diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    digest, size = put(gzip.compress(raw, 6, mtime=0))
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size})
config = {"architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
          "config": {"Cmd": ["/bin/bash"]}, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
cd, cs = put(json.dumps(config).encode())
manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": layers}
md, ms = put(json.dumps(manifest).encode())
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
           "digest": md, "size": ms, "annotations": {"org.opencontainers.image.ref.name": "v1"}}]},
          open(os.path.join(out, "index.json"), "w"))
open(os.path.join(out, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
EOF
    rm -rf "$bench/layers"
fi
mapfile -t blobs < <(python3 -c '
import json, sys
idx = json.load(open(sys.argv[1] + "/index.json"))
m = json.load(open(sys.argv[1] + "/blobs/sha256/" + idx["manifests"][0]["digest"][7:]))
for l in m["layers"]: print(sys.argv[1] + "/blobs/sha256/" + l["digest"][7:])' "$layout")
raw_bytes=0
for b in "${blobs[@]}"; do raw_bytes=$((raw_bytes + $(gzip -dc "$b" | wc -c))); done
gz_bytes=$(cat "${blobs[@]}" | wc -c)
files=$(find "$rootfs" -xdev | wc -l)
printf 'image: %d layers, %d entries, %.1f MiB uncompressed, %.1f MiB gzip\n' "${#blobs[@]}" "$files" \
    "$(bc -l <<<"$raw_bytes / 1048576")" "$(bc -l <<<"$gz_bytes / 1048576")"

# ------------------------------------------------------------------------------------------------- runs
scratch=$bench/run
now() { date +%s.%N; }
tar_run() { # [ROOT]: where to extract (default: on disk, under $scratch)
    local root=${1:-$scratch/root} t0 t1 t2
    rm -rf "$scratch" "$root" && mkdir -p "$root" && sync
    t0=$(now)
    for b in "${blobs[@]}"; do
        tar -C "$root" --numeric-owner --xattrs --xattrs-include='*' -xpzf "$b"
    done
    t1=$(now)
    sync
    t2=$(now)
    [[ $root == "$scratch/root" ]] || rm -rf "$root"
    echo "$(bc -l <<<"$t1 - $t0") $(bc -l <<<"$t2 - $t0")"
}
convert_run() {
    rm -rf "$scratch" && mkdir -p "$scratch/work" && sync
    local t0 t1 t2
    t0=$(now)
    "$ovbd" convert --json --workdir "$scratch/work" "oci:$layout:v1" "oci:$scratch/out:obd" >"$scratch.json" \
        2>"$scratch.log" || {
        cat "$scratch.log" >&2
        return 1
    }
    t1=$(now)
    sync
    t2=$(now)
    echo "$(bc -l <<<"$t1 - $t0") $(bc -l <<<"$t2 - $t0")"
}
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

cat "${blobs[@]}" >/dev/null # both sides read the blobs from the page cache
# tmpfs: the same extraction with no disk filesystem cost, the hardest baseline.
shm=/dev/shm/ovbd-bench-tar-$$
tar_t=() tar_s=() mem_t=() conv_t=() conv_s=() manifests=()
for ((r = 1; r <= runs; r++)); do # interleaved, so drift in the machine's speed hits every side
    read -r a b < <(tar_run)
    tar_t+=("$a") tar_s+=("$b")
    read -r a b < <(tar_run "$shm")
    mem_t+=("$a")
    read -r a b < <(convert_run)
    conv_t+=("$a") conv_s+=("$b")
    [[ -s $scratch.json ]] || exit 1
    manifests+=("$(grep -o '"manifest": *"[^"]*"' "$scratch.json" | head -n1 | grep -o 'sha256:[0-9a-f]*')")
    printf 'run %d: tar -x %.2f s (%.2f s with sync; %.2f s to tmpfs), ovbd convert %.2f s (%.2f s with sync): %s\n' \
        "$r" "${tar_t[-1]}" "${tar_s[-1]}" "${mem_t[-1]}" "${conv_t[-1]}" "${conv_s[-1]}" "${manifests[-1]}"
done
manifest=${manifests[0]}
reproducible=yes
for m in "${manifests[@]}"; do [[ $m == "$manifest" ]] || reproducible=NO; done
out_bytes=$(du -cb "$scratch"/out/blobs/sha256/* | tail -n1 | cut -f1)
rm -rf "$scratch" "$scratch.json" "$scratch.log"

mib=$(bc -l <<<"$raw_bytes / 1048576")
printf '\nmedian of %d runs, %.1f MiB of layer tar (output %.1f MiB, manifest %s, same in every run: %s):\n' \
    "$runs" "$mib" "$(bc -l <<<"$out_bytes / 1048576")" "$manifest" "$reproducible"
for pair in "disk:tar_t:conv_t" "disk + sync:tar_s:conv_s" "tar to tmpfs:mem_t:conv_t"; do
    IFS=: read -r what tv cv <<<"$pair"
    declare -n tref=$tv cref=$cv
    tm=$(median "${tref[@]}") cm=$(median "${cref[@]}")
    printf '  %-13s tar -x %6.2f s %6.1f MiB/s | ovbd convert %6.2f s %6.1f MiB/s | ratio %.2fx (goal >= 0.5x)\n' \
        "$what" "$tm" "$(bc -l <<<"$mib / $tm")" "$cm" "$(bc -l <<<"$mib / $cm")" "$(bc -l <<<"$tm / $cm")"
done
