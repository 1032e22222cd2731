#!/usr/bin/env bash
# Downloads Debian SUITE's containerd (containerd, ctr, containerd-shim-runc-v2) into the test cache and
# prints the directory holding its binaries; reused when already there. Nothing is installed: the .deb is
# fetched through a private apt state derived from the system's own sources (tests/e2e/lib/debian-apt.bash)
# and unpacked with dpkg-deb -x.
#
# Usage: tests/e2e/containerd/fetch-containerd.sh SUITE        (e.g. trixie: 1.7; sid: 2.x)
# Cache: ${OVBD_VM_CACHE:-<repo>/target/vm}/containerd/SUITE/ (bin dir: .../usr/bin; version in VERSION).
# Put the printed dir first on PATH: containerd finds its shim (containerd-shim-runc-v2) on PATH.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
cache=${OVBD_VM_CACHE:-$repo/target/vm}

die() {
    echo "fetch-containerd.sh: error: $*" >&2
    exit 1
}
[[ $# -eq 1 && $1 =~ ^[a-z][a-z0-9-]*$ ]] || die "usage: fetch-containerd.sh SUITE (a Debian suite name, e.g. trixie or sid)"
suite=$1
dest=$cache/containerd/$suite
bin=$dest/usr/bin

if [[ -x $bin/containerd && -x $bin/ctr && -x $bin/containerd-shim-runc-v2 && -s $dest/VERSION ]]; then
    echo "$bin"
    exit 0
fi
for tool in apt-get dpkg-deb flock; do
    command -v "$tool" >/dev/null || die "'$tool' not found"
done
# The system's own suite: its apt stanza (mirror, keyring) is the template for SUITE's.
base=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[[ -n $base ]] || die "no VERSION_CODENAME in /etc/os-release"

# shellcheck source=../lib/debian-apt.bash
. "$repo/tests/e2e/lib/debian-apt.bash"
mkdir -p "$cache/containerd"
exec 9>"$cache/containerd/.lock-$suite"
flock 9
aptdir=$cache/containerd/apt-$suite
apt_args=()
debian_apt_setup "$aptdir" "$base" "$suite" || die "cannot derive a private apt source for $suite"
debian_apt_update || die "apt-get update of the private $suite source failed"
rm -f "$aptdir"/debs/containerd_*.deb
(cd "$aptdir/debs" && apt-get "${apt_args[@]}" -q download "containerd/$suite" >&2) ||
    die "apt-get download containerd/$suite failed"
deb=$(compgen -G "$aptdir/debs/containerd_*.deb" | head -n1) || die "the downloaded containerd .deb is missing"
tmp=$dest.unpack.$$
rm -rf "$tmp"
mkdir -p "$tmp"
dpkg-deb -x "$deb" "$tmp"
for b in containerd ctr containerd-shim-runc-v2; do
    [[ -x $tmp/usr/bin/$b ]] || die "$(basename "$deb") has no usr/bin/$b"
done
dpkg-deb -f "$deb" Version >"$tmp/VERSION"
rm -rf "$dest"
mv "$tmp" "$dest"
rm -f "$deb"
echo "fetch-containerd.sh: containerd $(cat "$dest/VERSION") ($suite) in $bin" >&2
echo "$bin"
