# Sourced by the rig jobs (in L1): an ext4 file system local to L1 (a loop
# device over a file on L1's tmpfs), so O_DIRECT and hole punching behave as
# on a real host rather than as on the 9p share the repository is on.
# Usage: scratch_ext4 MOUNTPOINT SIZE
scratch_ext4() {
    modprobe -q loop; modprobe -q ext4
    mkdir -p "$1"
    truncate -s "$2" "$1.fs"
    mkfs.ext4 -q -F "$1.fs"
    mount -o loop "$1.fs" "$1"
}
