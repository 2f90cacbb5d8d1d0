#!/bin/bash
# Runs in L1 (guests/rig): makes an ext4 scratch file system local to L1 (so
# O_DIRECT and hole punching behave as on a real host), the root image and
# the data images, boots the guest under Platter with the config the test
# wrote, and reports the host-side allocation of the discard disks.
# Usage: virtio_blk_job.sh PLATTER CONFIG_TEMPLATE
set -euo pipefail
platter=$1 template=$2
work=/tmp/vblk
modprobe -q loop; modprobe -q ext4
mkdir -p $work
truncate -s 1G /tmp/vblk.fs
mkfs.ext4 -q -F /tmp/vblk.fs
mount -o loop /tmp/vblk.fs $work

cp --sparse=always guests/cache/l2/rootfs.ext4 $work/root.ext4
mkdir -p /tmp/rootmnt
mount -o loop $work/root.ext4 /tmp/rootmnt
install -m 755 vmm/tests/rig/virtio_blk_guest.sh /tmp/rootmnt/root/test.sh
umount /tmp/rootmnt

for img in $(sed -n 's|^path = "@WORK@/\(.*\.raw\)"|\1|p' "$template"); do
    "$platter" img create -f raw "$work/$img" 32M >/dev/null
done
sed "s|@WORK@|$work|g" "$template" > $work/vm.toml

set +e
"$platter" run $work/vm.toml --rig=never
echo "RUN_RC $?"
set -e
for s in disc-on disc-off; do
    echo "ALLOC_KIB $s $(( $(stat -c %b $work/$s.raw) * 512 / 1024 ))"
done
umount $work
