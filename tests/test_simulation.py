"""Seeded simulations of uploaders and GC racing on one bucket (see tests/sim.py), in virtual time.

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

from hookd import gc, narinfo
from hookd.backends import Backend
from hookd.safety import Bounds

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


async def old_sweep(backend: Backend, snap: gc.Snapshot, plan: gc.GcPlan, bounds: Bounds) -> None:
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
