#!/usr/bin/env bash
# Offline test of deploy/k8s/containerd-config.py on fake node configs of each version: the first run
# merges ovbd in (keeping the file's other content, backing it up, restarting once), the second
# changes nothing and restarts nothing; a check that fails restores the old file; bad input is named.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tool="$here/containerd-config.py"
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
q() { python3 -c "import sys, tomllib; d = tomllib.load(open(sys.argv[1], 'rb')); print($2)" "$1"; }
merge() { "$tool" --config "$1" --restart-command "touch $d/restarted" "${@:2}"; }

cat >"$d/v2.toml" <<'TOML'
version = 2
root = "/data/containerd" # a node's own setting
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = true
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/etc/containerd/certs.d"
TOML
cat >"$d/v3.toml" <<'TOML'
version = 3
[proxy_plugins.other]
  type = "snapshot"
  address = "/run/other.sock"
[plugins."io.containerd.transfer.v1.local"]
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/amd64"
    snapshotter = "overlayfs"
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
  SystemdCgroup = true
TOML

for v in v2 v3; do
    f="$d/$v.toml"
    cp "$f" "$d/$v.orig"
    rm -f "$d/restarted"
    merge "$f" | tee "$d/out"
    grep -q '^changed' "$d/out" || fail "$v: first run did not change the file"
    [[ -e $d/restarted ]] || fail "$v: no restart after a change"
    cmp -s "$d/$v.orig" "$f".ovbd-backup.* || fail "$v: no backup of the original"
    [[ ! -e $f.ovbd-restart-pending ]] || fail "$v: restart left pending"
    [[ $(q "$f" "d['proxy_plugins']['ovbd']['address']") == /run/ovbd/ovbd.sock ]] || fail "$v: proxy plugin"
    [[ $(q "$f" "sorted(e['snapshotter'] for e in d['plugins']['io.containerd.transfer.v1.local']['unpack_config'])") == "['ovbd', 'overlayfs']" ]] ||
        fail "$v: unpack_config (overlayfs once, ovbd once)"
    cp "$f" "$d/$v.merged"
    rm -f "$d/restarted"
    merge "$f" | tee "$d/out"
    [[ $(cat "$d/out") == unchanged ]] || fail "$v: second run changed something"
    cmp -s "$f" "$d/$v.merged" || fail "$v: second run rewrote the file"
    [[ ! -e $d/restarted ]] || fail "$v: restart without a change"
    [[ $(ls "$f".ovbd-backup.* | wc -l) == 1 ]] || fail "$v: a second backup"
done

# Version 2: the node's content kept, the runtime handler is runc's with ovbd's snapshotter.
f=$d/v2.toml
grep -q '^root = "/data/containerd" # a node' "$f" || fail "v2: unrelated line not kept as it was"
cri="d['plugins']['io.containerd.grpc.v1.cri']"
[[ $(q "$f" "($cri['registry']['config_path'], $cri['containerd']['snapshotter'], $cri['containerd']['disable_snapshot_annotations'])") == "('/etc/containerd/certs.d', 'overlayfs', False)" ]] ||
    fail "v2: CRI settings"
[[ $(q "$f" "$cri['containerd']['runtimes']['ovbd'] == {'runtime_type': 'io.containerd.runc.v2', 'options': {'SystemdCgroup': True}, 'snapshotter': 'ovbd'}") == True ]] ||
    fail "v2: runtime handler ovbd"
# containerd 1.6 (setup.sh installs it) reads the merged version 2 file.
if command -v containerd >/dev/null; then
    containerd --config "$f" config dump >"$d/dump" || fail "v2: containerd rejects the merged config"
    grep -q 'address = "/run/ovbd/ovbd.sock"' "$d/dump" || fail "v2: containerd does not see the proxy plugin"
fi

# Version 3: the other proxy plugin kept, the exports, the runtime handler in cri.v1.runtime.
f=$d/v3.toml
[[ $(q "$f" "(d['proxy_plugins']['other']['address'], d['proxy_plugins']['ovbd']['exports'])") == "('/run/other.sock', {'enable_remote_snapshot_annotations': 'true'})" ]] ||
    fail "v3: proxy plugins"
[[ $(q "$f" "d['plugins']['io.containerd.cri.v1.runtime']['containerd']['runtimes']['ovbd']['snapshotter']") == ovbd ]] ||
    fail "v3: runtime handler ovbd"
# --cri-default is one more change, then stable too.
merge "$f" --cri-default | grep -q '^changed' || fail "v3: --cri-default changed nothing"
[[ $(q "$f" "d['plugins']['io.containerd.cri.v1.images']['snapshotter']") == ovbd ]] || fail "v3: CRI default"
[[ $(merge "$f" --cri-default) == unchanged ]] || fail "v3: --cri-default not idempotent"

# A missing file needs a version; a failed check restores the old file and restarts nothing.
merge "$d/none.toml" 2>"$d/err" && fail "missing file without --version accepted"
grep -q 'pass --version' "$d/err" || fail "missing file: $(cat "$d/err")"
merge "$d/none.toml" --version 3 | grep -q '^changed' || fail "missing file with --version 3"
cp "$d/v2.orig" "$d/bad.toml"
rm -f "$d/restarted"
merge "$d/bad.toml" --check-command false 2>"$d/err" && fail "a failed check was accepted"
grep -q 'restored' "$d/err" || fail "failed check: $(cat "$d/err")"
cmp -s "$d/v2.orig" "$d/bad.toml" || fail "a failed check left the new file"
[[ ! -e $d/restarted ]] || fail "restart after a failed check"
# A restart that failed is retried by the next run, though the file no longer changes.
cp "$d/v2.orig" "$d/retry.toml"
"$tool" --config "$d/retry.toml" --restart-command false 2>/dev/null && fail "a failed restart was accepted"
[[ $(merge "$d/retry.toml") == "unchanged (restarted: a change was pending)" && -e $d/restarted ]] ||
    fail "a failed restart was not retried"
# Version 1 (no version key) and files that are not TOML are refused, naming the file.
printf '[plugins.cri]\n' >"$d/v1.toml"
merge "$d/v1.toml" 2>"$d/err" && fail "a version 1 config was accepted"
grep -q "v1.toml: config version None" "$d/err" || fail "v1: $(cat "$d/err")"
printf 'version = \n' >"$d/junk.toml"
merge "$d/junk.toml" 2>"$d/err" && fail "junk accepted"
grep -q "junk.toml: not TOML" "$d/err" || fail "junk: $(cat "$d/err")"
echo "containerd-config: ok"
