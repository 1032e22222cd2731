#!/usr/bin/env bash
# Guest test: tests/device.rs (the `ovbd device` tests the host runs with its FUSE frontend) on ublk: the
# read-only vector, RW layers + commit + stacks, discard, 20 devices, bad input, a stuck source. One body
# for both frontends; the host builds the test binary (below) and records its path for the guest.
# Extra arguments to the test binary (a name filter, --exact, ...) come from $OVBD_DEVICE_TEST_ARGS.
# host-prepare: cargo test --test device --no-run --message-format=json | jq -r 'select(.reason == "compiler-artifact" and .target.name == "device" and .profile.test) | .executable' | grep . >target/device-test.path
set -euo pipefail
# shellcheck source=lib/common.bash
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.bash"

path_file=$OVBD_REPO/target/device-test.path
[[ -s $path_file ]] || fail "$path_file missing: run via tests/e2e/run-guest-tests.sh (its host-prepare builds the test)"
built=$(<"$path_file")
[[ -x $built ]] || fail "$built (from $path_file) is not an executable"
# A private copy, like $OVBD: a host build during the run must not swap it.
cp "$built" "$WORK/bin/device-test" || fail "copying $built"
# The stuck-source test serves its layer through a FUSE filesystem of its own.
modprobe fuse || fail "modprobe fuse"

# One test at a time: under TCG parallel tests only compete for the two vCPUs.
# shellcheck disable=SC2086  # (word splitting of the extra arguments is wanted)
OVBD_TEST_FRONTEND=ublk OVBD_BIN=$OVBD "$WORK/bin/device-test" --test-threads=1 ${OVBD_DEVICE_TEST_ARGS:-} ||
    fail "tests/device.rs on ublk failed"
pass "tests/device.rs on ublk"
assert_no_ublk
