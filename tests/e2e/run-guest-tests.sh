#!/usr/bin/env bash
# Run the guest tests (tests/e2e/guest/*.sh, sorted) inside ONE boot of the test VM (see tests/e2e/vm/README.md).
#
# Usage: tests/e2e/run-guest-tests.sh [FILTER...]
#   FILTER  run only the tests whose file name contains one of the FILTERs (e.g. "smoke", "00-")
#
# Environment: OVBD_VM_TIMEOUT (whole guest run, default 120 + 600 per test), OVBD_GUEST_TEST_TIMEOUT
# (per test, default 600), OVBD_VM_MEM, OVBD_VM_CPUS, OVBD_VM_CACHE, plus whatever guest-run.sh passes through
# (RUST_LOG, RUST_BACKTRACE, OVBD_*).  Tests find the built binaries at $OVBD_REPO/target/debug/.
#
# Exit status: 0 if every selected test passed; 1 if any failed; 124 if the guest timed out; 125 if the
# guest died without reporting; 2 on usage errors (e.g. no test matches the filters).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

case ${1:-} in
    -h | --help)
        sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
        exit 0
        ;;
esac

# The guest mounts fresh tmpfs over these, so a checkout below them is invisible there.
case $repo/ in
    /tmp/* | /var/tmp/* | /run/*)
        echo "run-guest-tests.sh: the checkout ($repo) is under /tmp, /var/tmp or /run, which the test guest" \
            "replaces with empty tmpfs; use a checkout elsewhere" >&2
        exit 2
        ;;
esac

shopt -s nullglob
LC_COLLATE=C
tests=()
for t in "$repo"/tests/e2e/guest/*.sh; do
    name=$(basename "$t" .sh)
    if (($#)); then
        match=0
        for f in "$@"; do
            [[ $name == *"$f"* ]] && match=1
        done
        ((match)) || continue
    fi
    tests+=("$t")
done

if ((${#tests[@]} == 0)); then
    echo "run-guest-tests.sh: no guest tests match${*:+ the filters: $*}" >&2
    exit 2
fi

# A test's "# host-prepare: CMD" lines run here first, from the repo root: the guest has no network, so
# downloads (e.g. another containerd) happen on the host, into the cache the guest sees.
for t in "${tests[@]}"; do
    while IFS= read -r cmd; do
        echo "run-guest-tests.sh: $(basename "$t" .sh): host-prepare: $cmd"
        (cd "$repo" && bash -c "$cmd" >/dev/null) || {
            echo "run-guest-tests.sh: host-prepare of $(basename "$t" .sh) failed: $cmd" >&2
            exit 1
        }
    done < <(sed -n 's/^# host-prepare: //p' "$t")
done
export OVBD_GUEST_TEST_TIMEOUT=${OVBD_GUEST_TEST_TIMEOUT:-600}
total_timeout=${OVBD_VM_TIMEOUT:-$((120 + OVBD_GUEST_TEST_TIMEOUT * ${#tests[@]}))}

echo "run-guest-tests.sh: ${#tests[@]} test(s) in one guest: $(for t in "${tests[@]}"; do basename "$t" .sh; done | tr '\n' ' ')"
out=$(mktemp)
trap 'rm -f "$out"' EXIT

cd "$repo"
set +e
"$here/vm/guest-run.sh" -v --timeout "$total_timeout" -- bash "$here/vm/guest-suite.sh" "${tests[@]}" | tee "$out"
rc=${PIPESTATUS[0]}
set -e

passed=0
failed=0
not_run=()
failures=()
for t in "${tests[@]}"; do
    name=$(basename "$t" .sh)
    if grep -qxF "ok $name" "$out"; then
        passed=$((passed + 1))
    elif line=$(grep -m1 -E "^FAIL $name \(exit [0-9]+\)$" "$out"); then
        failed=$((failed + 1))
        failures+=("$line")
    else
        not_run+=("$name")
    fi
done

echo
echo "==== guest tests: $passed passed, $failed failed, ${#not_run[@]} not finished (of ${#tests[@]})"
for f in "${failures[@]}"; do echo "  $f"; done
for n in "${not_run[@]}"; do echo "  NOT FINISHED $n"; done
case $rc in
    0 | 1) ;;
    124) echo "  the guest timed out after ${total_timeout} s" ;;
    125) echo "  the guest died without reporting (see the console log above)" ;;
    *) echo "  the guest suite exited with $rc" ;;
esac

if ((rc == 124 || rc == 125)); then
    exit "$rc"
elif ((rc != 0 || failed > 0 || ${#not_run[@]} > 0)); then
    exit 1
fi
echo "==== all guest tests passed"
