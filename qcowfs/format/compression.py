"""Compressed clusters: zlib (raw deflate) and zstd, decoded to exactly one cluster."""
from __future__ import annotations

import zlib

import zstandard

from ..errors import CorruptionError, UnsupportedFeatureError
from . import COMPRESSION_ZLIB, COMPRESSION_ZSTD


def decompress_cluster(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    """Decode one cluster; trailing padding after the stream is ignored."""
    try:
        if compression_type == COMPRESSION_ZLIB:
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        elif compression_type == COMPRESSION_ZSTD:
            out = zstandard.ZstdDecompressor().decompressobj().decompress(data)[:cluster_size]
        else:
            raise UnsupportedFeatureError(f"unknown compression type {compression_type}")
    except (zlib.error, zstandard.ZstdError) as e:
        raise CorruptionError(f"compressed cluster does not decode: {e}") from None
    if len(out) != cluster_size:
        raise CorruptionError(f"compressed cluster decodes to {len(out)} bytes, not {cluster_size}")
    return out

