#!/bin/sh
# Build a sample image with snapshots and a bitmap, mount it, look inside, unmount.
# Runs qcowfs by name, as `make install` put it on every user's PATH, and
# once through `mount -t fuse.qcowfs` as /etc/fstab would.
set -eu
cd "$(dirname "$0")/.."
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
Q=qcowfs
D="$PWD/demo"
mkdir -p "$D/mnt"
mountpoint -q "$D/mnt" && "$Q" umount "$D/mnt"
rm -f "$D/sample.qcow2"

echo "== building demo/sample.qcow2 with qemu-img and qemu-io"
qemu-img create -q -f qcow2 "$D/sample.qcow2" 256M
qemu-io -c 'write -P 0x11 0 4M' "$D/sample.qcow2" >/dev/null
qemu-img snapshot -c before-upgrade "$D/sample.qcow2"
qemu-io -c 'write -P 0x22 1M 2M' "$D/sample.qcow2" >/dev/null
qemu-img bitmap --add --granularity 64K "$D/sample.qcow2" backup-inc
qemu-io -c 'write -P 0x33 64M 1M' "$D/sample.qcow2" >/dev/null
qemu-img snapshot -c after-upgrade "$D/sample.qcow2"

echo "== $(command -v qcowfs) --version"
"$Q" --version
echo "== qcowfs info"
"$Q" info "$D/sample.qcow2"
echo "== qcowfs mount demo/sample.qcow2 demo/mnt"
"$Q" mount "$D/sample.qcow2" "$D/mnt"
trap '"$Q" umount "$D/mnt" 2>/dev/null || true' EXIT
( cd "$D/mnt" && ls -lR . )
df -h "$D/mnt"
echo "== first bytes of disk.raw and of snapshots/before-upgrade.raw at 1 MiB"
od -A d -t x1 -N 16 -j 1048576 "$D/mnt/disk.raw"
od -A d -t x1 -N 16 -j 1048576 "$D/mnt/snapshots/before-upgrade.raw"
echo "== bitmap backup-inc (set bits as byte offsets)"
getfattr -d "$D/mnt/bitmaps/backup-inc" || true
od -A d -t x1 "$D/mnt/bitmaps/backup-inc" | head -5
echo "== unmount"
"$Q" umount "$D/mnt"
trap - EXIT
if [ "$(id -u)" = 0 ]; then
    echo "== mount -t fuse.qcowfs demo/sample.qcow2 demo/mnt -o ro (what /etc/fstab does)"
    mount -t fuse.qcowfs "$D/sample.qcow2" "$D/mnt" -o ro
    trap '"$Q" umount "$D/mnt" 2>/dev/null || true' EXIT
    findmnt "$D/mnt"
    "$Q" umount "$D/mnt"
    trap - EXIT
fi
qemu-img check "$D/sample.qcow2"
