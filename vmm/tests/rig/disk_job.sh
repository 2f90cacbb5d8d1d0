#!/bin/bash
# Runs in L1 (guests/rig) for the disk tests: makes an ext4 scratch file
# system local to L1 (so O_DIRECT and hole punching behave as on a real host),
# a copy of the guest root file system with GUEST_SCRIPT in it as
# /root/test.sh, every raw image the config names, and an ISO9660 image with a
# random file when the config names test.iso, images on a tiny file system
# for paths under @SMALL@; boots the guest under Platter
# with the config the test wrote; reports the host side afterwards.
# Usage: disk_job.sh PLATTER CONFIG_TEMPLATE GUEST_SCRIPT
set -euo pipefail
platter=$1 template=$2 guest=$3
work=/tmp/disks
. "$(dirname "$0")/scratch.sh"
# COW_BLOCKS and cow_pattern, shared with the guest scripts.
. "$(dirname "$0")/guest_lib.sh"
scratch_ext4 $work 1G

cp --sparse=always guests/cache/l2/rootfs.ext4 $work/root.ext4
mkdir -p /tmp/rootmnt
mount -o loop $work/root.ext4 /tmp/rootmnt
cat vmm/tests/rig/guest_lib.sh "$guest" > /tmp/rootmnt/root/test.sh
chmod 755 /tmp/rootmnt/root/test.sh
umount /tmp/rootmnt

for img in $(sed -n 's|^path = "@WORK@/\(.*\.raw\)"|\1|p' "$template"); do
    "$platter" img create -f raw "$work/$img" 32M >/dev/null
done
for img in $(sed -n 's|^path = "@WORK@/\(.*\.qcow2\)"|\1|p' "$template"); do
    case $img in
        # An overlay over a raw base of random bytes (kept, to check against).
        *-over.qcow2)
            base=${img%-over.qcow2}-base.img
            head -c 32M /dev/urandom > "$work/$base"
            "$platter" img create -f qcow2 -o backing_file="$base",backing_fmt=raw \
                "$work/$img" >/dev/null ;;
        *) "$platter" img create -f qcow2 "$work/$img" 32M >/dev/null ;;
    esac
done
# Images under @SMALL@ live on an 8 MiB file system: writes past that fail
# with ENOSPC, which the guest must see as an I/O error (the error path).
small=/tmp/small
if grep -q '@SMALL@/' "$template"; then
    mkdir -p $small
    mount -t tmpfs -o size=8m tmpfs $small
    for img in $(sed -n 's|^path = "@SMALL@/\(.*\.raw\)"|\1|p' "$template"); do
        "$platter" img create -f raw "$small/$img" 32M >/dev/null
    done
fi
if grep -q '@WORK@/test.iso' "$template"; then
    mkdir -p /tmp/iso
    head -c 1048576 /dev/urandom > /tmp/iso/data.bin
    echo "ISO_SHA256 $(sha256sum < /tmp/iso/data.bin | cut -d' ' -f1)"
    genisoimage -quiet -V PLATTERCD -o $work/test.iso /tmp/iso
fi
sed -e "s|@WORK@|$work|g" -e "s|@SMALL@|$small|g" "$template" > $work/vm.toml

set +e
# Platter's thread names while it runs (I/O threads are named after the config's).
(
    while :; do
        for p in /proc/[0-9]*; do
            [ "$(cat $p/comm 2>/dev/null)" = platter ] && cat $p/task/*/comm 2>/dev/null
        done
        sleep 1
    done
) > /tmp/platter-threads.txt &
watcher=$!
# Platter runs in the background, its output streamed: a guest that prints
# PLATTER-HOST-SIGTERM asks the host to stop Platter with SIGTERM (the orderly
# stop), and one that has not finished within GUEST_LIMIT seconds is stopped
# the same way, so a hung guest still shows Platter's exit and disk statistics.
limit=${GUEST_LIMIT:-300}
out=/tmp/platter.out
: > $out
"$platter" run $work/vm.toml --rig=never --exit-stats --disk-stats --stats-file $work/stats.json \
    > $out 2>&1 &
pid=$!
tail -n +1 -f --pid=$pid $out &
tailer=$!
# SIGTERM, then SIGKILL if Platter has not exited a minute later; a Platter that
# outlives SIGKILL too is stuck in L1's kernel (a vCPU inside KVM_RUN under TCG's
# nested SVM): the job gives up on it rather than wait out the rig's timeout.
stop_platter() {
    kill -TERM $pid
    for _ in $(seq 120); do kill -0 $pid 2>/dev/null || return 0; sleep 0.5; done
    echo "GUEST HUNG: Platter still running 60 s after SIGTERM; sending SIGKILL"
    kill -KILL $pid
    for _ in $(seq 40); do kill -0 $pid 2>/dev/null || return 0; sleep 0.5; done
    echo "GUEST HUNG: Platter outlived SIGKILL by 20 s (stuck in the kernel); giving up on it"
    exit 1
}
start=$(date +%s)
while kill -0 $pid 2>/dev/null; do
    if grep -q '^PLATTER-HOST-SIGTERM' $out; then
        stop_platter
        break
    fi
    if [ $(( $(date +%s) - start )) -ge "$limit" ]; then
        echo "GUEST HUNG: the guest had not finished after $limit s; stopping Platter with SIGTERM"
        stop_platter
        break
    fi
    sleep 0.5
done
wait $pid
echo "RUN_RC $?"
wait $tailer
kill $watcher; wait $watcher 2>/dev/null
echo "THREADS $(sort -u /tmp/platter-threads.txt | tr '\n' ' ')"
# The stats file's last write: the number of disks in it, and each disk's read ops.
echo "STATS_FILE_DISKS $(grep -o '"id":"[^"]*"' $work/stats.json | wc -l)"
grep -o '"id":"[^"]*","stats":{"read":{"ops":[0-9]*' $work/stats.json |
    sed 's/"id":"\([^"]*\)","stats":{"read":{"ops":\([0-9]*\)/STATS_FILE_READ_OPS \1 \2/'
echo "L1_MEM_AVAILABLE_MIB $(awk '/MemAvailable/ { print int($2 / 1024) }' /proc/meminfo)"
set -e
for f in $work/*.raw $work/*.qcow2; do
    [ -e "$f" ] || continue
    n=${f##*/}
    echo "ALLOC_KIB ${n%.*} $(( $(stat -c %b "$f") * 512 / 1024 ))"
done
# Each qcow2 image as QEMU's tools see it after Platter: consistent, and the
# checksum of its first 4 MiB (what the guest wrote there).
for f in $work/*.qcow2; do
    [ -e "$f" ] || continue
    n=${f##*/}
    qemu-img check -q "$f" >/dev/null 2>&1
    echo "QCOW2_CHECK ${n%.*} $?"
    qemu-img convert -O raw "$f" /tmp/converted.raw
    echo "QCOW2_SHA256_4M ${n%.*} $(head -c 4194304 /tmp/converted.raw | sha256sum | cut -d' ' -f1)"
    # An overlay: MiB 8-16 as the base with the guest's COW blocks written in
    # (guest_lib.sh), the guest's reading of them, and the image's.
    case $n in
        *-over.qcow2)
            s=${n%-over.qcow2}
            cp "$work/$s-base.img" /tmp/expect.raw
            cow_pattern > /tmp/cow.pat
            for k in $COW_BLOCKS; do
                dd if=/tmp/cow.pat of=/tmp/expect.raw bs=4096 seek=$k count=1 conv=notrunc 2>/dev/null
            done
            echo "COW_EXPECT_SHA256 $s $(dd if=/tmp/expect.raw bs=1M skip=8 count=8 2>/dev/null | sha256sum | cut -d' ' -f1)"
            echo "COW_IMAGE_SHA256 $s $(dd if=/tmp/converted.raw bs=1M skip=8 count=8 2>/dev/null | sha256sum | cut -d' ' -f1)"
            rm -f /tmp/expect.raw ;;
    esac
    rm -f /tmp/converted.raw
done
umount $work
