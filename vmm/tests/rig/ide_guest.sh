#!/bin/sh
# Runs in the L2 guest (root on an IDE disk): checks what ata_piix made of
# Platter's PIIX4 IDE controller and prints KEY VALUE lines for
# vmm/tests/rig.rs. Disks are found by model: sd names come in probe order.
dev() { for b in /sys/block/sd*; do [ "$(cat "$b/device/model" | sed 's/ *$//')" = "$1" ] && echo "${b##*/}"; done; }
serial() { tail -c +5 "/sys/block/$1/device/vpd_pg80" | tr -d '\000' | sed 's/ *$//'; }
verify() {
    fio --name=verify --filename="/dev/$1" --direct=1 --ioengine=libaio --iodepth=4 \
        --rw=randwrite --bsrange=512-64k --size=4M --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --output=/tmp/fio.log >/dev/null 2>&1
    rc=$?
    [ $rc = 0 ] || tail -n 20 /tmp/fio.log
    return $rc
}

echo "ROOT $(awk '$2 == "/" { print $3 }' /proc/mounts) $(dev 'Platter root')"
echo "DRIVER $(basename "$(readlink /sys/bus/pci/devices/*/driver | grep ata_piix | head -n 1)")"
# The mode each device was set to, and what dmesg announced.
for x in /sys/class/ata_device/dev*/xfer_mode; do echo "XFER $(cat "$x")"; done
echo "DMESG_MAX $(dmesg | grep -c 'max UDMA/100')"
for m in "Platter root" "Platter data1" "Platter data2"; do
    d=$(dev "$m")
    tag=$(echo "$m" | tr ' ' _)
    echo "DISK $tag $d $(cat /sys/block/$d/size) $(serial $d)"
    echo "BLOCKSIZES $tag $(cat /sys/block/$d/queue/logical_block_size) $(cat /sys/block/$d/queue/physical_block_size)"
done
for m in "Platter data1" "Platter data2"; do
    d=$(dev "$m")
    verify "$d"; echo "FIO $(echo "$m" | tr ' ' _) $?"
done

# Error path: the image's file system fills up at 8 MiB (guest_lib.sh).
full "$(dev "Platter data2")"

# The guest turns the drive's write cache off (MODE SELECT -> SET FEATURES);
# libata re-reads IDENTIFY, whose word 85 reports the block layer's state.
d=$(dev "Platter data1")
ct=$(echo /sys/block/$d/device/scsi_disk/*/cache_type)
echo "CACHE_BEFORE $(tr ' ' _ < $ct)"
echo "write through" > $ct
echo "CACHE_OFF $(tr ' ' _ < $ct)"
verify "$d"; echo "FIO cache_off $?"
echo "write back" > $ct
echo "CACHE_ON $(tr ' ' _ < $ct)"

echo "CD_SIZE $(cat /sys/block/sr0/size)"
mkdir -p /media/cd
mount -t iso9660 -o ro /dev/sr0 /media/cd; echo "CD_MOUNT $?"
echo "CD_SHA256 $(sha256sum < /media/cd/data.bin | cut -d' ' -f1)"
umount /media/cd
sync
