"""An uploader's side of the upload/GC protocol (hookd/safety.py): touch what it relies on, let any
delete decided before the touch land, check the objects are still there, and only then publish.

One `Freshness` per daemon: uploads that rely on the same reference share one touch and one wait.
Times are this host's monotonic clock; the bucket's clock is never compared with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable

from .backends import Backend
from .safety import Bounds

log = logging.getLogger("hookd")


class Freshness:
    """When each object this daemon relies on was last written or touched-and-verified by it."""

    def __init__(self, backend: Backend, bounds: Bounds, concurrency: int = 32) -> None:
        self.backend = backend
        self.bounds = bounds
        self.verified: dict[str, float] = {}  # key -> monotonic start of the write or verified touch
        self._absent: dict[str, float] = {}  # key -> monotonic start of a question that found it absent
        self._running: dict[str, asyncio.Task[bool]] = {}
        self._gate = asyncio.Semaphore(concurrency)
        self._writers: dict[str, tuple[asyncio.Lock, int]] = {}
        self.touches = 0  # requests spent on the protocol: touches and existence checks
        self.checks = 0

    def wrote(self, key: str, started: float) -> None:
        """This daemon wrote `key`; the write began at `started` (time.monotonic())."""
        if started > self.verified.get(key, float("-inf")):
            self.verified[key] = started

    @contextlib.asynccontextmanager
    async def sole_writer(self, key: str) -> AsyncIterator[None]:
        """One upload of this daemon at a time writes `key`. Paths with identical NARs (an empty
        directory, the same file) often upload together (same size, so side by side in the queue's
        order): the first writes the NAR, and the others find it fresh (`wrote`) and rely on that
        write, where a write of their own would find it there, not created, and have to touch it and
        wait out the settle time (safety.py)."""
        lock, users = self._writers.get(key, (asyncio.Lock(), 0))
        self._writers[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._writers[key]
            if users == 1:
                del self._writers[key]
            else:
                self._writers[key] = (lock, users - 1)

    def found_absent(self, keys: Iterable[str], asked: float) -> None:
        """A question sent at `asked` (time.monotonic()), a stat or a listing, found `keys` absent: a
        PUT of one soon after creates it (safety.py, step 5), without asking again."""
        for key in keys:
            self._absent.pop(key, None)
            self._absent[key] = asked
        old = time.monotonic() - self.bounds.fresh_for
        while self._absent and next(iter(self._absent.values())) < old:  # oldest first, roughly
            del self._absent[next(iter(self._absent))]

    def absent_since(self, key: str) -> float | None:
        """When a question that found `key` absent was sent, if it leaves a PUT starting now most of
        the protocol's window (half of `fresh_for`) to be sent as a creation."""
        asked = self._absent.get(key)
        return asked if asked is not None and time.monotonic() - asked < self.bounds.fresh_for / 2 else None

    def restore(self, written: dict[str, float]) -> None:
        """Objects this daemon wrote before a restart, by key, with the wall-clock time each write began."""
        offset = time.monotonic() - time.time()
        for key, when in written.items():
            self.wrote(key, when + offset)

    def forget(self) -> None:
        """The cache was emptied or replaced: nothing written to it before may be relied on."""
        self.verified.clear()
        self._absent.clear()

    def fresh(self, key: str, margin: float = 0.0) -> bool:
        """Whether `key` may be relied on for at least `margin` more seconds without a touch."""
        since = self.verified.get(key)
        return since is not None and time.monotonic() - since < self.bounds.fresh_for - margin

    def stale(self, keys: Iterable[str]) -> list[str]:
        """The keys that need a touch now: they would not stay fresh through the touches of the others
        (a touch, `settle`, an existence check) and the publish (a request)."""
        margin = self.bounds.settle + 3 * self.bounds.request_timeout
        return [k for k in dict.fromkeys(keys) if not self.fresh(k, margin)]

    def publishable(self, keys: Iterable[str]) -> bool:
        """Whether a publish sent now lands while every key is still fresh."""
        return all(self.fresh(k, self.bounds.request_timeout) for k in keys)

    async def ensure(self, keys: Iterable[str], content_types: dict[str, str]) -> set[str]:
        """Touch, wait out and verify every stale key; the keys found missing (nothing to rely on)."""
        stale = self.stale(keys)
        if not stale:
            return set()
        tasks, started = [], []
        for key in stale:
            task = self._running.get(key)
            if task is None:
                task = asyncio.create_task(self._touch_and_verify(key, content_types[key]), name=f"touch {key}")
                self._running[key] = task
                task.add_done_callback(lambda _t, k=key: self._running.pop(k, None))  # type: ignore[misc]
                started.append(key)
            tasks.append(task)
        if started:  # said once per batch: an upload that waits this long should say why
            log.info("touching %d cache objects this daemon has not written lately (%s%s) and waiting %.3gs, "
                     "the upload/GC protocol's settle time, before relying on them", len(started), started[0],
                     ", …" if len(started) > 1 else "", self.bounds.settle)  # fmt: skip
        results = await asyncio.gather(*(asyncio.shield(t) for t in tasks))
        missing = {k for k, ok in zip(stale, results, strict=True) if not ok}
        for key in missing:
            self.verified.pop(key, None)
        return missing

    async def _touch_and_verify(self, key: str, content_type: str) -> bool:
        started = time.monotonic()
        async with self._gate:
            self.touches += 1
            if not await self.backend.touch(key, content_type):
                return False
        # A GC that checked this object before the touch landed deletes it within check_to_delete plus
        # one request of that check; after `settle` such a delete has landed, or will never be sent.
        await asyncio.sleep(self.bounds.settle)
        async with self._gate:
            self.checks += 1
            if await self.backend.stat(key) is None:
                log.warning("%s was deleted (by a GC) while it was being touched: uploading it again", key)
                return False
        self.wrote(key, started)
        return True
