#!/bin/bash
# Runs in L1 (guests/rig): makes an ext4 scratch file system local to L1 (so
# O_DIRECT behaves as on a real host), the images a `platter compare` config
# names (raw or qcow2, by extension), and runs the comparison with QEMU.
# Usage: compare_job.sh PLATTER CONFIG_TEMPLATE CHART JSON [JOBS]
set -euo pipefail
platter=$1 template=$2 chart=$3 json=$4
jobs=${5:-randread-4k-qd32,randwrite-4k-qd32}
work=/tmp/compare
. "$(dirname "$0")/scratch.sh"
scratch_ext4 $work 512M

for img in $(sed -n 's|^path = "@WORK@/\(.*\)"|\1|p' "$template"); do
    "$platter" img create -f "${img##*.}" "$work/$img" 32M >/dev/null
done
sed "s|@WORK@|$work|g" "$template" > $work/vm.toml

set +e
"$platter" compare $work/vm.toml --rig=never --jobs=bogus
echo "BADJOBS_RC $?"
"$platter" compare $work/vm.toml --rig=never --qemu=always --size=16M --runtime=1 \
    --jobs="$jobs" \
    --chart="$chart" --json="$json"
echo "COMPARE_RC $?"
set -e
umount $work
