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
from dataclasses import dataclass, field

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


def _decompress(data: bytes, method: str) -> bytes:
    if method == "zstd":
        return bytes(pyzstd.decompress(data))
    if method == "xz":
        return lzma.decompress(data)
    if method == "bzip2":
        return bz2.decompress(data)
    if method == "none":
        return data
    raise ValueError(f"unsupported compression {method!r}")


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
            nar = objects.get(ni.url)
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
    for key, ni in parsed.items():
        for ref in ni.references:
            if ref[:32] not in present:
                report.problems[key].append(f"its reference {ref} is missing")
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


async def _deep(backend: Backend, ni: narinfo.NarInfo) -> list[str]:
    data = await backend.get(ni.url)
    if data is None:
        return [f"its NAR {ni.url} disappeared"]
    if ni.file_hash is not None and hashlib.sha256(data).digest() != ni.file_hash:
        return [f"its NAR {ni.url} does not match FileHash"]
    try:
        raw = await asyncio.to_thread(_decompress, data, ni.compression)
    except Exception as e:
        return [f"its NAR {ni.url} does not decompress as {ni.compression}: {type(e).__name__}"]
    problems = []
    if len(raw) != ni.nar_size:
        problems.append(f"its NAR decompresses to {len(raw)} bytes, NarSize says {ni.nar_size}")
    elif hashlib.sha256(raw).digest() != ni.nar_hash:
        problems.append("its NAR's contents do not match NarHash")
    return problems
