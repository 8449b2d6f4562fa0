#!/bin/sh
# Full and incremental backups of a mounted, running qcow2 disk with qcowfs,
# a shell and python3; and the restore. Nothing else: no NBD, no QEMU.
#
#   backup.sh full        MOUNTPOINT DIR NAME   checkpoint NAME, copy the whole disk as of then
#   backup.sh incremental MOUNTPOINT DIR NAME   checkpoint NAME, copy what changed since the last one
#   backup.sh restore     DIR OUT               the full copy, then every increment in order, into OUT
#
# A checkpoint is one instant: snapshot NAME, a frozen copy PREV@NAME of the
# bitmap that tracked writes since checkpoint PREV, and a new bitmap NAME.
# So snapshots/NAME.raw at the dirty extents of PREV@NAME is exactly what
# changed from PREV to NAME, and the disk stays in use all along.
set -eu

copy_extents() {  # SRC EXTENTS DEST: copy SRC's dirty extents (nbdinfo JSON) into DEST
    python3 - "$@" <<'PY'
import json, sys
src, extents, dest = sys.argv[1:]
with open(src, "rb") as s, open(dest, "r+b") as d, open(extents) as m:
    for e in json.load(m):
        if e["type"] & 1:                       # dirty
            s.seek(e["offset"]); d.seek(e["offset"])
            left = e["length"]
            while left:
                chunk = s.read(min(left, 1 << 20))
                d.write(chunk); left -= len(chunk)
PY
}

cmd=$1; shift
case $cmd in
full)
    mnt=$1 dir=$2 name=$3
    mkdir -p "$dir"
    qcowfs checkpoint "$mnt" "$name"
    cp --sparse=always "$mnt/snapshots/$name.raw" "$dir/0-$name.full"
    echo "$name" > "$dir/last" ;;
incremental)
    mnt=$1 dir=$2 name=$3
    prev=$(cat "$dir/last") n=$(ls "$dir" | grep -c '^[0-9]')
    qcowfs checkpoint "$mnt" "$name"
    cp "$mnt/maps/bitmaps/$prev@$name.json" "$dir/$n-$name.extents"
    truncate -s "$(stat -c %s "$mnt/snapshots/$name.raw")" "$dir/$n-$name.inc"
    copy_extents "$mnt/snapshots/$name.raw" "$dir/$n-$name.extents" "$dir/$n-$name.inc"
    # What the next increment does not need: the old snapshot and bitmaps.
    qcowfs snapshot delete "$mnt" "$prev"
    qcowfs bitmap remove "$mnt" "$prev"
    qcowfs bitmap remove "$mnt" "$prev@$name"
    echo "$name" > "$dir/last" ;;
restore)
    dir=$1 out=$2
    cp --sparse=always "$dir"/0-*.full "$out"
    for inc in $(ls "$dir" | grep '\.inc$' | sort -n); do
        copy_extents "$dir/$inc" "$dir/${inc%.inc}.extents" "$out"
    done ;;
*)
    echo "usage: backup.sh full|incremental MOUNTPOINT DIR NAME | restore DIR OUT" >&2; exit 2 ;;
esac
