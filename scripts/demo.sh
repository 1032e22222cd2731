#!/usr/bin/env bash
# The main job end to end on the built-in sample image (the hello-world OverlayBD image made by
# upstream's converter, in tests/fixtures): unpack its layer, rebuild the registry blob byte for
# byte, flatten the image and read /hello from the ext4 inside.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh
cargo build --release -q
ovbd=target/release/ovbd
blob=tests/fixtures/hello-world-oci/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== the layer as upstream's converter made it"
$ovbd layer inspect "$blob"
echo
echo "== decompress to the raw LSMT, compress again: same blob digest?"
$ovbd layer decompress "$blob" "$work/layer.lsmt"
$ovbd layer compress "$work/layer.lsmt" "$work/layer.blob"
sha256sum "$blob" "$work/layer.blob" | awk '{print $1}' | uniq -c
echo
echo "== flatten the image and run nothing but a read of /hello"
$ovbd image export "$blob" "$work/disk.img"
debugfs -R "cat /hello" "$work/disk.img" 2>/dev/null >"$work/hello"
chmod +x "$work/hello"
"$work/hello" | head -3
