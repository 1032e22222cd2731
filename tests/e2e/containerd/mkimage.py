#!/usr/bin/env python3
"""OCI image layouts for the containerd end-to-end tests.

  mkimage.py busybox OUT_DIR TAG [--busybox /bin/busybox] [--no-gzip] [--large MIB]
      Build a small multi-layer image from a static busybox (layers below) into the OCI layout OUT_DIR
      (created or added to) under TAG; prints the manifest digest. --large adds a 4th layer with
      /data/large.bin: MIB MiB of pseudo-random (incompressible, seeded) bytes, for lazy-pull tests.
  mkimage.py pause OUT_DIR TAG [--busybox /bin/busybox]
      A tiny "pause" image for the CRI plugin's sandbox_image: one layer with /bin/busybox (static) and
      the entrypoint ["/bin/busybox", "sleep", "2147483647"]. Deterministic like the busybox image;
      prints the manifest digest.
  mkimage.py from-docker SRC_LAYOUT SRC_TAG OUT_DIR TAG
      Copy the single-platform image SRC_TAG of SRC_LAYOUT, whose manifest has Docker media types, into
      OUT_DIR as TAG with OCI media types (config and layer blobs unchanged; a new manifest). skopeo 1.9
      skips index entries with Docker media types, so this is how the plain hello-world image (fixture tag
      `amd64`) gets pushed. Prints the new manifest digest.

The busybox image is deterministic (fixed mtimes, owners, gzip header), so the manifest digest only
changes when this script or the busybox binary changes. Push it with
`skopeo copy oci:OUT_DIR:TAG docker://REGISTRY/busybox:TAG`.

Layers (bottom to top):
  1. base:    /bin/busybox + applet symlinks, /etc/{passwd,group,hostname}, /tmp (1777), /root (0700),
              /data/{gone.txt, old/, opaque/{a,b}, mode.txt, replaced.txt}
  2. files:   /usr/share/doc/e2e/readme.txt, /usr/local/bin/hello.sh (0755), /data/secret (0600, 1000:1000),
              /data/suid (04755), /data/sticky/ (01777), /data/empty, /data/big.bin (1 MiB pseudo-random),
              "/data/with space.txt", relative and absolute symlinks, a dangling symlink,
              /data/xattrs.txt (security.capability + user.e2e xattrs),
              a hardlink pair /data/hard1 = /data/hard2, /data/deep/a/b/c/leaf.txt
  3. changes: whiteouts for /data/gone.txt and /data/old, opaque /data/opaque (+ new.txt), /etc/hostname
              rewritten, /data/mode.txt re-added with mode 0640, /data/replaced.txt turned into a directory
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import random
import sys
import tarfile

MTIME = 1700000000
APPLETS = """sh ash cat ls echo sleep find stat sha256sum sed awk sort readlink mkdir rm touch printf true false
test [ wc head tail id env mv cp ln chmod chown grep dd sync uname xargs tr cut mount df du date hostname
basename dirname tee seq kill ps""".split()


class Layer:
    def __init__(self):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name, typ, mode, uid=0, gid=0):
        ti = tarfile.TarInfo(name.lstrip("/"))
        ti.type = typ
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""
        ti.mtime = MTIME
        return ti

    def dir(self, name, mode=0o755, uid=0, gid=0):
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode, uid, gid))

    def file(self, name, data, mode=0o644, uid=0, gid=0, xattrs=None):
        if isinstance(data, str):
            data = data.encode()
        ti = self._info(name, tarfile.REGTYPE, mode, uid, gid)
        ti.size = len(data)
        if xattrs:
            # PAX records as Go's archive/tar writes xattrs; values are raw bytes (surrogateescape).
            ti.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()}
        self.tar.addfile(ti, io.BytesIO(data))

    def symlink(self, name, target):
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self.tar.addfile(ti)

    def hardlink(self, name, target):
        ti = self._info(name, tarfile.LNKTYPE, 0o644)
        ti.linkname = target.lstrip("/")
        self.tar.addfile(ti)

    def whiteout(self, path):
        d, b = os.path.split(path)
        self.file(os.path.join(d, ".wh." + b), b"", 0o644)

    def opaque(self, dirpath):
        self.file(os.path.join(dirpath, ".wh..wh..opq"), b"", 0o644)

    def close(self):
        self.tar.close()
        return self.buf.getvalue()


def layers(busybox):
    with open(busybox, "rb") as f:
        bb = f.read()

    l1 = Layer()
    for d, m in [("/bin", 0o755), ("/etc", 0o755), ("/tmp", 0o1777), ("/root", 0o700), ("/data", 0o755)]:
        l1.dir(d, m)
    l1.file("/bin/busybox", bb, 0o755)
    for a in APPLETS:
        l1.symlink("/bin/" + a, "busybox")
    l1.file("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    l1.file("/etc/group", "root:x:0:\nnogroup:x:65534:\n")
    l1.file("/etc/hostname", "base\n")
    l1.file("/data/gone.txt", "this file is deleted by a whiteout in layer 3\n")
    l1.dir("/data/old")
    l1.file("/data/old/inside.txt", "the whole directory is whited out in layer 3\n")
    l1.dir("/data/opaque", 0o750)
    l1.file("/data/opaque/a", "hidden by the opaque marker\n")
    l1.file("/data/opaque/b", "hidden too\n")
    l1.file("/data/mode.txt", "mode changes in layer 3\n", 0o600)
    l1.file("/data/replaced.txt", "becomes a directory in layer 3\n")

    l2 = Layer()
    for d in ["/usr", "/usr/share", "/usr/share/doc", "/usr/share/doc/e2e", "/usr/local", "/usr/local/bin"]:
        l2.dir(d)
    l2.file("/usr/share/doc/e2e/readme.txt", "ovbd e2e busybox image\n")
    l2.file("/usr/local/bin/hello.sh", "#!/bin/sh\necho hello from the busybox image\n", 0o755)
    l2.file("/data/secret", "owned by 1000:1000, mode 0600\n", 0o600, 1000, 1000)
    l2.file("/data/suid", "setuid bit\n", 0o4755)
    l2.dir("/data/sticky", 0o1777)
    l2.file("/data/sticky/f", "in a sticky dir\n", 0o666, 65534, 65534)
    l2.file("/data/empty", b"")
    rnd = random.Random(20240601)
    l2.file("/data/big.bin", rnd.randbytes(1 << 20))
    l2.file("/data/with space.txt", "a name with a space\n")
    l2.symlink("/data/rel-link", "../usr/share/doc/e2e/readme.txt")
    l2.symlink("/data/abs-link", "/bin/busybox")
    l2.symlink("/data/dangling", "/nonexistent/target")
    l2.file("/data/hard1", "two names, one inode\n")
    l2.hardlink("/data/hard2", "/data/hard1")
    for d in ["/data/deep", "/data/deep/a", "/data/deep/a/b", "/data/deep/a/b/c"]:
        l2.dir(d, 0o711)
    l2.file("/data/deep/a/b/c/leaf.txt", "deep\n", 0o444)
    # cap_net_bind_service=ep (VFS_CAP_REVISION_2) and a user xattr.
    cap = bytes([0, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    l2.file("/data/xattrs.txt", "has xattrs\n", 0o755, xattrs={"security.capability": cap, "user.e2e": b"hello"})

    l3 = Layer()
    l3.dir("/data")
    l3.whiteout("/data/gone.txt")
    l3.whiteout("/data/old")
    l3.dir("/data/opaque", 0o750)
    l3.opaque("/data/opaque")
    l3.file("/data/opaque/new.txt", "only file left in the opaque dir\n")
    l3.dir("/etc")
    l3.file("/etc/hostname", "busybox-e2e\n")
    l3.file("/data/mode.txt", "mode changes in layer 3\n", 0o640)
    l3.dir("/data/replaced.txt", 0o755)
    l3.file("/data/replaced.txt/now-a-dir", "was a file below\n")

    return [("base", l1.close()), ("files", l2.close()), ("changes", l3.close())]


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_blob(out, data):
    d = sha(data)
    path = os.path.join(out, "blobs", "sha256", d.split(":", 1)[1])
    with open(path, "wb") as f:
        f.write(data)
    return {"digest": d, "size": len(data)}


def init_layout(out):
    os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)


def add_to_index(out, man_desc, tag, platform):
    index_path = os.path.join(out, "index.json")
    index = {"schemaVersion": 2, "manifests": []}
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
    index["manifests"] = [
        m for m in index.get("manifests", []) if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag
    ]
    index["manifests"].append(
        {**man_desc, "platform": platform, "annotations": {"org.opencontainers.image.ref.name": tag}}
    )
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)


def read_blob(layout, digest):
    with open(os.path.join(layout, "blobs", "sha256", digest.split(":", 1)[1]), "rb") as f:
        data = f.read()
    if sha(data) != digest:
        raise SystemExit(f"blob {digest} in {layout} does not match its digest")
    return data


OCI_TYPES = {
    "application/vnd.docker.distribution.manifest.v2+json": "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.container.image.v1+json": "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "application/vnd.oci.image.layer.v1.tar",
}


def from_docker(args):
    with open(os.path.join(args.src, "index.json")) as f:
        index = json.load(f)
    found = [m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == args.src_tag]
    if len(found) != 1:
        raise SystemExit(f"{args.src}: {len(found)} manifests tagged {args.src_tag!r}")
    src_desc = found[0]
    manifest = json.loads(read_blob(args.src, src_desc["digest"]))
    init_layout(args.out)

    def conv(desc):
        mt = desc["mediaType"]
        if mt not in OCI_TYPES:
            raise SystemExit(f"no OCI media type for {mt}")
        write_blob(args.out, read_blob(args.src, desc["digest"]))
        return {"mediaType": OCI_TYPES[mt], "digest": desc["digest"], "size": desc["size"]}

    new = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": conv(manifest["config"]),
        "layers": [conv(l) for l in manifest["layers"]],
    }
    man = json.dumps(new, sort_keys=True, separators=(",", ":")).encode()
    man_desc = {"mediaType": new["mediaType"], **write_blob(args.out, man)}
    add_to_index(args.out, man_desc, args.tag, src_desc.get("platform") or {"architecture": "amd64", "os": "linux"})
    print(man_desc["digest"])


def write_image(out, config, layer_descs, tag):
    """Writes config and manifest into the layout `out`, tags the manifest; prints its digest."""
    cfg = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    cfg_desc = {"mediaType": "application/vnd.oci.image.config.v1+json", **write_blob(out, cfg)}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg_desc,
        "layers": layer_descs,
    }
    man = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    man_desc = {"mediaType": manifest["mediaType"], **write_blob(out, man)}
    add_to_index(out, man_desc, tag, {"architecture": "amd64", "os": "linux"})
    print(man_desc["digest"])


def pause(args):
    """The CRI sandbox ("pause") image: a static busybox that sleeps until it is killed."""
    with open(args.busybox, "rb") as f:
        bb = f.read()
    layer = Layer()
    layer.dir("/bin")
    layer.file("/bin/busybox", bb, 0o755)
    tar = layer.close()
    init_layout(args.out)
    blob = gzip.compress(tar, compresslevel=6, mtime=0)
    layer_desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **write_blob(args.out, blob)}
    config = {
        "created": "2023-11-14T22:13:20Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/bin/busybox", "sleep", "2147483647"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [sha(tar)]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "ovbd e2e mkimage.py: pause"}],
    }
    write_image(args.out, config, [layer_desc], args.tag)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    bb = sub.add_parser("busybox", help="build the multi-layer busybox image")
    bb.add_argument("out")
    bb.add_argument("tag")
    bb.add_argument("--busybox", default="/bin/busybox")
    bb.add_argument("--no-gzip", dest="gzip", action="store_false", default=True)
    pa = sub.add_parser("pause", help="build the CRI sandbox (pause) image")
    pa.add_argument("out")
    pa.add_argument("tag")
    pa.add_argument("--busybox", default="/bin/busybox")
    fd = sub.add_parser("from-docker", help="copy a Docker-media-type image with OCI media types")
    fd.add_argument("src")
    fd.add_argument("src_tag")
    fd.add_argument("out")
    fd.add_argument("tag")
    bb.add_argument("--large", type=int, default=0, metavar="MIB")
    args = ap.parse_args()
    if args.cmd == "from-docker":
        return from_docker(args)
    if args.cmd == "pause":
        return pause(args)

    init_layout(args.out)

    all_layers = layers(args.busybox)
    if args.large:
        big = Layer()
        big.dir("/data")
        rng = random.Random(20231114)  # in 1 MiB pieces: randbytes takes at most 2^31 bits
        big.file("/data/large.bin", b"".join(rng.randbytes(1 << 20) for _ in range(args.large)), 0o644)
        all_layers.append(("large", big.close()))
    layer_descs, diff_ids, history = [], [], []
    for name, tar in all_layers:
        diff_ids.append(sha(tar))
        if args.gzip:
            blob = gzip.compress(tar, compresslevel=6, mtime=0)
            mt = "application/vnd.oci.image.layer.v1.tar+gzip"
        else:
            blob = tar
            mt = "application/vnd.oci.image.layer.v1.tar"
        desc = write_blob(args.out, blob)
        desc = {"mediaType": mt, **desc}
        layer_descs.append(desc)
        history.append({"created": "2023-11-14T22:13:20Z", "created_by": f"ovbd e2e mkimage.py: {name}"})

    config = {
        "created": "2023-11-14T22:13:20Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/bin:/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    write_image(args.out, config, layer_descs, args.tag)


if __name__ == "__main__":
    sys.exit(main())
