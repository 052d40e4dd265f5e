"""What one upload holds in memory at most, so that the scheduler's byte budget bounds a whole closure
and not only a single path (pure: sizes in, bytes out).

A NAR up to narstream.SMALL_NAR is compressed whole in memory by a thread of a small pool: its pieces
and their join (two copies of its compressed size, bounded by the NAR's size) while it is encoded, then
what the backend makes of it. Its compressor lives in that pool (a few threads, whatever the number of
uploads), so it is not counted per upload. A larger NAR is streamed: its compressor (threaded zstd's
workers and job buffers are most of it), the stream's pieces in flight, and what the backend buffers
(S3: its parts in flight; HTTP and file: nothing beyond the piece being written).

The compressor figures are RSS growths measured with pyzstd (zstd 1.5) compressing 48 MiB of ELF code:
single-threaded level 1: 1.4 MiB, 3: 3.4, 9: 15, 19: 90; threaded with 2 MiB jobs, level 3: 13.5 (1
worker), 19.5 (2), 27 (4); level 9, 2 workers: 38; level 19, 2 workers: 210. xz: its manual's table.
"""

from __future__ import annotations

from . import nar
from .narstream import EMIT, FEED_THREADED, JOB_MIB, SMALL_NAR, Encoding

MiB = 1 << 20
XZ_MIB = (3, 9, 17, 32, 48, 94, 94, 186, 370, 674)
"""xz(1)'s compressor memory for presets 0-9, MiB."""
STREAM_AHEAD = 2
"""Pieces a NarStream runs ahead of its consumer (narstream.NarStream's default)."""


def bound(nar_size: int) -> int:
    """At most the compressed size of a NAR (zstd's and xz's worst case is a little over the input)."""
    return nar_size + (nar_size >> 7) + (64 << 10)


def zstd_memory(level: int, workers: int) -> int:
    """zstd's compressor at `level`, with `workers` threads (0: compressing in the caller's thread)."""
    single = (2 if level <= 2 else 4 if level <= 5 else 16 if level <= 12 else 48 if level <= 16 else 96) * MiB
    if not workers:
        return single
    return 2 * single + workers * (single // 2 + 2 * JOB_MIB * MiB)


def compressor_memory(enc: Encoding, workers: int) -> int:
    """What `enc`'s compressor holds (`workers`: threaded zstd's worker threads)."""
    if enc.compression == "zstd":
        return zstd_memory(enc.level, workers if enc.threaded else 0)
    if enc.compression == "xz":
        return XZ_MIB[max(0, min(9, enc.level))] * MiB
    return 0


def upload_memory(nar_size: int, enc: Encoding, workers: int, nar_buffer: int) -> int:
    """What uploading a NAR of `nar_size` bytes holds at most; `nar_buffer`: what the backend's
    put_nar holds for it (Backend.nar_memory)."""
    if nar_size <= SMALL_NAR:  # encoded (the NAR's pieces, in case it is stored as itself, the compressed
        # pieces and their join), then put (the join and the backend's)
        return max(nar_size + 2 * bound(nar_size), bound(nar_size) + nar_buffer)
    return compressor_memory(enc, workers) + stream_memory(enc) + nar_buffer


def stream_memory(enc: Encoding) -> int:
    """A NarStream's bytes in flight: the NAR chunk read, the batch fed to the compressor and its
    output, the piece being filled, and the pieces queued for the consumer and the one it holds (each
    up to a piece plus one compressor output)."""
    feed = FEED_THREADED if enc.threaded else nar.CHUNK
    piece = EMIT + feed
    return nar.CHUNK + 2 * feed + piece * (STREAM_AHEAD + 2)
