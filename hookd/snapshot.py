"""GC's view of a cache at one moment: a listing, and each narinfo read once.

The parsed narinfos are kept in a local index (`NarinfoIndex`) and reused while their ETag, or size and
mtime, is unchanged, so a repeat run over an unchanged cache needs the listing only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from . import realisation
from .backends import Backend, ObjectStat
from .catalog import (
    PIN_PREFIX,
    Catalog,
    GcError,
    Progress,
    Record,
    is_realisation,
    known_kind,
    no_progress,
    parse_record,
    pausing_gc,
    split_listing,
)
from .pins import read_pins

log = logging.getLogger("hookd.gc")

READ_CONCURRENCY = 32
INDEX_VERSION = 2


@dataclass(repr=False)
class Snapshot:
    narinfos: Catalog
    nars: list[ObjectStat]  # listed under nar/
    others: list[ObjectStat]  # neither: listings, logs, pins, markers, unknown objects
    pins: dict[str, str] = field(default_factory=dict)  # name -> store path
    unknown: list[str] = field(default_factory=list)
    narinfo_reads: int = 0
    started: float = 0.0  # time.monotonic() when the listing began: the sweep's window counts from it
    realisations: dict[str, str] = field(default_factory=dict)  # key -> its output's base name ("": unreadable)

    def __repr__(self) -> str:
        return f"Snapshot({len(self.narinfos)} narinfos, {len(self.nars)} NARs, {len(self.others)} others)"

    @property
    def malformed(self) -> dict[str, str]:
        return {self.narinfos.keys[i]: why for i, why in self.narinfos.errors.items()}


class NarinfoIndex:
    """The last snapshot's catalog, kept as one JSON file of columns: what makes repeat runs cheap.

    Without a file (no writable state directory) it lasts as long as the object. A lost or garbled
    file only costs a re-read of the narinfos, so it is replaced atomically but not synced."""

    COLUMNS = ("keys", "sizes", "mtimes", "etags", "store_paths", "urls", "file_sizes", "derivers", "refs")

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.last: Catalog | None = None

    @classmethod
    def in_state_dir(cls, state_dir: Path, url: str) -> NarinfoIndex:
        """The index of the cache at `url`, kept in hookd's state directory; in memory if that cannot be made."""
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError:
            return cls(None)  # every narinfo is read
        return cls(index_path(state_dir, url))

    @pausing_gc
    def load(self) -> Catalog:
        if self.last is not None or self.path is None:
            return self.last or Catalog()
        try:
            return self._read(self.path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            if not isinstance(e, FileNotFoundError):
                log.warning(
                    "ignoring the GC index %s (%s: %s): every narinfo is read again", self.path, type(e).__name__, e
                )
            return Catalog()

    def _read(self, path: Path) -> Catalog:
        data = json.loads(path.read_bytes())
        if data.get("version") != INDEX_VERSION:
            return Catalog()
        cat = Catalog(**{c: data[c] for c in self.COLUMNS})
        cat.missing = {int(k): v for k, v in data["missing"].items()}
        cat.errors = {int(k): v for k, v in data["errors"].items()}
        if len({len(getattr(cat, c)) for c in self.COLUMNS}) != 1:
            raise ValueError("columns of different lengths")
        if max(chain.from_iterable(cat.refs), default=0) >= len(cat):
            raise ValueError("a reference to a row that does not exist")
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

    pins = await read_pins(backend, [o.key for o in others if o.key.startswith(PIN_PREFIX)])
    unknown = [o.key for o in others if not known_kind(o.key)]
    realisations = await read_realisations(backend, [o.key for o in others if is_realisation(o.key)])
    return Snapshot(catalog, nars, others, pins, unknown, reads, started, realisations=realisations)


async def read_realisations(backend: Backend, keys: list[str]) -> dict[str, str]:
    """The output each realisation names (few: content-addressed derivations only; read on every run).
    One that cannot be read names none, and stays; one deleted since the listing is left out."""
    gate = asyncio.Semaphore(READ_CONCURRENCY)
    outputs: dict[str, str] = {}

    async def read(key: str) -> None:
        async with gate:
            data = await backend.get(key)
        if data is None:
            return
        try:
            outputs[key] = realisation.parse_cached(key, data).out_path
        except realisation.RealisationError as e:
            log.warning("GC: the realisation %s cannot be read (%s): kept", key, e)
            outputs[key] = ""

    await asyncio.gather(*(read(k) for k in keys))
    return outputs


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
