#!/bin/sh
# Runs in the L2 guest with two vCPUs: a two-queue virtio-blk disk, one fio
# verify job pinned to each vCPU (so each goes through its own queue), and
# the per-queue interrupt counts. KEY VALUE lines for vmm/tests/rig.rs.
dev() { for b in /sys/block/vd*; do [ "$(cat "$b/serial")" = "$1" ] && echo "${b##*/}"; done; }
d=$(dev mq)
echo "NPROC $(nproc)"
echo "MQ $(ls /sys/block/$d/mq | wc -l)"
for q in /sys/block/$d/mq/*; do echo "MQ_CPUS ${q##*/} $(cat $q/cpu_list)"; done
for cpu in 0 1; do
    # Each job writes and verifies its own part of the disk.
    fio --name=mq-cpu$cpu --filename=/dev/$d --cpus_allowed=$cpu --offset=$((cpu * 8))M \
        --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bsrange=4k-64k \
        --size=4M --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --output=/tmp/fio-$cpu.log >/dev/null 2>&1 &
    eval "pid$cpu=$!"
done
wait $pid0; echo "FIO mq-cpu0 $?"
wait $pid1; echo "FIO mq-cpu1 $?"
# virtio_blk names its vectors virtioN-req.Q; sum the per-CPU columns.
v=$(basename "$(readlink /sys/block/$d/device)")
for q in 0 1; do
    echo "MQ_IRQS $q $(awk -v n="$v-req.$q" -v c="$(nproc)" \
        '$NF == n { s = 0; for (i = 2; i <= c + 1; i++) s += $i; print s }' /proc/interrupts)"
done
