#!/usr/bin/env bash
# Fetch and cache the guest kernel (Debian bookworm-backports linux-image-*-amd64, which has ublk_drv) and
# build the small initramfs used by guest-run.sh.  Idempotent: a re-run reuses the cached kernel and rebuilds
# the initramfs only when one of its inputs changed.
#
# Usage: tests/e2e/vm/prepare.sh [--refresh] [--quiet]
#   --refresh  re-resolve the newest backports kernel (otherwise a cached kernel is reused forever)
#   --quiet    print nothing when everything is already cached (work done is always reported)
#
# Cache: ${OVBD_VM_CACHE:-<repo>/target/vm}.  Writes <cache>/vm.env (KVER, KERNEL, INITRD, MODDIR) for
# guest-run.sh.  Needs: apt-get, dpkg, depmod/modprobe (kmod), cpio, xz, gzip, busybox-static.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
cache=${OVBD_VM_CACHE:-$repo/target/vm}
suite=${OVBD_VM_DEBIAN_SUITE:-bookworm}
# Modules the initramfs itself needs (9p root, overlay, ext4, loop) plus ublk_drv; their dependencies are
# resolved with modprobe --show-depends.  Everything else is loaded in the guest from the full module tree.
initrd_modules=(netfs 9pnet 9pnet_virtio 9p overlay ublk_drv crc32c jbd2 mbcache crc16 ext4 loop)

refresh=0
quiet=0
while (($#)); do
    case $1 in
        --refresh) refresh=1 ;;
        --quiet) quiet=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *)
            echo "prepare.sh: unknown argument: $1" >&2
            exit 2
            ;;
    esac
    shift
done

say() { echo "prepare.sh: $*" >&2; }
note() { ((quiet)) || say "$@"; }
die() {
    echo "prepare.sh: error: $*" >&2
    exit 1
}

find_busybox() {
    local b
    for b in /bin/busybox /usr/bin/busybox; do
        if [[ -x $b ]] && ! LC_ALL=C ldd "$b" >/dev/null 2>&1; then
            echo "$b"
            return 0
        fi
    done
    return 1
}

for tool in apt-get apt-cache dpkg depmod modprobe cpio xz gzip sha256sum flock; do
    command -v "$tool" >/dev/null || die "'$tool' not found (host packages needed: apt dpkg kmod cpio xz-utils gzip util-linux)"
done
busybox=$(find_busybox) || die "no statically linked busybox found (install busybox-static)"

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

# ---------------------------------------------------------------------------------------------------------
# 1. The kernel package, from backports, through a private apt state derived from the system's own sources.
# ---------------------------------------------------------------------------------------------------------
aptdir=$cache/apt

# shellcheck source=../lib/debian-apt.bash
. "$repo/tests/e2e/lib/debian-apt.bash"

fetch_kernel() {
    say "resolving the $suite-backports kernel"
    local apt_args
    debian_apt_setup "$aptdir" "$suite" "$suite-backports" || die "cannot derive a private $suite-backports source"
    debian_apt_update || die "apt-get update (private backports source) failed"

    local meta=linux-image-amd64/$suite-backports pkg
    pkg=$(apt-cache "${apt_args[@]}" depends "$meta" 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ { print $2; exit }')
    [[ -n $pkg ]] || die "could not resolve the image package that $meta depends on"
    say "downloading $pkg"
    rm -f "$aptdir/debs/${pkg}_"*.deb
    (cd "$aptdir/debs" && apt-get "${apt_args[@]}" -q download "$pkg/$suite-backports" >&2) ||
        die "apt-get download $pkg failed"
    local deb
    deb=$(compgen -G "$aptdir/debs/${pkg}_*.deb" | head -n1) || die "downloaded .deb for $pkg not found"

    say "unpacking $(basename "$deb")"
    local dest=$cache/kernel/$pkg tmp=$cache/kernel/.unpack.$$
    rm -rf "$tmp"
    mkdir -p "$tmp"
    dpkg -x "$deb" "$tmp"
    local moddir kver
    for moddir in "$tmp/lib/modules" "$tmp/usr/lib/modules"; do
        [[ -d $moddir ]] && break
    done
    [[ -d $moddir ]] || die "no lib/modules in $deb"
    kver=$(ls "$moddir")
    [[ $(wc -w <<<"$kver") == 1 ]] || die "expected one kernel version in $deb, found: $kver"
    # depmod -b (kmod 30) only looks at ROOT/lib/modules.
    [[ -e $tmp/lib ]] || ln -s usr/lib "$tmp/lib"
    [[ -f $tmp/boot/vmlinuz-$kver ]] || die "no boot/vmlinuz-$kver in $deb"
    depmod -b "$tmp" "$kver"
    [[ -s $tmp/lib/modules/$kver/modules.dep ]] || die "depmod produced no modules.dep"
    [[ -n $(find "$tmp/lib/modules/$kver" -name 'ublk_drv.ko*' -print -quit) ]] ||
        die "$pkg has no ublk_drv module"
    rm -rf "$dest"
    mv "$tmp" "$dest"
    rm -f "$deb" # 100+ MB; --refresh downloads again anyway
    printf 'KPKG=%q\nKVER=%q\n' "$pkg" "$kver" >"$cache/kernel.env"
    say "kernel $kver cached in $dest"
}

kernel_ok() {
    [[ -s $cache/kernel.env ]] || return 1
    # shellcheck disable=SC1091
    source "$cache/kernel.env"
    [[ -n ${KPKG:-} && -n ${KVER:-} ]] || return 1
    kroot=$cache/kernel/$KPKG
    [[ -f $kroot/boot/vmlinuz-$KVER && -s $kroot/lib/modules/$KVER/modules.dep ]]
}

if ((refresh)) || ! kernel_ok; then
    fetch_kernel
    kernel_ok || die "kernel cache is inconsistent after fetching"
fi

# ---------------------------------------------------------------------------------------------------------
# 2. The initramfs: static busybox, the init script, decompressed modules in load order.
# ---------------------------------------------------------------------------------------------------------
init_script=$here/guest-init.sh
[[ -f $init_script ]] || die "missing $init_script"
initrd=$cache/initramfs-$KVER.cpio.gz
stamp=$initrd.inputs
inputs=$(
    printf 'kver %s\nmodules %s\n' "$KVER" "${initrd_modules[*]}"
    sha256sum "$init_script" "${BASH_SOURCE[0]}" "$busybox" | awk '{ print $1 }'
)

if [[ -s $initrd && -f $stamp && $(<"$stamp") == "$inputs" ]]; then
    note "initramfs up to date: $initrd"
else
    say "building initramfs for $KVER"
    staging=$cache/.initramfs.$$
    rm -rf "$staging"
    trap 'rm -rf "$staging"' EXIT
    mkdir -p "$staging"/{bin,dev,proc,sys,lib/ovbd-vm-modules}
    cp "$busybox" "$staging/bin/busybox"
    cp "$init_script" "$staging/init"
    chmod 0755 "$staging/init" "$staging/bin/busybox"

    # Resolve the dependency closure in load order; "builtin" lines need nothing.
    declare -A seen=()
    : >"$staging/lib/ovbd-vm-modules/load.list"
    for m in "${initrd_modules[@]}"; do
        deps=$(modprobe -d "$kroot" -S "$KVER" --show-depends "$m") || die "modprobe --show-depends $m failed"
        while read -r kind path _; do
            [[ $kind == insmod ]] || continue
            name=$(basename "$path")
            name=${name%.xz}
            name=${name%.zst}
            name=${name%.gz}
            [[ -n ${seen[$name]:-} ]] && continue
            seen[$name]=1
            case $path in
                *.ko.xz) xz -dc "$path" ;;
                *.ko.zst) zstd -dcq "$path" ;;
                *.ko.gz) gzip -dc "$path" ;;
                *) cat "$path" ;;
            esac >"$staging/lib/ovbd-vm-modules/$name"
            echo "$name" >>"$staging/lib/ovbd-vm-modules/load.list"
        done <<<"$deps"
    done
    printf '%s\n' "$KVER" >"$staging/lib/ovbd-vm-modules/kver"

    (cd "$staging" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) |
        gzip -6 >"$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
    printf '%s\n' "$inputs" >"$stamp"
    rm -rf "$staging"
    trap - EXIT
    say "initramfs: $initrd ($(du -h "$initrd" | cut -f1)); modules: ${!seen[*]}"
fi

printf 'KVER=%q\nKERNEL=%q\nINITRD=%q\nMODDIR=%q\n' \
    "$KVER" "$kroot/boot/vmlinuz-$KVER" "$initrd" "$kroot/lib/modules/$KVER" >"$cache/vm.env.tmp"
mv "$cache/vm.env.tmp" "$cache/vm.env"
