"""What `qemu-img info --output=json` shows of an image, with the same keys."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..format import (NO_ICOUNT, COMPAT_LAZY_REFCOUNTS, COMPRESSION_NAMES, CRYPT_AES, CRYPT_NONE, EXT_BACKING_FORMAT,
                     EXT_DATA_FILE, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, SnapshotEntry)
from ..errors import QcowError
from .image import Image
from .opening import RawSource, resolve_backing

if TYPE_CHECKING:
    from ..format.crypto import LuksVolume


def describe(image: Image) -> dict[str, Any]:
    h = image.header
    data: dict[str, Any] = {
        "compat": "0.10" if h.version == 2 else "1.1",
        "refcount-bits": h.refcount_bits,
        "compression-type": COMPRESSION_NAMES.get(h.compression_type, str(h.compression_type)),
    }
    if h.crypt_method == CRYPT_AES:
        data["encrypt"] = {"format": "aes"}
    elif image.luks is not None:
        data["encrypt"] = luks_info(image.luks)
    if h.version >= 3:  # (a v2 header has no feature bits: qemu-img leaves these keys out)
        data["corrupt"] = bool(h.incompatible_features & INCOMPAT_CORRUPT)
        data["lazy-refcounts"] = bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS)
        data["extended-l2"] = h.extended_l2
        data["dirty"] = bool(h.incompatible_features & INCOMPAT_DIRTY)
    df = h.extension(EXT_DATA_FILE)
    if df is not None:
        data["data-file"] = df.decode("utf-8", "replace")
        data["data-file-raw"] = image.data_file_raw
    if image.bitmaps:
        data["bitmaps"] = [{"name": b.name, "granularity": b.granularity, "flags": b.flag_names}
                           for b in image.bitmaps]
    out: dict[str, Any] = {
        "filename": image.path,
        "format": "qcow2",
        "virtual-size": image.size,
        "actual-size": os.stat(image.path).st_blocks * 512,
        "cluster-size": h.cluster_size,
        "dirty-flag": bool(h.incompatible_features & INCOMPAT_DIRTY),
        "format-specific": {"type": "qcow2", "data": data},
    }
    if h.crypt_method != CRYPT_NONE:
        out["encrypted"] = True
    out["backing-chain"] = [p for p, _ in image.chain()[1:]]
    if h.backing_file is not None:
        out["backing-filename"] = h.backing_file
        chain = image.chain()
        if len(chain) > 1:
            out["full-backing-filename"] = chain[1][0]
        else:  # (not opened: info of an image whose backing file is missing)
            try:
                out["full-backing-filename"] = resolve_backing(image.path, h.backing_file)
            except QcowError:
                pass  # (a json: or protocol name: nothing to resolve)
        fmt = h.extension(EXT_BACKING_FORMAT)
        if fmt is not None:
            out["backing-filename-format"] = fmt.decode("utf-8", "replace")
    if image.snapshots:
        out["snapshots"] = [snapshot_info(s) for s in image.snapshots]
    return out


def describe_raw(source: RawSource) -> dict[str, Any]:
    """A raw file as `qemu-img info --output=json` shows it: its size in
    whole sectors (RawSource: as QEMU sizes a raw file), what it holds on
    disk."""
    return {"virtual-size": source.size, "filename": source.path, "format": "raw",
            "actual-size": os.fstat(source.file.fd).st_blocks * 512, "dirty-flag": False}


def snapshot_info(s: SnapshotEntry) -> dict[str, Any]:
    """One snapshot as qemu-img info --output=json lists it."""
    return {
        "id": s.id_str, "name": s.name, "vm-state-size": s.state_size,
        "date-sec": s.date_sec, "date-nsec": s.date_nsec,
        "vm-clock-sec": s.vm_clock_nsec // 10**9, "vm-clock-nsec": s.vm_clock_nsec % 10**9,
        # (-1: none recorded; qemu-img leaves the key out then)
        **({"icount": s.icount} if s.icount is not None and s.icount != NO_ICOUNT else {}),
    }


def luks_info(vol: LuksVolume) -> dict[str, Any]:
    """`qemu-img info`'s "encrypt" object of a LUKS image, its keys in its order."""
    from ..format.crypto import LUKS_SECTOR_SIZE
    h, spec = vol.header, vol.spec
    slots: list[dict[str, Any]] = []
    for s in h.key_slots:
        slot: dict[str, Any] = {"active": s.enabled}
        if s.enabled:
            slot["iters"] = s.iterations
        slot["key-offset"] = s.key_offset * LUKS_SECTOR_SIZE
        if s.enabled:
            slot["stripes"] = s.stripes
        slots.append(slot)
    out: dict[str, Any] = {"ivgen-alg": spec.ivgen, "hash-alg": spec.hash, "cipher-alg": spec.cipher_alg,
                           "uuid": h.uuid}
    if spec.ivgen_hash is not None:
        out["ivgen-hash-alg"] = spec.ivgen_hash
    out.update({"format": "luks", "cipher-mode": spec.mode, "slots": slots,
                "payload-offset": h.payload_offset * LUKS_SECTOR_SIZE,
                "master-key-iters": h.mk_digest_iterations})
    return out
