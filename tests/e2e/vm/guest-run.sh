#!/usr/bin/env bash
# Run one command inside a throw-away QEMU guest (Debian bookworm-backports 6.12 kernel, which has ublk_drv)
# whose root filesystem is the host's "/" (read-only over virtio-9p, under an overlayfs with a tmpfs upper).
#
# Usage: tests/e2e/vm/guest-run.sh [options] -- CMD [ARGS...]
#   --timeout SECS   kill the guest after SECS seconds, boot included (default $OVBD_VM_TIMEOUT or 900)
#   --mem MiB        guest memory (default $OVBD_VM_MEM or 4096)
#   --cpus N         guest vCPUs (default $OVBD_VM_CPUS or 2)
#   --env K=V        set K=V in the guest's environment (repeatable)
#   --append ARGS    extra kernel command line arguments
#   --keep           keep the run directory (console log, command, output) and print its path
#   -v, --verbose    print timings (boot to command, total) and the accelerator used on stderr
#
# CMD runs with bash in the guest, as root, with cwd = the caller's cwd and stdin = /dev/null; its stdout and
# stderr are streamed to this script's stdout and stderr.  Environment passed through from the caller:
# RUST_LOG, RUST_BACKTRACE, RUST_LIB_BACKTRACE, NO_COLOR, every OVBD_* variable except the harness's own
# OVBD_VM_*, and every variable named in $OVBD_VM_PASS_ENV (space-separated).  The guest sets OVBD_GUEST=1.
#
# Exit status: CMD's own exit status; 124 if the guest timed out; 125 if the guest died without reporting an
# exit status (kernel panic, init failure, QEMU error); 2 for a usage error.  On 124/125 the tail of the guest
# console log is printed.  Cache: ${OVBD_VM_CACHE:-<repo>/target/vm} (see prepare.sh).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
cache=${OVBD_VM_CACHE:-$repo/target/vm}

timeout_s=${OVBD_VM_TIMEOUT:-900}
mem=${OVBD_VM_MEM:-4096}
cpus=${OVBD_VM_CPUS:-2}
append=
keep=0
verbose=${OVBD_VM_VERBOSE:-0}
log_lines=${OVBD_VM_LOG_LINES:-60}
envs=()

usage() {
    sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2
    exit 2
}
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

while (($#)); do
    case $1 in
        --timeout) timeout_s=${2:?}; shift ;;
        --mem) mem=${2:?}; shift ;;
        --cpus) cpus=${2:?}; shift ;;
        --env) envs+=("${2:?}"); shift ;;
        --append) append=${2?}; shift ;;
        --keep) keep=1 ;;
        -v | --verbose) verbose=1 ;;
        -h | --help) usage ;;
        --) shift; break ;;
        *) echo "guest-run.sh: unknown option: $1 (the command goes after --)" >&2; usage ;;
    esac
    shift
done
(($#)) || { echo "guest-run.sh: no command given" >&2; usage; }
if ! is_uint "$timeout_s" || ! is_uint "$mem" || ! is_uint "$cpus"; then
    echo "guest-run.sh: --timeout/--mem/--cpus take integers" >&2
    exit 2
fi
for kv in "${envs[@]}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || { echo "guest-run.sh: --env wants K=V, got: $kv" >&2; exit 2; }
done

log() {
    if ((verbose)); then echo "guest-run.sh: $*" >&2; fi
}

case $PWD/ in
    /tmp/* | /var/tmp/* | /run/* | /proc/* | /sys/* | /dev/*)
        echo "guest-run.sh: warning: cwd $PWD is hidden in the guest (fresh tmpfs/proc/sys/dev there)" >&2 ;;
esac

"$here/prepare.sh" --quiet || { echo "guest-run.sh: prepare.sh failed" >&2; exit 125; }
# shellcheck disable=SC1091
source "$cache/vm.env"

mkdir -p "$cache/runs"
run=$(mktemp -d "$cache/runs/run.XXXXXX")
ctl=$run/ctl
mkdir "$ctl"
pids=()
qpid=
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    local p
    # If we are interrupted, stop QEMU too (timeout(1) passes the signal on to it).
    if [[ -n $qpid ]] && kill -0 "$qpid" 2>/dev/null; then
        kill "$qpid" 2>/dev/null || true
        wait "$qpid" 2>/dev/null || true
    fi
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    if ((keep)); then
        echo "guest-run.sh: run directory kept: $run" >&2
    else
        rm -rf "$run"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The command script: cwd, environment, then exec CMD.
{
    printf 'cd -- %q || exit 126\n' "$PWD"
    while IFS= read -r name; do
        case $name in
            OVBD_VM_*) continue ;;
        esac
        printf 'export %s=%q\n' "$name" "${!name}"
    done < <(
        compgen -e | grep -E '^OVBD_' || true
        for n in RUST_LOG RUST_BACKTRACE RUST_LIB_BACKTRACE NO_COLOR ${OVBD_VM_PASS_ENV:-}; do
            [[ -n ${!n+x} ]] && echo "$n"
        done
    )
    for kv in "${envs[@]}"; do
        printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"
    done
    printf 'exec'
    printf ' %q' "$@"
    printf '\n'
} >"$ctl/cmd"
: >"$ctl/stdout"
: >"$ctl/stderr"

if grep -qwE 'vmx|svm' /proc/cpuinfo && [[ -r /dev/kvm && -w /dev/kvm ]]; then
    accel=(-accel kvm -cpu host)
else
    # No vmx/svm (e.g. a kvm_pvm /dev/kvm, which stock kernels do not survive): single-threaded TCG.
    # Multi-threaded TCG has oopsed guests; single-threaded has not.
    # shellcheck disable=SC2054 # commas are QEMU's
    accel=(-accel tcg,thread=single -cpu max)
fi
log "accel: ${accel[*]}, ${cpus} vCPU, ${mem} MiB, kernel $KVER, timeout ${timeout_s}s"

# shellcheck disable=SC2054 # commas are QEMU's
qemu=(
    qemu-system-x86_64
    -M pc -nodefaults -no-user-config -nographic -no-reboot
    "${accel[@]}" -smp "$cpus" -m "$mem"
    -kernel "$KERNEL" -initrd "$INITRD"
    -append "console=ttyS0 panic=-1 $append"
    -serial "file:$run/console.log"
    -virtfs local,path=/,mount_tag=ovbdroot,security_model=none,readonly=on,multidevs=remap
    -virtfs "local,path=$ctl,mount_tag=ovbdctl,security_model=none,multidevs=remap"
    -virtfs "local,path=$MODDIR,mount_tag=ovbdmods,security_model=none,readonly=on"
)

t0=$(date +%s.%N)
timeout -k 10 "$timeout_s" "${qemu[@]}" </dev/null >"$run/qemu.out" 2>&1 &
qpid=$!
# Stream the command's output while the guest runs; tail exits after a last read once QEMU is gone.
tail -n +1 -s 0.2 -f --pid="$qpid" "$ctl/stdout" &
pids+=($!)
tail -n +1 -s 0.2 -f --pid="$qpid" "$ctl/stderr" >&2 &
pids+=($!)

qrc=0
wait "$qpid" || qrc=$?
qpid=
t1=$(date +%s.%N)
wait "${pids[@]}" 2>/dev/null || true
pids=()
cp "$run/console.log" "$cache/last-console.log" 2>/dev/null || true

if [[ -f $ctl/started ]]; then
    tstart=$(date -r "$ctl/started" +%s.%N)
    log "boot to command: $(awk -v a="$t0" -v b="$tstart" 'BEGIN { printf "%.1f", b - a }') s (guest uptime $(cut -d' ' -f1 "$ctl/started") s)"
fi
log "total: $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s"

if grep -qE 'Oops|BUG:|WARNING:|Call Trace|Kernel panic' "$run/console.log" 2>/dev/null; then
    echo "guest-run.sh: warning: the guest kernel logged an oops/BUG/WARNING (see $cache/last-console.log)" >&2
fi

show_console() {
    echo "----- guest console (last $log_lines lines of $cache/last-console.log) -----" >&2
    tail -n "$log_lines" "$run/console.log" >&2 2>/dev/null || true
    if [[ -s $run/qemu.out ]]; then
        echo "----- qemu output -----" >&2
        tail -n 20 "$run/qemu.out" >&2
    fi
    echo "-----" >&2
}

if [[ -f $ctl/exit ]] && is_uint "$(<"$ctl/exit")"; then
    exit "$(<"$ctl/exit")"
elif ((qrc == 124)) || ((qrc == 137)); then
    show_console
    echo "guest-run.sh: guest timed out after $timeout_s s" >&2
    exit 124
else
    show_console
    echo "guest-run.sh: guest died without reporting an exit code (qemu exit $qrc)" >&2
    exit 125
fi
