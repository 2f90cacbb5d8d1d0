#!/usr/bin/env bash
# Compare `platter img bench` with `qemu-img bench` (same options, same images, one run) and
# with fio on raw (the ceiling), and print a markdown table of ops/s and ratios.
#
# Usage: scripts/bench-img.sh            (everything; several minutes)
#   Environment knobs (space-separated lists):
#     DIR=/tmp SIZE=1G                 where and how large the images are
#     FORMATS="raw qcow2 qcow2-meta qcow2-sparse qcow2-frag qcow2-overlay"
#                                      raw: preallocation=full; qcow2: preallocation=full
#                                      (allocated); qcow2-meta: preallocation=metadata
#                                      (made by `platter img create`; the others by qemu-img,
#                                      so both tools also read images QEMU made);
#                                      qcow2-sparse: no preallocation, recreated before every
#                                      write run so writes allocate (write rows only)
#                                      qcow2-frag: filled by 64 KiB writes in stride order, so
#                                      neighbouring guest clusters lie far apart in the file
#                                      (an image written randomly, as guests do)
#                                      qcow2-overlay: an empty qcow2 over the raw image, so
#                                      reads come from the backing file; recreated before
#                                      every write run, so writes allocate with copy-on-write
#     ENGINES="threads native io_uring" CACHES="none writeback"
#     WORKLOADS="rr4k-d1 rr4k-d32 rw4k-d1 rw4k-d32 sr1m sw1m"
#     SCALE=1                          multiply request counts (runs are ~0.5-2 s at 1)
#     REPEAT=3                         runs per tool and row, interleaved (qemu-img, platter,
#                                      fio, qemu-img, ...); the table keeps each tool's best,
#                                      since one run swings by up to 2x on a shared host
#     PLATTER=target/release/platter   binary to test (built with cargo if missing)
#
# "Random" 4 KiB rows use qemu-img bench's stride pattern with a step of 7919 blocks (a prime,
# so the stride visits every block before repeating and defeats readahead), given to both
# tools identically; fio uses true random offsets. aio=native needs O_DIRECT in both QEMU and
# Platter, so native runs only with cache=none. The fio engine matches the aio engine:
# threads -> psync with numjobs=depth, native -> libaio, io_uring -> io_uring.
set -euo pipefail

cd "$(dirname "$0")/.."
DIR=${DIR:-/tmp}
SIZE=${SIZE:-1G}
FORMATS=${FORMATS:-"raw qcow2 qcow2-meta qcow2-sparse qcow2-frag qcow2-overlay"}
ENGINES=${ENGINES:-"threads native io_uring"}
CACHES=${CACHES:-"none writeback"}
WORKLOADS=${WORKLOADS:-"rr4k-d1 rr4k-d32 rw4k-d1 rw4k-d32 sr1m sw1m"}
SCALE=${SCALE:-1}
REPEAT=${REPEAT:-3}
PLATTER=${PLATTER:-target/release/platter}

command -v qemu-img >/dev/null || { echo "qemu-img not found (apt-get install qemu-utils)" >&2; exit 1; }
if ! command -v fio >/dev/null; then
    echo "fio missing; installing" >&2
    apt-get install -y fio >/dev/null
fi
if [ ! -x "$PLATTER" ]; then
    echo "building $PLATTER" >&2
    cargo build --release -p platter-vmm >&2
fi

WORK=$(mktemp -d "$DIR/platter-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

image_for() { # format -> path (creating it if needed)
    local f=$1 p="$WORK/$1.img"
    case $f in
        raw) [ -e "$p" ] || qemu-img create -q -f raw -o preallocation=full "$p" "$SIZE" ;;
        qcow2) [ -e "$p" ] || qemu-img create -q -f qcow2 -o preallocation=full "$p" "$SIZE" ;;
        qcow2-meta) [ -e "$p" ] || "$PLATTER" img create -f qcow2 -o preallocation=metadata "$p" "$SIZE" >/dev/null ;;
        qcow2-sparse) rm -f "$p"; qemu-img create -q -f qcow2 "$p" "$SIZE" ;;
        qcow2-overlay) [ -e "$p" ] && [ "${FRESH:-0}" = 0 ] || {
            rm -f "$p"
            local base; base=$(image_for raw)
            qemu-img create -q -f qcow2 -b "$base" -F raw "$p" "$SIZE"
        } ;;
        qcow2-frag) [ -e "$p" ] || {
            qemu-img create -q -f qcow2 "$p" "$SIZE"
            local clusters=$(( $(qemu-img info --output=json "$p" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])') / 65536 ))
            qemu-img bench -q -w -f qcow2 -t none -d 32 -s 64k -S $((65536 * 7919)) -c "$clusters" "$p" >/dev/null
        } ;;
    esac
    echo "$p"
}

fmt_of() { case $1 in raw) echo raw ;; *) echo qcow2 ;; esac; }

# workload -> "bs depth count write step"
params() {
    local c
    case $1 in
        rr4k-d1)  c=$((20000 * SCALE));  echo "4096 1 $c 0 $((4096 * 7919))" ;;
        rr4k-d32) c=$((100000 * SCALE)); echo "4096 32 $c 0 $((4096 * 7919))" ;;
        rw4k-d1)  c=$((20000 * SCALE));  echo "4096 1 $c 1 $((4096 * 7919))" ;;
        rw4k-d32) c=$((100000 * SCALE)); echo "4096 32 $c 1 $((4096 * 7919))" ;;
        sr1m)     c=$((2000 * SCALE));   echo "1048576 4 $c 0 1048576" ;;
        sw1m)     c=$((2000 * SCALE));   echo "1048576 4 $c 1 1048576" ;;
        *) echo "unknown workload $1" >&2; exit 1 ;;
    esac
}

# tool img fmt bs depth count write step cache aio -> ops/s or "-"
run_bench() {
    local tool=$1 img=$2 fmt=$3 bs=$4 depth=$5 count=$6 write=$7 step=$8 cache=$9 aio=${10}
    local w=() out secs
    [ "$write" = 1 ] && w=(-w)
    if [ "$tool" = qemu ]; then
        out=$(qemu-img bench -f "$fmt" -t "$cache" -i "$aio" -c "$count" -d "$depth" -s "$bs" \
            -S "$step" "${w[@]}" "$img" 2>&1) || { echo "qemu-img bench failed: $out" >&2; echo "-"; return; }
    else
        out=$("$PLATTER" img bench -f "$fmt" -t "$cache" -i "$aio" -c "$count" -d "$depth" -s "$bs" \
            -S "$step" "${w[@]}" "$img" 2>&1) || { echo "platter img bench failed: $out" >&2; echo "-"; return; }
    fi
    secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p' <<<"$out")
    awk -v c="$count" -v s="$secs" 'BEGIN { printf "%.0f", c / s }'
}

run_fio() { # img bs depth count write seq cache aio -> ops/s
    local img=$1 bs=$2 depth=$3 count=$4 write=$5 seq=$6 cache=$7 aio=$8 rw engine jobs=1 qd
    if [ "$seq" = 1 ]; then rw=read; [ "$write" = 1 ] && rw=write
    else rw=randread; [ "$write" = 1 ] && rw=randwrite; fi
    qd=$depth
    case $aio in
        threads) engine=psync; jobs=$depth; qd=1 ;;
        native) engine=libaio ;;
        io_uring) engine=io_uring ;;
    esac
    local direct=0; [ "$cache" = none ] && direct=1
    fio --name=b --filename="$img" --rw=$rw --bs="$bs" --iodepth=$qd --numjobs=$jobs \
        --group_reporting --ioengine=$engine --direct=$direct --invalidate=0 --size="$SIZE" \
        --io_size=$(( count * bs / jobs )) --norandommap --randrepeat=0 \
        --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print("%.0f" % (j["read"]["iops"] + j["write"]["iops"]))'
}

best() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-") print b; else if (b == "-" || a + 0 >= b + 0) print a; else print b }'; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'; }

echo "Host: $(uname -r), $(nproc) CPUs, $(qemu-img --version | head -1), $(fio --version); images in $DIR, $SIZE; best of $REPEAT runs each"
echo
echo "| format | workload | aio | cache | qemu-img ops/s | platter ops/s | platter/qemu | fio ops/s | platter/fio |"
echo "|---|---|---|---|---:|---:|---:|---:|---:|"
for f in $FORMATS; do
    for wl in $WORKLOADS; do
        read -r bs depth count write step <<<"$(params "$wl")"
        [ "$f" = qcow2-sparse ] && [ "$write" = 0 ] && continue
        seq=0; [ "$step" = "$bs" ] && seq=1
        for aio in $ENGINES; do
            for cache in $CACHES; do
                [ "$aio" = native ] && [ "$cache" != none ] && continue
                q=- p=- fi_ops="" pf=""
                for _ in $(seq "$REPEAT"); do
                    img=$(FRESH=$write image_for "$f")
                    [ "$cache" = writeback ] && [ "$write" = 0 ] && cat "$img" >/dev/null
                    q=$(best "$q" "$(run_bench qemu "$img" "$(fmt_of "$f")" "$bs" "$depth" "$count" "$write" "$step" "$cache" "$aio")")
                    sync
                    case $f in qcow2-sparse|qcow2-overlay) img=$(FRESH=$write image_for "$f") ;; esac
                    p=$(best "$p" "$(run_bench platter "$img" "$(fmt_of "$f")" "$bs" "$depth" "$count" "$write" "$step" "$cache" "$aio")")
                    sync
                    if [ "$f" = raw ]; then
                        fi_ops=$(best "${fi_ops:--}" "$(run_fio "$img" "$bs" "$depth" "$count" "$write" "$seq" "$cache" "$aio" || echo -)")
                        pf=$(ratio "$p" "$fi_ops")
                        sync
                    fi
                done
                echo "| $f | $wl | $aio | $cache | $q | $p | $(ratio "$p" "$q") | $fi_ops | $pf |"
            done
        done
    done
done
