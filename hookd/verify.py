"""`hookd verify`: is the cache whole? Every narinfo parses and carries a valid signature, its NAR
exists with the right size (with `deep`, decompresses to the right hash), and its references exist.
Every listing parses and describes a NAR of the narinfo's NarSize (with `deep`, it is the listing of the
NAR itself); every realisation parses, carries a valid signature and names an output whose narinfo is there.
`repair` deletes what is broken, referrers first, so no narinfo is left pointing at a deleted one; a bad
listing or realisation goes alone (nothing refers to it).
"""

from __future__ import annotations

import asyncio
import bz2
import contextlib
import hashlib
import lzma
from collections import defaultdict
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyzstd

from . import listing, narinfo, realisation
from .backends import Backend, ObjectStat
from .catalog import Catalog, Progress, Record, is_narinfo, is_realisation, known_kind, no_progress, record_of
from .signing import PublicKey
from .sweep import Decision, SweepState

CONCURRENCY = 16


@dataclass
class Report:
    narinfos: int = 0
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # narinfo key -> what
    broken: dict[str, str] = field(default_factory=dict)  # key -> why (problems and their referrers)
    unknown: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    listings: int = 0
    realisations: int = 0
    bad: dict[str, str] = field(default_factory=dict)  # listing or realisation key -> what is wrong

    @property
    def whole(self) -> bool:
        return not self.broken and not self.bad

    def to_json(self) -> dict[str, Any]:
        return {"narinfos": self.narinfos, "broken": self.broken, "unknown": self.unknown,
                "repaired": self.repaired, "whole": self.whole, "listings": self.listings,
                "realisations": self.realisations, "bad": self.bad}  # fmt: skip


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
    objects = {obj.key: obj async for obj in backend.list()}
    keys = sorted(k for k in objects if is_narinfo(k))
    checker = _Checker(backend, objects, public_key, deep)
    await checker.check_all(keys, progress)
    await checker.check_references({k[:32] for k in keys})
    await checker.check_realisations(sorted(k for k in objects if is_realisation(k)), {k[:32] for k in keys})
    cat = Catalog.build((objects[k] for k in keys), checker.records)
    # broken: every narinfo with a problem, and every narinfo that refers to a broken one
    found = {row: "; ".join(checker.problems[key]) for row, key in enumerate(cat.keys) if key in checker.problems}
    broken = cat.spread_broken(found, lambda row: f"refers to the broken {cat.keys[row]}")
    report = Report(narinfos=len(keys), problems=checker.problems, bad=checker.bad)
    report.listings, report.realisations = checker.listings, checker.realisations
    report.broken = {cat.keys[row]: why for row, why in broken.items()}
    report.unknown = [k for k in objects if not known_kind(k)]
    if repair:
        report.repaired = await _repair(backend, cat, broken)
        for key in sorted(report.bad):
            await backend.delete(key)
            report.repaired.append(key)
    return report


class _Gone(Exception):
    """The narinfo being checked was deleted meanwhile: nothing to report about it."""


class _Checker:
    """The checks of each narinfo; what they found, by narinfo key (nothing about one deleted meanwhile)."""

    def __init__(
        self, backend: Backend, objects: dict[str, ObjectStat], public_key: PublicKey | None, deep: bool
    ) -> None:
        self.backend = backend
        self.objects = objects  # the listing
        self.public_key = public_key
        self.deep = deep
        self.parsed: dict[str, narinfo.NarInfo] = {}
        self.records: dict[str, Record] = {}  # what the catalog is built from: parsed or not, not deleted
        self.problems: dict[str, list[str]] = defaultdict(list)
        self.bad: dict[str, str] = {}  # listings and realisations
        self.listings = self.realisations = 0

    def _forget(self, key: str) -> None:
        self.parsed.pop(key, None)
        self.records.pop(key, None)
        self.problems.pop(key, None)

    async def check_all(self, keys: list[str], progress: Progress) -> None:
        gate = asyncio.Semaphore(CONCURRENCY)
        done = 0

        async def check(key: str) -> None:
            nonlocal done
            try:
                async with gate:
                    await self._check(key)
            except _Gone:
                self._forget(key)
            done += 1
            if done % 100 == 0:
                progress("verifying", done, len(keys))

        await asyncio.gather(*(check(k) for k in keys))
        progress("verifying", len(keys), len(keys))

    async def _check(self, key: str) -> None:
        data = await self.backend.get(key)
        if data is None:
            return  # deleted since the listing
        try:
            ni = narinfo.parse(data)
        except narinfo.NarInfoError as e:
            self.records[key] = {"error": str(e)}
            self.problems[key].append(f"cannot be parsed: {e}")
            return
        self.parsed[key], self.records[key] = ni, record_of(ni)
        if ni.hash_part + ".narinfo" != key:
            self.problems[key].append(f"holds {ni.store_path}, which belongs under another key")
        if self.public_key is not None and not any(self.public_key.verify(ni.fingerprint(), s) for s in ni.sigs):
            self.problems[key].append(f"no valid signature by {self.public_key.name}")
        builder = listing.ListingBuilder() if self.deep and listing.key(ni.hash_part) in self.objects else None
        if problems := await self._nar_problems(key, ni, builder):
            self.problems[key].extend(problems)
            builder = None
        await self._check_listing(ni, builder)

    async def _nar_problems(self, key: str, ni: narinfo.NarInfo, builder: listing.ListingBuilder | None) -> list[str]:
        nar = self.objects.get(ni.url) or await _still(self.backend, ni.url, key)
        if nar is None:
            return [f"its NAR {ni.url} is missing"]
        if ni.file_size is not None and nar.size != ni.file_size:
            return [f"its NAR {ni.url} has {nar.size} bytes, FileSize says {ni.file_size}"]
        return await _deep(self.backend, ni, builder) if self.deep else []

    async def _check_listing(self, ni: narinfo.NarInfo, builder: listing.ListingBuilder | None) -> None:
        """The path's listing, if the cache has one: it parses, its NarSize is the narinfo's, and (deep,
        `builder` fed with the NAR) it is the NAR's own."""
        key = listing.key(ni.hash_part)
        if key not in self.objects or (data := await self.backend.get(key)) is None:
            return
        self.listings += 1
        try:
            doc = listing.parse(data)
            if (size := listing.nar_size(doc)) != ni.nar_size:
                self.bad[key] = f"describes a NAR of {size} bytes, NarSize says {ni.nar_size}"
            elif builder is not None and builder.finish() != doc:
                self.bad[key] = "does not match its NAR"
        except listing.ListingError as e:
            self.bad[key] = f"cannot be used: {e}"

    async def check_realisations(self, keys: list[str], listed: set[str]) -> None:
        """Each realisation parses, is signed (when a key is given) and names an output that is there."""
        for key in keys:
            data = await self.backend.get(key)
            if data is None:
                continue  # deleted since the listing
            self.realisations += 1
            try:
                r = realisation.parse_cached(key, data)
            except realisation.RealisationError as e:
                self.bad[key] = f"cannot be parsed: {e}"
                continue
            if self.public_key is not None and not r.verify(self.public_key):
                self.bad[key] = f"no valid signature by {self.public_key.name}"
            elif (
                r.out_path[:32] not in listed
                and await self.backend.stat(f"{r.out_path[:32]}.narinfo") is None
                and await self.backend.stat(key) is not None  # not deleted meanwhile (by a GC, with its output)
            ):
                self.bad[key] = f"its output {r.out_path} is not in the cache"

    async def check_references(self, listed: set[str]) -> None:
        """References missing from the listing, looked for again: the cache is live."""
        for key, ni in list(self.parsed.items()):
            try:
                for ref in ni.references:
                    if ref[:32] not in listed and await _still(self.backend, ref[:32] + ".narinfo", key) is None:
                        self.problems[key].append(f"its reference {ref} is missing")
            except _Gone:
                self._forget(key)


async def _repair(backend: Backend, cat: Catalog, broken: Collection[int]) -> list[str]:
    """Delete the broken narinfos referrers first, as GC's sweep does: none left behind points at a deleted one."""
    state = SweepState(cat, broken)
    repaired: list[str] = []
    while not state.done:
        # nothing ready: a reference cycle (only self-references are legal): break it anywhere
        for row in state.ready() or [min(state.undecided)]:
            await backend.delete(cat.keys[row])
            repaired.append(cat.keys[row])
            state.decide(row, Decision.DELETED)
    return repaired


async def _still(backend: Backend, key: str, referrer: str) -> ObjectStat | None:
    """Whether an object missing from the listing is there after all (the cache is live: uploads and
    GC run meanwhile, and a listing is not one instant). Raises _Gone if `referrer` itself was deleted."""
    obj = await backend.stat(key)
    if obj is None and await backend.stat(referrer) is None:
        raise _Gone(referrer)
    return obj


async def _deep(backend: Backend, ni: narinfo.NarInfo, builder: listing.ListingBuilder | None = None) -> list[str]:
    problems = await backend.read(ni.url, lambda chunks: _check_nar(chunks, ni, builder))
    return [f"its NAR {ni.url} disappeared"] if problems is None else problems


async def _check_nar(
    chunks: AsyncIterator[bytes], ni: narinfo.NarInfo, builder: listing.ListingBuilder | None = None
) -> list[str]:
    """FileHash over the NAR as stored; NarSize and NarHash over it decompressed; chunk by chunk. The
    decompressed bytes also go to `builder`, if given (a listing of the NAR; a NAR it cannot read makes
    its `finish()` raise)."""
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
                    if builder is not None:
                        _feed(builder, piece)
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


def _feed(builder: listing.ListingBuilder, piece: bytes) -> None:
    """Feed a listing builder; a NAR it cannot read shows later, as `finish()` raising."""
    with contextlib.suppress(listing.ListingError):
        builder.feed(piece)
