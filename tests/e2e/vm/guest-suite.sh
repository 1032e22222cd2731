#!/usr/bin/env bash
# Runs inside the test guest (started by tests/e2e/run-guest-tests.sh): runs each test script given as an
# argument, in order, with bash, cwd = the repository root, stderr merged into stdout (so the log reads in
# order), and prints one result line per test:
#   ok NAME
#   FAIL NAME (exit N)
# Each test gets at most $OVBD_GUEST_TEST_TIMEOUT seconds (default 600; a timeout shows as exit 124).
# Exits 1 if any test failed, 0 otherwise.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
export OVBD_REPO=$repo
per_test_timeout=${OVBD_GUEST_TEST_TIMEOUT:-600}

# What a failure may owe to the guest itself (the tmpfs /tmp and /var/tmp live in its RAM).
mem_summary() {
    local avail
    avail=$(awk '$1 == "MemAvailable:" {print int($2 / 1024)}' /proc/meminfo)
    echo "guest: ${avail} MiB available, $(df -m --output=used /tmp | tail -1 | tr -d ' ') MiB in /tmp," \
        "$(df -m --output=used /var/tmp | tail -1 | tr -d ' ') MiB in /var/tmp"
}
# Processes the kernel killed or that crashed during the suite (OOM killer, segfaults, hung tasks).
kernel_complaints() {
    local lines
    # (grep finding nothing must not end the suite under set -e -o pipefail)
    lines=$(dmesg 2>/dev/null | grep -iE 'out of memory|oom-kill|killed process|segfault|traps:|blocked for more than' | tail -n 10) || true
    [[ -z $lines ]] || printf '  kernel log:\n%s\n' "$(sed 's/^/    /' <<<"$lines")"
}

passed=0
failed=0
for t in "$@"; do
    name=$(basename "$t" .sh)
    echo "=== $name"
    start=$SECONDS
    rc=0
    (cd "$repo" && exec timeout -k 10 "$per_test_timeout" bash "$t") </dev/null 2>&1 || rc=$?
    echo "=== $name finished in $((SECONDS - start)) s ($(mem_summary))"
    if ((rc == 0)); then
        echo "ok $name"
        passed=$((passed + 1))
    else
        ((rc == 124)) && echo "$name: timed out after ${per_test_timeout} s"
        kernel_complaints
        echo "FAIL $name (exit $rc)"
        failed=$((failed + 1))
    fi
done
echo "=== guest suite: $passed passed, $failed failed"
((failed == 0))
