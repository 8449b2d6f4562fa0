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

usage() {
    echo "usage: backup.sh full|incremental MOUNTPOINT DIR NAME | restore DIR OUT" >&2; exit 2
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
full)
    [ $# -eq 3 ] || usage
    mnt=$1 dir=$2 name=$3
    mkdir -p "$dir"
    qcowfs checkpoint "$mnt" "$name"
    cp --sparse=always "$mnt/snapshots/$name.raw" "$dir/0-$name.full"
    echo "$name" > "$dir/last" ;;
incremental)
    [ $# -eq 3 ] || usage
    mnt=$1 dir=$2 name=$3
    # Increments are numbered 1, 2, 3... after the full copy 0.
    prev=$(cat "$dir/last") n=$(($(ls "$dir" | grep -c '\.inc$' || true) + 1))
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
    [ $# -eq 2 ] || usage
    dir=$1 out=$2
    # Built beside OUT and renamed at the end: a failed restore leaves no OUT.
    # (--no-preserve=mode: the copy is ours to write, not the snapshot's 0444.)
    trap 'rm -f "$out.partial"' EXIT
    cp --sparse=always --no-preserve=mode "$dir"/0-*.full "$out.partial"
    for inc in $(ls "$dir" | grep '\.inc$' | sort -n); do
        copy_extents "$dir/$inc" "$dir/${inc%.inc}.extents" "$out.partial"
    done
    mv "$out.partial" "$out" ;;
*)
    usage ;;
esac
