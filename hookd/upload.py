"""The per-path pipeline: the NAR streamed from the store to the cache (dumped, checked against the
store's NarHash, compressed, hashed, sent as it is produced: narstream.py), signed, and the narinfo
put last.

Nothing is staged: a NAR's key is known before its first byte (narstream.py says why that is safe), a
small NAR is encoded in memory and sent in one PUT, a large one is streamed and committed by the
backend only after its NarHash was checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass

from . import narinfo, narstream, storepath
from .backends import Backend, BackendError
from .freshness import Freshness
from .narstream import NarMismatchError, NarStream
from .pathinfo import PathInfo
from .publish import Extras
from .signing import SecretKey

NAR_CONTENT_TYPE = "application/x-nix-nar"

__all__ = ["NarMismatchError", "ReferenceGone", "Uploaded", "upload_path"]


def make_narinfo(
    info: PathInfo, url: str, compression: str, encoded: narstream.Encoded | None, file_size: int
) -> narinfo.NarInfo:
    """The narinfo for `info`, its NAR at `url`; FileHash only for bytes this uploader encoded itself."""
    return narinfo.NarInfo(
        store_path=info.path,
        url=url,
        compression=compression,
        file_hash=encoded.file_hash if encoded else None,
        file_size=file_size,
        nar_hash=info.nar_hash,
        nar_size=info.nar_size,
        references=[storepath.basename(r) for r in info.references],
        deriver=storepath.basename(info.deriver) if info.deriver else None,
        ca=info.ca,
    )


@dataclass(frozen=True)
class PutNar:
    key: str
    compression: str  # the setting's, or "none" for a NAR that does not compress (narstream.WORTH)
    created: bool  # by this call: it may be relied on without a touch (safety.py)
    encoded: narstream.Encoded | None  # None: a large NAR found there, not encoded here
    file_size: int


async def put_nar(
    info: PathInfo, backend: Backend, compression: str, levels: narstream.Levels, nice: int, freshness: Freshness
) -> PutNar:
    """Put the path's NAR unless the cache has it.

    A small NAR is sent without asking first (a conditional write where the backend has one: one
    request either way); a large one is asked for, then streamed. Either is stored as itself when
    compressing it is not worth it (narstream.WORTH). A NAR that another upload of this daemon has
    just written is not written again (Freshness.sole_writer): a write is recorded before the next
    writer of its key takes its turn, not when the upload that made it goes on to its narinfo.
    """
    enc = narstream.encoding(compression, levels.current(), info.nar_size)
    if info.nar_size <= narstream.SMALL_NAR:
        if info.nar_size <= narstream.INLINE_NAR:  # less work than the hop to a thread and back
            enc, data, encoded = narstream.encode_small(info, enc)
        else:
            enc, data, encoded = await asyncio.to_thread(narstream.encode_small, info, enc, nice)
        key = enc.key(info.nar_hash)
        async with freshness.sole_writer(key):
            began = time.monotonic()
            # fresh: written by this daemon, the same bytes (narstream.py), relied on like a reference
            created = not freshness.fresh(key) and await backend.put_new(key, data, NAR_CONTENT_TYPE)
            if created:
                freshness.wrote(key, began)
        return PutNar(key, enc.compression, created, encoded, encoded.file_size)
    enc = await asyncio.to_thread(narstream.sampled_encoding, info, enc)
    async with freshness.sole_writer(enc.key(info.nar_hash)):
        began = time.monotonic()
        put = await _put_large(info, backend, enc, nice, levels)
        if put.created:
            freshness.wrote(put.key, began)
        return put


async def _put_large(
    info: PathInfo, backend: Backend, enc: narstream.Encoding, nice: int, levels: narstream.Levels
) -> PutNar:
    """Ask, then stream. A NAR found there is relied on (touched unless this daemon wrote it lately)."""
    key = enc.key(info.nar_hash)
    there = await backend.stat(key)
    if there is not None:
        return PutNar(key, enc.compression, False, None, there.size)
    # absent when asked: a delete decided on an earlier object of this key has landed (safety.py)
    stream = NarStream(info, enc, nice)
    try:
        await backend.put_nar(key, stream, NAR_CONTENT_TYPE, info.nar_size)
    finally:
        stream.close()
    assert stream.encoded is not None  # a normal end of the stream sets it
    if enc.compression != "none":
        levels.observe(stream.starved, stream.blocked)
    return PutNar(key, enc.compression, True, stream.encoded, stream.encoded.file_size)


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
    levels: narstream.Levels,
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
    an upstream cache) are not this cache's to touch. `extras` writes the path's listing (beside the
    NAR, before the protocol's waits, which bound the time from the last check to the narinfo's PUT)
    and encodes the narinfo.
    """
    ni_key = narinfo.narinfo_key(info.path)
    # The narinfo's PUT counts as this daemon's write (its referrers rely on it without a touch) only if
    # the key was absent when asked, well within the grace period before the PUT: a PUT that replaced a
    # narinfo already there is only a touch, and a GC delete decided on that earlier one may still land
    # after it (safety.py, step 5). A narinfo another uploader creates after the question is young.
    # The planner's question usually answers it (Freshness.found_absent); else it is asked beside the
    # NAR's upload, like the listing.
    beside: dict[str, asyncio.Future[object]] = {}
    if (asked := freshness.absent_since(ni_key)) is None:
        asked = time.monotonic()
        beside["there"] = asyncio.ensure_future(backend.stat(ni_key))
    if extras:
        beside["listing"] = asyncio.ensure_future(extras.write_listing(info))
    try:
        nar = await put_nar(info, backend, compression, levels, nice, freshness)
        await asyncio.gather(*beside.values())
        there = beside["there"].result() if "there" in beside else None
    finally:
        for task in beside.values():
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
    url = nar.key
    # not created: an identical NAR was there already, touched and verified below (unless this daemon
    # wrote or verified it recently), like a reference
    ni = make_narinfo(info, url, nar.compression, nar.encoded, nar.file_size)
    ni.sigs = [key.sign(ni.fingerprint())]
    body, enc = extras.narinfo_body(ni) if extras else (ni.render().encode(), None)
    skip = set(elsewhere)
    refs = {narinfo.narinfo_key(r): r for r in info.references if r != info.path and r not in skip}
    relied = {url: NAR_CONTENT_TYPE, **dict.fromkeys(refs, narinfo.CONTENT_TYPE)}
    for _ in range(3):
        missing = await freshness.ensure(relied, relied)
        if gone := sorted(refs[k] for k in missing if k in refs):
            raise ReferenceGone(info.path, gone)
        if url in missing:
            raise BackendError(f"{info.path}: its NAR {url} was deleted (by a GC) before it could be published")
        if freshness.publishable(relied):
            break
    else:
        raise BackendError(
            f"{info.path}: what it relies on could not be kept fresh (requests take longer than "
            f"gc_request_timeout); trying again later"
        )
    published, written = time.monotonic(), time.time()
    async with asyncio.timeout(freshness.bounds.request_timeout):
        await backend.put(ni_key, body, narinfo.CONTENT_TYPE, content_encoding=enc)
    if there is None and published - asked < freshness.bounds.fresh_for:
        freshness.wrote(ni_key, published)
    return Uploaded(info.path, info.nar_size, nar.file_size, written)
