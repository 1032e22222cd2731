#!/usr/bin/env python3
"""xattr-list.py ROOT [EXCLUDE...]: every extended attribute under ROOT, one line per attribute, sorted:

    PATH NAME=HEX

PATH relative to ROOT ("./data/x"), symlinks not followed, mount points not crossed. EXCLUDE: paths
("./lost+found") left out with everything below them. Complements tree-digest.sh, which busybox can run
inside a container but which cannot see xattrs.
"""
import os
import sys


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: xattr-list.py ROOT [EXCLUDE...]")
    root = sys.argv[1]
    excl = sys.argv[2:]
    dev = os.lstat(root).st_dev
    lines = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = "." + dirpath[len(root.rstrip("/")):]
        keep = []
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if os.lstat(p).st_dev == dev:
                keep.append(d)
        dirnames[:] = keep
        for name in [None] + dirnames + filenames:
            path = dirpath if name is None else os.path.join(dirpath, name)
            rel = rel_dir if name is None else rel_dir + "/" + name
            if any(rel == e or rel.startswith(e + "/") for e in excl):
                continue
            for attr in os.listxattr(path, follow_symlinks=False):
                value = os.getxattr(path, attr, follow_symlinks=False)
                lines.append(f"{rel} {attr}={value.hex()}")
    for line in sorted(set(lines)):
        print(line)


main()
