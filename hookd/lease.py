"""The GC lease: one GC at a time per cache, held as an object in the cache itself.

The lease also measures the bucket's clock against this host's: GC judges ages by the bucket's stamps.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from typing import Any

from .backends import Backend
from .catalog import LEASE_KEY, GcError

log = logging.getLogger("hookd.gc")


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
