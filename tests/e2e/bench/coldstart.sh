#!/usr/bin/env bash
# Cold-start benchmark body (scripts/bench-coldstart.sh builds the release binary and runs this): cold pull +
# first run of the same workloads through containerd's overlayfs (full pull), stargz (eStargz), soci (SOCI
# index) and ovbd (OverlayBD; with and without a trace), interleaved run by run, on this host (ovbd's fuse
# frontend where there is no ublk). Prints per workload and snapshotter the medians (min-max) of pull, run
# and total seconds and of the blob bytes the registry sent (its access log), the warm start (a second run
# right after), and the ratios ovbd/peer against the goals. Asserts nothing.
#
# Cold: before every run containerd starts from an empty root (no content, no snapshots), the snapshotter
# from an empty root (its snapshots and block/chunk caches), and the page cache is dropped. The registry's
# blobs are on this host's disk by default, so they are dropped too: its cold reads (up to 4 MiB per range,
# see registry_totals) then share the disk with containerd's and the snapshotters' fsyncs, which a remote
# registry's reads do not. OVBD_BENCH_REGISTRY_STORAGE=tmpfs keeps them in RAM, off the node's disk.
#
# Workloads (tests/e2e/bench/mkbench-image.py builds them locally; layouts cached in
# $OVBD_BENCH_IMAGE_CACHE, default target/vm/coldstart-images):
#   small     cat of one small file from a large (OVBD_BENCH_SMALL_MIB, 256 MiB) image
#   python    python3 -c 'import json, email, http.server' in an image of this host's Debian python3, its
#             libraries and stdlib plus other /usr/lib files (OVBD_BENCH_PYTHON_MIB, 240 MiB uncompressed)
#   layers3   cat of one small file in each layer of a 3-layer image (OVBD_BENCH_LAYERS_MIB, 200 MiB)
#   layers20  the same with 20 layers
# Snapshotters: overlayfs (ctr image pull), stargz (ctr-remote image rpull; containerd-stargz-grpc built by
# peers.sh), soci (soci image rpull with the index digest; soci-snapshotter-grpc from Debian sid, pulling from
# a TLS front of the same registry: see tls_registry_start), ovbd
# (ovbd rpull), ovbd-trace (ovbd rpull of the image with a trace `ovbd record-trace` recorded of the workload:
# trace_record below), ovbd-cached (ovbd of the image without a trace, cold as the others but with its
# blocks already in ovbd's block cache: seeded by an untimed pull + run first, then everything but the cache
# wiped: the start of an image already cached, network left out). Lazy peers run without background fetch and without
# prefetch landmarks, like ovbd ([download] enable = false): bytes are what the first run needs.
#
# Knobs: OVBD_BENCH_RUNS (3), OVBD_BENCH_WORKLOADS ("small python layers3 layers20"),
# OVBD_BENCH_SNAPSHOTTERS ("overlayfs stargz soci ovbd ovbd-trace ovbd-cached"), OVBD_BENCH_CONVERT_ARGS (`ovbd convert`
# arguments; default "--algo zstd --block-size 16384", images made for lazy pulling as eStargz's are: see the README;
# empty: converter defaults), OVBD_BENCH_OVBD_CONFIG (TOML added to ovbd's config, e.g. $'[cache]\nrefill_kb = 16';
# not [device] or [download]), OVBD_BIN (target/release/ovbd),
# OVBD_BENCH_REGISTRY_STORAGE (disk: the registry's blobs on this host's disk, default; tmpfs: in RAM),
# E2E_KEEP=1 keeps the work dir (logs). As root.
set -uo pipefail
convert_args=${OVBD_BENCH_CONVERT_ARGS-"--algo zstd --block-size 16384"}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
# shellcheck source=../containerd/env.bash
. "$repo/tests/e2e/containerd/env.bash"
# shellcheck source=../containerd/ovbd.bash
. "$repo/tests/e2e/containerd/ovbd.bash"
((EUID == 0)) || e2e_fail "run as root (containerd, mounts, drop_caches)"
trap 'exit 130' INT
trap 'exit 143' TERM

runs=${OVBD_BENCH_RUNS:-3}
workloads=(${OVBD_BENCH_WORKLOADS:-small python layers3 layers20})
snapshotters=(${OVBD_BENCH_SNAPSHOTTERS:-overlayfs stargz soci ovbd ovbd-trace ovbd-cached})
ovbd_bin=${OVBD_BIN:-$repo/target/release/ovbd}
image_cache=${OVBD_BENCH_IMAGE_CACHE:-${OVBD_VM_CACHE:-$repo/target/vm}/coldstart-images}
soci_fixed_root=/var/lib/soci-snapshotter-grpc # soci 0.4 keeps its index store there whatever --root says
registry_storage=${OVBD_BENCH_REGISTRY_STORAGE:-disk}
[[ $runs =~ ^[1-9][0-9]*$ ]] || e2e_fail "OVBD_BENCH_RUNS: a positive number, not '$runs'"
[[ $registry_storage == disk || $registry_storage == tmpfs ]] ||
    e2e_fail "OVBD_BENCH_REGISTRY_STORAGE: disk or tmpfs, not '$registry_storage'"
[[ -x $ovbd_bin ]] || e2e_fail "$ovbd_bin not built (cargo build --release --bin ovbd)"

work= && e2e_tmpdir work /var/tmp
mkdir -p "$work/bin"
cp "$ovbd_bin" "$work/bin/ovbd" # a cargo build during the run would swap the binary under us
ovbd=$work/bin/ovbd
export CTRD_NS=coldstart-$$ CTRD_PROXY_ALIAS=
results=$work/results.tsv # workload snapshotter run pull_s run_s total_s bytes warm_s gets
: >"$results"
declare -A blocked=() # [snapshotter] or [workload/snapshotter] = why it did not run

log() { echo "[coldstart] $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
wanted() {
    local s
    for s in "${snapshotters[@]}"; do [[ $s == "$1" ]] && return 0; done
    return 1
}

# --------------------------------------------------------------------------------------------- workloads

# workload_build W: the OCI layout of W in the image cache (built once); sets W_LAYOUT, W_CMD (array), W_WANT
# (what the command prints, or empty: not checked).
workload_build() {
    local w=$1 args=() dir
    case $w in
        small) args=(small --mib "${OVBD_BENCH_SMALL_MIB:-256}") W_CMD=(cat /data/small.txt)
            W_WANT="one small file in the middle of a large layer" ;;
        python) args=(python --mib "${OVBD_BENCH_PYTHON_MIB:-240}")
            W_CMD=(/usr/bin/python3 -c 'import json, email, http.server; print("imported")') W_WANT=imported ;;
        layers3 | layers20) args=(layers --count "${w#layers}" --mib "${OVBD_BENCH_LAYERS_MIB:-200}")
            W_CMD=(/bin/sh -c 'cat /data/l*/small.txt | wc -l') W_WANT=$((${w#layers} - 1)) ;;
        *) e2e_fail "no workload '$w' (small python layers3 layers20)" ;;
    esac
    # Keyed by the builders' text too: a changed builder builds its images again.
    dir=$image_cache/$(echo "${args[*]}" | tr ' ' '_')_$(cat "$here/mkbench-image.py" "$here/../containerd/mkimage.py" |
        sha256sum | cut -c1-8)
    if [[ ! -s $dir/index.json ]]; then
        log "building the $w image (${args[*]}) in $dir"
        rm -rf "$dir.tmp"
        mkdir -p "$image_cache"
        nice "$E2E_PYTHON" "$here/mkbench-image.py" "${args[0]}" "$dir.tmp" v1 "${args[@]:1}" >/dev/null ||
            e2e_fail "mkbench-image.py ${args[*]} failed"
        mv "$dir.tmp" "$dir"
    fi
    W_LAYOUT=$dir
}

# The image references of workload W per format: cs-W:oci, :obd, :esgz (eStargz), :obd-trace.
ref() { echo "$REGISTRY/cs-$1:$2"; }

# prepare_images W: pushes W's OCI image and makes the variants each wanted snapshotter pulls (not timed);
# a variant that cannot be made blocks that snapshotter for W (with the error).
prepare_images() {
    local w=$1 oci out
    oci=$(ref "$w" oci)
    push_oci_layout "$W_LAYOUT" v1 "cs-$w:oci"
    if wanted ovbd || wanted ovbd-trace || wanted ovbd-cached; then
        out=$("$ovbd" convert $convert_args "$oci" "$(ref "$w" obd)" 2>&1) || {
            blocked[$w/ovbd]="ovbd convert failed: $(tail -n 3 <<<"$out")"
            blocked[$w/ovbd-trace]=${blocked[$w/ovbd]} blocked[$w/ovbd-cached]=${blocked[$w/ovbd]}
        }
    fi
    if wanted stargz && [[ -z ${blocked[stargz]:-} ]]; then
        ctr_pull "$oci" overlayfs && out=$(ctr-remote image convert --oci --estargz "$oci" "$(ref "$w" esgz)" 2>&1) &&
            out=$(ctr_do image push --plain-http "$(ref "$w" esgz)" 2>&1) ||
            blocked[$w/stargz]="eStargz conversion/push failed: $(tail -n 3 <<<"$out")"
    fi
    if wanted soci && [[ -z ${blocked[soci]:-} ]]; then
        ctr_pull "$oci" overlayfs && soci_index_make "$w" || true
    fi
    if wanted ovbd-trace && [[ -z ${blocked[ovbd-trace]:-} && -z ${blocked[$w/ovbd-trace]:-} ]]; then
        trace_record "$w" || true
    fi
}

# soci_index_make W: soci create (zTOCs for the layers of >= 10 MiB, soci's default) + soci push; the index
# digest goes to SOCI_INDEX[W] (soci image rpull is told it: this registry has no referrers API).
declare -A SOCI_INDEX=()
soci_index_make() {
    local w=$1 oci out digest
    oci=$(ref "$w" oci)
    out=$(soci_cli create "$oci" 2>&1) || {
        blocked[$w/soci]="soci create failed: $(tail -n 3 <<<"$out")"
        return 1
    }
    out=$(soci_cli push --plain-http "$oci" 2>&1) || {
        blocked[$w/soci]="soci push failed: $(tail -n 3 <<<"$out")"
        return 1
    }
    digest=$(soci_cli index list -q --ref "$oci" 2>/dev/null | head -n1)
    [[ $digest == sha256:* ]] || {
        blocked[$w/soci]="soci index list printed no index digest for $oci"
        return 1
    }
    SOCI_INDEX[$w]=$digest
    log "soci index of $oci: $digest"
}
soci_cli() { "$peer_bin/soci" --address "$CTRD_ADDR" --namespace "$CTRD_NS" "$@"; }

# soci 0.4 fetches its index over https whatever its config says, and layers over plain http from a
# loopback address: so it gets the same registry storage served over TLS by a second docker-registry on
# this host's first non-loopback IPv4 address ($TLS_REGISTRY; a self-signed certificate trusted by soci's
# processes through SSL_CERT_FILE). The bytes it sends are counted with the plain registry's (registry_totals).
TLS_REGISTRY= TLS_REGISTRY_PID=
tls_registry_start() {
    local dir=$work/registry-tls port=${REGISTRY##*:} ip
    ip=$(ip -4 -o addr show scope global 2>/dev/null | awk '{ sub(/\/.*/, "", $4); print $4; exit }')
    [[ -n $ip ]] || {
        log "soci: no non-loopback IPv4 address for its TLS registry"
        return 1
    }
    mkdir -p "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=$ip" -addext "subjectAltName=IP:$ip" \
        -keyout "$dir/key.pem" -out "$dir/cert.pem" >/dev/null 2>&1 || return 1
    for ((port = port + 1; port < 5200; port++)); do _port_busy "$ip" "$port" || break; done
    TLS_REGISTRY=$ip:$port
    sed -e "s|addr: .*|addr: $TLS_REGISTRY\n  tls:\n    certificate: $dir/cert.pem\n    key: $dir/key.pem|" \
        "$REGISTRY_DIR/config.yml" >"$dir/config.yml"
    docker-registry serve "$dir/config.yml" >>"$dir/registry.log" 2>&1 &
    TLS_REGISTRY_PID=$!
    e2e_on_exit 'e2e_kill_wait "$TLS_REGISTRY_PID" 10'
    e2e_wait "$E2E_READY_TIMEOUT" "TLS registry at $TLS_REGISTRY" curl -fsS --cacert "$dir/cert.pem" -o /dev/null \
        "https://$TLS_REGISTRY/v2/"
}
soci_env() { SSL_CERT_FILE=$work/registry-tls/cert.pem "$@"; }

# registry_totals: "BYTES GETS": blob bytes sent and blob GETs answered so far by both registries (the plain
# one and soci's TLS front), from their access logs as env.bash's registry_blob_bytes counts them, the bytes
# printed as an integer past 2^31 (mawk prints large sums as 2.1e+09, which bash arithmetic cannot take).
# This bench's registry spends a few ms of CPU on each GET whatever its size, so their count weighs on a lazy
# start more than their bytes.
registry_totals() {
    local logs=("$REGISTRY_DIR/registry.log")
    [[ -z $TLS_REGISTRY ]] || logs+=("$work/registry-tls/registry.log")
    awk '$6 == "\"GET" && $7 ~ /^\/v2\/.*\/blobs\// && $10 ~ /^[0-9]+$/ { n += $10; g++ }
         END { printf "%.0f %d\n", n, g }' "${logs[@]}"
}

# ----------------------------------------------------------------------------------- trace (the hook)
# ovbd with a trace: the image is pulled with a recorded access trace so ovbd can prefetch what the
# workload reads. `ovbd record-trace SRC DST -- CMD...` runs CMD once in SRC (downloaded, on a device of its
# own, outside containerd) and pushes DST = SRC + an acceleration layer holding the trace of its reads.
trace_available() { "$ovbd" record-trace --help >/dev/null 2>&1; }

trace_record() {
    local w=$1 out
    out=$("$ovbd" record-trace --time 120 --workdir "$work" "$(ref "$w" obd)" "$(ref "$w" obd-trace)" \
        -- "${W_CMD[@]}" 2>&1) || {
        blocked[$w/ovbd-trace]="ovbd record-trace failed: $(tail -n 3 <<<"$out")"
        return 1
    }
    log "trace of $w: $(tail -n 1 <<<"$out")"
}

# ------------------------------------------------------------------------------------------ snapshotters

# snap_start S DIR: containerd (empty root in DIR/ctrd) with S as its proxy snapshotter (started with an
# empty root), ready for a pull.
snap_start() {
    local s=$1 dir=$2 sock
    case $s in
        overlayfs) ctrd_start "$dir/ctrd" ;;
        ovbd*)
            rm -rf "$OVBD_ROOT" && mkdir -p "$OVBD_ROOT"
            # ovbd-cached: the block cache a seed run left (cache_seed).
            [[ $s != ovbd-cached || ! -d $work/cache-seed ]] || mv "$work/cache-seed" "$OVBD_ROOT/cache"
            CTRD_PROXY_NAME=ovbd ctrd_start "$dir/ctrd" "$OVBD_SOCK"
            ovbd_serve_start || return 1
            ;;
        stargz)
            sock=$dir/stargz/stargz.sock
            "$peer_bin/containerd-stargz-grpc" -address "$sock" -root "$dir/stargz-root" -config "$work/stargz.toml" \
                -log-level warn >>"$work/stargz.log" 2>&1 &
            PEER_PID=$!
            e2e_wait "$E2E_READY_TIMEOUT" "stargz socket" test -S "$sock" || return 1
            CTRD_PROXY_NAME=stargz ctrd_start "$dir/ctrd" "$sock"
            ;;
        soci)
            sock=$dir/soci/soci.sock
            rm -rf "$soci_fixed_root"
            SSL_CERT_FILE=$work/registry-tls/cert.pem "$peer_bin/soci-snapshotter-grpc" -address "$sock" -root "$dir/soci-root" -config "$work/soci.toml" \
                -log-level warn >>"$work/soci.log" 2>&1 &
            PEER_PID=$!
            e2e_wait "$E2E_READY_TIMEOUT" "soci socket" test -S "$sock" || return 1
            CTRD_PROXY_NAME=soci ctrd_start "$dir/ctrd" "$sock"
            ;;
    esac
}

snap_stop() {
    local s=$1 dir=$2 image=$3 pid
    # The image removed (a synchronous GC: its snapshots go) while the snapshotter runs: ovbd then stops
    # with no device to tear down.
    [[ -z $image ]] || ctr_do image rm --sync "$image" >/dev/null 2>&1
    ctrd_stop
    case $s in
        ovbd*)
            ovbd_serve_stop
            # A FUSE mount left behind is kept open by ovbd's holder process (for a restart): end it, or the
            # unmount waits for an answer that never comes.
            if [[ -n $(e2e_mounts_under "$OVBD_ROOT/fuse") ]]; then
                log "ovbd serve left its FUSE mount: stopping its holder"
                for pid in $(_pids_with_arg "$OVBD_ROOT/fuse.holder"); do e2e_kill_wait "$pid" 5; done
            fi
            ;;
        stargz | soci)
            [[ -n ${PEER_PID:-} ]] && e2e_kill_wait "$PEER_PID" 15
            PEER_PID=
            ;;
    esac
    e2e_umount_under "$dir"
    [[ $s != ovbd* ]] || { ovbd_detach_leftover_loops; e2e_umount_under "$OVBD_ROOT"; }
    [[ $s != soci ]] || rm -rf "$soci_fixed_root"
    rm -rf "$dir"
}

# pull S W: the pull each snapshotter's users run.
pull() {
    local s=$1 w=$2
    case $s in
        overlayfs) ctr_pull "$(ref "$w" oci)" overlayfs ;;
        ovbd | ovbd-cached) "$ovbd" rpull --address "$CTRD_ADDR" --namespace "$CTRD_NS" "$(ref "$w" obd)" ;;
        ovbd-trace) "$ovbd" rpull --address "$CTRD_ADDR" --namespace "$CTRD_NS" "$(ref "$w" obd-trace)" ;;
        stargz) ctr-remote image rpull --plain-http "$(ref "$w" esgz)" ;;
        soci) soci_env soci_cli image rpull --soci-index-digest "${SOCI_INDEX[$w]}" "$TLS_REGISTRY/cs-$w:oci" ;;
    esac
}
image_of() {
    case $1 in
        overlayfs) ref "$2" oci ;;
        soci) echo "$TLS_REGISTRY/cs-$2:oci" ;;
        ovbd | ovbd-cached) ref "$2" obd ;;
        ovbd-trace) ref "$2" obd-trace ;;
        stargz) ref "$2" esgz ;;
    esac
}
snap_name() { case $1 in ovbd-*) echo ovbd ;; *) echo "$1" ;; esac; }

# cache_seed W DIR: an untimed pull + run of W through ovbd; its block cache is kept in $work/cache-seed
# for the next snap_start of ovbd-cached (everything else goes).
cache_seed() {
    local w=$1 dir=$2
    rm -rf "$work/cache-seed"
    snap_start ovbd "$dir" && pull ovbd "$w" >/dev/null 2>&1 &&
        ctr_do run --rm --snapshotter ovbd "$(image_of ovbd "$w")" "cs-seed" "${W_CMD[@]}" >/dev/null 2>&1
    local ok=$?
    snap_stop ovbd "$dir" "$(image_of ovbd "$w")"
    ((ok == 0)) && [[ -d $OVBD_ROOT/cache ]] && mv "$OVBD_ROOT/cache" "$work/cache-seed"
}

# cold_run S W R: one cold pull + first run (+ a warm run) of W through S; a line in $results.
cold_run() {
    local s=$1 w=$2 r=$3 dir=$work/run b0 g0 t0 pull_s run_s total_s bytes gets warm_s out t1
    local why=${blocked[$s]:-${blocked[$w/$s]:-}}
    [[ -z $why ]] || return 0
    rm -rf "$dir" && mkdir -p "$dir"
    if [[ $s == ovbd-cached ]] && ! cache_seed "$w" "$dir" >"$dir.start.log" 2>&1; then
        blocked[$w/$s]="seeding the cache failed: $(tail -n 3 "$dir.start.log")"
        return 0
    fi
    mkdir -p "$dir"
    if ! snap_start "$s" "$dir" >"$dir.start.log" 2>&1; then
        blocked[$w/$s]="$s did not start: $(tail -n 3 "$dir.start.log")"
        snap_stop "$s" "$dir" "" 2>/dev/null
        return 0
    fi
    sync
    echo 3 >/proc/sys/vm/drop_caches
    read -r b0 g0 < <(registry_totals)
    t0=$(now)
    if ! out=$(pull "$s" "$w" 2>&1); then
        blocked[$w/$s]="pull failed: $(tail -n 3 <<<"$out")"
        snap_stop "$s" "$dir" "$(image_of "$s" "$w")"
        return 0
    fi
    pull_s=$(since "$t0") t1=$(now)
    out=$(ctr_do run --rm --snapshotter "$(snap_name "$s")" "$(image_of "$s" "$w")" "cs-$s-$r" "${W_CMD[@]}" 2>&1)
    local rc=$?
    run_s=$(since "$t1") total_s=$(since "$t0")
    read -r bytes gets < <(registry_totals)
    bytes=$((bytes - b0)) gets=$((gets - g0))
    local last
    last=$(tail -n 1 <<<"$out" | tr -d '\r' | sed 's/^[[:space:]]*//; s/[[:space:]]*$//')
    if ((rc != 0)) || [[ -n $W_WANT && $last != "$W_WANT" ]]; then
        blocked[$w/$s]="run failed (exit $rc): $(tail -n 3 <<<"$out")"
        snap_stop "$s" "$dir" "$(image_of "$s" "$w")"
        return 0
    fi
    t1=$(now)
    ctr_do run --rm --snapshotter "$(snap_name "$s")" "$(image_of "$s" "$w")" "cs-$s-$r-warm" "${W_CMD[@]}" >/dev/null 2>&1
    warm_s=$(since "$t1")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$w" "$s" "$r" "$pull_s" "$run_s" "$total_s" "$bytes" "$warm_s" "$gets" \
        >>"$results"
    log "run $r $w $s: pull ${pull_s}s run ${run_s}s total ${total_s}s, $bytes bytes in $gets GETs, warm ${warm_s}s"
    snap_stop "$s" "$dir" "$(image_of "$s" "$w")"
}

# -------------------------------------------------------------------------------------------------- setup

peer_bin=
if wanted stargz || wanted soci; then
    if ! peer_bin=$("$here/peers.sh" 2>"$work/peers.log"); then
        why="peers.sh failed: $(tail -n 2 "$work/peers.log")"
        blocked[stargz]=$why blocked[soci]=$why
    fi
fi
if wanted stargz && [[ -z ${blocked[stargz]:-} ]] && ! command -v ctr-remote >/dev/null; then
    blocked[stargz]="no ctr-remote (scripts/setup.sh installs Debian's stargz-snapshotter)"
fi
if wanted soci && [[ -e $soci_fixed_root ]]; then
    blocked[soci]="$soci_fixed_root exists (another soci user?): not wiping it"
fi
if wanted ovbd-trace && ! trace_available; then
    blocked[ovbd-trace]="trace: not available in this build (no 'ovbd record-trace')"
    echo "trace: not available in this build"
fi
# No background fetch, no prefetch (an eStargz converted without `optimize` has no landmark anyway).
printf 'noprefetch = true\nno_background_fetch = true\n' >"$work/stargz.toml"

OVBD_SERVE_LOG_LEVEL=info
OVBD_SERVE_EXTRA_CONFIG=$'[device]\nfrontend = "'${OVBD_BENCH_FRONTEND:-fuse}$'"\n[download]\nenable = false\n'${OVBD_BENCH_OVBD_CONFIG:-}
ovbd_serve_setup "$ovbd" "$work/ovbd-root" "$work/ovbd/ovbd.sock"
[[ -z $OVBD_SERVE_MISSING ]] || blocked[ovbd]=$OVBD_SERVE_MISSING blocked[ovbd-trace]=${blocked[ovbd-trace]:-$OVBD_SERVE_MISSING} \
    blocked[ovbd-cached]=$OVBD_SERVE_MISSING

if [[ $registry_storage == tmpfs ]]; then
    # Unmounted after the registry stops (exit hooks run newest first).
    mkdir -p "$work/registry/storage" && mount -t tmpfs tmpfs "$work/registry/storage" ||
        e2e_fail "mounting a tmpfs for the registry's storage"
    e2e_on_exit "umount '$work/registry/storage'"
fi
E2E_REGISTRY_ACCESSLOG=1 registry_start "$work/registry"
printf '[background_fetch]\ndisable = true\n' >"$work/soci.toml"
wanted soci && [[ -z ${blocked[soci]:-} ]] && { tls_registry_start || blocked[soci]="no TLS registry for soci (log: $work/registry-tls/registry.log)"; }
declare -A W_CMDS=() W_WANTS=() W_SHOW=()
ctrd_start "$work/ctrd-setup"
for w in "${workloads[@]}"; do
    workload_build "$w"
    prepare_images "$w"
    W_CMDS[$w]=$(printf '%q ' "${W_CMD[@]}") W_WANTS[$w]=$W_WANT W_SHOW[$w]=${W_CMD[*]}
done
ctrd_stop
rm -rf "$soci_fixed_root" "$work/ctrd-setup"

# ---------------------------------------------------------------------------------------------- the runs

n_snap=${#snapshotters[@]}
for ((r = 1; r <= runs; r++)); do
    for w in "${workloads[@]}"; do
        eval "W_CMD=(${W_CMDS[$w]})"
        W_WANT=${W_WANTS[$w]}
        # Interleaved: every run starts the rotation one snapshotter later (no fixed position in the order).
        for ((i = 0; i < n_snap; i++)); do
            cold_run "${snapshotters[(i + r - 1) % n_snap]}" "$w" "$r"
        done
    done
done

# -------------------------------------------------------------------------------------------------- report

# col_stat W S COL: "median min max" of column COL (4 pull, 5 run, 6 total, 7 bytes, 8 warm, 9 GETs) over the runs.
col_stat() {
    awk -F'\t' -v w="$1" -v s="$2" -v c="$3" '$1 == w && $2 == s { print $c }' "$results" | sort -g |
        awk '{ v[++n] = $1 } END { if (!n) exit 1; m = n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
              printf "%.6f %.6f %.6f\n", m, v[1], v[n] }'
}
fmt_s() { awk -v m="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.2f (%.2f-%.2f)", m, a, b }'; }
fmt_n() { awk -v m="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.0f (%d-%d)", m, a, b }'; }
fmt_mb() { awk -v m="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.1f (%.1f-%.1f)", m / 1e6, a / 1e6, b / 1e6 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }'; }
goal() { awk -v v="${1%x}" -v op="$2" -v g="$3" 'BEGIN { if (v == "n/a") print "n/a"; else if ((op == "<=" && v <= g) || (op == ">=" && v >= g)) print "met"; else print "NOT met" }'; }

echo
echo "==== cold start: pull + first run, $runs runs interleaved, medians (min-max); host, ovbd frontend ${OVBD_BENCH_FRONTEND:-fuse}"
echo "     (cold: empty containerd root, empty snapshotter root and caches, page cache dropped before each run;"
echo "      MB and GETs = blob bytes and requests the registry answered (access log); warm = a second run right after,"
echo "      image local; registry storage: $registry_storage)"
extra_config=${OVBD_BENCH_OVBD_CONFIG:-}
echo "     ovbd: convert ${convert_args:-(defaults)}${extra_config:+; config + ${extra_config//$'\n'/ }}"
for w in "${workloads[@]}"; do
    echo
    echo "== $w: ${W_SHOW[$w]}"
    printf '  %-11s %-20s %-20s %-20s %-22s %-16s %s\n' snapshotter "pull s" "run s" "total s" "MB fetched" "blob GETs" \
        "warm run s"
    declare -A med_total=() med_bytes=() med_warm=()
    for s in "${snapshotters[@]}"; do
        why=${blocked[$s]:-${blocked[$w/$s]:-}}
        if [[ -n $why ]] || ! col_stat "$w" "$s" 6 >/dev/null; then
            why=${why:-no run finished}
            printf '  %-11s blocked: %s\n' "$s" "${why//$'\n'/ | }"
            continue
        fi
        read -r pm pa pb < <(col_stat "$w" "$s" 4)
        read -r rm_ ra rb < <(col_stat "$w" "$s" 5)
        read -r tm ta tb < <(col_stat "$w" "$s" 6)
        read -r bm ba bb < <(col_stat "$w" "$s" 7)
        read -r wm wa wb < <(col_stat "$w" "$s" 8)
        read -r gm ga gb < <(col_stat "$w" "$s" 9)
        med_total[$s]=$tm med_bytes[$s]=$bm med_warm[$s]=$wm
        printf '  %-11s %-20s %-20s %-20s %-22s %-16s %s\n' "$s" "$(fmt_s "$pm" "$pa" "$pb")" "$(fmt_s "$rm_" "$ra" "$rb")" \
            "$(fmt_s "$tm" "$ta" "$tb")" "$(fmt_mb "$bm" "$ba" "$bb")" "$(fmt_n "$gm" "$ga" "$gb")" "$(fmt_s "$wm" "$wa" "$wb")"
    done
    for o in ovbd ovbd-trace; do
        [[ -n ${med_total[$o]:-} ]] || continue
        line="  $o/peer total:"
        for p in overlayfs stargz soci; do
            [[ -n ${med_total[$p]:-} ]] && line+=" /$p $(ratio "${med_total[$o]}" "${med_total[$p]}")"
        done
        line+=" | bytes:"
        for p in overlayfs stargz soci; do
            [[ -n ${med_bytes[$p]:-} ]] && line+=" /$p $(ratio "${med_bytes[$o]}" "${med_bytes[$p]}")"
        done
        echo "$line"
    done
    if [[ -n ${med_total[ovbd]:-} ]]; then
        if [[ -n ${med_total[stargz]:-} ]]; then
            v=$(ratio "${med_total[ovbd]}" "${med_total[stargz]}")
            echo "  goal ovbd total <= 0.7x stargz: $v $(goal "$v" '<=' 0.7)"
            v=$(ratio "${med_bytes[ovbd]}" "${med_bytes[stargz]}")
            echo "  goal ovbd bytes <= 1.2x stargz: $v $(goal "$v" '<=' 1.2)"
        fi
        if [[ -n ${med_total[overlayfs]:-} ]]; then
            v=$(ratio "${med_total[overlayfs]}" "${med_total[ovbd]}")
            echo "  goal ovbd >= 3x faster than overlayfs full pull: $v $(goal "$v" '>=' 3)"
        fi
    fi
    if [[ -n ${med_total[ovbd-trace]:-} ]]; then
        # Two readings of "a warm start (image already cached)": the start of an image whose blocks
        # ovbd has cached (ovbd-cached: pull + run, cold host), and a second run right after (warm run:
        # no pull, host page cache hot).
        if [[ -n ${med_total[ovbd-cached]:-} ]]; then
            v=$(ratio "${med_total[ovbd-trace]}" "${med_total[ovbd-cached]}")
            echo "  goal ovbd with trace within 1.3x of a warm start, as a cached image's start (ovbd-cached): $v $(goal "$v" '<=' 1.3)"
        fi
        v=$(ratio "${med_total[ovbd-trace]}" "${med_warm[ovbd]:-${med_warm[ovbd-trace]}}")
        echo "  goal ovbd with trace within 1.3x of a warm start, as the warm run: $v $(goal "$v" '<=' 1.3)"
    else
        echo "  goal ovbd with trace within 1.3x of a warm start: n/a (${blocked[ovbd-trace]:-${blocked[$w/ovbd-trace]:-not run}})"
    fi
    unset med_total med_bytes med_warm
done
# The raw figures (one line per run: workload snapshotter run pull_s run_s total_s bytes warm_s gets).
[[ -z ${OVBD_BENCH_RESULTS:-} ]] || cp "$results" "$OVBD_BENCH_RESULTS"
