"""Retries for remote backends: exponential backoff with full jitter, Retry-After, and an adaptive
request rate that halves when the backend throttles and recovers slowly (AIMD, like TCP's window).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

from .base import BackendError

log = logging.getLogger("hookd.backend")
T = TypeVar("T")

_send_deadline: ContextVar[float | None] = ContextVar("send_deadline", default=None)


class DeadlinePassed(BackendError):
    """A request was not sent (nor retried) because its deadline had passed."""


@contextlib.contextmanager
def send_before(deadline: float) -> Iterator[None]:
    """No request attempt, first or retry, starts after `deadline` (time.monotonic) inside this block.

    GC's deletes use it: a delete must be sent within a bound of the check that found the object old.
    """
    token = _send_deadline.set(deadline)
    try:
        yield
    finally:
        _send_deadline.reset(token)


class RetryableError(BackendError):
    """A request failed in a way worth repeating (5xx, throttling, reset, timeout)."""

    def __init__(self, message: str, throttled: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.throttled = throttled
        self.retry_after = retry_after


def unanswered(what: str, e: BaseException) -> RetryableError:
    """A request that failed short of an answer (connection, timeout, garbled answer): worth repeating."""
    return RetryableError(f"{what}: {type(e).__name__}{': ' + str(e) if str(e) else ''}")


def parse_retry_after(value: str | None, cap: float = 300.0) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), capped; None if absent/bad."""
    if not value:
        return None
    try:
        return max(0.0, min(cap, float(value)))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, min(cap, when - time.time()))


class AdaptiveRate:
    """A request-rate limit that halves when the backend throttles and climbs back gradually (AIMD,
    as TCP does with its window).

    Unthrottled it stays out of the way. A 429/SlowDown cuts the rate in half, at most once per
    `window` seconds (one burst of throttling answers is one signal, not twenty); each success raises
    it by `growth`, and past `max_rate` the limit lifts again.
    """

    def __init__(
        self, max_rate: float = 1000.0, min_rate: float = 2.0, growth: float = 1.02, window: float = 1.0
    ) -> None:
        self.max_rate = max_rate
        self.min_rate = min_rate
        self.growth = growth
        self.window = window
        self.rate: float | None = None  # None: unlimited
        self._next = 0.0
        self._last_cut = -1e9
        self._lock = asyncio.Lock()
        self.latency: float | None = None  # moving average of answered requests' time
        self.fastest: float | None = None  # the lowest recent one (drifts up 1% a request)

    async def acquire(self) -> None:
        if self.rate is None:
            return
        async with self._lock:
            now = time.monotonic()
            wait = self._next - now
            self._next = max(now, self._next) + 1.0 / self.rate
        if wait > 0:
            await asyncio.sleep(wait)

    def on_success(self, seconds: float | None = None) -> None:
        if seconds is not None:
            self.latency = seconds if self.latency is None else 0.9 * self.latency + 0.1 * seconds
            self.fastest = seconds if self.fastest is None else min(seconds, self.fastest * 1.01)
        if self.rate is not None:
            self.rate *= self.growth
            if self.rate >= self.max_rate:
                self.rate = None
                log.info("backend no longer throttling: request rate limit lifted")

    @property
    def congested(self) -> bool:
        """Whether the backend throttles or answers much slower than it can: fewer requests would
        do as much (the signal the scheduler's parallelism follows)."""
        if self.rate is not None:
            return True
        if self.latency is None or self.fastest is None:
            return False
        return self.latency > 2 * self.fastest + 0.005

    def on_throttle(self) -> None:
        now = time.monotonic()
        if now - self._last_cut < self.window:
            return
        self._last_cut = now
        self.rate = max(self.min_rate, (self.rate or 100.0) / 2)
        log.warning("backend throttled: request rate lowered to %.1f/s", self.rate)


def backoff(attempts: int, base: float, cap: float) -> float:
    """Seconds to wait before attempt `attempts + 1`: exponential with full jitter (AWS's advice),
    for requests here and for whole uploads in the scheduler."""
    return random.uniform(0, min(cap, base * 2 ** min(attempts, 32)))


@dataclass
class RetryPolicy:
    attempts: int = 6
    base: float = 0.25
    cap: float = 20.0
    on_retry: Callable[[], object] | None = None  # counts retries (metrics)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        return max(backoff(attempt, self.base, self.cap), retry_after or 0.0)


@dataclass
class Remote:
    """What every remote backend (S3, HTTP) takes alike: timeouts, connection pool, retries, rate."""

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_connections: int = 64
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    rate: AdaptiveRate = field(default_factory=AdaptiveRate)


async def with_retries(what: str, op: Callable[[], Awaitable[T]], policy: RetryPolicy, rate: AdaptiveRate) -> T:
    """Run `op`, repeating it on RetryableError until the policy's attempts are spent."""
    deadline = _send_deadline.get()
    for attempt in range(policy.attempts):
        await rate.acquire()
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlinePassed(f"{what}: not sent, its deadline passed")
        started = time.monotonic()
        try:
            result = await op()
        except RetryableError as e:
            if e.throttled:
                rate.on_throttle()
            if attempt + 1 >= policy.attempts:
                raise BackendError(f"{what}: {e} (gave up after {policy.attempts} attempts)") from None
            delay = policy.delay(attempt, e.retry_after)
            if policy.on_retry is not None:
                policy.on_retry()
            log.debug("%s: %s; retry %d in %.2fs", what, e, attempt + 1, delay)
            await asyncio.sleep(delay)
        else:
            rate.on_success(time.monotonic() - started)
            return result
    raise AssertionError("unreachable")
