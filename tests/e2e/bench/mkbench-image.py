#!/usr/bin/env python3
"""OCI image layouts for the cold-start benchmark (scripts/bench-coldstart.sh). Prints the manifest digest.

  mkbench-image.py small OUT TAG [--mib 256] [--busybox /bin/busybox]
      A large image and one small file: layer 1 a static busybox (+ applet links, /etc/passwd), layer 2
      eight pseudo-random (incompressible, seeded) files of MIB/8 MiB each under /data, with /data/small.txt
      written in the middle of the layer's tar. Workload: cat /data/small.txt.
  mkbench-image.py python OUT TAG [--mib 240]
      An application image made from this host's own Debian files (merged /usr, no network): layer 1
      /etc basics and the shared libraries python3 and its extension modules load (found with ldd),
      layer 2 python3 and its standard library (/usr/lib/python3.X, with the byte-code Debian compiled),
      layer 3 the other top-level files of /usr/lib/<multiarch> in name order until the image holds MIB
      MiB uncompressed: content an application image carries and this start does not read.
      Workload: python3 -c 'import json, email, http.server'.
  mkbench-image.py layers OUT TAG --count N [--mib 200] [--busybox /bin/busybox]
      N layers: busybox, then N-1 layers each with /data/lK/blob.bin (MIB/(N-1) MiB pseudo-random) and
      /data/lK/small.txt. Workload: cat /data/l*/small.txt (one small read per layer).

Layers are gzip tars written through temporary files (images of hundreds of MiB stay out of memory);
mtimes (but host files' own), owners and the gzip header are fixed, so the same inputs give the same
digests.
"""
import argparse
import glob
import gzip
import hashlib
import io
import os
import random
import re
import subprocess
import sys
import tarfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "containerd"))
from mkimage import APPLETS, MTIME, init_layout, write_image  # noqa: E402

MIB = 1 << 20
GZIP_MT = "application/vnd.oci.image.layer.v1.tar+gzip"


class RandomReader(io.RawIOBase):
    """An endless stream of seeded pseudo-random bytes."""

    def __init__(self, seed):
        self.rng = random.Random(seed)

    def readable(self):
        return True

    def read(self, n=-1):
        return self.rng.randbytes(min(n, MIB) if n > 0 else MIB)


class StreamLayer:
    """A layer tar written to a temporary file in OUT; finish() gzips it into a blob."""

    def __init__(self, out, name):
        self.out, self.name = out, name
        self.path = os.path.join(out, f".layer-{name}.tar")
        self.tar = tarfile.open(self.path, mode="w", format=tarfile.PAX_FORMAT)
        self.dirs = set()

    def _info(self, name, typ, mode):
        ti = tarfile.TarInfo(name.lstrip("/"))
        ti.type, ti.mode, ti.mtime = typ, mode, MTIME
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        return ti

    def dir(self, name, mode=0o755):
        name = name.rstrip("/")
        if not name or name in self.dirs:
            return
        self.dir(os.path.dirname(name), 0o755)
        self.dirs.add(name)
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode))

    def file(self, name, data, mode=0o644):
        if isinstance(data, str):
            data = data.encode()
        self.dir(os.path.dirname(name))
        ti = self._info(name, tarfile.REGTYPE, mode)
        ti.size = len(data)
        self.tar.addfile(ti, io.BytesIO(data))

    def random_file(self, name, size, seed):
        """SIZE pseudo-random bytes (seeded), generated piece by piece as the tar reads them."""
        self.dir(os.path.dirname(name))
        ti = self._info(name, tarfile.REGTYPE, 0o644)
        ti.size = size
        self.tar.addfile(ti, RandomReader(seed))

    def symlink(self, name, target):
        self.dir(os.path.dirname(name))
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self.tar.addfile(ti)

    def host_file(self, path):
        """The host's file PATH at the same path (a symlink stays a symlink); returns its size."""
        self.dir(os.path.dirname(path))
        if os.path.islink(path):
            self.symlink(path, os.readlink(path))
            return 0
        st = os.stat(path)
        ti = self._info(path, tarfile.REGTYPE, st.st_mode & 0o7777)
        ti.size = st.st_size
        # The host's mtime (as an image built from installed packages keeps it), not MTIME: a .pyc
        # records its source's mtime, and Python recompiles every module whose .py says otherwise.
        ti.mtime = int(st.st_mtime)
        with open(path, "rb") as f:
            self.tar.addfile(ti, f)
        return st.st_size

    def finish(self):
        """Closes the tar, gzips it into OUT's blobs; returns (descriptor, diff_id)."""
        self.tar.close()
        tar_sha, gz_sha = hashlib.sha256(), hashlib.sha256()
        tmp_gz = self.path + ".gz"
        with open(self.path, "rb") as src, open(tmp_gz, "wb") as raw:

            class Hashing(io.RawIOBase):
                def writable(self):
                    return True

                def write(self, b):
                    gz_sha.update(b)
                    return raw.write(b)

            with gzip.GzipFile(fileobj=Hashing(), mode="wb", compresslevel=6, mtime=0, filename="") as gz:
                while chunk := src.read(4 * MIB):
                    tar_sha.update(chunk)
                    gz.write(chunk)
        digest = "sha256:" + gz_sha.hexdigest()
        size = os.path.getsize(tmp_gz)
        os.replace(tmp_gz, os.path.join(self.out, "blobs", "sha256", gz_sha.hexdigest()))
        os.remove(self.path)
        return {"mediaType": GZIP_MT, "digest": digest, "size": size}, "sha256:" + tar_sha.hexdigest()


def busybox_base(layer, busybox):
    with open(busybox, "rb") as f:
        layer.file("/bin/busybox", f.read(), 0o755)
    for a in APPLETS:
        layer.symlink(f"/bin/{a}", "busybox")
    etc_basics(layer)


def etc_basics(layer):
    layer.file("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    layer.file("/etc/group", "root:x:0:\nnogroup:x:65534:\n")
    layer.dir("/tmp", 0o1777)
    layer.dir("/root", 0o700)


def small(args, out):
    l1 = StreamLayer(out, "base")
    busybox_base(l1, args.busybox)
    l2 = StreamLayer(out, "data")
    each = args.mib * MIB // 8
    for i in range(8):
        l2.random_file(f"/data/blob-{i:02}.bin", each, 1000 + i)
        if i == 3:
            l2.file("/data/small.txt", "one small file in the middle of a large layer\n")
    return [l1, l2], ["/bin/sh"]


def ldd_paths(paths):
    """The shared libraries (with their symlink chains) the ELF files PATHS load, per ldd."""
    found = set()
    for p in paths:
        r = subprocess.run(["ldd", p], capture_output=True, text=True)
        for m in re.finditer(r"(?:=>\s+)?(/\S+)\s+\(0x", r.stdout):
            lib = m.group(1)
            while True:
                found.add(lib)
                if not os.path.islink(lib):
                    break
                lib = os.path.join(os.path.dirname(lib), os.readlink(lib))
    # /lib64 and /lib are symlinks into /usr on merged-/usr Debian: keep the /usr paths.
    return sorted({os.path.realpath(os.path.dirname(x)) + "/" + os.path.basename(x) for x in found})


def python(args, out):
    # The system's python3 (Debian's), whatever interpreter runs this script.
    info = subprocess.run(
        [args.python, "-c", "import sys, sysconfig; print(f'python{sys.version_info[0]}.{sys.version_info[1]}');"
         "print(sysconfig.get_paths()['stdlib']); print(sysconfig.get_config_var('MULTIARCH') or 'x86_64-linux-gnu')"],
        capture_output=True, text=True, check=True).stdout.split()
    ver, stdlib, multiarch = info
    exe = os.path.realpath(f"/usr/bin/{ver}")
    libdir = f"/usr/lib/{multiarch}"
    l1 = StreamLayer(out, "libs")
    for d in ("bin", "lib", "sbin"):
        l1.dir(f"/usr/{d}")
        l1.symlink(f"/{d}", f"usr/{d}")
    l1.dir("/usr/lib64")
    l1.symlink("/lib64", "usr/lib64")
    etc_basics(l1)
    libs = ldd_paths([exe] + glob.glob(f"{stdlib}/lib-dynload/*.so"))
    total = 0
    for lib in libs:
        total += l1.host_file(lib)
    loader = "/usr/lib64/ld-linux-x86-64.so.2"
    if os.path.lexists(loader):
        l1.host_file(loader)
    l2 = StreamLayer(out, "python")
    total += l2.host_file(exe)
    l2.symlink("/usr/bin/python3", ver)
    for root, dirs, files in os.walk(stdlib):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            if os.path.islink(p) or os.path.isfile(p):
                total += l2.host_file(p)
    l3 = StreamLayer(out, "filler")
    taken = set(libs)
    for name in sorted(os.listdir(libdir)):
        if total >= args.mib * MIB:
            break
        p = os.path.join(libdir, name)
        if p in taken or os.path.islink(p) or not os.path.isfile(p):
            continue
        total += l3.host_file(p)
    if total < args.mib * MIB:
        raise SystemExit(f"only {total // MIB} MiB of host files found, {args.mib} MiB asked")
    return [l1, l2, l3], ["/usr/bin/python3"]


def layers(args, out):
    if args.count < 2:
        raise SystemExit("--count: at least 2 layers")
    l1 = StreamLayer(out, "base")
    busybox_base(l1, args.busybox)
    result = [l1]
    each = args.mib * MIB // (args.count - 1)
    for k in range(1, args.count):
        lk = StreamLayer(out, f"l{k}")
        lk.random_file(f"/data/l{k:02}/blob.bin", each, 2000 + k)
        lk.file(f"/data/l{k:02}/small.txt", f"layer {k}\n")
        result.append(lk)
    return result, ["/bin/sh"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, mib in (("small", 256), ("python", 240), ("layers", 200)):
        p = sub.add_parser(name)
        p.add_argument("out")
        p.add_argument("tag")
        p.add_argument("--mib", type=int, default=mib)
        p.add_argument("--busybox", default="/bin/busybox")
        p.add_argument("--python", default="/usr/bin/python3", help="the host's interpreter the python image copies")
        if name == "layers":
            p.add_argument("--count", type=int, required=True)
    args = ap.parse_args()
    out = args.out
    init_layout(out)
    built, cmd = {"small": small, "python": python, "layers": layers}[args.cmd](args, out)
    descs, diff_ids = [], []
    for layer in built:
        d, diff_id = layer.finish()
        descs.append(d)
        diff_ids.append(diff_id)
    config = {
        "created": "2023-11-14T22:13:20Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": cmd, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": f"mkbench-image.py {args.cmd}: {l.name}"} for l in built],
    }
    write_image(out, config, descs, args.tag)


if __name__ == "__main__":
    sys.exit(main())
