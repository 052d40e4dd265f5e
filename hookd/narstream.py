"""A NAR on its way from the store to the cache: the key it gets before its first byte, and its bytes,
dumped, checked against the store's NarHash, compressed and hashed in a worker thread.

The key scheme (why a NAR's key can be chosen before it is compressed):

    nar/<nix32 NarHash>[-<encoding tag>].nar<ext>     for example  nar/0a1b…-zstd3-1.5.7.nar.zst

(and `nar/<nix32 NarHash>.nar` for a NAR stored as itself, when it does not compress: see WORTH; the
same bytes Nix writes under that name)

The tag names everything the compressed bytes depend on besides the NAR: the compressor, its level, its
mode and job size (zstd's multi-threaded format differs from its single-threaded one, not from itself
with another number of workers), and the library's version. Encoding is deterministic for a given tag (checked by
tests/test_narstream.py), and NarHash is a SHA-256 of the NAR, so:

- every writer of a key writes the same bytes: two different blobs never share a key, whichever writer
  wins a race or overwrites the other, so the FileHash and FileSize of any narinfo pointing at it are
  true (a narinfo records them only for bytes its uploader encoded itself; otherwise it omits FileHash);
- builders running the same hookd and library share NARs (dedup): the key depends on the path's
  contents, not on who uploads it; a different zstd version writes a second NAR beside the first, never
  over it;
- a key is only ever committed after the stream's NarHash was checked (`NarStream` raises before it
  ends normally, and every backend commits only after a normal end), so no key holds a NAR other than
  the one its name says.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import hashlib
import lzma
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import pyzstd

from . import nar, nixbase32
from .narinfo import COMPRESSION_EXT
from .pathinfo import PathInfo

SMALL_NAR = 4 << 20
"""NARs up to this size are encoded whole in memory and sent in one request, without asking first
whether the cache has them: the PUT costs about what the question would."""
INLINE_NAR = 64 << 10
"""NARs up to this size are encoded (and listed) on the event loop, not in a worker thread: the hop
there and back, with the GIL handed over twice, costs more than the work (tens of microseconds)."""
THREADED_FROM = 16 << 20
"""zstd compresses NARs from this size with worker threads (one per core)."""
JOB_MIB = 2
"""zstd's threaded job size: with the default (8 MiB at level 3) its buffers take ~100 MiB; with 2 MiB
~30 MiB, for a 3% larger NAR. Part of the encoding tag: changing it changes the bytes."""
FEED_THREADED = 2 << 20
"""Threaded zstd is fed this much at a time (one job): fed the NAR's 1 MiB pieces it kept to one core.
Measured, 1 GiB of /usr files to nginx: 125 MiB/s at 1 MiB, 247 at 2 MiB, 227 at 8 MiB (with 22 MiB
output bursts and 98 MiB peak RSS)."""
EMIT = 1 << 20
"""Compressed bytes are handed to the backend in pieces of about this size."""


class NarMismatchError(Exception):
    """The path on disk does not match the store's NarHash/NarSize: never upload it."""


class Compressor(Protocol):
    def compress(self, data: bytes | bytearray | memoryview) -> bytes: ...
    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        return bytes(data)

    def flush(self) -> bytes:
        return b""


@functools.cache
def library_version(compression: str) -> str:
    """The version of the library that produces `compression`'s bytes (part of a NAR's key)."""
    if compression == "zstd":
        return str(pyzstd.zstd_version)
    if compression == "xz":
        try:
            lib = ctypes.CDLL("liblzma.so.5")
            lib.lzma_version_string.restype = ctypes.c_char_p
            return str(lib.lzma_version_string().decode())
        except (OSError, AttributeError):  # not Linux's liblzma: the Python build fixes the bytes
            return f"py{sys.version_info.major}.{sys.version_info.minor}"
    return ""


@dataclass(frozen=True)
class Encoding:
    """How a NAR is compressed; with its NarHash, it names the NAR's key (see the module docstring)."""

    compression: str
    level: int
    threaded: bool = False

    @property
    def tag(self) -> str:
        if self.compression == "none":
            return ""
        mode = f"-mt{JOB_MIB}m" if self.threaded else ""
        return f"{self.compression}{self.level}{mode}-{library_version(self.compression)}"

    def key(self, nar_hash: bytes) -> str:
        tag = f"-{self.tag}" if self.tag else ""
        return f"nar/{nixbase32.encode(nar_hash)}{tag}.nar{COMPRESSION_EXT[self.compression]}"

    def compressor(self) -> Compressor:
        if self.compression == "zstd":
            options: dict[int, int] = {pyzstd.CParameter.compressionLevel: self.level}
            if self.threaded:
                options[pyzstd.CParameter.nbWorkers] = max(1, os.cpu_count() or 1)
                options[pyzstd.CParameter.jobSize] = JOB_MIB << 20
            return pyzstd.ZstdCompressor(options)
        if self.compression == "xz":
            return lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=self.level)
        if self.compression == "none":
            return _Identity()
        raise ValueError(f"unknown compression {self.compression!r}")


def encoding(compression: str, level: int, nar_size: int) -> Encoding:
    """The encoding every hookd with this compression setting uses for a NAR of this size, if it
    compresses (see `worth_compressing`)."""
    return Encoding(compression, level, threaded=compression == "zstd" and nar_size >= THREADED_FROM)


FAST_LEVEL = 1


@dataclass
class Levels:
    """The level each NAR is compressed at: `normal`, or, when `adaptive` (zstd with no level set),
    FAST_LEVEL while compression is what holds uploads back.

    Whether it is: after each streamed NAR, whether the backend waited longer for compressed bytes
    (`starved`) than the compressor waited for the backend to take them (`blocked`). A cache on a fast
    link is fed at level 1 (measured on this 2-core machine, /usr files: zstd -1 ~700 MiB/s against
    ~400 at -3, for a 6 % larger NAR); a slow uplink gets level 3's smaller NARs, as it waits anyway.
    The level is in the NAR's key (`Encoding.tag`), so the key scheme holds whatever the choice.
    It starts fast: guessed wrong on a slow link, one NAR goes up ~6 % larger; guessed wrong the other
    way on a fast one, it takes nearly twice as long.
    """

    normal: int
    adaptive: bool = False
    fast: bool = True

    def current(self) -> int:
        return FAST_LEVEL if self.adaptive and self.fast and self.normal > FAST_LEVEL else self.normal

    def observe(self, starved: float, blocked: float) -> None:
        if self.adaptive and starved + blocked >= 0.05:  # long enough to tell
            self.fast = starved > blocked


RAW = Encoding("none", 0)
WORTH = 0.97
"""A NAR is stored compressed only when compression takes off more than 3 % (of the whole NAR when it is
small, of its first SAMPLE bytes when not). Less is not worth the CPU on both ends: random data,
compressed archives and images (`.tar.gz` sources, media) come out of zstd as large as they went in,
after zstd was the slowest stage of their upload (and of every later download)."""
SAMPLE = 1 << 20


def worth_compressing(raw: int, compressed: int) -> bool:
    return compressed < WORTH * raw


def sampled_encoding(info: PathInfo, enc: Encoding) -> Encoding:
    """`enc`, or RAW when the NAR's first SAMPLE bytes do not compress (blocking: run it in a thread).

    A function of the NAR's contents only, so every hookd makes the same choice for a NAR and the key
    scheme holds: the choice is part of the key (`.nar` or `-<tag>.nar.zst`). The NarHash of the
    sampled bytes is not checked here; the upload's stream checks the whole NAR before it ends.
    """
    if enc.compression == "none":
        return enc
    sample = bytearray()
    for chunk in nar.dump_borrowed(info.path):
        sample += chunk
        if len(sample) >= SAMPLE:
            break
    del sample[SAMPLE:]
    single = Encoding(enc.compression, enc.level)
    comp = _reused.by_encoding.pop(single, None) or single.compressor()
    compressed = len(comp.compress(sample)) + len(comp.flush())
    _reuse(single, comp)
    return enc if worth_compressing(len(sample), compressed) else RAW


_niced = threading.local()


def lower_thread_priority(nice: int) -> None:
    """Make this worker thread (and the compressor threads it starts) yield the CPU to builds and to
    the daemon's event loop. On Linux, niceness is per thread and inherited by threads it creates."""
    if nice and not getattr(_niced, "done", False):
        with contextlib.suppress(OSError):
            os.setpriority(
                os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice)
            )
        _niced.done = True


@dataclass(frozen=True)
class Encoded:
    """What is known of a NAR's compressed bytes once they have all been produced."""

    file_hash: bytes
    file_size: int


def encode(
    info: PathInfo,
    enc: Encoding,
    sink: Callable[[bytes], None],
    stopped: Callable[[], bool] = lambda: False,
    raw: Callable[[bytes], None] | None = None,
) -> Encoded:
    """Dump `info`'s path, check it against the store's NarHash and NarSize, compress it, and hand the
    compressed bytes to `sink` (blocking: run it in a thread). Raises NarMismatchError instead of
    returning (and, compressed, before the compressor's last bytes), so a consumer that commits only
    on a normal end commits nothing wrong; _Stopped as soon as `stopped()` says nobody wants the rest.
    `raw` sees the NAR's own bytes."""
    if enc.compression == "none":
        return _as_itself(info, sink, stopped)
    nar_hash, file_hash = hashlib.sha256(), hashlib.sha256()
    nar_size = file_size = 0
    comp = _reused.by_encoding.pop(enc, None) or enc.compressor()
    feed = FEED_THREADED if enc.threaded else 0
    batch = bytearray()

    def compress(data: bytes | bytearray | memoryview) -> None:
        nonlocal file_size
        if out := comp.compress(data):
            file_hash.update(out)
            file_size += len(out)
            sink(out)

    for chunk in nar.dump_borrowed(info.path):  # each chunk hashed and compressed before the next read
        if stopped():
            raise _Stopped
        nar_hash.update(chunk)
        nar_size += len(chunk)
        if nar_size > info.nar_size:  # grown on disk: said at once, not after reading all of it
            check(info, None, nar_size)
        if raw is not None:
            raw(bytes(chunk))
        if not feed:
            compress(chunk)
            continue
        batch += chunk
        if len(batch) >= feed:
            compress(batch)
            batch.clear()
    if batch:
        compress(batch)
    check(info, nar_hash.digest(), nar_size)
    out = comp.flush()
    file_hash.update(out)
    sink(out)
    _reuse(enc, comp)
    return Encoded(file_hash.digest(), file_size + len(out))


class _Reused(threading.local):
    """This thread's single-threaded zstd compressor, kept between NARs once it has ended a frame: making
    one allocates and clears several MiB (with large buffers unmapped when freed, as the daemon sets
    glibc, ~0.8 ms per NAR, more than compressing a small one). A compressor that did not end its frame
    (an error, a stop) is dropped. Reuse does not change the bytes (tests/test_narstream.py)."""

    def __init__(self) -> None:
        self.by_encoding: dict[Encoding, Compressor] = {}


_reused = _Reused()


def _reuse(enc: Encoding, comp: Compressor) -> None:
    if enc.compression == "zstd" and not enc.threaded:
        _reused.by_encoding[enc] = comp


def _as_itself(info: PathInfo, sink: Callable[[bytes], None], stopped: Callable[[], bool]) -> Encoded:
    """`encode` for RAW: the dump's own pieces, hashed once (FileHash is NarHash), copied nowhere."""
    nar_hash = hashlib.sha256()
    nar_size = 0
    for chunk in nar.dump(info.path):
        if stopped():
            raise _Stopped
        nar_hash.update(chunk)
        nar_size += len(chunk)
        if nar_size > info.nar_size:
            check(info, None, nar_size)
        sink(chunk)
    check(info, nar_hash.digest(), nar_size)
    return Encoded(info.nar_hash, nar_size)


def check(info: PathInfo, digest: bytes | None, size: int) -> None:
    """Raise NarMismatchError unless the dump matched the store's record; `digest` None: the dump was
    stopped at `size` bytes, past the recorded size."""
    if size != info.nar_size or digest != info.nar_hash:
        disk = (
            f"NarHash {nixbase32.format_hash(digest)}, NarSize {size}"
            if digest is not None
            else f"NarSize over {size}, stopped there"
        )
        raise NarMismatchError(
            f"{info.path}: the contents on disk do not match the Nix store's record "
            f"(store: NarHash {nixbase32.format_hash(info.nar_hash)}, NarSize {info.nar_size}; "
            f"disk: {disk}). The path was "
            f"modified or corrupted after it was built; nothing was uploaded. Check it with "
            f"`nix-store --verify-path {info.path}` and repair it with `nix-store --repair-path`."
        )


def encode_small(info: PathInfo, enc: Encoding, nice: int = 0) -> tuple[Encoding, bytes, Encoded]:
    """A small NAR in memory, compressed with `enc` if that is worth it (`worth_compressing`) and as
    itself (RAW) if not, with the encoding chosen (blocking: run it in a thread)."""
    lower_thread_priority(nice)
    raw: list[bytes] = []
    parts: list[bytes] = []
    encoded = encode(info, enc, parts.append, raw=raw.append)
    if enc.compression == "none" or worth_compressing(info.nar_size, encoded.file_size):
        return enc, b"".join(parts), encoded
    data = b"".join(raw)
    return RAW, data, Encoded(info.nar_hash, len(data))


_END = object()


class NarStream:
    """A path's compressed NAR as an async iterator of pieces, produced by a worker thread that runs at
    most `ahead` pieces ahead of the consumer (memory stays bounded whatever the NAR's size).

    The iteration raises NarMismatchError instead of ending when the path differs from the store's
    record. `encoded` is set once the iteration has ended normally. `close()` stops the worker early.
    """

    def __init__(self, info: PathInfo, enc: Encoding, nice: int = 0, ahead: int = 2) -> None:
        self.info, self.enc, self.nice = info, enc, nice
        self.encoded: Encoded | None = None
        self.starved = 0.0  # seconds the consumer waited for the next piece
        self.blocked = 0.0  # seconds the worker waited for the consumer to take one
        self._slots = threading.Semaphore(ahead)
        self._stopped = threading.Event()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._thread: threading.Thread | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._thread is not None:
            raise RuntimeError("a NarStream is read once")
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._produce, args=(loop,), name=f"nar {self.info.path}", daemon=True)
        self._thread.start()
        try:
            while True:
                waited = time.monotonic()
                item = await self._queue.get()
                self.starved += time.monotonic() - waited
                self._slots.release()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, bytes)
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stopped.set()
        self._slots.release()  # a worker waiting for room wakes up and sees the stop

    def _produce(self, loop: asyncio.AbstractEventLoop) -> None:
        lower_thread_priority(self.nice)
        pending = bytearray()

        def emit(data: bytes) -> None:
            if not pending and len(data) >= EMIT:
                self._put(loop, data)  # as it is: a NAR sent as itself comes in the dump's 1 MiB pieces
                return
            pending.extend(data)
            if len(pending) >= EMIT:
                self._put(loop, bytes(pending))
                pending.clear()

        try:
            encoded = encode(self.info, self.enc, emit, self._stopped.is_set)
            if pending:
                self._put(loop, bytes(pending))
            self.encoded = encoded
            self._put(loop, _END)
        except _Stopped:
            return
        except BaseException as e:  # handed to the consumer, which raises it
            with contextlib.suppress(_Stopped):
                self._put(loop, e)

    def _put(self, loop: asyncio.AbstractEventLoop, item: object) -> None:
        waited = time.monotonic()
        self._slots.acquire()
        self.blocked += time.monotonic() - waited
        if self._stopped.is_set():
            raise _Stopped
        try:
            loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody reads any more
            raise _Stopped from None


class _Stopped(Exception):
    """The consumer went away: the worker ends without producing the rest."""
