#!/bin/sh
# Runs in the L2 guest (root on virtio-blk): exercises every virtio-blk disk
# the job configured, found by serial, and prints KEY VALUE lines that
# vmm/tests/rig.rs checks.
dev() { for b in /sys/block/vd*; do [ "$(cat "$b/serial")" = "$1" ] && echo "${b##*/}"; done; }
verify() { # device [min block] -> fio's status; random writes of 512 B..64 KiB, then read and check
    fio --name=verify --filename="/dev/$1" --direct=1 --ioengine=libaio --iodepth=16 \
        --rw=randwrite --bsrange=${2:-512}-64k --size=4M --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --output=/tmp/fio.log >/dev/null 2>&1
    rc=$?
    [ $rc = 0 ] || tail -n 20 /tmp/fio.log
    return $rc
}

echo "ROOT $(awk '$2 == "/" { print $1, $3 }' /proc/mounts)"
for cache in wb no wt ds un; do
    for aio in th ur; do
        d=$(dev "m-$cache-$aio")
        echo "CACHETYPE m-$cache-$aio $(cat /sys/block/$d/cache_type | tr ' ' _)"
        echo "SIZE m-$cache-$aio $(cat /sys/block/$d/size)"
        verify "$d"; echo "FIO m-$cache-$aio $?"
    done
done

# The guest turns its write cache off and on; I/O keeps verifying.
d=$(dev m-wb-ur)
echo "write through" > /sys/block/$d/cache_type
echo "TOGGLED $(cat /sys/block/$d/cache_type | tr ' ' _)"
verify "$d"; echo "FIO toggled $?"
echo "write back" > /sys/block/$d/cache_type
echo "RESTORED $(cat /sys/block/$d/cache_type | tr ' ' _)"

d=$(dev ro)
echo "RO_FLAG $(cat /sys/block/$d/ro)"
dd if=/dev/zero of=/dev/$d bs=4k count=1 oflag=direct 2>/dev/null; echo "RO_WRITE $?"
dd if=/dev/$d of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null; echo "RO_READ $?"

for s in disc-on disc-q2 disc-off; do
    d=$(dev $s)
    echo "DISCMAX $s $(cat /sys/block/$d/queue/discard_max_bytes)"
    dd if=/dev/urandom of=/tmp/data bs=1M count=8 2>/dev/null
    # busybox dd ignores oflag=direct: sync puts the data on the disk before
    # the discard (which would otherwise just drop the dirty pages).
    dd if=/tmp/data of=/dev/$d bs=1M 2>/dev/null; echo "WROTE $s $?"
    sync
    blkdiscard /dev/$d 2>/dev/null; echo "BLKDISCARD $s $?"
done

# qcow2 overlays over a raw base: writes copy on write (cache=none: the
# engine carries them out; writethrough: allocation with the write cache off).
for s in cow cow-wt; do
    d=$(dev $s)
    verify "$d"; echo "FIO $s $?"
    cow_write "$d"; echo "COW_WRITE $s $?"
    echo 3 > /proc/sys/vm/drop_caches
    echo "COW_GUEST_SHA256 $s $(dd if=/dev/$d bs=1M skip=8 count=8 2>/dev/null | sha256sum | cut -d' ' -f1)"
done

d=$(dev mq)
echo "MQ $(ls /sys/block/$d/mq | wc -l)"
verify "$d"; echo "FIO mq $?"

# Error path: the image's file system fills up at 8 MiB (guest_lib.sh).
full "$(dev full)"

# 50 IOPS at most, whatever the queue depth.
d=$(dev thr)
fio --name=thr --filename=/dev/$d --direct=1 --ioengine=libaio --iodepth=8 --rw=randread \
    --bs=4k --size=4M --time_based --runtime=3 --output-format=terse --terse-version=3 \
    >/tmp/thr.log 2>&1
echo "THR_IOPS $(grep '^3;' /tmp/thr.log | cut -d';' -f8)"

# 4 KiB logical blocks: the queue limits follow, a 512-byte direct write is
# refused (by the guest kernel; the device refuses it too, see the unit tests).
d=$(dev blk4k)
echo "BLOCKSIZES blk4k $(cat /sys/block/$d/queue/logical_block_size) $(cat /sys/block/$d/queue/physical_block_size)"
if fio --name=small --filename=/dev/$d --direct=1 --rw=write --bs=512 --size=512 \
    --ioengine=psync >/dev/null 2>&1; then r=accepted; else r=failed; fi
echo "SMALL_WRITE blk4k $r"
verify "$d" 4k; echo "FIO blk4k $?"
sync
