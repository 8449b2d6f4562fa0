"""The on-disk format of qcow2: pure parsing and packing, no I/O.

Names follow docs/interop/qcow2.txt in QEMU; every integer is big-endian.

- `header`: the header, its extensions and feature bits, `Geometry`;
- `entries`: L1/L2 entries, subcluster types, compressed descriptors,
  refcount blocks, tables in memory (`Table`);
- `bulk`: the same over many entries at once, with numpy (bulk work imports
  it; it is not re-exported here, so reading needs no numpy);
- `tables`: snapshot table entries and bitmap directory entries;
- `compression`: zlib and zstd clusters;
- `crypto`: the LUKS1 header, key slots and the sector ciphers.

Everything of the first three is importable from here: one vocabulary for
every layer above.
"""
from .entries import *  # noqa: F401,F403
from .header import *  # noqa: F401,F403
from .tables import *  # noqa: F401,F403
