#!/bin/sh
# tree-digest.sh ROOT [EXCLUDE...]
#
# Prints a stable listing of the file tree under ROOT (not crossing mount points: mount points themselves are
# listed, their contents are not), one line per entry, sorted by path (byte order):
#
#   PATH TYPE MODE UID:GID [SIZE NLINK MTIME DETAIL]
#
#   PATH    relative to ROOT, starting with "." ("./bin/sh")
#   TYPE    d directory, f regular file, l symlink, c/b char/block device, p fifo, s socket
#   MODE    permission bits in octal, including setuid/setgid/sticky (04755)
#   directories stop there: their size, link count and mtime differ between filesystems (and runtimes touch
#   them). Other entries go on with:
#   SIZE    bytes;  NLINK  n<count>;  MTIME  seconds since the epoch
#   DETAIL  files: sha256=<hex> (and hardlink=<first path of the inode> when the link count is > 1);
#           symlinks: -> <target>;  devices: rdev=<major>:<minor> (hex)
#
# EXCLUDE: paths relative to ROOT ("./lost+found") left out with everything below them.
#
# POSIX sh; works with busybox (sh, find, stat, sha256sum, readlink, sed, awk, sort) as well as with GNU tools,
# so the same script runs on the host over a mounted tree and inside a busybox container (`sh -c "$script"`).
# Path names must not contain a newline or "|".
set -e
[ $# -ge 1 ] || {
    echo "usage: tree-digest.sh ROOT [EXCLUDE...]" >&2
    exit 2
}
cd "$1"
shift
excl=" $* "
{
    find . -xdev -exec stat -c 'S|%f|%u|%g|%s|%h|%Y|%i|%t:%T|%n' {} +
    find . -xdev -type f -exec sha256sum {} + | sed 's/^\([0-9a-f]*\)  /H|\1|/'
    find . -xdev -type l -exec sh -c 'for l; do printf "L|%s|%s\n" "$l" "$(readlink "$l")"; done' sh {} +
} | awk -F'|' -v excl="$excl" '
function hex(s,   i, n, c) {
    n = 0
    s = tolower(s)
    for (i = 1; i <= length(s); i++) {
        c = index("0123456789abcdef", substr(s, i, 1)) - 1
        n = n * 16 + c
    }
    return n
}
function oct(n,   s) {
    s = ""
    while (n > 0) { s = (n % 8) s; n = int(n / 8) }
    while (length(s) < 4) s = "0" s
    return s
}
function rest(from,   i, s) {
    s = $from
    for (i = from + 1; i <= NF; i++) s = s "|" $i
    return s
}
function excluded(p,   n, i, e, a) {
    n = split(excl, a, " ")
    for (i = 1; i <= n; i++) {
        e = a[i]
        if (p == e || substr(p, 1, length(e) + 1) == e "/") return 1
    }
    return 0
}
$1 == "S" {
    p = rest(10)
    if (excluded(p)) next
    m = hex($2)
    t = int(m / 4096)
    ty = (t == 4) ? "d" : (t == 8) ? "f" : (t == 10) ? "l" : (t == 2) ? "c" : (t == 6) ? "b" : (t == 1) ? "p" : (t == 12) ? "s" : "?"
    line = ty " " oct(m % 4096) " " $3 ":" $4
    if (ty != "d") line = line " " $5 " n" $6 " " $7
    if (ty == "c" || ty == "b") line = line " rdev=" $9
    info[p] = line
    type[p] = ty
    nlink[p] = $6
    ino[p] = $8
    if (ty == "f" && $6 > 1 && (!($8 in first) || p < first[$8])) first[$8] = p
    next
}
$1 == "H" { sum[rest(3)] = $2; next }
$1 == "L" { target[$2] = rest(3); next }
END {
    for (p in info) {
        line = p " " info[p]
        if (type[p] == "f") {
            line = line " sha256=" sum[p]
            if (nlink[p] > 1) line = line " hardlink=" first[ino[p]]
        }
        if (type[p] == "l") line = line " -> " target[p]
        print line
    }
}' | LC_ALL=C sort
