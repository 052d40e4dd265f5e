"""Seeded simulations of uploaders and GC racing on one bucket (see tests/sim.py), in virtual time;
and the daemon's own parts (queue, planner loop, scheduler) with a GC, in-process, in real time.

Each seed builds a random store graph, runs three uploaders pushing random closures and a GC running
again and again with a short grace, over a bucket with request latency and injected faults; the
cache's invariant is checked after every change, and at the end every pushed closure must be in the
cache. `tests/test_simulation.py::test_old_sweep_is_caught` shows the harness finds defect 1 (the
sweep of hookd 0.1) on the same schedules. Soak: `HOOKD_SIM_SEEDS=5000 pytest tests/test_simulation.py`.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from hookd import narinfo
from hookd.backends import Backend
from hookd.plan import GcPlan
from hookd.safety import Bounds
from hookd.snapshot import Snapshot

from .sim import InvariantBroken, SimBucket, Uploader, closure, gc_loop, make_store, run_virtual

VIRTUAL_LIMIT = 3600.0  # seconds of virtual time a scenario may take (it needs about 100)
SEEDS = int(os.environ.get("HOOKD_SIM_SEEDS", "400"))
PUSHES = 16
RETENTION = 40.0  # longer than a closure takes to upload here; shorter than a scenario
BOUNDS = Bounds(grace=12.0, check_to_delete=0.5, request_timeout=1.0, max_skew=0.0).check()


async def scenario(seed: int, root: Path, sweeper: Any = None) -> tuple[SimBucket, list[Uploader], int]:
    rng = random.Random(seed)
    infos = make_store(root, rng, 14)
    bucket = SimBucket(random.Random(seed + 1), apply_within=0.4, answer_within=0.8, fault_rate=0.05)
    uploaders = [Uploader(f"u{i}", bucket, infos, BOUNDS, root / f"staging{i}") for i in range(3)]
    stop = asyncio.Event()
    gc_task = asyncio.create_task(gc_loop(bucket, BOUNDS, RETENTION, stop, random.Random(seed + 2), sweeper))
    paths = list(infos)
    pushed: list[str] = []

    async def builder(u: Uploader, urng: random.Random) -> None:
        for _ in range(PUSHES):
            root_path = urng.choice(paths)
            pushed.append(root_path)
            await u.push(root_path)
            await asyncio.sleep(urng.uniform(0, 20))  # builds come and go: closures age past the grace

    try:
        # every push ends with its root published or found in the cache (nothing accepted is lost),
        # and in bounded time (no livelock between uploaders and GC)
        async with asyncio.timeout(VIRTUAL_LIMIT):
            await asyncio.gather(*(builder(u, random.Random(seed * 10 + i)) for i, u in enumerate(uploaders)))
    finally:
        stop.set()
        runs = await gc_task
    assert len(pushed) == PUSHES * len(uploaders)
    for p in closure(infos, pushed):  # what was published, and is still there, is whole
        if narinfo.narinfo_key(p) in bucket.objects:
            assert all(narinfo.narinfo_key(r) in bucket.objects for r in infos[p].references)
    return bucket, uploaders, runs


def test_uploaders_and_gc_keep_the_cache_whole(tmp_path: Path) -> None:
    total_runs = total_deletes = 0
    for seed in range(SEEDS):
        try:
            bucket, _, runs = run_virtual(scenario(seed, tmp_path / str(seed)))
        except InvariantBroken as e:
            raise AssertionError(f"seed {seed}: {e}") from None
        total_runs += runs
        total_deletes += sum(1 for line in bucket.log if " delete " in line)
    # the schedules really raced: GC ran and deleted a lot while uploaders kept pushing
    assert total_runs > 5 * SEEDS and total_deletes > 3 * SEEDS, (total_runs, total_deletes)


async def old_sweep(backend: Backend, snap: Snapshot, plan: GcPlan, bounds: Bounds) -> None:
    """hookd 0.1's sweep: the plan's narinfos, then its NARs, then the rest, each object's age checked
    on its own right before it goes (defect 1 of issue 12)."""
    for phase in (plan.delete_narinfos, plan.delete_nars, plan.delete_other):
        for key in phase:
            obj = await backend.stat(key)
            if obj is not None and obj.mtime < time.time() - plan.grace:
                await backend.delete(key)


def test_old_sweep_is_caught(tmp_path: Path) -> None:
    """The same harness, with the old sweep: it must find a broken cache on some seed."""
    found = []
    for seed in range(60):
        try:
            run_virtual(scenario(seed, tmp_path / str(seed), old_sweep))
        except InvariantBroken as e:
            found.append((seed, str(e)))
            break
    assert found, "the simulation did not catch the old sweep on any of 60 seeds"


def test_virtual_time_runs_protocol_hours_fast() -> None:
    start = time.monotonic()

    async def sleeper() -> float:
        await asyncio.sleep(3600)
        return time.monotonic()

    assert run_virtual(sleeper()) == pytest.approx(3600)
    assert time.monotonic() - start < 5


class FakeStore:
    """What the planner asks of Nix, answered from the simulated store's graph."""

    def __init__(self, infos: dict[str, Any]) -> None:
        self.infos = infos

    async def closure(self, paths: Any) -> dict[str, Any]:
        return {p: self.infos[p] for p in closure(self.infos, list(paths))}

    async def outputs(self, drvs: Any) -> list[str]:
        return []

    async def read_log(self, drv: str) -> bytes | None:
        return None


@pytest.mark.parametrize("seed", range(3))
async def test_the_daemon_in_process_with_a_gc(tmp_path: Path, seed: int) -> None:
    """The daemon's own parts (queue in sqlite, planner loop, scheduler) and a GC on one event loop,
    against the simulated bucket with latency and faults and a store Nix is replaced in, in real time
    with bounds scaled down: every request ends with its closure in the cache, each path uploaded
    while the GC deletes around it, and the invariant holds after every change."""
    from hookd import planner as planning
    from hookd.config import Config
    from hookd.metrics import Metrics
    from hookd.planner import Planner
    from hookd.queue import Queue
    from hookd.scheduler import Scheduler
    from hookd.signing import SecretKey

    rng = random.Random(seed)
    infos = make_store(tmp_path, rng, 14)
    bucket = SimBucket(random.Random(seed + 1), apply_within=0.02, answer_within=0.03, fault_rate=0.03)
    cfg = Config(cache="sim://bucket", state_dir=tmp_path / "state", store_dir=str(tmp_path / "store"),
                 gc_grace=2.0, gc_check_to_delete=0.05, gc_request_timeout=0.1, max_clock_skew=0.0,
                 retry_base=0.05, retry_max=0.2, recheck_interval=0.5, refresh_interval=0.5).validate()  # fmt: skip
    cfg.state_dir.mkdir()
    queue = await Queue.open(cfg.db_path, cfg.store_dir)
    metrics = Metrics()
    scheduler = Scheduler(cfg, queue, bucket, SecretKey.generate("sim-1"), metrics)
    # the planner tells the uploads which narinfos it found absent, as in the daemon
    planner = Planner(cfg, queue, FakeStore(infos), bucket, metrics, scheduler.freshness)  # type: ignore[arg-type]
    stopping, wake, gc_stop = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def no_spool() -> int:
        return 0

    parts = [
        asyncio.create_task(planning.run(planner, stopping, wake, no_spool, scheduler.wake.set)),
        asyncio.create_task(scheduler.run(stopping)),
    ]
    gc_task = asyncio.create_task(gc_loop(bucket, cfg.bounds, 2.5, gc_stop, random.Random(seed + 2), pause=0.3))
    paths = list(infos)

    async def idle() -> None:
        async with asyncio.timeout(30):  # every request planned, nothing left to upload
            while (counts := await queue.counts())["requests"] or counts["pending"] or counts["uploading"]:
                await asyncio.sleep(0.05)

    requested: list[str] = []
    try:
        for _ in range(30):  # builds come and go for a few grace periods
            requested.append(rng.choice(paths))
            await queue.add_request(None, [requested[-1]], "socket")
            wake.set()
            await asyncio.sleep(rng.uniform(0, 0.7))
        gc_stop.set()
        assert await gc_task > 3
        await idle()
        # what the GC took since is uploaded again when asked for (`hookd push`: checked against the cache)
        await queue.add_request(None, sorted(set(requested)), "cli")
        wake.set()
        await idle()
    finally:
        stopping.set()
        wake.set()
        scheduler.wake.set()
        await asyncio.gather(*parts, return_exceptions=True)
        await planner.close()
        await queue.close()
    assert not bucket.violations, bucket.violations[:3]
    assert any(" delete " in line for line in bucket.log), "the GC deleted nothing: no race happened"
    for p in closure(infos, requested):
        assert narinfo.narinfo_key(p) in bucket.objects, f"{p} was accepted but is not in the cache"
