#!/bin/bash
# guests/build.sh - build the kernel and initramfs images the nested test rig boots.
#
# Why: this machine's /dev/kvm cannot run a stock Linux guest (see
# shared/RIG.md), so tests run inside an emulated AMD machine (L1, QEMU TCG
# with SVM+NPT) that offers a real nested KVM to the VMM under test, which in
# turn boots an L2 Linux guest. This script prepares everything for that:
#
#   $CACHE/kernel/vmlinuz            Debian 6.1 generic kernel, used for L1 and L2
#   $CACHE/kernel/version            its `uname -r`
#   $CACHE/l1/initramfs.cpio.gz      busybox + kvm_amd/9p modules + guests/l1-init
#   $CACHE/l2/initramfs.cpio.gz      busybox + fio + mkfs.ext4 + storage modules
#                                    + guests/l2-init
#   $CACHE/l2/rootfs.ext4            the same tree as an ext4 root file system
#                                    (sparse), for root-on-disk tests (rig.root=)
#
# $CACHE is guests/cache unless PLATTER_CACHE says otherwise. The script is
# idempotent: host packages are installed only when missing, the kernel is
# fetched only when a newer one shows up in the local apt lists (or none is
# there yet), and an initramfs is rebuilt only when one of its inputs changed.
# It needs root (apt-get) and runs on a fresh Debian 12.
#
# Usage: guests/build.sh [--force]     (--force rebuilds both initramfs images)
set -euo pipefail

# shellcheck source=guests/lib.sh
. "$(dirname "$0")/lib.sh"

die() { log "error: $*"; exit 1; }

FORCE=0
case "${1:-}" in
    "") ;;
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (try --help)" ;;
esac

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages with apt-get)"

# Modules each guest can load. modprobe resolves their dependencies from the
# kernel's modules.dep when the images are built.
L1_MODULES=(kvm_amd ccp irqbypass 9p 9pnet_virtio virtio_pci
            vfio_pci vfio_iommu_type1 loop tun ext4 crc32c)
L2_MODULES=(ata_piix ahci libata sd_mod sr_mod cdrom virtio_pci virtio_blk
            virtio_scsi scsi_mod xhci_pci xhci_hcd usb_storage uas nvme ext4 isofs
            crc32c)

export DEBIAN_FRONTEND=noninteractive
APT_QUIET=(-q -o Dpkg::Use-Pty=0 -o APT::Sandbox::User=root)

# One build at a time: two rig runs may both decide to build.
exec 9>"$CACHE/.build.lock"
flock 9

# ---------------------------------------------------------------- host packages

pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

# apt-get install, refreshing the package lists once if the first try fails
# (a fresh machine may have no lists, or lists naming versions since removed).
apt_install() {
    apt-get install -y "${APT_QUIET[@]}" --no-install-recommends --allow-downgrades "$@" ||
        { apt-get update "${APT_QUIET[@]}" &&
          apt-get install -y "${APT_QUIET[@]}" --no-install-recommends --allow-downgrades "$@"; }
}

install_host_packages() {
    local missing=() p
    for p in busybox-static fio cpio kmod gzip e2fsprogs genisoimage; do
        pkg_installed "$p" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        apt_install "${missing[@]}" || die "apt-get install ${missing[*]} failed"
    fi
    if ! pkg_installed qemu-system-x86; then
        # A fresh machine has qemu-utils 10.0 from a suite apt doesn't list,
        # which conflicts with Debian's qemu-system-x86: pin both to one version.
        local v
        v=$(apt-cache policy qemu-system-x86 | awk '/Candidate/{print $2}')
        if [ -z "$v" ] || [ "$v" = "(none)" ]; then
            apt-get update "${APT_QUIET[@]}" || die "apt-get update failed"
            v=$(apt-cache policy qemu-system-x86 | awk '/Candidate/{print $2}')
        fi
        log "installing qemu-system-x86 $v"
        apt_install qemu-system-x86 "qemu-utils=$v" || die "could not install qemu-system-x86 $v"
    fi
}

# ---------------------------------------------------------------------- kernel

# The newest generic 6.1 kernel package in the local apt lists
# (linux-image-6.1.0-NN-amd64; not -cloud, -rt, -unsigned or -dbg).
newest_kernel_package() {
    apt-cache pkgnames linux-image-6.1.0- |
        grep -E '^linux-image-6\.1\.0-[0-9]+-amd64$' | sort -V | tail -n 1
}

fetch_kernel() {
    local pkg ver deb tmp
    pkg=$(newest_kernel_package)
    if [ -z "$pkg" ]; then
        apt-get update "${APT_QUIET[@]}" || die "apt-get update failed"
        pkg=$(newest_kernel_package)
        [ -n "$pkg" ] || die "no linux-image-6.1.0-NN-amd64 package in the apt lists"
    fi
    ver=${pkg#linux-image-}
    if [ -f "$KERNEL_IMAGE" ] && [ "$(cat "$KERNEL_VERSION_FILE" 2>/dev/null)" = "$ver" ] &&
       [ -f "$CACHE/kernel/root/lib/modules/$ver/modules.dep" ]; then
        return 0
    fi

    log "fetching $pkg"
    mkdir -p "$CACHE/debs"
    rm -f "$CACHE/debs/linux-image-"*.deb
    if ! (cd "$CACHE/debs" && apt-get download "${APT_QUIET[@]}" "$pkg"); then
        # The lists may name a version the mirror no longer has.
        apt-get update "${APT_QUIET[@]}" || die "apt-get update failed"
        pkg=$(newest_kernel_package)
        ver=${pkg#linux-image-}
        (cd "$CACHE/debs" && apt-get download "${APT_QUIET[@]}" "$pkg") ||
            die "apt-get download $pkg failed"
    fi
    deb=$(ls "$CACHE/debs/$pkg"_*.deb)

    log "unpacking $pkg"
    tmp=$CACHE/kernel.tmp
    rm -rf "$tmp"
    mkdir -p "$tmp"
    dpkg-deb -x "$deb" "$tmp/root"
    depmod -b "$tmp/root" "$ver"
    [ -f "$tmp/root/boot/vmlinuz-$ver" ] || die "$deb has no boot/vmlinuz-$ver"
    cp "$tmp/root/boot/vmlinuz-$ver" "$tmp/vmlinuz"
    dpkg-deb -f "$deb" Version > "$tmp/package-version"
    echo "$ver" > "$tmp/version"
    rm -rf "$CACHE/kernel"
    mv "$tmp" "$CACHE/kernel"
}

# ------------------------------------------------------------------- initramfs

# Print the .ko files (absolute paths) that modprobe would load for the given
# modules, dependencies included, from the unpacked kernel tree.
module_closure() {
    local kroot=$1 ver=$2 m
    shift 2
    for m in "$@"; do
        modprobe -d "$kroot" -S "$ver" --show-depends "$m" ||
            { log "error: module $m not found for kernel $ver"; return 1; }
    done | awk '$1 == "insmod" { print $2 }' | sort -u
}

# Lay out a minimal root: directories, device nodes the kernel wants before
# devtmpfs is mounted, and busybox with a symlink for every applet.
stage_busybox() {
    local dir=$1 applet
    mkdir -p "$dir"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,mnt,root,etc,lib}
    mknod -m 600 "$dir/dev/console" c 5 1
    mknod -m 666 "$dir/dev/null" c 1 3
    cp /bin/busybox "$dir/bin/busybox"
    for applet in $(/bin/busybox --list-full); do
        [ -e "$dir/$applet" ] || ln -s /bin/busybox "$dir/$applet"
    done
}

# Copy modules (with dependencies) and build modules.dep for them, so that
# busybox modprobe works inside the guest.
stage_modules() {
    local dir=$1 ver=$2 kroot=$CACHE/kernel/root ko rel f
    shift 2
    local mods
    mods=$(module_closure "$kroot" "$ver" "$@")
    for ko in $mods; do
        rel=${ko#"$kroot"/}
        mkdir -p "$dir/$(dirname "$rel")"
        cp "$ko" "$dir/$rel"
    done
    for f in modules.order modules.builtin modules.builtin.modinfo; do
        cp "$kroot/lib/modules/$ver/$f" "$dir/lib/modules/$ver/$f"
    done
    depmod -b "$dir" "$ver"
}

# Copy host executables into the tree at the same path, with every shared
# library ldd lists for them.
stage_binaries() {
    local dir=$1 bin lib
    shift
    for bin in "$@"; do
        mkdir -p "$dir/$(dirname "$bin")"
        rm -f "$dir/$bin"
        cp -L "$bin" "$dir/$bin"
        for lib in $(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
            [ -e "$dir/$lib" ] && continue
            mkdir -p "$dir/$(dirname "$lib")"
            cp -L "$lib" "$dir/$lib"
        done
    done
}

# Pack a staged tree into a gzip'd newc cpio archive, atomically.
pack() {
    local dir=$1 out=$2
    (cd "$dir" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc --owner=0:0 --quiet) | gzip -6 > "$out.tmp"
    mv "$out.tmp" "$out"
}

# Succeed when $out exists and was built from the inputs described by $stamp.
up_to_date() {
    local out=$1 stamp=$2
    [ "$FORCE" = 0 ] && [ -f "$out" ] && [ "$(cat "$out.inputs" 2>/dev/null)" = "$stamp" ] &&
        touch "$out" # newer than its inputs again, so guests/rig stops asking
}

pkg_version() { dpkg-query -W -f='${Version}' "$1"; }

build_l1() {
    local ver=$1 stamp stage
    stamp=$(printf '%s\n' "kernel $ver" "busybox $(pkg_version busybox-static)" \
        "modules ${L1_MODULES[*]}" "init $(sha256sum < "$GUESTS_DIR/l1-init")" \
        "build $(sha256sum < "$GUESTS_DIR/build.sh")" | sha256sum | cut -d' ' -f1)
    up_to_date "$L1_INITRAMFS" "$stamp" && return 0

    log "building $L1_INITRAMFS"
    stage=$CACHE/l1/stage
    rm -rf "$stage"
    mkdir -p "$stage"
    stage_busybox "$stage"
    stage_modules "$stage" "$ver" "${L1_MODULES[@]}"
    install -m 755 "$GUESTS_DIR/l1-init" "$stage/init"
    pack "$stage" "$L1_INITRAMFS"
    echo "$stamp" > "$L1_INITRAMFS.inputs"
    rm -rf "$stage"
}

build_l2() {
    local ver=$1 stamp stage
    stamp=$(printf '%s\n' "kernel $ver" "busybox $(pkg_version busybox-static)" \
        "fio $(pkg_version fio)" "e2fsprogs $(pkg_version e2fsprogs)" \
        "modules ${L2_MODULES[*]}" "init $(sha256sum < "$GUESTS_DIR/l2-init")" \
        "build $(sha256sum < "$GUESTS_DIR/build.sh")" | sha256sum | cut -d' ' -f1)
    up_to_date "$L2_INITRAMFS" "$stamp" && [ -f "$L2_ROOTFS" ] && return 0

    log "building $L2_INITRAMFS"
    stage=$CACHE/l2/stage
    rm -rf "$stage"
    mkdir -p "$stage"
    stage_busybox "$stage"
    stage_modules "$stage" "$ver" "${L2_MODULES[@]}"
    # The real mke2fs makes ext4 (busybox's only makes ext2); e2fsck checks
    # what a test wrote. Both share fio's libraries mostly, so they are cheap.
    stage_binaries "$stage" /usr/bin/fio /sbin/mke2fs /sbin/e2fsck
    ln -sf mke2fs "$stage/sbin/mkfs.ext4"
    ln -sf e2fsck "$stage/sbin/fsck.ext4"
    cp /etc/mke2fs.conf "$stage/etc/"
    install -m 755 "$GUESTS_DIR/l2-init" "$stage/init"
    pack "$stage" "$L2_INITRAMFS"
    # The same tree as an ext4 root file system (rig.root=), for tests that
    # boot with their root on an emulated disk. Sparse; copy it before use.
    mkdir -p "$stage/newroot"
    touch "$stage/etc/platter-rootfs"
    rm -f "$L2_ROOTFS.tmp"
    mke2fs -q -t ext4 -L platter-root -d "$stage" "$L2_ROOTFS.tmp" "$L2_ROOTFS_SIZE" ||
        die "cannot make $L2_ROOTFS"
    mv "$L2_ROOTFS.tmp" "$L2_ROOTFS"
    echo "$stamp" > "$L2_INITRAMFS.inputs"
    rm -rf "$stage"
}

# ------------------------------------------------------------------------ main

install_host_packages
fetch_kernel
KVER=$(cat "$KERNEL_VERSION_FILE")
mkdir -p "$CACHE/l1" "$CACHE/l2"
build_l1 "$KVER"
build_l2 "$KVER"
