#!/usr/bin/env bash
# Makes the disk images the example configs in configs/ point at, under
# guests/cache/images/ (gitignored): raw and qcow2 images made with
# `platter img create`, and an ISO9660 image for the IDE CD-ROM. Existing
# images are kept; --fresh makes them anew (resetting qcow2 allocation).
set -euo pipefail
GUESTS_DIR=$(cd "$(dirname "$0")" && pwd -P)
REPO=$(cd "$GUESTS_DIR/.." && pwd -P)
IMAGES=$GUESTS_DIR/cache/images
PLATTER=${PLATTER:-$REPO/target/release/platter}
fresh=false
[ "${1:-}" = --fresh ] && fresh=true

[ -x "$PLATTER" ] || (cd "$REPO" && cargo build --release)
mkdir -p "$IMAGES"

make() { # format file size
    if $fresh || [ ! -e "$IMAGES/$2" ]; then
        "$PLATTER" img create -f "$1" "$IMAGES/$2" "$3"
    fi
}
make raw compare-raw-a.raw 128M      # configs/compare.toml
make raw compare-raw-b.raw 128M
make qcow2 compare.qcow2 128M
make raw compare-ide.raw 128M        # configs/compare-ide.toml
make raw compare-vd.raw 128M
make raw data.raw 64M                # configs/virtio-blk.toml
make raw ide0.raw 64M                # configs/ide.toml
make raw ide1.raw 32M
if $fresh || [ ! -e "$IMAGES/test.iso" ]; then
    command -v genisoimage >/dev/null || apt-get install -y -q genisoimage >/dev/null
    src=$(mktemp -d)
    echo "Hello from Platter's IDE CD-ROM." > "$src/hello.txt"
    genisoimage -quiet -V PLATTERCD -o "$IMAGES/test.iso" "$src"
    rm -rf "$src"
    echo "Made $IMAGES/test.iso"
fi
