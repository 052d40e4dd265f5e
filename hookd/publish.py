"""What the daemon writes besides NARs and narinfos: NAR listings, with each path before its narinfo, and
the realisations of content-addressed derivations, each after its output's narinfo; narinfos, listings
and logs with the configured Content-Encoding (encoding.py).

A realisation points at an output path: it is published only once the cache holds that path's narinfo,
under the upload/GC protocol of safety.py like a narinfo (the output's narinfo is what it relies on: touched
if this daemon did not write or verify it lately, checked after the settle time, then the realisation is put
within the request bound). Realisations wait in the queue's database, so a restart loses none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import derivation, encoding, listing, narinfo, narstream, storepath
from . import realisation as realisations
from .backends import Backend, BackendError
from .backends.retry import backoff
from .config import Config
from .freshness import Freshness
from .pathinfo import PathInfo
from .queue import Queue
from .signing import SecretKey
from .store import Store

log = logging.getLogger("hookd")

IDLE_POLL = 1.0


class Extras:
    """The listing and the narinfo's bytes of each upload (upload.py calls it before the narinfo goes up)."""

    def __init__(self, backend: Backend, listings: bool = True, content_encoding: str = "none") -> None:
        self.backend = backend
        self.listings = listings
        self.content_encoding = content_encoding

    async def write_listing(self, info: PathInfo) -> None:
        """Write the path's listing (from an lstat walk of the path), if listings are on. upload.py runs
        it beside the NAR's upload: both must be in the cache before the narinfo, neither needs the other."""
        if not self.listings:
            return
        try:
            if info.nar_size <= narstream.INLINE_NAR:  # less work than the hop to a thread and back
                doc = listing.from_path(info.path)
            else:
                doc = await asyncio.to_thread(listing.from_path, info.path)
        except listing.ListingError as e:  # a name JSON cannot hold: Nix writes no listing either
            log.warning("no listing for %s: %s", info.path, e)
            return
        key = listing.key(storepath.hash_part(info.path))
        body, enc = encoding.encode(key, listing.render(doc), self.content_encoding)
        await self.backend.put(key, body, listing.CONTENT_TYPE, content_encoding=enc)

    def narinfo_body(self, ni: narinfo.NarInfo) -> tuple[bytes, str | None]:
        """The narinfo's bytes as stored and their Content-Encoding."""
        return encoding.encode(narinfo.narinfo_key(ni.store_path), ni.render().encode(), self.content_encoding)


@dataclass
class Realisations:
    """Realisations from the store to the cache: queued when a request is planned, published when ready."""

    cfg: Config
    queue: Queue
    store: Store
    backend: Backend
    key: SecretKey
    freshness: Freshness
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    on_gone: Any = None  # called when an output was found gone (queued again): wakes the scheduler
    published: int = 0

    async def plan(self, drvs: Iterable[str]) -> int:
        """Queue the realisations of those .drv files whose outputs are known only once built; how many.

        Raises StoreError when Nix cannot answer (the request is planned again later)."""
        rows: list[tuple[str, str, str]] = []
        for drv in dict.fromkeys(drvs):
            try:
                data = await asyncio.to_thread(_read, drv)
                parsed = derivation.parse(data)
            except (OSError, derivation.DerivationError) as e:
                log.debug("not looking for realisations of %s: %s", drv, e)
                continue
            if not parsed.has_deferred_outputs:
                continue
            found = await self.store.realisations([drv])
            if parsed.resolved:  # its own resolution: its 2.35 build-trace entries follow from these
                found += [r.as_trace(drv) for r in found if r.id is not None]
            rows += [(r.key, f"{self.cfg.store_dir}/{r.out_path}", r.render().decode()) for r in found]
        if rows:
            await self.queue.add_realisations(rows)
            self.wake.set()
            log.info("queued %d realisations of %d derivations", len(rows), len(set(drvs)))
        return len(rows)

    async def publish_ready(self) -> int:
        """Publish the queued realisations whose output the cache holds; how many were published."""
        ready = await self.queue.ready_realisations()
        if not ready:
            return 0
        published: list[str] = []
        retry: dict[str, tuple[str, float]] = {}
        gone: list[str] = []

        async def one(key: str, out_path: str, body: str, attempts: int) -> None:
            try:
                r = realisations.parse_cached(key, body.encode())
                ni_key = narinfo.narinfo_key(out_path)
                relied = {ni_key: narinfo.CONTENT_TYPE}
                if await self.freshness.ensure(relied, relied):
                    gone.append(out_path)
                    raise BackendError(f"its output {out_path} is gone from the cache (a GC?): uploading it again")
                if not self.freshness.publishable(relied):
                    raise BackendError(f"its output {out_path} could not be kept fresh; trying again")
                signed = r.signed(self.key).render()
                async with asyncio.timeout(self.freshness.bounds.request_timeout):
                    await self.backend.put(key, signed, realisations.CONTENT_TYPE)
                published.append(key)
            except (BackendError, TimeoutError, realisations.RealisationError) as e:
                delay = backoff(attempts + 1, self.cfg.retry_base, self.cfg.retry_max)
                retry[key] = (str(e) or type(e).__name__, time.time() + delay)
                log.warning("realisation %s not published: %s (retry in %.0fs)", key, e, delay)

        await asyncio.gather(*(one(*row) for row in ready))
        if gone:
            await self.queue.forget(gone)
            if self.on_gone is not None:
                self.on_gone()
        await self.queue.finish_realisations(published, retry)
        self.published += len(published)
        if published:
            log.info("published %d realisations", len(published))
        return len(published)

    async def run(self, stopping: asyncio.Event) -> None:
        """Publish what is ready, whenever woken (a plan, an upload) and at least every second."""
        while not stopping.is_set():
            try:
                await self.publish_ready()
            except Exception as e:  # the queue or the cache: try again later
                log.error("publishing realisations: %s", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), IDLE_POLL)
            self.wake.clear()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(16 << 20)


def drvs_of(drvs: Iterable[str | None], outs: Iterable[str] = ()) -> list[str]:
    """The .drv files a batch of requests names: their DRV_PATHs, and .drv paths given as outputs."""
    return list(dict.fromkeys([*(d for d in drvs if d), *(p for p in outs if p.endswith(".drv"))]))
