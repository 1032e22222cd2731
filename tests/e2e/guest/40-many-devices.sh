#!/usr/bin/env bash
# Guest test: ONE `ovbd device attach --background` process serving 20 devices: 18 read-only configs of the
# hello-world layer, one read-only ext4_64 base and one writable layer over it.  All are read concurrently
# (parallel debugfs, then all mounted at once and hashed in parallel), `ovbd device list` shows all 20
# served by that one process, detaching half leaves the other half working, detaching the rest ends the
# server, and no ublk device is left.
# Runs inside the test VM (tests/e2e/run-guest-tests.sh); exits non-zero on the first failed check.
set -euo pipefail
# shellcheck source=lib/common.bash
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"

N_HELLO=18
base=$(extract_base "$WORK")
configs=()
for i in $(seq 1 $N_HELLO); do
    write_config "$WORK/hello$i.json" --result "$WORK/hello$i.result" "$HELLO_BLOB"
    configs+=("$WORK/hello$i.json")
done
write_config "$WORK/base.json" --result "$WORK/base.result" "$base"
"$OVBD" layer create "$WORK/up.data" "$WORK/up.index" --vsize-gb 0 || fail "layer create"
write_config "$WORK/rw.json" --upper "$WORK/up.data" "$WORK/up.index" --result "$WORK/rw.result" "$base"
configs+=("$WORK/base.json" "$WORK/rw.json")
n=${#configs[@]}

t0=$SECONDS
mapfile -t devs < <(attach "${configs[@]}")
took $t0 "attach $n devices"
((${#devs[@]} == n)) || fail "attach printed ${#devs[@]} devices for $n configs: ${devs[*]}"
for d in "${devs[@]}"; do
    [[ -b $d ]] || fail "$d is not a block device"
done
[[ $(printf '%s\n' "${devs[@]}" | sort -u | wc -l) == "$n" ]] || fail "attach printed duplicate devices: ${devs[*]}"
for r in "$WORK"/*.result; do
    [[ $(<"$r") == success ]] || fail "$(basename "$r"): $(<"$r")"
done
hello_devs=("${devs[@]:0:N_HELLO}")
base_dev=${devs[N_HELLO]}
rw_dev=${devs[N_HELLO + 1]}
pass "one attach: $n devices (${devs[0]} .. ${devs[n - 1]}), every resultFile says success"

# All served by one process, listed as serving.
json=$("$OVBD" device list --json)
[[ $(jq length <<<"$json") == "$n" ]] || fail "ovbd device list shows $(jq length <<<"$json") devices, expected $n"
[[ $(jq '[.[] | select(.state == "serving")] | length' <<<"$json") == "$n" ]] || fail "not all devices are serving: $json"
pids=$(jq -r '.[].pid' <<<"$json" | sort -u)
[[ $(wc -l <<<"$pids") == 1 ]] || fail "devices are served by several processes: $pids"
server=$pids
[[ $(tr '\0' ' ' <"/proc/$server/cmdline") == *"device attach"* ]] || fail "pid $server is not an ovbd device attach"
[[ $(jq -r --arg d "$rw_dev" '.[] | select(.block == $d) | .writable' <<<"$json") == true ]] || fail "$rw_dev not listed writable"
[[ $(jq '[.[] | select(.writable)] | length' <<<"$json") == 1 ]] || fail "more than one device listed writable"
[[ $("$OVBD" device list | tail -n +2 | wc -l) == "$n" ]] || fail "ovbd device list (table) does not show $n rows"
pass "ovbd device list: $n devices, all serving, one server process (pid $server)"

# hash_hello_all DEV...: debugfs `cat /hello` on every DEV at once; every hash must be right.
hash_hello_all() {
    local d pids=() i=0
    for d in "$@"; do
        (debugfs -R 'cat /hello' "$d" 2>/dev/null | sha256sum | cut -d' ' -f1 >"$WORK/sum.$i") &
        pids+=($!)
        i=$((i + 1))
    done
    for p in "${pids[@]}"; do
        wait "$p" || fail "debugfs on one of $* failed"
    done
    for ((i = 0; i < $#; i++)); do
        [[ $(<"$WORK/sum.$i") == "$HELLO_SHA" ]] || fail "/hello via debugfs on device #$i of $*: $(<"$WORK/sum.$i")"
    done
}

t0=$SECONDS
hash_hello_all "${hello_devs[@]}"
took $t0 "parallel debugfs on $N_HELLO devices"
pass "parallel debugfs 'cat /hello' on $N_HELLO devices: all $HELLO_SHA"

# Every device mounted at once; read in parallel, the RW one written too.
t0=$SECONDS
for i in "${!devs[@]}"; do
    mkdir "$WORK/m$i"
    if [[ ${devs[i]} == "$rw_dev" ]]; then
        mount "${devs[i]}" "$WORK/m$i" || fail "mount ${devs[i]}"
    else
        mount -o ro "${devs[i]}" "$WORK/m$i" || fail "mount -o ro ${devs[i]}"
    fi
done
rw_mnt=$WORK/m$((N_HELLO + 1))
head -c 8M /dev/urandom >"$WORK/blob"
pids=()
for i in $(seq 0 $((N_HELLO - 1))); do
    (sha256sum "$WORK/m$i/hello" | cut -d' ' -f1 >"$WORK/msum.$i") &
    pids+=($!)
done
(cp "$WORK/blob" "$rw_mnt/blob" && sync "$rw_mnt/blob") &
pids+=($!)
(ls "$WORK/m$N_HELLO" >"$WORK/base.ls") &
pids+=($!)
for p in "${pids[@]}"; do
    wait "$p" || fail "a parallel read or write on the mounted devices failed"
done
for i in $(seq 0 $((N_HELLO - 1))); do
    [[ $(<"$WORK/msum.$i") == "$HELLO_SHA" ]] || fail "/hello on ${devs[i]} (mounted): $(<"$WORK/msum.$i")"
done
[[ $(<"$WORK/base.ls") == lost+found ]] || fail "ext4_64 base root holds '$(<"$WORK/base.ls")', expected lost+found"
for i in "${!devs[@]}"; do
    umount "$WORK/m$i" || fail "umount $WORK/m$i"
done
took $t0 "mount all, read/write in parallel, umount"
pass "all $n devices mounted at once: $N_HELLO /hello hashes right, base lists lost+found, 8 MiB written to $rw_dev"

# Detach half (by id); the rest keep working, the server keeps running.
t0=$SECONDS
half=$((N_HELLO / 2))
for d in "${hello_devs[@]:0:half}"; do
    detach_dev "$d"
done
kill -0 "$server" 2>/dev/null || fail "the server exited after detaching $half of $n devices"
[[ $("$OVBD" device list --json | jq length) == $((n - half)) ]] || fail "ovbd device list does not show $((n - half)) devices"
hash_hello_all "${hello_devs[@]:half}"
mount -o ro "$rw_dev" "$rw_mnt" || fail "mount -o ro $rw_dev"
cmp "$WORK/blob" "$rw_mnt/blob" || fail "the file written to $rw_dev reads back wrong"
umount "$rw_mnt"
e2fsck_clean "$rw_dev"
pass "detached $half; the other $((n - half)) still read right (and the written file on $rw_dev), server still up"

for d in "${hello_devs[@]:half}" "$base_dev" "$rw_dev"; do
    detach_dev "$d"
done
took $t0 "detach all"
wait_gone "$server" 30 || fail "the server (pid $server) still runs after every device was detached"
pass "detached all $n by id; the server exited"
[[ $("$OVBD" device list --json | jq length) == 0 ]] || fail "ovbd device list still shows devices"
assert_no_ublk
