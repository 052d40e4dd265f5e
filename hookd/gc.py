"""Garbage collection for throwaway caches: pins, a lease, mark and sweep.

Roots are the pins (stored in the cache, under `hookd-pins/`) and every narinfo modified within the
retention window (uploads and dedup hits reset a narinfo's age). The mark is the closure of the roots
through `References`. A narinfo whose NAR or references are missing is broken: it and its referrers
go. `plan` names the candidates (unmarked or broken narinfos older than the grace period) and forecasts
what follows from them; `sweep.sweep` deletes them under the upload/GC protocol of `safety.py`
(narinfos referrers first, a narinfo found young spares its closure, NARs decided last, every delete
within a bound of its check), so builders may keep uploading meanwhile.

`snapshot` reads the cache (a listing, and each narinfo once: the parsed narinfos are kept in a local
index and reused while their ETag, or size and mtime, is unchanged, so a repeat run over an unchanged
cache needs the listing only); `plan` is a pure function of a snapshot; `sweep` carries a plan out.
Narinfos are held as columns indexed by row, with references as row numbers: a GC over a hundred
thousand narinfos then costs a few passes over lists rather than a hundred thousand objects.
"""

from __future__ import annotations

import asyncio
import functools
import gc as cyclegc
import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter
from pathlib import Path
from typing import Any, ParamSpec, TypedDict, TypeVar

from . import narinfo
from .backends import Backend, ObjectStat
from .storepath import StorePathError, check_basename

log = logging.getLogger("hookd.gc")

PIN_PREFIX = "hookd-pins/"
LEASE_KEY = "hookd-gc-lease"
KEEP_ALWAYS = {"nix-cache-info", "hookd-cache-id", LEASE_KEY}
READ_CONCURRENCY = 32
INDEX_VERSION = 2

Progress = Callable[[str, int, int], None]
P = ParamSpec("P")
R = TypeVar("R")


def no_progress(stage: str, done: int, total: int) -> None:
    return None


def _pausing_gc(fn: Callable[P, R]) -> Callable[P, R]:
    """Run fn with the cycle collector paused.

    GC builds 10^5 small acyclic containers at once; CPython's collector would walk the whole heap
    several times meanwhile, which costs more than the work itself (Mercurial's `util.nogc` does the same).
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        enabled = cyclegc.isenabled()
        cyclegc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                cyclegc.enable()

    return wrapper


class GcError(RuntimeError):
    """GC cannot run (another one holds the lease, the cache cannot be listed, bad options)."""


class Record(TypedDict, total=False):
    """What GC needs of one narinfo, as read from the cache; `error` alone if it could not be parsed."""

    store_path: str
    url: str | None  # a malformed narinfo keeps the URL it seems to point at: that NAR is not deleted
    references: list[str]  # hash parts, self-reference excluded
    deriver: str | None
    file_size: int
    error: str


@dataclass(repr=False)  # asyncio reprs a finished task's result: keep that cheap for 10^5 rows
class Catalog:
    """The narinfos of a cache as columns, one row per narinfo object, in listing order."""

    keys: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # the narinfo objects' own size, mtime and ETag
    mtimes: list[float] = field(default_factory=list)
    etags: list[str | None] = field(default_factory=list)
    store_paths: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    file_sizes: list[int] = field(default_factory=list)
    derivers: list[str | None] = field(default_factory=list)
    refs: list[list[int]] = field(default_factory=list)  # rows referred to
    missing: dict[int, list[str]] = field(default_factory=dict)  # row -> references not in the cache
    errors: dict[int, str] = field(default_factory=dict)  # row -> why it is malformed (never deleted)

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"Catalog({len(self.keys)} narinfos)"

    @classmethod
    @_pausing_gc
    def build(cls, objs: Iterable[ObjectStat], records: Mapping[str, Record]) -> Catalog:
        """Rows for the listed narinfos that have a record (one deleted since the listing has none)."""
        cat = cls()
        listed = [(o, records[o.key]) for o in objs if o.key in records]
        row_of = {o.key[:32]: i for i, (o, _) in enumerate(listed)}
        for i, (o, rec) in enumerate(listed):
            cat.keys.append(o.key)
            cat.sizes.append(o.size)
            cat.mtimes.append(o.mtime)
            cat.etags.append(o.etag)
            cat.store_paths.append(rec.get("store_path", ""))
            cat.urls.append(rec.get("url") or "")
            cat.file_sizes.append(rec.get("file_size", 0))
            cat.derivers.append(rec.get("deriver"))
            refs = rec.get("references", [])
            cat.refs.append([row_of[r] for r in refs if r in row_of])
            if len(cat.refs[-1]) < len(refs):
                cat.missing[i] = [r for r in refs if r not in row_of]
            if "error" in rec:
                cat.errors[i] = rec["error"]
        return cat

    def record(self, row: int) -> Record:
        if row in self.errors:
            return {"error": self.errors[row], "url": self.urls[row] or None}
        return {
            "store_path": self.store_paths[row],
            "url": self.urls[row],
            "references": [self.keys[j][:32] for j in self.refs[row]] + self.missing.get(row, []),
            "deriver": self.derivers[row],
            "file_size": self.file_sizes[row],
        }

    def same_tag(self, row: int, obj: ObjectStat) -> bool:
        """Whether the object is unchanged since the row was read: by ETag, else by size and mtime."""
        if obj.etag:
            return self.etags[row] == obj.etag
        return self.sizes[row] == obj.size and self.mtimes[row] == obj.mtime

    def unchanged(self, listed: Catalog) -> bool:
        """Whether the listing holds exactly this catalog's rows, each with the same tag (whole columns at once)."""
        if listed.keys != self.keys or listed.etags != self.etags:
            return False
        return all(self.etags) or (listed.sizes == self.sizes and listed.mtimes == self.mtimes)

    @classmethod
    @_pausing_gc
    def listed(cls, objs: list[ObjectStat]) -> Catalog:
        """The listing's columns alone (key, size, mtime, ETag), to compare with a stored catalog."""
        if not objs:
            return cls()
        keys, sizes, mtimes, etags = map(list, zip(*objs, strict=True))  # ObjectStat is a tuple: transpose
        return cls(keys=keys, sizes=sizes, mtimes=mtimes, etags=etags)

    def with_listing(self, listed: Catalog) -> Catalog:
        """The same rows with the listing's mtimes (a touch on S3 changes the mtime, not the ETag)."""
        if listed.mtimes == self.mtimes:
            return self
        return Catalog(**{**self.__dict__, "mtimes": listed.mtimes, "sizes": listed.sizes})


@dataclass(repr=False)
class Snapshot:
    narinfos: Catalog
    nars: list[ObjectStat]  # listed under nar/
    others: list[ObjectStat]  # neither: listings, logs, pins, markers, unknown objects
    pins: dict[str, str] = field(default_factory=dict)  # name -> store path
    unknown: list[str] = field(default_factory=list)
    narinfo_reads: int = 0
    started: float = 0.0  # time.monotonic() when the listing began: the sweep's window counts from it

    def __repr__(self) -> str:
        return f"Snapshot({len(self.narinfos)} narinfos, {len(self.nars)} NARs, {len(self.others)} others)"

    @property
    def malformed(self) -> dict[str, str]:
        return {self.narinfos.keys[i]: why for i, why in self.narinfos.errors.items()}


# --- the narinfo index --------------------------------------------------------------------------


class NarinfoIndex:
    """The last snapshot's catalog, kept as one JSON file of columns: what makes repeat runs cheap.

    Without a file (no writable state directory) it lasts as long as the object. A lost or garbled
    file only costs a re-read of the narinfos, so it is replaced atomically but not synced."""

    COLUMNS = ("keys", "sizes", "mtimes", "etags", "store_paths", "urls", "file_sizes", "derivers", "refs")

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.last: Catalog | None = None

    @_pausing_gc
    def load(self) -> Catalog:
        if self.last is not None or self.path is None:
            return self.last or Catalog()
        try:
            data = json.loads(self.path.read_bytes())
            if data.get("version") != INDEX_VERSION:
                return Catalog()
            cat = Catalog(**{c: data[c] for c in self.COLUMNS})
            cat.missing = {int(k): v for k, v in data["missing"].items()}
            cat.errors = {int(k): v for k, v in data["errors"].items()}
            if len({len(getattr(cat, c)) for c in self.COLUMNS}) != 1:
                raise ValueError("columns of different lengths")
            if max(chain.from_iterable(cat.refs), default=0) >= len(cat):
                raise ValueError("a reference to a row that does not exist")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            if not isinstance(e, FileNotFoundError):
                log.warning(
                    "ignoring the GC index %s (%s: %s): every narinfo is read again", self.path, type(e).__name__, e
                )
            return Catalog()
        return cat

    def save(self, cat: Catalog) -> None:
        self.last = cat
        if self.path is None:
            return
        data = {c: getattr(cat, c) for c in self.COLUMNS}
        body = json.dumps({"version": INDEX_VERSION, **data, "missing": cat.missing, "errors": cat.errors})
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(body)
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            log.warning("cannot save the GC index %s: %s", self.path, e)


def index_path(state_dir: Path, url: str) -> Path:
    return state_dir / f"gc-index-{hashlib.sha256(url.encode()).hexdigest()[:16]}.json"


# --- reading the cache ----------------------------------------------------------------------------


def parse_record(key: str, data: bytes) -> Record:
    """The index's record of one narinfo: its fields, or why it could not be read."""
    try:
        ni = narinfo.parse(data)
    except narinfo.NarInfoError as e:
        # keep what can be salvaged: the NAR it points at is not deleted on its account
        url = re.search(rb"^URL: *(nar/\S+)", data, re.MULTILINE)
        return {"error": str(e), "url": url.group(1).decode(errors="replace") if url else None}
    if ni.hash_part + ".narinfo" != key:
        return {"error": f"StorePath {ni.store_path} does not belong under the key {key}"}
    return {
        "store_path": ni.store_path,
        "url": ni.url,
        "references": sorted({r[:32] for r in ni.references} - {ni.hash_part}),
        "deriver": ni.deriver,
        "file_size": ni.file_size or 0,
    }


@_pausing_gc
def split_listing(listed: list[ObjectStat]) -> tuple[list[ObjectStat], list[ObjectStat], list[ObjectStat]]:
    """The listing's narinfos, NARs and other objects."""
    narinfos: list[ObjectStat] = []
    nars: list[ObjectStat] = []
    others: list[ObjectStat] = []
    for obj in listed:
        key = obj.key
        if key.startswith("nar/"):
            nars.append(obj)
        elif key.endswith(".narinfo") and "/" not in key:
            narinfos.append(obj)
        else:
            others.append(obj)
    return narinfos, nars, others


async def snapshot(backend: Backend, index: NarinfoIndex, progress: Progress = no_progress) -> Snapshot:
    started = time.monotonic()
    listed: list[ObjectStat] = []
    try:
        async for obj in backend.list():
            listed.append(obj)
            if len(listed) % 1000 == 0:
                progress("listing", len(listed), 0)
    except Exception as e:
        raise GcError(f"cannot list {backend.url}: {e}") from None
    progress("listing", len(listed), len(listed))

    narinfo_objs, nars, others = split_listing(listed)
    old = index.load()
    current = Catalog.listed(narinfo_objs)
    reads = 0
    if old.unchanged(current):
        catalog = old.with_listing(current)
    else:
        catalog, reads = await _refresh(backend, old, narinfo_objs, progress)
        index.save(catalog)

    pins: dict[str, str] = {}
    unknown: list[str] = []
    for obj in others:
        key = obj.key
        if key.startswith(PIN_PREFIX):
            data = await backend.get(key)
            path = data.decode(errors="replace").strip() if data else ""
            if path:
                pins[key[len(PIN_PREFIX) :]] = path
        elif not known_kind(key):
            unknown.append(key)
    return Snapshot(catalog, nars, others, pins, unknown, reads, started)


async def _refresh(backend: Backend, old: Catalog, objs: list[ObjectStat], progress: Progress) -> tuple[Catalog, int]:
    """A catalog of the listed narinfos: the old one's records where the tag is unchanged, the rest read."""
    old_rows = {key: i for i, key in enumerate(old.keys)}
    records: dict[str, Record] = {}
    to_read: list[ObjectStat] = []
    for o in objs:
        i = old_rows.get(o.key)
        if i is not None and old.same_tag(i, o):
            records[o.key] = old.record(i)
        else:
            to_read.append(o)
    gate = asyncio.Semaphore(READ_CONCURRENCY)
    done = 0

    async def read(obj: ObjectStat) -> None:
        nonlocal done
        async with gate:
            data = await backend.get(obj.key)
        done += 1
        if done % 200 == 0:
            progress("reading narinfos", done, len(to_read))
        if data is not None:  # else deleted since the listing
            records[obj.key] = parse_record(obj.key, data)

    await asyncio.gather(*(read(o) for o in to_read))
    progress("reading narinfos", len(to_read), len(to_read))
    return Catalog.build(objs, records), len(to_read)


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


@dataclass(repr=False)
class GcPlan:
    now: float
    grace: float
    candidates: list[int] = field(default_factory=list)  # catalog rows to sweep: unmarked or broken, old
    delete_narinfos: list[str] = field(default_factory=list)  # their keys, unmarked then broken
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

    def tally(self, category: str, count: int, nbytes: int) -> None:
        if count:
            cat = self.stats[category]
            cat.count += count
            cat.bytes += nbytes

    def to_json(self) -> dict[str, Any]:
        return {
            "stats": {k: {"count": v.count, "bytes": v.bytes} for k, v in sorted(self.stats.items())},
            "broken": self.broken,
            "dropped_roots": self.dropped_roots,
            "malformed": self.malformed,
            "unknown": self.unknown,
        }


def _broken(cat: Catalog, nar_keys: set[str], urls: set[str]) -> dict[int, str]:
    """Rows whose NAR or a reference is missing, then every row that refers to one of them.

    A reference to a malformed narinfo is not missing: nothing is deleted on a malformed object's account."""
    broken: dict[int, str] = {}
    if missing_nars := urls - nar_keys:
        for i, url in enumerate(cat.urls):
            if url in missing_nars and i not in cat.errors:
                broken[i] = f"its NAR {url} is missing"
    for i, refs in cat.missing.items():
        if i not in broken and i not in cat.errors:
            broken[i] = f"its reference {refs[0]} is missing"
    if not broken:
        return broken
    referrers: dict[int, list[int]] = defaultdict(list)
    for i, rows in enumerate(cat.refs):
        for r in rows:
            referrers[r].append(i)
    todo = list(broken)
    while todo:
        i = todo.pop()
        for j in referrers.get(i, ()):
            if j not in broken:
                broken[j] = f"it refers to the broken path {cat.store_paths[i]}"
                todo.append(j)
    return broken


def _mark(cat: Catalog, roots: Iterable[int]) -> set[int]:
    """The closure of the roots, a level at a time: each level is a few set operations over row numbers."""
    frontier = set(roots)
    marked = set(frontier)
    while frontier:
        frontier = set(chain.from_iterable(map(cat.refs.__getitem__, frontier))) - marked
        marked |= frontier
    return marked


def _kept_size(cat: Catalog, marked: set[int]) -> int:
    """The bytes the marked narinfos and their NARs take (several narinfos may share one NAR)."""
    nars = dict(zip(map(cat.urls.__getitem__, marked), map(cat.file_sizes.__getitem__, marked), strict=True))
    return sum(nars.values()) + sum(map(cat.sizes.__getitem__, marked))


@_pausing_gc
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
    cat = snap.narinfos
    out = GcPlan(now=now, grace=grace, malformed=snap.malformed, unknown=list(snap.unknown))
    young = now - grace
    cutoff = now - older_than
    rows, sizes, mtimes = range(len(cat)), cat.sizes, cat.mtimes

    nar_keys = set(map(attrgetter("key"), snap.nars))
    urls = set(cat.urls)  # a malformed narinfo's URL included: that NAR is kept
    broken = _broken(cat, nar_keys, urls)
    out.broken = {cat.keys[i]: why for i, why in broken.items()}

    # roots: pins, then narinfos within the retention window (a young broken one may just be racing
    # an upload: keep what it refers to)
    pinned: list[int] = []
    if pin_paths := [*snap.pins.values(), *keep_paths]:
        row_of = {k[:32]: i for i, k in enumerate(cat.keys)}
        pinned = [row_of[h] for p in pin_paths if (h := p.rsplit("/", 1)[-1][:32]) in row_of]
        pinned = [i for i in pinned if i not in broken]
    window = [i for i, t in enumerate(mtimes) if t >= cutoff]
    if broken:
        window = [i for i in window if i not in broken or mtimes[i] >= young]

    marked = _mark(cat, [*pinned, *window])
    if max_size is not None and _kept_size(cat, marked) > max_size:
        window.sort(key=mtimes.__getitem__)  # oldest first
        lo, hi = 0, len(window)  # smallest k such that dropping the k oldest roots fits
        while lo < hi:
            mid = (lo + hi) // 2
            if _kept_size(cat, _mark(cat, [*pinned, *window[mid:]])) <= max_size:
                hi = mid
            else:
                lo = mid + 1
        out.dropped_roots = lo
        marked = _mark(cat, [*pinned, *window[lo:]])

    # narinfos: kept (marked and whole), spared (young) or deleted; malformed ones are left alone
    kept = marked - broken.keys() - cat.errors.keys()
    out.tally("narinfos kept", len(kept), sum(map(sizes.__getitem__, kept)))
    rest = set(rows) - kept - cat.errors.keys()
    spared = [i for i in rest if mtimes[i] >= young]
    out.tally("narinfos spared (younger than grace)", len(spared), sum(map(sizes.__getitem__, spared)))
    deleted = sorted(rest.difference(spared))
    out.candidates = deleted
    out.delete_narinfos = sorted((cat.keys[i] for i in deleted), key=lambda k: (k in out.broken, k))
    for name, part in (("narinfos deleted", False), ("narinfos broken, deleted", True)):
        chosen = [sizes[i] for i in deleted if (i in broken) == part]
        out.tally(name, len(chosen), sum(chosen))

    # NARs no remaining narinfo points to (several narinfos may share one)
    remaining = set(rows).difference(deleted) if deleted else set(rows)
    if deleted:
        urls = set(map(cat.urls.__getitem__, remaining))
    unreferenced = [o for o in snap.nars if o.key not in urls] if nar_keys - urls else []
    nar_bytes = sum(map(attrgetter("size"), snap.nars))
    out.tally("NARs kept", len(snap.nars) - len(unreferenced), nar_bytes - sum(o.size for o in unreferenced))
    spared_nars = [o.size for o in unreferenced if o.mtime >= young]
    out.tally("NARs spared (younger than grace)", len(spared_nars), sum(spared_nars))
    out.delete_nars = [o.key for o in unreferenced if o.mtime < young]
    out.tally("NARs deleted", len(out.delete_nars), sum(o.size for o in unreferenced if o.mtime < young))

    # the listings and logs of deleted paths (a listing whose narinfo is gone is a leftover too)
    old = [o for o in snap.others if o.mtime < young]
    if listings := [o for o in old if o.key.endswith(".ls") and "/" not in o.key and len(o.key) == 35]:
        present = {cat.keys[i][:32] for i in remaining}
        for obj in listings:
            if obj.key[:32] not in present:
                out.delete_other.append(obj.key)
                out.tally("listings deleted", 1, obj.size)
    if (logs := [o for o in old if o.key.startswith("log/")]) and deleted:
        derivers = {cat.derivers[i] for i in deleted} - {cat.derivers[i] for i in remaining} - {None}
        for obj in logs:
            if obj.key[4:] in derivers:
                out.delete_other.append(obj.key)
                out.tally("logs deleted", 1, obj.size)
    return out


# --- the lease and the sweep ----------------------------------------------------------------------


class Lease:
    """One GC at a time per cache: an object naming its holder and an expiry.

    Used as `async with Lease(...)`: it is taken on entry, renewed every third of its duration while
    the body runs (a GC may outlast it), and released on any exit. Should another GC take it meanwhile
    (this one stalled past the expiry), the body is cancelled and GcError raised: two sweeps never
    knowingly overlap."""

    def __init__(self, backend: Backend, duration: float, max_skew: float | None = None) -> None:
        self.backend = backend
        self.duration = duration
        self.max_skew = max_skew  # refuse to run when the bucket's clock is further from ours
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lost = False
        self._keeper: asyncio.Task[None] | None = None

    async def _holder(self) -> tuple[str, float] | None:
        """The stored lease's owner and expiry, or None when there is none (a garbled lease is no lease)."""
        data = await self.backend.get(LEASE_KEY)
        try:
            held = json.loads(data) if data else None
            return (str(held["owner"]), float(held["expires"])) if isinstance(held, dict) else None
        except (ValueError, KeyError, TypeError):
            return None

    async def _ours(self) -> bool:
        held = await self._holder()
        return held is not None and held[0] == self.owner

    async def _write(self) -> tuple[float, float]:
        """Write the lease; the wall-clock interval within which the bucket stamped it."""
        before = time.time()
        body = json.dumps({"owner": self.owner, "expires": before + self.duration}).encode()
        await self.backend.put(LEASE_KEY, body, "application/json")
        return before, time.time()

    async def _check_skew(self, before: float, after: float) -> None:
        """GC compares the bucket's times with its own clock: refuse to run if they differ too much.

        The lease was stamped by the bucket between `before` and `after` (our clock); stamps may be
        truncated to whole seconds (S3, HTTP dates), hence the one-second allowance."""
        if self.max_skew is None:
            return
        obj = await self.backend.stat(LEASE_KEY)
        if obj is None:
            return  # taken over at once: acquire() reports it
        skew = max(before - 1.0 - obj.mtime, obj.mtime - after, 0.0)
        if skew > self.max_skew:
            await self.backend.delete(LEASE_KEY)
            raise GcError(
                f"the clock of {self.backend.url} differs from this host's by about {skew:.0f}s, more than "
                f"max_clock_skew ({self.max_skew:g}s): GC judges ages by that clock. Fix the time "
                f"(NTP) on this host or the server"
            )

    async def acquire(self) -> None:
        held = await self._holder()
        if held is not None and held[1] > time.time():
            until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held[1]))
            raise GcError(f"another GC holds {self.backend.url} (lease of {held[0]}, until {until}); try again later")
        before, after = await self._write()
        await asyncio.sleep(0.2)  # let a racing writer land, then see who won
        await self._check_skew(before, after)
        if not await self._ours():
            raise GcError(f"another GC took the lease of {self.backend.url} at the same moment; try again later")

    async def renew(self) -> bool:
        """Push the expiry out; False if the lease is no longer ours."""
        if not await self._ours():
            return False
        await self._write()
        return True

    async def release(self) -> None:
        if await self._ours():
            await self.backend.delete(LEASE_KEY)

    async def _keep(self, body: asyncio.Task[Any]) -> None:
        while True:
            await asyncio.sleep(self.duration / 3)
            try:
                if await self.renew():
                    continue
            except Exception as e:  # a backend hiccup: the lease still holds for two thirds of its time
                log.warning("cannot renew the GC lease of %s: %s", self.backend.url, e)
                continue
            self.lost = True
            body.cancel()
            return

    async def __aenter__(self) -> Lease:
        await self.acquire()
        body = asyncio.current_task()
        assert body is not None
        self._keeper = asyncio.create_task(self._keep(body))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        if self.lost:
            if (body := asyncio.current_task()) is not None:
                body.uncancel()  # the cancellation was ours, and it is answered by the GcError below
            raise GcError(
                f"another GC took the lease of {self.backend.url} while this one ran (it outlasted its lease of "
                f"{self.duration:.0f}s without renewing it); stopped. Re-run GC once the other one is done"
            ) from None
        try:
            await self.release()
        except Exception as e:  # it expires by itself
            log.warning("cannot release the GC lease of %s: %s", self.backend.url, e)


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
