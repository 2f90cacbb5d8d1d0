#!/bin/sh
# Shell functions for the rig tests' guest scripts; disk_job.sh puts this
# file in front of the test's own script in the guest's /root/test.sh.

# Error path (device): the disk's image sits on a file system that fills up
# at 8 MiB (disk_job.sh's @SMALL@); writing 16 MiB must fail with I/O errors,
# and the disk must keep working afterwards. Prints FULL_* lines.
full() { # device
    before=$(dmesg | grep -c "I/O error, dev $1")
    fio --name=full --filename=/dev/$1 --direct=1 --ioengine=libaio --iodepth=4 \
        --rw=write --bs=1M --size=16M --output=/tmp/full.log >/dev/null 2>&1
    echo "FULL_WRITE $?"
    echo "FULL_IOERRORS $(( $(dmesg | grep -c "I/O error, dev $1") - before ))"
    fio --name=read --filename=/dev/$1 --direct=1 --rw=read --bs=64k --size=1M \
        --output=/tmp/full.log >/dev/null 2>&1
    echo "FULL_READ $?"
    fio --name=verify --filename=/dev/$1 --direct=1 --ioengine=libaio --iodepth=4 \
        --rw=randwrite --bs=4k --size=2M --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --output=/tmp/full.log >/dev/null 2>&1
    echo "FULL_VERIFY $?"
}

# Copy-on-write check (virtio-blk test): 4 KiB blocks written, one at a time and
# flushed, into an overlay over a raw base image; disk_job.sh (which sources
# this file on the host too) applies the same blocks to a copy of the base and
# compares MiB 8-16 of both. Blocks 2050, 2051: one cluster, two writes;
# 2063: a cluster's last block; 2304: alone in its cluster.
COW_BLOCKS="2050 2051 2063 2304"
cow_pattern() { head -c 4096 /dev/zero | tr '\0' P; }
cow_write() { # device
    cow_pattern > /tmp/cow.pat
    for k in $COW_BLOCKS; do
        dd if=/tmp/cow.pat of=/dev/$1 bs=4096 seek=$k count=1 conv=notrunc,fsync 2>/dev/null || return 1
    done
}
