"""Garbage collection for throwaway caches: pins, a lease, mark and sweep.

Roots are the pins (stored in the cache, under `hookd-pins/`) and every narinfo modified within the
retention window (uploads and dedup hits reset a narinfo's age). The mark is the closure of the roots
through `References`. The sweep deletes, in this order: unmarked and broken narinfos, then NARs no
remaining narinfo points to, then the listings and build logs of deleted paths. A narinfo whose NAR or
references are missing is broken: it and its referrers go. Nothing younger than the grace period is
deleted, and each object's age is checked again right before it is deleted, so uploads running at the
same time are safe (uploaders touch what they reuse; see DESIGN.md).

`snapshot` reads the cache (listing, and each narinfo once: parsed narinfos are kept in a local index
by key and ETag or size and mtime, so a repeat run over an unchanged cache needs listings only);
`plan` is a pure function of a snapshot; `sweep` carries a plan out.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import socket
import sqlite3
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from . import narinfo
from .backends import Backend, ObjectStat
from .storepath import StorePathError, check_basename

log = logging.getLogger("hookd.gc")

PIN_PREFIX = "hookd-pins/"
LEASE_KEY = "hookd-gc-lease"
KEEP_ALWAYS = {"nix-cache-info", "hookd-cache-id", LEASE_KEY}
READ_CONCURRENCY = 32

Progress = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    return None


class GcError(RuntimeError):
    """GC cannot run (another one holds the lease, the cache cannot be listed, bad options)."""


class Entry(NamedTuple):
    """What GC needs of one narinfo (a tuple: GC builds a hundred thousand of them)."""

    key: str
    store_path: str
    url: str
    references: tuple[str, ...]  # hash parts, self-reference excluded
    deriver: str | None
    file_size: int
    mtime: float
    size: int

    @property
    def hash_part(self) -> str:
        return self.key[:32]


@dataclass(repr=False)  # asyncio reprs a finished task's result: keep that cheap for 10^5 objects
class Snapshot:
    objects: dict[str, ObjectStat]
    narinfos: dict[str, Entry]  # by hash part
    malformed: dict[str, str]  # key -> why
    malformed_urls: set[str]  # NARs that malformed narinfos seem to point at
    pins: dict[str, str]  # name -> store path
    unknown: list[str]
    narinfo_reads: int = 0

    def __repr__(self) -> str:
        return f"Snapshot({len(self.objects)} objects, {len(self.narinfos)} narinfos)"


# --- the narinfo index --------------------------------------------------------------------------


class NarinfoIndex:
    """Parsed narinfos by key and tag (ETag, or size and mtime): what makes repeat runs cheap."""

    def __init__(self, path: Path | None) -> None:
        self.db = sqlite3.connect(path or ":memory:")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS narinfo (key TEXT PRIMARY KEY, tag TEXT NOT NULL, data TEXT NOT NULL)"
        )

    @staticmethod
    def tag(obj: ObjectStat) -> str:
        return obj.etag or f"{obj.size}:{obj.mtime}"

    def lookup_all(self, objs: Iterable[ObjectStat]) -> dict[str, dict[str, Any]]:
        """The records of those objects whose tag is unchanged (one pass over the index)."""
        tags = {o.key: self.tag(o) for o in objs}
        rows = [(key, data) for key, tag, data in self.db.execute("SELECT key, tag, data FROM narinfo")
                if tags.get(key) == tag]  # fmt: skip
        # one JSON document for all of them: a single parse is several times faster than one per record
        values = json.loads("[" + ",".join(data for _, data in rows) + "]")
        return {key: value for (key, _), value in zip(rows, values, strict=True)}

    def store(self, items: Iterable[tuple[ObjectStat, dict[str, Any]]]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO narinfo (key, tag, data) VALUES (?, ?, ?)",
            [(o.key, self.tag(o), json.dumps(d)) for o, d in items],
        )
        self.db.commit()

    def close(self) -> None:
        self.db.close()


def index_path(state_dir: Path, url: str) -> Path:
    return state_dir / f"gc-index-{hashlib.sha256(url.encode()).hexdigest()[:16]}.sqlite"


# --- reading the cache ----------------------------------------------------------------------------


def _parse_entry(obj: ObjectStat, data: bytes) -> dict[str, Any]:
    """The index's record of one narinfo: its fields, or why it could not be read."""
    try:
        ni = narinfo.parse(data)
    except narinfo.NarInfoError as e:
        # keep what can be salvaged: the NAR it points at is not deleted on its account
        url = re.search(rb"^URL: *(nar/\S+)", data, re.MULTILINE)
        return {"error": str(e), "url": url.group(1).decode(errors="replace") if url else None}
    if ni.hash_part + ".narinfo" != obj.key:
        return {"error": f"StorePath {ni.store_path} does not belong under the key {obj.key}"}
    return {
        "store_path": ni.store_path,
        "url": ni.url,
        "references": sorted({r[:32] for r in ni.references} - {ni.hash_part}),
        "deriver": ni.deriver,
        "file_size": ni.file_size or 0,
    }


async def snapshot(backend: Backend, index: NarinfoIndex, progress: Progress = no_progress) -> Snapshot:
    objects: dict[str, ObjectStat] = {}
    try:
        async for obj in backend.list():
            objects[obj.key] = obj
            if len(objects) % 1000 == 0:
                progress("listing", len(objects), 0)
    except Exception as e:
        raise GcError(f"cannot list {backend.url}: {e}") from None
    progress("listing", len(objects), len(objects))

    narinfo_objs = [o for k, o in objects.items() if k.endswith(".narinfo") and "/" not in k]
    records = index.lookup_all(narinfo_objs)
    to_read = [o for o in narinfo_objs if o.key not in records]
    gate = asyncio.Semaphore(READ_CONCURRENCY)
    done = 0

    async def read(obj: ObjectStat) -> tuple[ObjectStat, dict[str, Any]] | None:
        nonlocal done
        async with gate:
            data = await backend.get(obj.key)
        done += 1
        if done % 200 == 0:
            progress("reading narinfos", done, len(to_read))
        if data is None:  # deleted since the listing
            return None
        return obj, _parse_entry(obj, data)

    fresh = [r for r in await asyncio.gather(*(read(o) for o in to_read)) if r]
    progress("reading narinfos", len(to_read), len(to_read))
    index.store(fresh)
    records.update({o.key: d for o, d in fresh})

    narinfos: dict[str, Entry] = {}
    malformed: dict[str, str] = {}
    malformed_urls: set[str] = set()
    for obj in narinfo_objs:
        rec = records.get(obj.key)
        if rec is None:
            continue
        if "error" in rec:
            malformed[obj.key] = str(rec["error"])
            if rec.get("url"):
                malformed_urls.add(str(rec["url"]))
            continue
        entry = Entry(
            key=obj.key,
            store_path=str(rec["store_path"]),
            url=str(rec["url"]),
            references=tuple(rec["references"]),
            deriver=rec["deriver"] if isinstance(rec["deriver"], str) else None,
            file_size=int(rec["file_size"]),
            mtime=obj.mtime,
            size=obj.size,
        )
        narinfos[entry.hash_part] = entry

    pins: dict[str, str] = {}
    unknown: list[str] = []
    for key in objects:
        if key.startswith(PIN_PREFIX):
            data = await backend.get(key)
            path = data.decode(errors="replace").strip() if data else ""
            if path:
                pins[key[len(PIN_PREFIX) :]] = path
        elif not known_kind(key):
            unknown.append(key)
    return Snapshot(objects, narinfos, malformed, malformed_urls, pins, unknown, len(to_read))


def known_kind(key: str) -> bool:
    return (
        key in KEEP_ALWAYS
        or (key.endswith(".narinfo") and "/" not in key)
        or (key.endswith(".ls") and "/" not in key)
        or key.startswith(("nar/", "log/", "realisations/", PIN_PREFIX))
    )


# --- planning -------------------------------------------------------------------------------------


@dataclass
class Category:
    count: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.count += 1
        self.bytes += size


@dataclass(repr=False)
class GcPlan:
    now: float
    grace: float
    delete_narinfos: list[str] = field(default_factory=list)  # unmarked and broken, in that order
    delete_nars: list[str] = field(default_factory=list)
    delete_other: list[str] = field(default_factory=list)  # listings and logs
    broken: dict[str, str] = field(default_factory=dict)  # narinfo key -> why
    dropped_roots: int = 0
    stats: dict[str, Category] = field(default_factory=lambda: defaultdict(Category))
    malformed: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"GcPlan({len(self.deletions)} deletions)"

    @property
    def deletions(self) -> list[str]:
        return self.delete_narinfos + self.delete_nars + self.delete_other

    def to_json(self) -> dict[str, Any]:
        return {
            "stats": {k: {"count": v.count, "bytes": v.bytes} for k, v in sorted(self.stats.items())},
            "broken": self.broken,
            "dropped_roots": self.dropped_roots,
            "malformed": self.malformed,
            "unknown": self.unknown,
        }


def plan(
    snap: Snapshot,
    *,
    now: float,
    older_than: float,
    grace: float,
    max_size: int | None = None,
    keep_paths: Iterable[str] = (),
) -> GcPlan:
    """What to delete: a pure function of the snapshot and the policy."""
    if grace > older_than:
        raise GcError("the grace period must not be longer than the retention (--older-than)")
    out = GcPlan(now=now, grace=grace, malformed=dict(snap.malformed), unknown=list(snap.unknown))
    infos = snap.narinfos
    young = now - grace

    # broken: NAR or a reference missing; then everything that refers to a broken path
    # (a reference whose narinfo is malformed is not missing: never delete on a malformed object's account)
    unreadable = {k[:32] for k in snap.malformed}
    broken: dict[str, str] = {}
    for h, e in infos.items():
        if e.url not in snap.objects:
            broken[h] = f"its NAR {e.url} is missing"
        else:
            missing = [r for r in e.references if r not in infos and r not in unreadable]
            if missing:
                broken[h] = f"its reference {missing[0]} is missing"
    referrers: dict[str, list[str]] = defaultdict(list)
    for h, e in infos.items():
        for r in e.references:
            referrers[r].append(h)
    todo = list(broken)
    while todo:
        h = todo.pop()
        for ref in referrers.get(h, ()):
            if ref not in broken:
                broken[ref] = f"it refers to the broken path {infos[h].store_path}"
                todo.append(ref)
    out.broken = {infos[h].key: why for h, why in broken.items()}

    # roots: pins, then narinfos within the retention window (a young broken one may just be racing
    # an upload: keep what it refers to)
    pinned = {p.rsplit("/", 1)[-1][:32] for p in [*snap.pins.values(), *keep_paths]}
    pinned = {h for h in pinned if h in infos and h not in broken}
    window = [h for h, e in infos.items() if e.mtime >= now - older_than and (h not in broken or e.mtime >= young)]
    window.sort(key=lambda h: infos[h].mtime)  # oldest first

    def mark(roots: Iterable[str]) -> set[str]:
        marked: set[str] = set()
        stack = [r for r in roots if r in infos]
        while stack:
            h = stack.pop()
            if h in marked:
                continue
            marked.add(h)
            stack.extend(r for r in infos[h].references if r in infos and r not in marked)
        return marked

    def size(marked: set[str]) -> int:
        nars = {infos[h].url: infos[h].file_size for h in marked}
        return sum(nars.values()) + sum(infos[h].size for h in marked)

    marked = mark([*pinned, *window])
    if max_size is not None and size(marked) > max_size:
        lo, hi = 0, len(window)  # smallest k such that dropping the k oldest roots fits
        while lo < hi:
            mid = (lo + hi) // 2
            if size(mark([*pinned, *window[mid:]])) <= max_size:
                hi = mid
            else:
                lo = mid + 1
        out.dropped_roots = lo
        marked = mark([*pinned, *window[lo:]])

    # sweep lists: narinfos (unmarked, then broken), NARs, then listings and logs
    deleted: set[str] = set()
    for h, e in infos.items():
        if h in marked and h not in broken:
            out.stats["narinfos kept"].add(e.size)
        elif e.mtime >= young:
            out.stats["narinfos spared (younger than grace)"].add(e.size)
        else:
            out.delete_narinfos.append(e.key)
            out.stats["narinfos broken, deleted" if h in broken else "narinfos deleted"].add(e.size)
            deleted.add(h)
    out.delete_narinfos.sort(key=lambda k: (k[:32] in broken, k))  # unmarked first, then broken
    remaining = {e.url for h, e in infos.items() if h not in deleted}
    kept_derivers = {e.deriver for h, e in infos.items() if h not in deleted and e.deriver}
    deleted_derivers = {infos[h].deriver for h in deleted if infos[h].deriver} - kept_derivers
    for key, obj in snap.objects.items():
        if not key.startswith("nar/"):
            if key.endswith(".ls") and "/" not in key:
                h = key[:-3]
                gone = h in deleted or h not in infos
                if gone and obj.mtime < young and len(h) == 32:
                    out.delete_other.append(key)
                    out.stats["listings deleted"].add(obj.size)
            elif key.startswith("log/") and key[4:] in deleted_derivers and obj.mtime < young:
                out.delete_other.append(key)
                out.stats["logs deleted"].add(obj.size)
            continue
        if key in remaining:
            out.stats["NARs kept"].add(obj.size)
        elif obj.mtime >= young:
            out.stats["NARs spared (younger than grace)"].add(obj.size)
        elif key in snap.malformed_urls:
            out.stats["NARs kept (a malformed narinfo points here)"].add(obj.size)
        else:
            out.delete_nars.append(key)
            out.stats["NARs deleted"].add(obj.size)
    return out


# --- the lease and the sweep ----------------------------------------------------------------------


class Lease:
    """One GC at a time per cache: an object naming its holder and an expiry."""

    def __init__(self, backend: Backend, duration: float) -> None:
        self.backend = backend
        self.duration = duration
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    async def acquire(self) -> None:
        data = await self.backend.get(LEASE_KEY)
        if data:
            try:
                held = json.loads(data)
                if float(held["expires"]) > time.time():
                    raise GcError(
                        f"another GC holds {self.backend.url} (lease of {held['owner']}, until "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(held['expires'])))}); "
                        "try again later"
                    )
            except (ValueError, KeyError, TypeError):
                pass  # a garbled lease is no lease
        body = json.dumps({"owner": self.owner, "expires": time.time() + self.duration}).encode()
        await self.backend.put(LEASE_KEY, body, "application/json")
        await asyncio.sleep(0.2)  # let a racing writer land, then see who won
        data = await self.backend.get(LEASE_KEY)
        if not data or json.loads(data).get("owner") != self.owner:
            raise GcError(f"another GC took the lease of {self.backend.url} at the same moment; try again later")

    async def release(self) -> None:
        data = await self.backend.get(LEASE_KEY)
        if data and json.loads(data).get("owner") == self.owner:
            await self.backend.delete(LEASE_KEY)


@dataclass
class SweepResult:
    deleted: int = 0
    bytes: int = 0
    spared: int = 0  # found younger than grace (refreshed or re-uploaded) just before deletion


async def sweep(backend: Backend, gc_plan: GcPlan, progress: Progress = no_progress) -> SweepResult:
    """Delete in the plan's order; each object's age is checked again just before it goes."""
    result = SweepResult()
    gate = asyncio.Semaphore(READ_CONCURRENCY)
    total = len(gc_plan.deletions)
    done = 0

    async def remove(key: str) -> None:
        nonlocal done
        async with gate:
            obj = await backend.stat(key)
            if obj is not None and obj.mtime >= time.time() - gc_plan.grace:
                result.spared += 1
            elif obj is not None:
                await backend.delete(key)
                result.deleted += 1
                result.bytes += obj.size
        done += 1
        if done % 100 == 0:
            progress("deleting", done, total)

    # phases run one after the other: no NAR goes while a narinfo pointing at it may remain
    for phase in (gc_plan.delete_narinfos, gc_plan.delete_nars, gc_plan.delete_other):
        await asyncio.gather(*(remove(k) for k in phase))
    progress("deleting", total, total)
    return result


# --- pins -----------------------------------------------------------------------------------------


def check_pin_name(name: str) -> str:
    if not name or len(name) > 200 or not all(c.isalnum() or c in "._-" for c in name) or name[0] == ".":
        raise ValueError(f"pin name {name!r}: use letters, digits, '.', '_' and '-'")
    return name


async def pin(backend: Backend, name: str, store_path: str, require_present: bool = True) -> None:
    check_pin_name(name)
    base = store_path.rsplit("/", 1)[-1]
    try:
        check_basename(base)
    except StorePathError as e:
        raise ValueError(str(e)) from None
    if require_present and not await backend.exists(narinfo.narinfo_key(store_path)):
        raise ValueError(f"{store_path} is not in {backend.url}; push it first (`hookd push --pin {name} PATH`)")
    await backend.put(PIN_PREFIX + name, (store_path + "\n").encode(), "text/plain; charset=utf-8")


async def unpin(backend: Backend, name: str) -> bool:
    check_pin_name(name)
    if not await backend.exists(PIN_PREFIX + name):
        return False
    await backend.delete(PIN_PREFIX + name)
    return True


async def list_pins(backend: Backend) -> dict[str, str]:
    pins = {}
    async for obj in backend.list(PIN_PREFIX):
        data = await backend.get(obj.key)
        if data:
            pins[obj.key[len(PIN_PREFIX) :]] = data.decode(errors="replace").strip()
    return pins
