"""A deterministic simulation of several uploaders and a GC sharing one bucket, in virtual time.

The real protocol code runs unchanged (`upload.upload_path` with its `Freshness`, `snapshot.snapshot`,
`plan.plan`, `sweep.sweep`) on an event loop whose clock jumps to the next timer whenever nothing is
ready, against `SimBucket`, an in-memory bucket whose requests take a seeded random time and take
effect somewhere inside it, and which checks the cache's invariant after every change. Store paths
are real files with real NAR hashes; only Nix itself is replaced by the graph that made them.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hookd import nar, narinfo, nixbase32
from hookd.backends import Backend, BackendError, ObjectStat
from hookd.catalog import GcError
from hookd.freshness import Freshness
from hookd.narstream import Levels
from hookd.pathinfo import PathInfo
from hookd.plan import GcPlan, plan
from hookd.safety import Bounds
from hookd.signing import SecretKey
from hookd.snapshot import NarinfoIndex, Snapshot, snapshot
from hookd.sweep import sweep
from hookd.upload import ReferenceGone, upload_path

T = TypeVar("T")
EPOCH = 1_700_000_000.0


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock stands still while callbacks run and jumps to the next timer when
    none is ready: hours of protocol time in a fraction of a second, the same schedule every run."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def _run_once(self) -> None:  # type: ignore[override]
        ready, scheduled = self._ready, self._scheduled  # type: ignore[attr-defined]
        while scheduled and scheduled[0].cancelled():  # as the base loop would, before it picks a timeout
            heapq.heappop(scheduled)._scheduled = False
        if not ready and scheduled and scheduled[0].when() > self.now:
            self.now = scheduled[0].when()
        super()._run_once()  # type: ignore[misc]


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on a VirtualLoop, with time.time/time.monotonic following its clock."""
    loop = VirtualLoop()
    real_time, real_monotonic = time.time, time.monotonic
    time.time = lambda: EPOCH + loop.now  # type: ignore[assignment]
    time.monotonic = lambda: loop.now  # type: ignore[assignment]
    real_to_thread = asyncio.to_thread

    async def inline(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)  # no threads: their timing would not be simulated

    asyncio.to_thread = inline  # type: ignore[assignment]
    try:
        return loop.run_until_complete(main)
    finally:
        time.time, time.monotonic = real_time, real_monotonic  # type: ignore[assignment]
        asyncio.to_thread = real_to_thread
        loop.close()


class InvariantBroken(AssertionError):
    pass


@dataclass
class SimBucket(Backend):
    """One bucket: objects with last-modified times; every request takes a random time, applies at a
    random point within it (never later than `apply_within`), and may fail before or after applying."""

    rng: random.Random
    apply_within: float = 0.5
    answer_within: float = 0.5
    fault_rate: float = 0.0
    objects: dict[str, tuple[bytes, float]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    needs: dict[str, set[str]] = field(default_factory=dict)  # narinfo key -> what it needs
    needed_by: dict[str, set[str]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    requests: int = 0
    url: str = "sim://bucket"

    async def _request(self, what: str, apply: Callable[[], T]) -> T:
        self.requests += 1
        await asyncio.sleep(self.rng.uniform(0, self.apply_within))
        if self.rng.random() < self.fault_rate / 2:
            raise BackendError(f"{what}: injected fault before the request applied")
        result = apply()
        await asyncio.sleep(self.rng.uniform(0, self.answer_within))
        if self.rng.random() < self.fault_rate / 2:
            raise BackendError(f"{what}: injected fault after the request applied")
        return result

    def _changed(self, what: str, key: str, deleted: bool) -> None:
        """Check the invariant where `key` changed: a new narinfo needs its NAR and references; a
        deleted object must not be needed by any narinfo still there."""
        self.log.append(f"{time.monotonic():9.3f} {what}")
        if deleted:
            if key.endswith(".narinfo"):
                for needed in self.needs.pop(key, ()):
                    self.needed_by.get(needed, set()).discard(key)
            holders = sorted(self.needed_by.get(key, ()))
            if holders:
                self._broken(f"after {what}: {holders[0]} is visible without {key}")
            return
        if key.endswith(".narinfo"):
            ni = narinfo.parse(self.objects[key][0])
            needs = {ni.url} | {narinfo.narinfo_key(r) for r in ni.references if r[:32] != key[:32]}
            self.needs[key] = needs
            for needed in needs:
                self.needed_by.setdefault(needed, set()).add(key)
            if missing := sorted(n for n in needs if n not in self.objects):
                self._broken(f"after {what}: {key} is visible without {missing}")

    def _broken(self, message: str) -> None:
        self.violations.append(message)
        raise InvariantBroken(message)

    def _put(self, key: str, data: bytes) -> None:
        self.objects[key] = (data, time.time())
        self._changed(f"put {key}", key, deleted=False)

    async def exists(self, key: str) -> bool:
        return await self._request(f"HEAD {key}", lambda: key in self.objects)

    async def get(self, key: str) -> bytes | None:
        return await self._request(f"GET {key}", lambda: self.objects.get(key, (None, 0.0))[0])

    async def put(self, key: str, data: bytes, content_type: str, *, content_encoding: str | None = None) -> None:
        await self._request(f"PUT {key}", lambda: self._put(key, data))

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectStat]:  # type: ignore[override]
        keys = sorted(k for k in self.objects if k.startswith(prefix))
        for i in range(0, len(keys), 20):  # pages: the listing is not one instant
            page = await self._request(
                "LIST", lambda p=keys[i : i + 20]: [(k, self.objects.get(k)) for k in p]  # type: ignore[misc]
            )
            for k, obj in page:
                if obj is not None:
                    yield ObjectStat(k, len(obj[0]), obj[1], None)

    async def delete(self, key: str) -> None:
        def apply() -> None:
            if self.objects.pop(key, None) is not None:
                self._changed(f"delete {key}", key, deleted=True)

        await self._request(f"DELETE {key}", apply)

    async def stat(self, key: str) -> ObjectStat | None:
        def apply() -> ObjectStat | None:
            obj = self.objects.get(key)
            return ObjectStat(key, len(obj[0]), obj[1], None) if obj else None

        return await self._request(f"HEAD {key}", apply)

    async def touch(self, key: str, content_type: str) -> bool:
        def apply() -> bool:
            if key not in self.objects:
                return False
            self._put(key, self.objects[key][0])
            return True

        return await self._request(f"COPY {key}", apply)


def make_store(root: Path, rng: random.Random, count: int) -> dict[str, PathInfo]:
    """`count` store paths (real files) in a random reference graph (each path refers to earlier ones)."""
    store = root / "store"
    store.mkdir(parents=True)
    infos: dict[str, PathInfo] = {}
    paths: list[str] = []
    for i in range(count):
        digest = hashlib.sha256(f"{root}-{i}".encode()).digest()[:20]
        path = str(store / f"{nixbase32.encode(digest)}-p{i}")
        Path(path).write_text(f"path {i}\n" * (1 + i % 7))
        refs = tuple(sorted(rng.sample(paths, min(len(paths), rng.randint(0, 3)))))
        h = hashlib.sha256()
        size = 0
        for chunk in nar.dump(path):
            h.update(chunk)
            size += len(chunk)
        infos[path] = PathInfo(path, h.digest(), size, refs)
        paths.append(path)
    return infos


def closure(infos: dict[str, PathInfo], roots: list[str]) -> list[str]:
    """The closure of `roots`, references before referrers."""
    out: dict[str, None] = {}

    def visit(p: str) -> None:
        if p in out:
            return
        for r in infos[p].references:
            visit(r)
        out[p] = None

    for r in roots:
        visit(r)
    return list(out)


@dataclass
class Uploader:
    """What a hookd daemon does with one bucket, reduced to its protocol: skip what it recorded or
    finds in the cache, upload the rest references first with the real `upload_path`."""

    name: str
    bucket: SimBucket
    infos: dict[str, PathInfo]
    bounds: Bounds
    staging: Path
    key: SecretKey = field(default_factory=lambda: SecretKey.generate("sim-1"))
    done: set[str] = field(default_factory=set)
    uploads: int = 0

    def __post_init__(self) -> None:
        self.freshness = Freshness(self.bucket, self.bounds)

    async def push(self, root: str) -> None:
        """Until the closure of `root` is published: every accepted path ends up in the cache."""
        while True:
            try:
                for p in closure(self.infos, [root]):
                    if p in self.done:
                        continue
                    asked = time.monotonic()
                    if await self.bucket.stat(narinfo.narinfo_key(p)) is not None:
                        self.done.add(p)  # found, not written: it will be touched before it is relied on
                        continue
                    self.freshness.found_absent([narinfo.narinfo_key(p)], asked)  # as the planner does
                    await upload_path(self.infos[p], self.bucket, self.key, "none", Levels(0), self.freshness)
                    self.uploads += 1
                    self.done.add(p)
                return
            except ReferenceGone as e:
                self.done.difference_update(e.gone)
            except (BackendError, TimeoutError):
                await asyncio.sleep(0.5)


async def gc_loop(
    bucket: SimBucket, bounds: Bounds, older_than: float, stop: asyncio.Event, rng: random.Random,
    sweeper: Callable[..., Awaitable[Any]] | None = None, pause: float = 2.0,
) -> int:  # fmt: skip
    """GC again and again until `stop`; the number of runs that completed."""
    async def new_sweep(b: Backend, snap: Snapshot, planned: GcPlan, bounds: Bounds) -> Any:
        return await sweep(b, snap, planned.candidates, bounds)

    sweeper = sweeper or new_sweep
    runs = 0
    while not stop.is_set():
        try:
            snap = await snapshot(bucket, NarinfoIndex(None))
            planned = plan(snap, now=time.time(), older_than=older_than, grace=bounds.grace)
            await sweeper(bucket, snap, planned, bounds)
            runs += 1
        except (BackendError, GcError):
            pass
        await asyncio.sleep(rng.uniform(0, pause))
    return runs
