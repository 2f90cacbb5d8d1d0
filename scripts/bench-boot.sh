#!/usr/bin/env bash
# Boot benchmark: Platter beside QEMU, booting the same kernel and initramfs
# in the same rig run. For each VMM, RUNS boots (default 5): time from process
# start to the guest init's first marker (PLATTER-GUEST-INIT on the serial
# console), and the VMM's resident memory beyond guest RAM at that moment
# (total Rss in /proc/PID/smaps minus the guest RAM mapping). Prints medians
# and the ratio. Timings inside the rig are distorted by emulation: only the
# ratio of the two, measured in one run, means something.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}

if [ "${BENCH_INNER:-}" != 1 ]; then
    guests/build.sh >/dev/null
    [ -x target/release/platter ] || cargo build --release
    exec guests/rig --timeout 3600 -- env BENCH_INNER=1 bash scripts/bench-boot.sh "$RUNS"
fi

MEM_MIB=512
KERNEL=guests/cache/kernel/vmlinuz
INITRD=guests/cache/l2/initramfs.cpio.gz
# The guest lingers after the marker so the VMM is still there to be measured.
APPEND="console=ttyS0 quiet rig.cmd=$(printf 'sleep 2' | base64 -w0)"
MARK=PLATTER-GUEST-INIT
OUT=$(mktemp -d)

# `exec`: the background job's PID must be the VMM's own, for its smaps.
platter_cmd() {
    exec target/release/platter run configs/boot.toml --rig=never \
        --set machine.vcpus=2 --set "machine.memory=${MEM_MIB}M" \
        --set "kernel.cmdline=$APPEND"
}
qemu_cmd() {
    exec qemu-system-x86_64 -machine q35,accel=kvm -cpu host -smp 2 -m "${MEM_MIB}M" \
        -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND"
}

# Rss (KiB) of a process minus its guest RAM mapping (the one >= 90% of RAM).
rss_beyond_ram() {
    awk -v ram=$((MEM_MIB * 1024 * 9 / 10)) '
        /^[0-9a-f]+-[0-9a-f]+ / { big = 0 }
        /^Size:/ { big = ($2 >= ram) }
        /^Rss:/ { if (big) guest += $2; total += $2 }
        END { print total - guest }' "/proc/$1/smaps"
}

one_boot() { # name -> prints "ms rss_kib"
    local log="$OUT/$1.log" start now pid
    : > "$log"
    start=$(date +%s%N)
    "$1_cmd" > "$log" 2>&1 < /dev/null &
    pid=$!
    while ! grep -q "$MARK" "$log"; do
        if ! kill -0 "$pid" 2>/dev/null && ! grep -q "$MARK" "$log"; then
            echo "$1 exited before $MARK:" >&2; tail -n 20 "$log" >&2; exit 1
        fi
        sleep 0.005
    done
    now=$(date +%s%N)
    local rss; rss=$(rss_beyond_ram "$pid")
    wait "$pid" || { echo "$1 failed:" >&2; tail -n 20 "$log" >&2; exit 1; }
    echo "$(( (now - start) / 1000000 )) $rss"
}

median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : int((a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }

for vmm in platter qemu; do
    : > "$OUT/$vmm.times"; : > "$OUT/$vmm.rss"
done
# Interleave the two so drift in the rig affects both alike.
for i in $(seq 1 "$RUNS"); do
    for vmm in platter qemu; do
        res=$(one_boot "$vmm")
        ms=${res% *}; rss=${res#* }
        echo "$ms" >> "$OUT/$vmm.times"; echo "$rss" >> "$OUT/$vmm.rss"
        echo "run $i $vmm: ${ms} ms to $MARK, ${rss} KiB beyond guest RAM" >&2
    done
done
pt=$(median < "$OUT/platter.times"); qt=$(median < "$OUT/qemu.times")
pr=$(median < "$OUT/platter.rss"); qr=$(median < "$OUT/qemu.rss")
echo
echo "| VMM | median ms to guest init ($RUNS runs) | median RSS beyond guest RAM (MiB) |"
echo "| --- | ---: | ---: |"
awk -v pt="$pt" -v qt="$qt" -v pr="$pr" -v qr="$qr" -v qv="$(qemu-system-x86_64 --version | awk 'NR==1{print $4}')" 'BEGIN {
    printf "| Platter | %d | %.1f |\n", pt, pr / 1024
    printf "| QEMU %s | %d | %.1f |\n", qv, qt, qr / 1024
    printf "| Platter / QEMU | %.2f | %.2f |\n", pt / qt, pr / qr }'
rm -rf "$OUT"
