"""Compressed clusters: zlib (raw deflate) and zstd, decoded to exactly one cluster."""
from __future__ import annotations

import os
import threading
import zlib
from types import ModuleType
from typing import TYPE_CHECKING, Callable, TypeVar

from ..errors import CorruptionError, UnsupportedFeatureError
from . import COMPRESSION_ZLIB, COMPRESSION_ZSTD

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    import zstandard

T = TypeVar("T")

# Codec objects are not thread-safe, and images may be read on several
# threads at once (qcowfs.open's calls run on their callers' threads): one
# per thread and codec.
_LOCAL = threading.local()


def _zstd() -> ModuleType:
    """The zstd library, imported at its first use: most images are zlib or
    uncompressed, and importing it costs every command and mount 2-5 ms."""
    import zstandard

    return zstandard


def _zstd_decompressor() -> "zstandard.ZstdDecompressor":
    """This thread's zstd decompressor, reused for every cluster: building one
    costs more than decoding a 64 KiB cluster (39 against 13 us)."""
    return _this_thread("zstd_d", _zstd().ZstdDecompressor)


def _zstd_compressor() -> "zstandard.ZstdCompressor":
    return _this_thread("zstd_c", _zstd().ZstdCompressor)


def _this_thread(name: str, make: Callable[[], T]) -> T:
    """This thread's codec object NAME, made by MAKE at its first use here."""
    codec = getattr(_LOCAL, name, None)
    if codec is None:
        codec = make()
        setattr(_LOCAL, name, codec)
    return codec


def decompress_cluster(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    """Decode one cluster; trailing padding after the stream is ignored."""
    if compression_type == COMPRESSION_ZLIB:
        codec_error: type[Exception] = zlib.error
    elif compression_type == COMPRESSION_ZSTD:
        codec_error = _zstd().ZstdError
    else:
        raise UnsupportedFeatureError(f"unknown compression type {compression_type}")
    try:
        if compression_type == COMPRESSION_ZLIB:
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        else:
            out = _zstd_decompressor().decompress(data, max_output_size=cluster_size)
    except codec_error as e:
        raise CorruptionError(f"compressed cluster does not decode: {e}") from None
    if len(out) != cluster_size:
        raise CorruptionError(f"compressed cluster decodes to {len(out)} bytes, not {cluster_size}")
    return out



# Worker threads that inflate next to the caller (decompress_clusters): one
# fewer than the CPUs this process may run on, made at first use.
_pool: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    """A forked child has none of its parent's threads: it makes its own."""
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def decompress_clusters(raws: list[bytes], cluster_size: int, compression_type: int) -> list[bytes]:
    """decompress_cluster of each of RAWS, in order: the caller's thread and
    up to one worker thread per other CPU decode them together (zlib and zstd
    release the GIL while they work), so a long read of a compressed image is
    inflated on every core, as QEMU inflates in its thread pool."""
    global _pool
    workers = len(os.sched_getaffinity(0)) - 1
    if workers < 1 or len(raws) < 2:
        return _decode_all(raws, cluster_size, compression_type)
    if _pool is None:
        # (imported here: a mount that inflates one cluster at a time never needs it)
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(workers, thread_name_prefix="qcowfs-inflate")
    share = len(raws) // (workers + 1)
    mine = raws[: len(raws) - share * workers]
    theirs = [_pool.submit(_decode_all, raws[len(mine) + i * share : len(mine) + (i + 1) * share],
                           cluster_size, compression_type) for i in range(workers) if share]
    out = _decode_all(mine, cluster_size, compression_type)
    for job in theirs:
        out += job.result()
    return out


def _decode_all(raws: list[bytes], cluster_size: int, compression_type: int) -> list[bytes]:
    return [decompress_cluster(r, cluster_size, compression_type) for r in raws]


# QEMU's deflate settings (block/qcow2-threads.c): raw deflate, a 4 KiB window.
ZLIB_WBITS = -12


def compress_cluster(data: bytes | bytearray | memoryview, compression_type: int) -> bytes | None:
    """One cluster compressed as QEMU stores it, or None when it does not
    shrink below a cluster (QEMU then writes it uncompressed). Runs in any
    thread: zlib and zstd release the GIL while they work."""
    if compression_type == COMPRESSION_ZLIB:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, ZLIB_WBITS)
        out = c.compress(data) + c.flush()
    elif compression_type == COMPRESSION_ZSTD:
        out = _zstd_compressor().compress(data)
    else:
        raise UnsupportedFeatureError(f"unknown compression type {compression_type}")
    return out if len(out) < len(data) else None
