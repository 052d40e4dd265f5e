"""The per-path pipeline: dump the NAR from the store, check it against the store's NarHash, compress,
put the NAR, sign, and put the narinfo last.

Nothing reaches the cache before the whole NAR has been hashed and checked: the compressed NAR is staged
in memory (small paths) or in a local file (large ones) first, which also gives its FileHash, and so its
key, before the first byte is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import lzma
import os
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import pyzstd

from . import nar, narinfo, nixbase32, storepath
from .backends import Backend, BackendError, Blob
from .backends.file import TMP_PREFIX
from .freshness import Freshness
from .publish import Extras
from .signing import SecretKey
from .store import PathInfo

NAR_CONTENT_TYPE = "application/x-nix-nar"
MEMORY_LIMIT = 8 << 20
SYNC_EVERY = 16 << 20


class NarMismatchError(Exception):
    """The path on disk does not match the store's NarHash/NarSize: never upload it."""


class _Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


def compressor(kind: str, level: int) -> _Compressor:
    if kind == "zstd":
        return pyzstd.ZstdCompressor(level)
    if kind == "xz":
        return lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=level)
    if kind == "none":
        return _Identity()
    raise ValueError(f"unknown compression {kind!r}")


@dataclass(frozen=True)
class StagedNar:
    nar_hash: bytes
    nar_size: int
    file_hash: bytes
    blob: Blob

    def discard(self) -> None:
        if self.blob.path is not None:
            self.blob.path.unlink(missing_ok=True)


class _Spill:
    """Collects output in memory, moving to a temp file once it passes `limit` bytes."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.directory, self.limit = directory, limit
        self.buf: BinaryIO = io.BytesIO()
        self.path: Path | None = None
        self.size = 0
        self.synced = 0
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.hash.update(data)
        self.size += len(data)
        if self.path is None and self.size > self.limit:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=TMP_PREFIX + "nar-", dir=self.directory)
            f = os.fdopen(fd, "w+b")
            f.write(self.buf.getvalue())  # type: ignore[attr-defined]
            self.buf, self.path = f, Path(name)
        self.buf.write(data)
        if self.path is not None and self.size - self.synced >= SYNC_EVERY:
            # Keep dirty pages few: one huge fsync at the end would stall every other fsync on the
            # file system (the queue's commits, which the hook waits for) behind it.
            self.buf.flush()
            os.fdatasync(self.buf.fileno())
            self.synced = self.size

    def finish(self) -> Blob:
        if self.path is None:
            return Blob(self.size, data=self.buf.getvalue())  # type: ignore[attr-defined]
        self.buf.close()
        return Blob(self.size, path=self.path)

    def abort(self) -> None:
        self.buf.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


_niced = threading.local()


def _lower_thread_priority(nice: int) -> None:
    """Make this worker thread yield the CPU to builds and to the daemon's event loop.

    On Linux, niceness is per thread: the event loop that answers the hook keeps its priority.
    """
    if nice and not getattr(_niced, "done", False):
        with contextlib.suppress(OSError):
            os.setpriority(
                os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice)
            )
        _niced.done = True


def stage_nar(
    info: PathInfo,
    compression: str,
    level: int,
    staging_dir: Path,
    memory_limit: int = MEMORY_LIMIT,
    nice: int = 0,
) -> StagedNar:
    """Dump, hash, check and compress one store path (blocking: run it in a thread)."""
    _lower_thread_priority(nice)
    nar_hash = hashlib.sha256()
    nar_size = 0
    comp = compressor(compression, level)
    out = _Spill(staging_dir, memory_limit)
    try:
        for chunk in nar.dump(info.path):
            nar_hash.update(chunk)
            nar_size += len(chunk)
            out.write(comp.compress(chunk))
        out.write(comp.flush())
        digest = nar_hash.digest()
        if nar_size != info.nar_size or digest != info.nar_hash:
            raise NarMismatchError(
                f"{info.path}: the contents on disk do not match the Nix store's record "
                f"(store: NarHash {nixbase32.format_hash(info.nar_hash)}, NarSize {info.nar_size}; "
                f"disk: NarHash {nixbase32.format_hash(digest)}, NarSize {nar_size}). The path was "
                f"modified or corrupted after it was built; nothing was uploaded. Check it with "
                f"`nix-store --verify-path {info.path}` and repair it with `nix-store --repair-path`."
            )
        blob = out.finish()
    except BaseException:
        out.abort()
        raise
    return StagedNar(digest, nar_size, out.hash.digest(), blob)


def make_narinfo(info: PathInfo, staged: StagedNar, compression: str, key: SecretKey) -> narinfo.NarInfo:
    ni = narinfo.NarInfo(
        store_path=info.path,
        url=narinfo.nar_key(staged.file_hash, compression),
        compression=compression,
        file_hash=staged.file_hash,
        file_size=staged.blob.size,
        nar_hash=info.nar_hash,
        nar_size=info.nar_size,
        references=[storepath.basename(r) for r in info.references],
        deriver=storepath.basename(info.deriver) if info.deriver else None,
        ca=info.ca,
    )
    ni.sigs = [key.sign(ni.fingerprint())]
    return ni


@dataclass(frozen=True)
class Uploaded:
    path: str
    nar_size: int
    file_size: int
    written: float  # when the narinfo's PUT began (wall clock)


class ReferenceGone(Exception):
    """References this path relies on were deleted (by a GC): they must be uploaded again first."""

    def __init__(self, path: str, gone: list[str]) -> None:
        super().__init__(f"{len(gone)} references of {path} are gone from the cache ({gone[0]}…); uploading them first")
        self.gone = gone


async def upload_path(
    info: PathInfo,
    backend: Backend,
    key: SecretKey,
    compression: str,
    level: int,
    staging_dir: Path,
    freshness: Freshness,
    nice: int = 0,
    elsewhere: Iterable[str] = (),
    extras: Extras | None = None,
) -> Uploaded:
    """Upload one path whose references are in the cache, under the upload/GC protocol (safety.py).

    The NAR goes first; then every object the narinfo will rely on and this daemon did not write or
    verify recently (the references' narinfos, a NAR that was already there) is touched and, after
    the settle time, checked; the narinfo goes last. Raises on failure (nothing published) and
    ReferenceGone when a reference has to be uploaded again first. References in `elsewhere` (left to
    an upstream cache) are not this cache's to touch. `extras` writes the path's listing (before any wait
    of the protocol, which bounds the time from the check to the narinfo's PUT) and encodes the narinfo.
    """
    ni_key = narinfo.narinfo_key(info.path)
    staging = backend.staging_dir() or staging_dir
    staged = await asyncio.to_thread(stage_nar, info, compression, level, staging, MEMORY_LIMIT, nice)
    try:
        ni = make_narinfo(info, staged, compression, key)
        body, enc = await extras.before_narinfo(info, ni) if extras else (ni.render().encode(), None)
        skip = set(elsewhere)
        refs = {narinfo.narinfo_key(r): r for r in info.references if r != info.path and r not in skip}
        relied = {ni.url: NAR_CONTENT_TYPE, **dict.fromkeys(refs, narinfo.CONTENT_TYPE)}
        for _ in range(3):
            started = time.monotonic()
            if await backend.put_stream(ni.url, staged.blob, NAR_CONTENT_TYPE):
                freshness.wrote(ni.url, started)
            # else an identical NAR is there already: touched and verified below (unless this daemon
            # wrote or verified it recently), like a reference
            missing = await freshness.ensure(relied, relied)
            if gone := sorted(refs[k] for k in missing if k in refs):
                raise ReferenceGone(info.path, gone)
            if not missing and freshness.publishable(relied):
                break
        else:
            raise BackendError(
                f"{info.path}: what it relies on could not be kept fresh (its NAR vanished, or requests take "
                f"longer than gc_request_timeout); trying again later"
            )
        published, written = time.monotonic(), time.time()
        async with asyncio.timeout(freshness.bounds.request_timeout):
            await backend.put(ni_key, body, narinfo.CONTENT_TYPE, content_encoding=enc)
        freshness.wrote(ni_key, published)
    finally:
        staged.discard()
    return Uploaded(info.path, staged.nar_size, staged.blob.size, written)
