"""Planning: from hook requests to the set of paths that really need uploading.

A request names outputs (or a .drv whose outputs are wanted). The planner expands them to their closure
with one `nix path-info` call per batch, then drops, cheapest test first:
1. paths the local state records as in the cache (no network; re-checked after `recheck_interval`);
2. paths signed in the local store by an upstream cache's key (no network);
3. paths the cache already holds (narinfo existence checks, concurrent and bounded);
4. paths an upstream cache holds, signed by its key (asked through its narinfo, answers kept for TTLs).
What remains is queued. Requested outputs that were already cached have their narinfo's age reset (at
most once per `refresh_interval`), so GC retention measures when a path was last needed.

Before each batch it reads the cache's identity marker: a cache that was emptied, recreated or swapped
has a new (or no) marker, and everything recorded about the old one is forgotten, so the cache is
refilled instead of silently skipped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from . import encoding, narinfo
from .backends import Backend, BackendError, open_backend
from .backends.retry import backoff
from .config import Config
from .freshness import Freshness
from .metrics import Metrics
from .pathinfo import PathInfo
from .publish import Realisations, drvs_of
from .queue import Queue, Request
from .signing import KeyFileError, PublicKey
from .store import InvalidPathError, Store, StoreError

log = logging.getLogger("hookd")

IDENTITY_KEY = "hookd-cache-id"
SPOOL_POLL = 5.0


class TrustedKeys:
    """Upstream keys given as bare names (`cache.nixos.org-1`) or full public keys (`name:base64`)."""

    def __init__(self, specs: Iterable[str]) -> None:
        self.names: set[str] = set()
        self.keys: dict[str, PublicKey] = {}
        for spec in specs:
            if ":" in spec:
                try:
                    key = PublicKey.parse(spec)
                except KeyFileError as e:
                    raise ValueError(f"upstream key {spec[:40]!r}: {e}") from None
                self.keys[key.name] = key
            else:
                self.names.add(spec)

    def __bool__(self) -> bool:
        return bool(self.names or self.keys)

    def signed(self, fingerprint: str, sigs: Iterable[str]) -> bool:
        for sig in sigs:
            name = sig.partition(":")[0]
            if name in self.keys:
                if self.keys[name].verify(fingerprint, sig):
                    return True
            elif name in self.names:
                return True
        return False


class Upstream:
    """An upstream cache asked whether it holds a path (its narinfo, with a trusted signature)."""

    def __init__(self, backend: Backend, keys: TrustedKeys) -> None:
        self.backend = backend
        self.keys = keys

    async def has(self, info: PathInfo) -> bool:
        data = await self.backend.get(narinfo.narinfo_key(info.path))
        if data is None:
            return False
        try:
            ni = narinfo.parse(data)
        except narinfo.NarInfoError:
            return False
        if ni.store_path != info.path or ni.nar_hash != info.nar_hash:
            return False
        return self.keys.signed(ni.fingerprint(), ni.sigs)


@dataclass
class Plan:
    closure: dict[str, PathInfo]
    known: set[str]
    present: set[str]
    upstream: set[str]

    @property
    def to_upload(self) -> int:
        return len(self.closure) - len(self.known | self.present | self.upstream)


LISTING_GAIN = 50
"""A listing replaces per-path existence checks when each of its requests answers for this many paths."""


class Planner:
    def __init__(
        self,
        cfg: Config,
        queue: Queue,
        store: Store,
        backend: Backend,
        metrics: Metrics | None = None,
        freshness: Freshness | None = None,
    ) -> None:
        self.cfg = cfg
        self.freshness = freshness  # told which narinfos were found absent: their uploads need not ask again
        self.metrics = metrics or Metrics()
        self.queue = queue
        self.store = store
        self.backend = backend
        self.keys = TrustedKeys(cfg.upstream_keys if cfg.skip_upstream else ())
        self.upstreams = [
            Upstream(open_backend(url, cfg), self.keys) for url in (cfg.upstream_caches if cfg.skip_upstream else ())
        ]
        self.gate = asyncio.Semaphore(cfg.existence_concurrency)
        self.identity: str | None = None
        self.new_cache = False  # set when the identity changed; the daemon rewrites nix-cache-info
        self.on_gone: Callable[[], None] | None = None  # paths were queued again: wake the scheduler
        self.realisations: Realisations | None = None  # set by the daemon when it publishes realisations
        self._rechecks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in list(self._rechecks):
            task.cancel()
        for u in self.upstreams:
            await u.backend.close()

    # --- identity -----------------------------------------------------------------------------------

    async def check_identity(self) -> None:
        """Read the cache's identity marker (writing one if missing); note it in `new_cache` if the cache
        is new to us (emptied, recreated or swapped)."""
        data = await self.backend.get(IDENTITY_KEY)
        identity = data.decode(errors="replace").strip() if data else ""
        if not identity:
            identity = uuid.uuid4().hex
            await self.backend.put(IDENTITY_KEY, (identity + "\n").encode(), "text/plain; charset=utf-8")
        known = self.identity or await self.queue.get_meta("cache_id")
        self.identity = identity
        if known == identity:
            return
        if known is not None:
            log.warning(
                "cache %s has a new identity (emptied, recreated or replaced): forgetting what it held",
                self.backend.url,
            )
        await self.queue.set_cache_identity(identity)
        if self.freshness is not None:  # nothing written to the old cache may be relied on
            self.freshness.forget()
        self.new_cache = True

    # --- planning -----------------------------------------------------------------------------------

    async def plan(self, reqs: Sequence[Request]) -> Plan | None:
        """Plan a batch; None when nothing could be planned now (errors are recorded on the requests)."""
        try:
            await self.check_identity()
            return await self._plan(reqs)
        except InvalidPathError as e:
            if len(reqs) > 1:
                for r in reqs:  # find the bad request without holding up the good ones
                    await self.plan([r])
                return None
            log.error("request %d failed: %s", reqs[0].id, e)
            await self.queue.fail_request(reqs[0].id, str(e))
        except (StoreError, BackendError) as e:
            delay = backoff(min(r.attempts for r in reqs), self.cfg.retry_base, self.cfg.retry_max)
            log.warning("cannot plan %d requests yet: %s (retry in %.0fs)", len(reqs), e, delay)
            await self.queue.retry_requests([r.id for r in reqs], str(e), time.time() + delay)
        return None

    async def _plan(self, reqs: Sequence[Request]) -> Plan:
        if self.realisations is not None:  # before the shortcut below: a rebuilt CA output may be cached
            await self.realisations.plan(drvs_of((r.drv for r in reqs), (p for r in reqs for p in r.outs)))
        reqs = await self._plan_recorded(reqs)
        if not reqs:
            return Plan({}, set(), set(), set())
        started = time.monotonic()
        roots = await self._roots(reqs)
        closure = await self.store.closure(dict.fromkeys(roots)) if roots else {}
        checked_at, asked = time.time(), time.monotonic()
        # `hookd push` asks for certainty: its closure is checked against the cache, not local records
        trust = 0.0 if any(r.source == "cli" for r in reqs) else self.cfg.recheck_interval
        known, present, upstream = await self._locate(closure, trust)
        located = time.monotonic()
        await self.queue.plan(
            [r.id for r in reqs], closure, {**dict.fromkeys(known, 0.0), **present}, upstream, checked_at
        )
        queued = time.monotonic()
        # Keep young what was asked for again (GC retention counts from the last need); references
        # of new uploads are touched, if need be, right before their referrer is published.
        await self.refresh(p for p in roots if p in known or p in present)
        plan = Plan(closure, known, set(present), upstream)
        self.metrics.dedup_hits.labels("local state").inc(len(known))
        self.metrics.dedup_hits.labels("cache").inc(len(present))
        self.metrics.upstream_skips.inc(len(upstream))
        if self.cfg.upload_build_logs:
            await self._upload_logs([r.drv for r in reqs if r.drv])
        log.info(
            "planned %d requests: closure of %d paths; %d recorded, %d already in the cache, %d upstream; "
            "%d to upload (in %.3fs: store %.3fs, cache %.3fs, queue %.3fs)",
            len(reqs), len(closure), len(known), len(present), len(upstream), plan.to_upload,
            time.monotonic() - started, asked - started, located - asked, queued - located,
        )  # fmt: skip
        return plan

    async def _plan_recorded(self, reqs: Sequence[Request]) -> list[Request]:
        """Plan at once the requests that name only outputs recorded as cached (their closures went up
        before them); the other requests, to be planned the long way."""
        quick = [r for r in reqs if r.outs and len(r.outs) <= 1000 and r.source != "cli"]
        recorded = await self.queue.known_uploaded({p for r in quick for p in r.outs}, self.cfg.recheck_interval)
        done = [r for r in quick if set(r.outs) <= recorded]
        if not done:
            return list(reqs)
        gone = await self.refresh({p for r in done for p in r.outs})
        done = [r for r in done if not gone & set(r.outs)]  # those go the long way
        await self.queue.plan([r.id for r in done], {})
        if done:
            log.info("%d requests name only paths already in the cache", len(done))
        return [r for r in reqs if r not in done]

    async def _locate(
        self, closure: dict[str, PathInfo], trust: float
    ) -> tuple[set[str], dict[str, float], set[str]]:
        """Where the closure's paths are: recorded as cached within `trust` seconds, found in the cache
        (with their narinfo's last-modified time), or left to an upstream cache."""
        known = await self.queue.known_uploaded(closure, trust) if trust else set()
        upstream = {p for p, i in closure.items() if p not in known and self._signed_upstream(i)}
        unknown = [i for p, i in closure.items() if p not in known and p not in upstream]
        present = await self._present(unknown)
        if self.upstreams:
            upstream |= await self._in_upstream([i for i in unknown if i.path not in present])
        return known, present, upstream

    async def _upload_logs(self, drvs: Sequence[str]) -> None:
        """Put each build log at log/<drv basename>, where `nix log` looks for it through the Deriver."""
        for drv in drvs:
            key = f"log/{drv.rsplit('/', 1)[-1]}"
            try:
                text = await self.store.read_log(drv)
                if text is not None and not await self.backend.exists(key):
                    body, enc = encoding.encode(key, text, self.cfg.content_encoding)
                    await self.backend.put(key, body, "text/plain; charset=utf-8", content_encoding=enc)
                    log.info("uploaded the build log of %s", drv)
            except (StoreError, BackendError) as e:
                log.warning("could not upload the build log of %s: %s", drv, e)

    async def _roots(self, reqs: Sequence[Request]) -> list[str]:
        roots: list[str] = []
        drvs: list[str] = []
        for r in reqs:
            if r.outs:
                # A .drv given as a path (`hookd push X.drv`, an older client) means its outputs, as on Nix
                # 2.8; `nix path-info X.drv` would answer for the .drv itself on 2.26+.
                roots.extend(p for p in r.outs if not p.endswith(".drv"))
                drvs.extend(p for p in r.outs if p.endswith(".drv"))
            elif r.drv:
                drvs.append(r.drv)
        if drvs:
            outs = await self.store.outputs(drvs)
            roots.extend(o for o in outs if os.path.lexists(o))
        return roots

    def _signed_upstream(self, info: PathInfo) -> bool:
        if not self.keys or not info.sigs:
            return False
        fingerprint = narinfo.fingerprint(info.path, info.nar_hash, info.nar_size, info.references)
        return self.keys.signed(fingerprint, info.sigs)

    async def _present(self, infos: Sequence[PathInfo]) -> dict[str, float]:
        """Which of these paths the cache already holds, with their narinfo's last-modified time (it
        says whether a GC could soon take it): from a listing of the cache's top level when that takes
        at most one request per LISTING_GAIN paths (S3, a large closure), else one narinfo check each,
        concurrent and bounded."""
        asked = time.monotonic()  # before any question is sent
        keys = {narinfo.narinfo_key(i.path): i.path for i in infos}
        found: dict[str, float] | None = None
        if len(infos) >= 2 * LISTING_GAIN:
            listed = await self.backend.stat_top(keys, len(infos) // LISTING_GAIN)
            if listed is not None:
                found = {keys[k]: obj.mtime for k, obj in listed.items()}

        async def check(key: str, path: str) -> tuple[str, float] | None:
            async with self.gate:
                obj = await self.backend.stat(key)
                return (path, obj.mtime) if obj is not None else None

        if found is None:
            found = dict(f for f in await asyncio.gather(*(check(k, p) for k, p in keys.items())) if f)
        if self.freshness is not None:
            self.freshness.found_absent((k for k, p in keys.items() if p not in found), asked)
        return found

    async def _in_upstream(self, infos: Sequence[PathInfo]) -> set[str]:
        cached = await self.queue.upstream_answers(
            (i.path for i in infos), self.cfg.upstream_positive_ttl, self.cfg.upstream_negative_ttl
        )
        ask = [i for i in infos if i.path not in cached]

        async def check(info: PathInfo) -> tuple[str, bool]:
            async with self.gate:
                for u in self.upstreams:
                    try:
                        if await u.has(info):
                            return info.path, True
                    except BackendError as e:  # an upstream that is down is an upstream without it
                        log.warning("upstream %s: %s", u.backend.url, e)
                return info.path, False

        answers = dict(await asyncio.gather(*(check(i) for i in ask)))
        await self.queue.record_upstream(answers)
        return {p for p, present in {**cached, **answers}.items() if present}

    async def _recheck(self, paths: list[str]) -> None:
        """After the settle time, queue again the refreshed paths a GC deleted anyway (safety.py): a path
        found in the cache was only as good as the GC let it be, until its touch was verified."""
        await asyncio.sleep(self.cfg.bounds.settle)

        async def check(path: str) -> str | None:
            async with self.gate:
                try:
                    return None if await self.backend.stat(narinfo.narinfo_key(path)) else path
                except BackendError:
                    return None  # the next request for it looks again

        gone = [p for p in await asyncio.gather(*(check(p) for p in paths)) if p]
        if gone:
            log.warning("%d paths were deleted by a GC right after their refresh: uploading them again", len(gone))
            await self.queue.forget(gone)
            if self.on_gone is not None:
                self.on_gone()

    async def refresh(self, paths: Iterable[str]) -> set[str]:
        """Reset the narinfo age of cached paths asked for again, at most once per refresh interval.

        Returns the paths found gone (a GC took them): they are forgotten, to be uploaded again.
        """
        due = await self.queue.due_refresh(paths, self.cfg.refresh_interval)
        if not due:
            return set()

        async def touch(path: str) -> tuple[str, bool | None]:
            async with self.gate:
                try:
                    return path, await self.backend.touch(narinfo.narinfo_key(path), narinfo.CONTENT_TYPE)
                except BackendError as e:
                    log.warning("could not refresh %s: %s", path, e)
                    return path, None

        results = await asyncio.gather(*(touch(p) for p in due))
        touched = [p for p, ok in results if ok]
        gone = {p for p, ok in results if ok is False}
        await self.queue.mark_refreshed(touched)
        if touched:  # a GC that checked them before the touch may still delete them: look again later
            task = asyncio.create_task(self._recheck(touched), name="recheck refreshed paths")
            self._rechecks.add(task)
            task.add_done_callback(self._rechecks.discard)
        if touched:
            log.info("refreshed the age of %d cached paths asked for again", len(touched))
        if gone:
            log.warning("%d paths recorded as cached are gone from the cache (GC?): uploading them again", len(gone))
            await self.queue.forget(gone)
        return gone


async def run(
    planner: Planner,
    stopping: asyncio.Event,
    wake: asyncio.Event,
    poll_spool: Callable[[], Awaitable[int]],
    on_planned: Callable[[], None],
) -> None:
    """The planner loop: plan due requests in batches; between them, wait for a wake-up and poll the spool."""
    from .scheduler import wait_event

    while not stopping.is_set():
        try:
            reqs = await planner.queue.due_requests()
            if reqs:
                await planner.plan(reqs)
                on_planned()
                continue
            nxt = await planner.queue.next_request_time()
            timeout = SPOOL_POLL if nxt is None else max(0.05, min(SPOOL_POLL, nxt - time.time()))
            # no delay to gather a burst: the requests that arrive while one batch is planned make the next
            await wait_event(wake, timeout)
            if not stopping.is_set():
                await poll_spool()
        except Exception:
            log.exception("planner error; retrying in %gs", SPOOL_POLL)
            await wait_event(stopping, SPOOL_POLL, clear=False)
