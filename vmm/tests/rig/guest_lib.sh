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
