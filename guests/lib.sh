# shellcheck shell=bash disable=SC2034 # the variables are for the scripts sourcing this
# guests/lib.sh - helpers shared by guests/build.sh and guests/rig.
#
# Sourced, not run. Works out where the repository and the artefact cache
# are, so both scripts agree on paths however they are invoked.

# The repository root, with symlinks resolved: the rig mounts it at this same
# absolute path inside L1, so paths have to be physical to line up.
GUESTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd "$GUESTS_DIR/.." && pwd -P)

# Everything generated (kernel, initramfs images, job scripts) goes here.
CACHE=${PLATTER_CACHE:-$GUESTS_DIR/cache}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd -P)

# The artefacts guests/rig needs; build.sh produces them.
KERNEL_IMAGE=$CACHE/kernel/vmlinuz
KERNEL_VERSION_FILE=$CACHE/kernel/version
L1_INITRAMFS=$CACHE/l1/initramfs.cpio.gz
L2_INITRAMFS=$CACHE/l2/initramfs.cpio.gz
L2_ROOTFS=$CACHE/l2/rootfs.ext4
# Size of the (sparse) root file system image.
L2_ROOTFS_SIZE=256M

# Print a message on stderr, prefixed with the calling script's name.
log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
