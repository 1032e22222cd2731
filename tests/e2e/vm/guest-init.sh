#!/bin/busybox sh
# shellcheck shell=sh
# /init of the ovbd test guest (packed into the initramfs by prepare.sh; runs under busybox sh).
#
# Stage 1 (PID 1 in the initramfs): mount proc/sys/devtmpfs, insmod the bundled modules, mount the host's
# "/" (virtio-9p tag ovbdroot, read-only) as the lower layer of an overlayfs with a tmpfs upper, mount fresh
# tmpfs on /tmp /run /var/tmp, the control share (tag ovbdctl, writable) on /run/ovbd-vm/ctl and the
# kernel's module tree (tag ovbdmods) on /lib/modules/KVER, then switch_root into the overlay.
# Stage 2 (PID 1 in the overlay root): cgroup2, devpts, lo up, run /run/ovbd-vm/ctl/cmd with bash, write
# its exit code to /run/ovbd-vm/ctl/exit, power off.  Any setup failure powers off without an exit code,
# which the host reports as "guest died without reporting".

bb=/bin/busybox
msize=512000
p9="trans=virtio,version=9p2000.L,msize=$msize"

fatal() {
    echo "ovbd-vm-init: FATAL: $*" >&2
    $bb sync
    $bb poweroff -f
    exit 1
}

stage1() {
    $bb mkdir -p /proc /sys /dev /usr/bin /usr/sbin /sbin
    $bb --install -s
    export PATH=/bin:/sbin:/usr/bin:/usr/sbin
    mount -t devtmpfs devtmpfs /dev || fatal "mount devtmpfs"
    exec </dev/console >/dev/console 2>&1
    mount -t proc proc /proc || fatal "mount proc"
    mount -t sysfs sysfs /sys || fatal "mount sysfs"

    while read -r m; do
        # Not fatal: an alias can resolve to a CPU-specific variant (crc32c-intel) that refuses to load;
        # a module that is really needed makes the mount below fail.
        insmod "/lib/ovbd-vm-modules/$m" || echo "ovbd-vm-init: warning: insmod $m failed" >&2
    done </lib/ovbd-vm-modules/load.list
    kver=$(uname -r)

    mkdir -p /mnt/host /mnt/rw /newroot
    mount -t 9p -o "$p9,ro" ovbdroot /mnt/host || fatal "mount 9p root"
    mount -t tmpfs -o mode=0755 tmpfs /mnt/rw || fatal "mount tmpfs upper"
    mkdir -p /mnt/rw/upper /mnt/rw/work
    mount -t overlay -o lowerdir=/mnt/host,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /newroot ||
        fatal "mount overlay root"

    for d in dev proc sys; do
        mkdir -p "/newroot/$d"
        mount --move "/$d" "/newroot/$d" || fatal "move /$d"
    done
    mkdir -p /newroot/tmp /newroot/var/tmp /newroot/run
    mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp || fatal "tmpfs /tmp"
    mount -t tmpfs -o mode=1777 tmpfs /newroot/var/tmp || fatal "tmpfs /var/tmp"
    mount -t tmpfs -o mode=0755 tmpfs /newroot/run || fatal "tmpfs /run"
    mkdir -p /newroot/run/ovbd-vm/ctl /newroot/run/lock
    mount -t 9p -o "$p9" ovbdctl /newroot/run/ovbd-vm/ctl || fatal "mount 9p control share"
    # /lib may be a symlink to usr/lib in the host root; mkdir -p follows it inside the overlay.
    mkdir -p "/newroot/lib/modules/$kver"
    mount -t 9p -o "$p9,ro" ovbdmods "/newroot/lib/modules/$kver" || fatal "mount 9p module tree"

    cp $bb /newroot/run/ovbd-vm/busybox
    cp /init /newroot/run/ovbd-vm/init
    # If this exec fails, PID 1 exits, the kernel panics and QEMU stops (panic=-1, -no-reboot).
    exec switch_root /newroot /run/ovbd-vm/busybox sh /run/ovbd-vm/init stage2
}

stage2() {
    bb=/run/ovbd-vm/busybox
    ctl=/run/ovbd-vm/ctl
    export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    export HOME=/root LANG=C.UTF-8 TERM=dumb OVBD_GUEST=1
    $bb mount -t cgroup2 cgroup2 /sys/fs/cgroup || fatal "mount cgroup2"
    $bb mkdir -p /dev/pts /dev/shm
    $bb mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts || fatal "mount devpts"
    $bb mount -t tmpfs -o mode=1777 tmpfs /dev/shm || fatal "mount /dev/shm"
    [ -e /dev/fd ] || $bb ln -s /proc/self/fd /dev/fd
    $bb hostname ovbd-vm
    $bb ip link set lo up || fatal "lo up"
    [ -f $ctl/cmd ] || fatal "no command in the control share"

    $bb cat /proc/uptime >$ctl/started
    cd / || fatal "cd /"
    echo "ovbd-vm-init: running the command"
    /bin/bash $ctl/cmd </dev/null >>$ctl/stdout 2>>$ctl/stderr
    rc=$?
    echo "ovbd-vm-init: the command exited with status $rc"
    echo "$rc" >$ctl/exit.tmp && $bb mv $ctl/exit.tmp $ctl/exit
    $bb sync
    $bb poweroff -f
}

case ${1:-} in
    stage2) stage2 ;;
    *) stage1 ;;
esac
