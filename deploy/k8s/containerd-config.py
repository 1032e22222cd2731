#!/usr/bin/python3
"""Adds ovbd to a node's containerd config, idempotently (the DaemonSet's init container runs it).

Merges, into the file's own tables (its other content is kept, formatting included, via tomlkit):
  version 2 (containerd 1.6 / 1.7): [proxy_plugins.ovbd], CRI's disable_snapshot_annotations = false,
    a CRI runtime handler `ovbd` (runc's options + snapshotter = "ovbd"), the transfer service's
    unpack_config for ovbd (overlayfs kept);
  version 3 (containerd 2.x): [proxy_plugins.ovbd] with
    exports = { enable_remote_snapshot_annotations = "true" }, the runtime handler `ovbd` in
    io.containerd.cri.v1.runtime, the transfer service's unpack_config.
With --cri-default, CRI's default snapshotter becomes ovbd (see deploy/k8s/README.md for why that is
not the DaemonSet's default). Only if the file changes: a backup (FILE.ovbd-backup.<UTC time>), the
new file checked (read back here, then --check-command on the host), renamed into place, and
--restart-command run; a failed check puts the old file back. Prints "changed" or "unchanged".
"""
import argparse
import datetime
import os
import shlex
import subprocess
import sys
import tomllib

import tomlkit

NAME = "ovbd"
V2_CRI = "io.containerd.grpc.v1.cri"
V3_RUNTIME = "io.containerd.cri.v1.runtime"
V3_IMAGES = "io.containerd.cri.v1.images"
TRANSFER = "io.containerd.transfer.v1.local"


def table(parent, *keys):
    """The table at parent.keys..., created (as a [section]) where missing."""
    for k in keys:
        if k not in parent:
            parent[k] = tomlkit.table()
        parent = parent[k]
        if not isinstance(parent, dict):
            raise SystemExit(f"containerd-config: key {k!r} is not a table")
    return parent


def put(t, key, value):
    # Assign only a different value: tomlkit reformats what it rewrites.
    if t.get(key) != value:
        t[key] = value


def runtime_handler(runtimes, snapshotter):
    """runtimes.ovbd: a copy of runc's handler (runtime_type, options such as SystemdCgroup) whose
    containers get their rootfs from ovbd; a pod opts in with runtimeClassName: ovbd."""
    if NAME not in runtimes:
        runc = runtimes.get("runc")
        h = tomlkit.table()
        for k, v in (runc.unwrap() if isinstance(runc, dict) else {}).items():
            h[k] = v
        runtimes[NAME] = h
    h = runtimes[NAME]
    if "runtime_type" not in h:
        h["runtime_type"] = "io.containerd.runc.v2"
    put(h, "snapshotter", snapshotter)


def unpack_config(plugins, platform):
    t = table(plugins, TRANSFER)
    if "unpack_config" not in t:
        # Listing replaces containerd's default (overlayfs): keep it.
        t["unpack_config"] = tomlkit.aot()
    entries = t["unpack_config"]
    for snap in ("overlayfs", NAME):
        if not any(e.get("platform") == platform and e.get("snapshotter") == snap for e in entries):
            e = tomlkit.table()
            e["platform"] = platform
            e["snapshotter"] = snap
            entries.append(e)


def merge(doc, version, socket, platform, cri_default):
    plugin = table(table(doc, "proxy_plugins"), NAME)
    put(plugin, "type", "snapshot")
    put(plugin, "address", socket)
    plugins = table(doc, "plugins")
    if version == 2:
        cri = table(plugins, V2_CRI, "containerd")
        put(cri, "disable_snapshot_annotations", False)
        runtime_handler(table(cri, "runtimes"), NAME)
        if cri_default:
            put(cri, "snapshotter", NAME)
    else:
        exports = plugin.get("exports")
        if not isinstance(exports, dict) or exports.get("enable_remote_snapshot_annotations") != "true":
            e = tomlkit.inline_table()
            e.update(exports if isinstance(exports, dict) else {})
            e["enable_remote_snapshot_annotations"] = "true"
            plugin["exports"] = e
        runtime_handler(table(plugins, V3_RUNTIME, "containerd", "runtimes"), NAME)
        if cri_default:
            put(table(plugins, V3_IMAGES), "snapshotter", NAME)
    unpack_config(plugins, platform)


def check_merged(text, version, socket):
    """The written text, read back by another parser, says what we meant."""
    d = tomllib.loads(text)
    assert d.get("version") == version, "version"
    p = d["proxy_plugins"][NAME]
    assert p["type"] == "snapshot" and p["address"] == socket, "proxy_plugins.ovbd"
    snaps = [e.get("snapshotter") for e in d["plugins"][TRANSFER]["unpack_config"]]
    assert NAME in snaps and "overlayfs" in snaps, "unpack_config"


def run(command, what):
    if not command:
        return
    r = subprocess.run(shlex.split(command), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{what} ({command}) failed: {r.stderr.strip() or r.stdout.strip()}")


def this_platform():
    arch = os.uname().machine
    return "linux/" + {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(arch, arch)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="/host/etc/containerd/config.toml",
                    help="the node's containerd config, as this process sees it")
    ap.add_argument("--version", type=int, choices=(2, 3),
                    help="config version for a missing or empty file (containerd 1.x: 2, 2.x: 3)")
    ap.add_argument("--socket", default="/run/ovbd/ovbd.sock")
    ap.add_argument("--platform", default=this_platform(),
                    help="unpack_config's platform (default: this machine's, e.g. linux/amd64)")
    ap.add_argument("--cri-default", action="store_true", help="make ovbd CRI's default snapshotter")
    ap.add_argument("--check-command", default="", help="run on a change, before it is kept")
    ap.add_argument("--restart-command", default="", help="run after a change (restart containerd)")
    a = ap.parse_args()

    try:
        with open(a.config, encoding="utf-8") as f:
            old = f.read()
    except FileNotFoundError:
        old = ""
    try:
        doc = tomlkit.parse(old)
    except Exception as e:
        raise SystemExit(f"containerd-config: {a.config}: not TOML: {e}")
    version = doc.get("version")
    if version is None and not old.strip():
        if a.version is None:
            raise SystemExit(f"containerd-config: {a.config} is missing or empty: pass --version 2 or 3")
        doc["version"] = version = a.version
    if version not in (2, 3):
        raise SystemExit(f"containerd-config: {a.config}: config version {version!r}: "
                         "only 2 (containerd 1.6/1.7) and 3 (2.x) are supported")
    merge(doc, version, a.socket, a.platform, a.cri_default)
    new = tomlkit.dumps(doc)
    # Present from a change until containerd has restarted with it: a failed restart is retried
    # by the next run, though the file no longer changes.
    pending = f"{a.config}.ovbd-restart-pending"
    # Same settings, same file: tomlkit may lay out what it added differently when re-read.
    if new == old or (old.strip() and tomllib.loads(new) == tomllib.loads(old)):
        if os.path.exists(pending):
            run(a.restart_command, "restarting containerd")
            os.remove(pending)
            print("unchanged (restarted: a change was pending)")
        else:
            print("unchanged")
        return
    try:
        check_merged(new, version, a.socket)
    except (AssertionError, KeyError, tomllib.TOMLDecodeError) as e:
        raise SystemExit(f"containerd-config: the merged {a.config} does not read back: {e!r}")

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    backup = f"{a.config}.ovbd-backup.{stamp}"
    tmp = f"{a.config}.ovbd-new"
    os.makedirs(os.path.dirname(os.path.abspath(a.config)), exist_ok=True)
    if old:
        with open(backup, "w", encoding="utf-8") as f:
            f.write(old)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(a.config):
        os.chmod(tmp, os.stat(a.config).st_mode & 0o7777)
    os.replace(tmp, a.config)
    try:
        run(a.check_command, "checking the new config")
    except RuntimeError as e:
        # Never leave containerd a config it rejects: the next restart would take the node down.
        if old:
            os.replace(backup, a.config)
        else:
            os.remove(a.config)
        raise SystemExit(f"containerd-config: {e}; {a.config} restored")
    open(pending, "w").close()
    print("changed" + (f" (backup: {backup})" if old else ""))
    run(a.restart_command, "restarting containerd")
    os.remove(pending)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:
        raise SystemExit(f"containerd-config: {e}")
