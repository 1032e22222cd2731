#!/usr/bin/env bash
# The peers of scripts/bench-coldstart.sh, from Debian, cached (quick when already there):
#   stargz: containerd-stargz-grpc built offline (GO111MODULE=off, GOPROXY=off) from stargz-grpc/main.go
#           here against Debian's Go sources (golang-github-containerd-stargz-snapshotter-dev, golang-go, in
#           /usr/share/gocode); ctr-remote from Debian's stargz-snapshotter package (/usr/bin/ctr-remote).
#   soci:   soci and soci-snapshotter-grpc from the soci-snapshotter package of $OVBD_SOCI_SUITE (sid), downloaded
#           through a private apt state derived from the system's own sources (tests/e2e/lib/debian-apt.bash)
#           and unpacked with dpkg-deb -x, not installed.
# The apt packages themselves (golang-go, the -dev package, stargz-snapshotter) are installed by scripts/setup.sh.
#
# Usage: tests/e2e/bench/peers.sh          builds/fetches what is missing; prints the bin directory
# Cache: ${OVBD_VM_CACHE:-<repo>/target/vm}/peers/ (bin/ holds containerd-stargz-grpc, soci, soci-snapshotter-grpc).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
cache=${OVBD_VM_CACHE:-$repo/target/vm}/peers
bin=$cache/bin
soci_suite=${OVBD_SOCI_SUITE:-sid}

die() {
    echo "peers.sh: error: $*" >&2
    exit 1
}
mkdir -p "$bin"
exec 9>"$cache/.lock"
flock 9

# stargz: rebuilt when main.go or the Go toolchain changes.
stamp=$( (sha256sum "$here/stargz-grpc/main.go" && go version 2>/dev/null) | sha256sum | cut -c1-16) || true
if [[ ! -x $bin/containerd-stargz-grpc || $(cat "$cache/stargz.stamp" 2>/dev/null) != "$stamp" ]]; then
    command -v go >/dev/null || die "no go toolchain (scripts/setup.sh installs golang-go)"
    [[ -d /usr/share/gocode/src/github.com/containerd/stargz-snapshotter/service ]] ||
        die "no stargz-snapshotter Go sources (scripts/setup.sh installs golang-github-containerd-stargz-snapshotter-dev)"
    echo "peers.sh: building containerd-stargz-grpc offline from Debian's Go sources" >&2
    (cd "$here/stargz-grpc" && env GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH=/usr/share/gocode \
        GOCACHE="$cache/go-build" CGO_ENABLED=0 go build -o "$bin/containerd-stargz-grpc.new" .) ||
        die "go build of containerd-stargz-grpc failed"
    mv "$bin/containerd-stargz-grpc.new" "$bin/containerd-stargz-grpc"
    echo "$stamp" >"$cache/stargz.stamp"
fi

# soci: the .deb of $soci_suite, unpacked.
if [[ ! -x $bin/soci || ! -x $bin/soci-snapshotter-grpc ]]; then
    base=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    [[ -n $base ]] || die "no VERSION_CODENAME in /etc/os-release"
    # shellcheck source=../lib/debian-apt.bash
    . "$repo/tests/e2e/lib/debian-apt.bash"
    aptdir=$cache/apt-$soci_suite
    apt_args=()
    debian_apt_setup "$aptdir" "$base" "$soci_suite" || die "cannot derive a private apt source for $soci_suite"
    debian_apt_update || die "apt-get update of the private $soci_suite source failed"
    rm -f "$aptdir"/debs/soci-snapshotter_*.deb
    (cd "$aptdir/debs" && apt-get "${apt_args[@]}" -q download "soci-snapshotter/$soci_suite" >&2) ||
        die "apt-get download soci-snapshotter/$soci_suite failed"
    deb=$(compgen -G "$aptdir/debs/soci-snapshotter_*.deb" | head -n1) || die "the soci-snapshotter .deb is missing"
    tmp=$cache/soci.unpack.$$
    rm -rf "$tmp"
    dpkg-deb -x "$deb" "$tmp"
    for b in soci soci-snapshotter-grpc; do
        [[ -x $tmp/usr/bin/$b ]] || die "$(basename "$deb") has no usr/bin/$b"
        mv "$tmp/usr/bin/$b" "$bin/$b"
    done
    dpkg-deb -f "$deb" Version >"$cache/soci.version"
    rm -rf "$tmp" "$deb"
    echo "peers.sh: soci-snapshotter $(cat "$cache/soci.version") ($soci_suite) in $bin" >&2
fi
echo "$bin"
