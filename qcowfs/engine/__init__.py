"""The qcow2 engine: everything QEMU's block/qcow2*.c does, on host files.

No FUSE and no command line here; the public API (`qcowfs`, `qcowfs.aio`)
is built on `image.Image`. By concern, as QEMU splits block/qcow2*.c:

- `opening`: header validation, encryption, backing chain (qcow2_do_open);
- `image`: the state of one open image and its entry points (BDRVQcow2State);
- `metadata`: the one owner of the header and table pointers (qcow2_update_header);
- `overlap`: which host clusters hold metadata (qcow2_pre_write_overlap_check);
- `cache`: L2 and refcount block caches with flush dependencies (qcow2-cache.c);
- `mapper`: guest offsets to typed runs, reads, SEEK_DATA/SEEK_HOLE (qcow2-cluster.c);
- `writer`: writes, allocation, copy-on-write, zeroing (qcow2-cluster.c);
- `refcount/`: allocator, transactions, COPIED flags, rebuild (qcow2-refcount.c);
- `references`: one walker of every reference the image holds;
- `stored`: the refcount table and blocks as stored, without numpy;
- `snapshots`, `snapshot_ops`: internal snapshots (qcow2-snapshot.c);
- `bitmaps`, `bitmap_ops`: persistent dirty bitmaps (qcow2-bitmap.c);
- `extents`: allocation and dirty maps; `check`: qemu-img check; `info`: qemu-img info;
- `create`, `convert`, `chain_ops`, `resize`: what qemu-img makes and changes
  (`builder`: the new plain image a convert writes front to back), and
  `blocks`, the block comparisons convert, rebase and the maps share;
- `compare`: where two disks first differ (qemu-img compare).

Importing this package costs nothing: it imports none of its modules.
"""

# qemu-img check's exit statuses (check.py returns them; the records re-export them).
EXIT_CLEAN, EXIT_FAILED, EXIT_CORRUPT, EXIT_LEAKS = 0, 1, 2, 3

# The L2 cache of one open image, by default (the `l2_cache_size=` mount option).
DEFAULT_L2_CACHE_BYTES = 32 << 20
