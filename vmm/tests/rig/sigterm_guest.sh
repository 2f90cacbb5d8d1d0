#!/bin/sh
# Runs in the L2 guest: writes 4 MiB of random data to the qcow2 disk with
# O_DIRECT and no flush (the image's new L2 entries stay in Platter's memory),
# then asks the host to stop Platter with SIGTERM and waits to be stopped.
dev() { for b in /sys/block/vd*; do [ "$(cat "$b/serial")" = "$1" ] && echo "${b##*/}"; done; }
d=$(dev held)
head -c 4194304 /dev/urandom > /tmp/pattern
echo "WROTE_SHA256 $(sha256sum < /tmp/pattern | cut -d' ' -f1)"
dd if=/tmp/pattern of=/dev/$d bs=1M oflag=direct 2>/dev/null
echo "DD_RC $?"
echo PLATTER-HOST-SIGTERM
sleep 600
