"""The cache as GC and `verify` see it: the layout of its keys, and its narinfos as columns.

A binary cache holds `<hash>.narinfo` at the top, the NARs under `nar/`, file listings `<hash>.ls`, build
logs under `log/`, and hookd's own objects (pins under `hookd-pins/`, the GC lease, the cache id).
A `Catalog` holds the narinfos as columns indexed by row, with references as row numbers: a pass over
a hundred thousand narinfos then costs a few passes over lists rather than a hundred thousand objects.
What follows from a narinfo being broken or gone (its referrers, its NAR, its listing and log) is
decided here, once, for GC's plan, GC's sweep and `verify` alike. Pure: no I/O.
"""

from __future__ import annotations

import functools
import gc as cyclegc
import re
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import ParamSpec, TypedDict, TypeVar

from . import narinfo, realisation
from .backends import ObjectStat

PIN_PREFIX = "hookd-pins/"
LEASE_KEY = "hookd-gc-lease"
KEEP_ALWAYS = {"nix-cache-info", "hookd-cache-id", LEASE_KEY}

Progress = Callable[[str, int, int], None]  # (stage, done, total; 0 when not known yet)
P = ParamSpec("P")
R = TypeVar("R")


def no_progress(stage: str, done: int, total: int) -> None:
    return None


class GcError(RuntimeError):
    """GC cannot run (another one holds the lease, the cache cannot be listed, bad options)."""


def pausing_gc(fn: Callable[P, R]) -> Callable[P, R]:
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


# --- the key layout -------------------------------------------------------------------------------


def is_narinfo(key: str) -> bool:
    return key.endswith(".narinfo") and "/" not in key


def is_listing(key: str) -> bool:
    """A `<hash>.ls` file listing (written by Nix's `write-nar-listing`)."""
    return key.endswith(".ls") and "/" not in key and len(key) == 35


def known_kind(key: str) -> bool:
    return (
        key in KEEP_ALWAYS
        or is_narinfo(key)
        or (key.endswith(".ls") and "/" not in key)
        or key.startswith(("nar/", "log/", realisation.LEGACY_PREFIX, realisation.TRACE_PREFIX, PIN_PREFIX))
    )


def is_realisation(key: str) -> bool:
    """A realisation of a content-addressed derivation's output (either layout: realisation.py)."""
    return realisation.is_key(key)


@pausing_gc
def split_listing(listed: list[ObjectStat]) -> tuple[list[ObjectStat], list[ObjectStat], list[ObjectStat]]:
    """The listing's narinfos, NARs and other objects."""
    narinfos: list[ObjectStat] = []
    nars: list[ObjectStat] = []
    others: list[ObjectStat] = []
    for obj in listed:
        if obj.key.startswith("nar/"):
            nars.append(obj)
        elif is_narinfo(obj.key):
            narinfos.append(obj)
        else:
            others.append(obj)
    return narinfos, nars, others


# --- one narinfo ----------------------------------------------------------------------------------


class Record(TypedDict, total=False):
    """What GC needs of one narinfo, as read from the cache; `error` alone if it could not be parsed."""

    store_path: str
    url: str | None  # a malformed narinfo keeps the URL it seems to point at: that NAR is not deleted
    references: list[str]  # hash parts, self-reference excluded
    deriver: str | None
    file_size: int
    error: str


def record_of(ni: narinfo.NarInfo) -> Record:
    return {
        "store_path": ni.store_path,
        "url": ni.url,
        "references": sorted({r[:32] for r in ni.references} - {ni.hash_part}),
        "deriver": ni.deriver,
        "file_size": ni.file_size or 0,
    }


def parse_record(key: str, data: bytes) -> Record:
    """The record of one narinfo: its fields, or why it could not be read."""
    try:
        ni = narinfo.parse(data)
    except narinfo.NarInfoError as e:
        # keep what can be salvaged: the NAR it points at is not deleted on its account
        url = re.search(rb"^URL: *(nar/\S+)", data, re.MULTILINE)
        return {"error": str(e), "url": url.group(1).decode(errors="replace") if url else None}
    if ni.hash_part + ".narinfo" != key:
        return {"error": f"StorePath {ni.store_path} does not belong under the key {key}"}
    return record_of(ni)


# --- the narinfos as columns ----------------------------------------------------------------------


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
    @pausing_gc
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
    @pausing_gc
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

    # --- what follows from rows being broken or gone ------------------------------------------------

    def referrers(self) -> dict[int, list[int]]:
        """Row -> the rows that refer to it."""
        out: dict[int, list[int]] = defaultdict(list)
        for i, rows in enumerate(self.refs):
            for r in rows:
                out[r].append(i)
        return out

    def spread_broken(self, broken: dict[int, str], why: Callable[[int], str]) -> dict[int, str]:
        """`broken` with every row that refers to a broken one, directly or not (`why(row)` for a referrer of
        `row`): a narinfo whose closure is not whole is unusable, so it is broken too."""
        if not broken:
            return broken
        referrers = self.referrers()
        todo = list(broken)
        while todo:
            i = todo.pop()
            for j in referrers.get(i, ()):
                if j not in broken:
                    broken[j] = why(i)
                    todo.append(j)
        return broken

    def urls_kept(self, gone: Collection[int]) -> set[str]:
        """The NARs that the rows not `gone` point at (malformed ones count: they keep theirs)."""
        if not gone:
            return set(self.urls)
        return {u for i, u in enumerate(self.urls) if i not in gone}

    def unreferenced_nars(self, nars: Sequence[ObjectStat], gone: Collection[int]) -> list[ObjectStat]:
        """Listed NARs that no row but the `gone` ones points at."""
        kept = self.urls_kept(gone)
        if kept.issuperset(map(attrgetter("key"), nars)):  # the common case, at C speed
            return []
        return [o for o in nars if o.key not in kept]

    def leftovers(
        self, others: Sequence[ObjectStat], gone: Collection[int]
    ) -> tuple[list[ObjectStat], list[ObjectStat]]:
        """Listings of narinfos not in the cache once the `gone` rows are, and the build logs that only
        `gone` rows named as their deriver's."""
        listings = [o for o in others if is_listing(o.key)]
        logs = [o for o in others if o.key.startswith("log/")]
        kept = range(len(self)) if not gone else [i for i in range(len(self)) if i not in gone]
        if listings:
            present = {self.keys[i][:32] for i in kept}
            listings = [o for o in listings if o.key[:32] not in present]
        if logs:
            derivers = {self.derivers[i] for i in gone} - {self.derivers[i] for i in kept} - {None}
            logs = [o for o in logs if o.key[4:] in derivers]
        return listings, logs

    def orphan_realisations(
        self, outputs: Mapping[str, str], others: Sequence[ObjectStat], gone: Collection[int]
    ) -> list[ObjectStat]:
        """Realisations whose output's narinfo is not in the cache once the `gone` rows are; `outputs` maps a
        realisation's key to its output's base name ("" when it could not be read: such a one stays)."""
        if not outputs:
            return []
        present = {k[:32] for i, k in enumerate(self.keys) if i not in gone}
        return [o for o in others if (out := outputs.get(o.key)) and out[:32] not in present]
