"""`hookd verify`: is the cache whole? Every narinfo parses and carries a valid signature, its NAR
exists with the right size (with `deep`, decompresses to the right hash), and its references exist.
`repair` deletes what is broken, referrers first, so no narinfo is left pointing at a deleted one.
"""

from __future__ import annotations

import asyncio
import bz2
import hashlib
import lzma
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyzstd

from . import narinfo
from .backends import Backend, ObjectStat
from .gc import Progress, known_kind, no_progress
from .signing import PublicKey

CONCURRENCY = 16


@dataclass
class Report:
    narinfos: int = 0
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # narinfo key -> what
    broken: dict[str, str] = field(default_factory=dict)  # key -> why (problems and their referrers)
    unknown: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def whole(self) -> bool:
        return not self.broken


class Inflater:
    """Incremental decompression in bounded pieces: one stored chunk may inflate to gigabytes."""

    PIECE = 4 << 20

    def __init__(self, method: str) -> None:
        self.method = method
        self.d: Any
        if method == "zstd":
            self.d = pyzstd.EndlessZstdDecompressor()  # a NAR may hold several frames
        elif method == "xz":
            self.d = lzma.LZMADecompressor()
        elif method == "bzip2":
            self.d = bz2.BZ2Decompressor()
        elif method == "none":
            self.d = None
        else:
            raise ValueError(f"unsupported compression {method!r}")

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self.d is None:
            yield data
            return
        if getattr(self.d, "eof", False):
            return  # padding after the end of the stream: not NAR bytes
        yield self.d.decompress(data, self.PIECE)
        while not self.d.needs_input and not getattr(self.d, "eof", False):
            yield self.d.decompress(b"", self.PIECE)

    def complete(self) -> bool:
        """Whether the stream ended where the compressed data does (not truncated)."""
        if self.d is None:
            return True
        if self.method == "zstd":
            return bool(self.d.at_frame_edge)
        return bool(self.d.eof)


async def verify(
    backend: Backend,
    public_key: PublicKey | None = None,
    deep: bool = False,
    repair: bool = False,
    progress: Progress = no_progress,
) -> Report:
    report = Report()
    objects: dict[str, ObjectStat] = {}
    async for obj in backend.list():
        objects[obj.key] = obj
    keys = sorted(k for k in objects if k.endswith(".narinfo") and "/" not in k)
    report.narinfos = len(keys)
    parsed: dict[str, narinfo.NarInfo] = {}
    gate = asyncio.Semaphore(CONCURRENCY)
    done = 0

    async def check(key: str) -> None:
        try:
            await check_one(key)
        except _Gone:
            parsed.pop(key, None)
            report.problems.pop(key, None)

    async def check_one(key: str) -> None:
        nonlocal done
        async with gate:
            data = await backend.get(key)
            if data is None:
                return  # deleted since the listing
            try:
                ni = narinfo.parse(data)
            except narinfo.NarInfoError as e:
                report.problems[key].append(f"cannot be parsed: {e}")
                return
            parsed[key] = ni
            if ni.hash_part + ".narinfo" != key:
                report.problems[key].append(f"holds {ni.store_path}, which belongs under another key")
            if public_key is not None and not any(public_key.verify(ni.fingerprint(), s) for s in ni.sigs):
                report.problems[key].append(f"no valid signature by {public_key.name}")
            nar = objects.get(ni.url) or await _still(backend, ni.url, key)
            if nar is None:
                report.problems[key].append(f"its NAR {ni.url} is missing")
            elif ni.file_size is not None and nar.size != ni.file_size:
                report.problems[key].append(f"its NAR {ni.url} has {nar.size} bytes, FileSize says {ni.file_size}")
            elif deep:
                report.problems[key].extend(await _deep(backend, ni))
        done += 1
        if done % 100 == 0:
            progress("verifying", done, len(keys))

    await asyncio.gather(*(check(k) for k in keys))
    progress("verifying", len(keys), len(keys))
    present = {k[:32] for k in keys}
    for key, ni in list(parsed.items()):
        try:
            for ref in ni.references:
                if ref[:32] not in present and await _still(backend, ref[:32] + ".narinfo", key) is None:
                    report.problems[key].append(f"its reference {ref} is missing")
        except _Gone:
            parsed.pop(key, None)
            report.problems.pop(key, None)
    report.unknown = [k for k in objects if not known_kind(k)]

    # broken: every narinfo with a problem, and every narinfo that refers to a broken one
    referrers: dict[str, list[str]] = defaultdict(list)
    for key, ni in parsed.items():
        for ref in ni.references:
            if ref[:32] + ".narinfo" != key:
                referrers[ref[:32] + ".narinfo"].append(key)
    report.broken = {k: "; ".join(v) for k, v in report.problems.items() if v}
    todo = list(report.broken)
    while todo:
        key = todo.pop()
        for ref in referrers.get(key, ()):
            if ref not in report.broken:
                report.broken[ref] = f"refers to the broken {key}"
                todo.append(ref)
    if repair:
        # referrers before what they refer to: nothing left behind points at a deleted narinfo
        left = set(report.broken)
        while left:
            ready = sorted(k for k in left if not any(r in left for r in referrers.get(k, ())))
            if not ready:  # a reference cycle (only self-references are legal): break it anywhere
                ready = [min(left)]
            for key in ready:
                await backend.delete(key)
                report.repaired.append(key)
                left.discard(key)
    return report


class _Gone(Exception):
    """The narinfo being checked was deleted meanwhile: nothing to report about it."""


async def _still(backend: Backend, key: str, referrer: str) -> ObjectStat | None:
    """Whether an object missing from the listing is there after all (the cache is live: uploads and
    GC run meanwhile, and a listing is not one instant). Raises _Gone if `referrer` itself was deleted."""
    obj = await backend.stat(key)
    if obj is None and await backend.stat(referrer) is None:
        raise _Gone(referrer)
    return obj


async def _deep(backend: Backend, ni: narinfo.NarInfo) -> list[str]:
    problems = await backend.read(ni.url, lambda chunks: _check_nar(chunks, ni))
    return [f"its NAR {ni.url} disappeared"] if problems is None else problems


async def _check_nar(chunks: AsyncIterator[bytes], ni: narinfo.NarInfo) -> list[str]:
    """FileHash over the NAR as stored; NarSize and NarHash over it decompressed; chunk by chunk."""
    try:
        inflater = Inflater(ni.compression)
    except ValueError as e:
        return [f"its NAR {ni.url}: {e}"]
    file_hash, nar_hash = hashlib.sha256(), hashlib.sha256()
    nar_size = 0
    bad: str | None = None

    def take(chunk: bytes) -> None:
        nonlocal nar_size, bad
        file_hash.update(chunk)
        if bad is None:
            try:
                for piece in inflater.feed(chunk):
                    nar_hash.update(piece)
                    nar_size += len(piece)
            except Exception as e:  # a corrupt stream: keep reading for FileHash's sake
                bad = f"its NAR {ni.url} does not decompress as {ni.compression}: {type(e).__name__}"

    async for chunk in chunks:
        await asyncio.to_thread(take, chunk)  # hashing and inflating release the GIL: checks run in parallel
    if ni.file_hash is not None and file_hash.digest() != ni.file_hash:
        return [f"its NAR {ni.url} does not match FileHash"]
    if bad is None and not inflater.complete():
        bad = f"its NAR {ni.url} does not decompress as {ni.compression}: it is truncated"
    if bad is not None:
        return [bad]
    if nar_size != ni.nar_size:
        return [f"its NAR decompresses to {nar_size} bytes, NarSize says {ni.nar_size}"]
    if nar_hash.digest() != ni.nar_hash:
        return ["its NAR's contents do not match NarHash"]
    return []
