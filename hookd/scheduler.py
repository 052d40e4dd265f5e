"""The upload scheduler: starts uploads of ready paths within the limits, and records how each ended.

`classify` turns an attempt's exception into the path's next state (pure, so every failure mode is
tested without a backend). `Scheduler` runs on the daemon's loop, or in-process in the simulation
tests against a fake store and bucket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from . import footprint, narinfo, narstream
from .backends import Backend, BackendError, PermanentBackendError
from .backends.retry import backoff
from .config import Config
from .freshness import Freshness
from .lifecycle import DONE, FAILED, PENDING
from .metrics import Metrics
from .pathinfo import PathInfo
from .publish import Extras
from .queue import Outcome, Queue
from .signing import SecretKey
from .upload import NarMismatchError, ReferenceGone, Uploaded, upload_path

log = logging.getLogger("hookd")

IDLE_POLL = 1.0
START_PARALLEL = 8


def classify(path: str, error: BaseException, attempts: int, retry_base: float, retry_max: float) -> Outcome:
    """The outcome of a failed attempt (the `attempts`-th): refused for good, or tried again when."""
    if isinstance(error, ReferenceGone):
        return Outcome(path, PENDING, str(error), 0.0)  # waits for its references, not for a timer
    if isinstance(error, NarMismatchError):
        return Outcome(path, FAILED, str(error))
    if isinstance(error, FileNotFoundError):
        msg = f"{path} is gone from the store ({error.filename}); it was garbage-collected before upload"
        return Outcome(path, FAILED, msg)
    if isinstance(error, PermanentBackendError):
        return Outcome(
            path, FAILED, f"the cache refused it: {error}. Fix the cause, then `hookd queue retry --failed`"
        )
    delay = backoff(attempts, retry_base, retry_max)
    return Outcome(path, PENDING, str(error) or type(error).__name__, time.time() + delay)


class ByteBudget:
    """Bounds the memory uploads in flight hold, as footprint.py counts it (paths in flight are bounded
    apart)."""

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.used = 0
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        n = min(max(nbytes, 1), self.total)  # a path larger than the budget goes alone
        async with self._cond:
            await self._cond.wait_for(lambda: self.used + n <= self.total)
            self.used += n
        try:
            yield
        finally:
            async with self._cond:
                self.used -= n
                self._cond.notify_all()


@dataclass
class Parallelism:
    """How many paths upload at once, adapted to the backend like TCP's window: doubling each round of
    uploads until the backend first shows strain (slow start), then one more per round while it keeps
    up, a quarter fewer (at most once a second) when it throttles or its answers slow down, never fewer
    than `floor`. Latency-bound backends get many paths in flight. (Below the floor, throttling is the
    request rate's business (AdaptiveRate): an upload spends most of its time waiting, on the
    protocol's settle time or a slow link, not loading the backend, and a shared server's latency
    swings would otherwise starve it.)"""

    limit: float
    ceiling: int
    floor: int = 1
    last_cut: float = float("-inf")
    slow_start: bool = True

    def update(self, congested: bool, now: float) -> None:
        if not congested:
            self.limit = min(float(self.ceiling), self.limit + (1 if self.slow_start else 1 / self.limit))
            return
        self.slow_start = False
        if now - self.last_cut >= 1.0:
            self.limit = max(float(self.floor), self.limit * 0.75)
            self.last_cut = now

    @property
    def slots(self) -> int:
        return max(self.floor, int(self.limit))


class Scheduler:
    def __init__(
        self,
        cfg: Config,
        queue: Queue,
        backend: Backend,
        key: SecretKey,
        metrics: Metrics,
        freshness: Freshness | None = None,
    ) -> None:
        self.cfg = cfg
        self.queue = queue
        self.backend = backend
        self.key = key
        self.metrics = metrics
        self.freshness = freshness or Freshness(backend, cfg.bounds)
        self.extras = Extras(backend, cfg.listings, cfg.content_encoding)
        self.inflight: dict[str, asyncio.Task[None]] = {}
        # Started in the queue, not yet here: an upload that ends starts the next at once, without the
        # step's transaction in between (which takes longer than a small path's whole upload).
        self.ready: collections.deque[PathInfo] = collections.deque()
        self.stopping = False
        self.outcomes: list[Outcome] = []
        self.bytes = ByteBudget(cfg.max_bytes_in_flight)
        # threaded zstd uses every core already: more than one such stream per core only adds memory
        self.workers = max(1, os.cpu_count() or 1)
        self.threaded = asyncio.Semaphore(self.workers)
        start = min(START_PARALLEL, cfg.max_parallel)
        self.parallel = Parallelism(float(start), cfg.max_parallel, floor=start)
        self.levels = narstream.Levels(cfg.level, cfg.adaptive_level)
        self.wake = asyncio.Event()
        self.cache_ready = False

    async def restore(self) -> None:
        """Rely again on what this daemon wrote within the protocol's window before it was restarted."""
        written = await self.queue.written_since(time.time() - self.freshness.bounds.fresh_for)
        self.freshness.restore({narinfo.narinfo_key(p): t for p, t in written.items()})

    async def run(self, stopping: asyncio.Event) -> None:
        failures = 0
        while not stopping.is_set():
            try:
                await self.step()
                # an upload in flight wakes the next step when it ends; a retry due meanwhile waits for it
                nxt = await self.queue.next_path_time() if not self.inflight else None
                timeout = IDLE_POLL if nxt is None else max(0.01, min(IDLE_POLL, nxt - time.time()))
                failures = 0
                await wait_event(self.wake, timeout)
            except Exception as e:
                failures += 1
                delay = backoff(failures, self.cfg.retry_base, self.cfg.retry_max)
                log.error("cache %s: %s (retry in %.0fs)", self.backend.url, e, delay)
                await wait_event(stopping, delay, clear=False)

    async def step(self) -> list[str]:
        """Record finished attempts and start the uploads there is room for (one transaction); the paths
        started."""
        if not self.cache_ready:
            await self.flush()
            await self.ensure_cache_info()
        # a round ahead: what the slots free while this transaction runs is filled from `ready`
        want = 0 if self.stopping else max(0, 2 * self.parallel.slots - len(self.inflight) - len(self.ready))
        batch, self.outcomes = self.outcomes, []
        try:
            ready = await self.queue.advance(batch, want, exclude=[*self.inflight, *(i.path for i in self.ready)])
        except BaseException:
            self.outcomes[:0] = batch
            raise
        self.ready.extend(ready)
        self._launch()
        return [i.path for i in ready]

    def stop_starting(self) -> None:
        """Start no more uploads (shutdown); those started in the queue only are pending again."""
        self.stopping = True
        while self.ready:
            self.outcomes.append(Outcome(self.ready.popleft().path, PENDING, "not started (shutdown)", 0.0))

    def _launch(self) -> None:
        """Start uploads from `ready` while there are free slots."""
        while self.ready and len(self.inflight) < self.parallel.slots and not self.stopping:
            info = self.ready.popleft()
            self.inflight[info.path] = asyncio.create_task(self._upload(info), name=info.path)

    async def ensure_cache_info(self) -> None:
        if not await self.backend.exists("nix-cache-info"):
            text = narinfo.cache_info(self.cfg.store_dir, self.cfg.priority)
            await self.backend.put("nix-cache-info", text.encode(), "text/x-nix-cache-info")
            log.info("wrote nix-cache-info to %s", self.backend.url)
        await self.backend.cleanup()
        self.cache_ready = True

    async def flush(self) -> None:
        if self.outcomes:
            batch, self.outcomes = self.outcomes, []
            try:
                await self.queue.record(batch)
            except BaseException:
                self.outcomes[:0] = batch
                raise

    async def drain(self, timeout: float) -> None:
        """Let uploads in flight finish for up to `timeout` seconds; the rest stay queued."""
        self.stop_starting()
        tasks = list(self.inflight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                log.warning("stopping: %d uploads did not finish in time; they stay queued", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        await self.flush()

    def memory(self, info: PathInfo) -> tuple[int, bool]:
        """What uploading `info` holds in memory at most (footprint.py), and whether it compresses
        with threads."""
        enc = narstream.encoding(self.cfg.compression, self.levels.current(), info.nar_size)
        nar_buffer = self.backend.nar_memory(info.nar_size)
        return footprint.upload_memory(info.nar_size, enc, self.workers, nar_buffer), enc.threaded

    async def upload(self, info: PathInfo) -> Uploaded:
        refs = any(r != info.path for r in info.references)
        elsewhere = await self.queue.upstream_references(info.path) if refs else set()
        nbytes, threaded = self.memory(info)
        async with contextlib.AsyncExitStack() as held:
            if threaded:
                await held.enter_async_context(self.threaded)
            await held.enter_async_context(self.bytes.hold(nbytes))
            return await upload_path(
                info,
                self.backend,
                self.key,
                self.cfg.compression,
                self.levels,
                self.freshness,
                self.cfg.worker_nice,
                elsewhere,
                self.extras,
            )

    async def _upload(self, info: PathInfo) -> None:
        start = time.monotonic()
        try:
            res = await self.upload(info)
        except asyncio.CancelledError:
            self.outcomes.append(Outcome(info.path, PENDING, "interrupted (shutdown)", 0.0))
            raise
        except Exception as e:
            attempts = await self.queue.attempts(info.path) + 1
            outcome = classify(info.path, e, attempts, self.cfg.retry_base, self.cfg.retry_max)
            if isinstance(e, ReferenceGone) and await self.queue.forget(e.gone) < len(e.gone):
                # not all of them could be queued again (not ours to upload?): back off, do not spin
                outcome = classify(info.path, RuntimeError(str(e)), attempts, self.cfg.retry_base, self.cfg.retry_max)
            self._report(info, e, outcome, attempts)
            self.outcomes.append(outcome)
        else:
            elapsed = time.monotonic() - start
            log.info("uploaded %s: NAR %d bytes, compressed %d, %.2fs", info.path, res.nar_size, res.file_size, elapsed)
            self.outcomes.append(Outcome(info.path, DONE, None, 0.0, res.nar_size, res.file_size, res.written))
            self.metrics.uploads.inc()
            self.metrics.nar_bytes.inc(res.nar_size)
            self.metrics.compressed_bytes.inc(res.file_size)
            self.metrics.upload_seconds.observe(elapsed)
        finally:
            self.inflight.pop(info.path, None)
            self.parallel.update(self.backend.congested(), time.monotonic())
            self._launch()
            self.wake.set()

    def _report(self, info: PathInfo, error: Exception, outcome: Outcome, attempts: int) -> None:
        if outcome.state == FAILED:
            self.metrics.failures.labels("refused").inc()
            why = outcome.error or ""
            log.error("refused %s", why if why.startswith(info.path) else f"{info.path}: {why}")
        elif isinstance(error, ReferenceGone):
            log.warning("%s", error)
        else:
            self.metrics.failures.labels("transient").inc()
            level = logging.WARNING if isinstance(error, BackendError | OSError | TimeoutError) else logging.ERROR
            log.log(
                level,
                "upload of %s failed (attempt %d): %s; retry in %.0fs",
                info.path, attempts, outcome.error, max(0.0, outcome.next_try - time.time()),
                exc_info=level == logging.ERROR,
            )  # fmt: skip


async def wait_event(event: asyncio.Event, timeout: float, clear: bool = True) -> None:
    """Wait for a wake-up or the timeout; consume the wake-up (a later set() is kept for next time)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
    if clear:
        event.clear()

