"""`hookd gc`: garbage collection of a throwaway cache, from the lease to the sweep.

One run: take the lease (`lease.py`), take a snapshot of the cache (`snapshot.py`, reading only the
narinfos that changed since the last run), plan (`plan.py`, pure), sweep (`sweep.py`, under the
upload/GC protocol of `safety.py`), so builders may keep uploading meanwhile. A dry run plans only,
and needs no lease.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .backends import Backend
from .catalog import Progress, no_progress
from .lease import Lease
from .plan import plan
from .safety import Bounds
from .snapshot import NarinfoIndex, snapshot
from .sweep import sweep


async def collect(
    backend: Backend,
    state_dir: Path,
    bounds: Bounds,
    *,
    older_than: float,
    max_size: int | None = None,
    lease: float,
    dry_run: bool = False,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """One GC run with `bounds.grace` as its grace period; what it planned and did, as `hookd gc --json` says."""
    if dry_run:  # reads only: no lease needed
        return await _collect(backend, state_dir, bounds, older_than, max_size, dry_run, progress)
    async with Lease(backend, lease, bounds.max_skew):
        return await _collect(backend, state_dir, bounds, older_than, max_size, dry_run, progress)


async def _collect(
    backend: Backend, state_dir: Path, bounds: Bounds, older_than: float, max_size: int | None, dry_run: bool,
    progress: Progress,
) -> dict[str, Any]:  # fmt: skip
    snap = await snapshot(backend, NarinfoIndex.in_state_dir(state_dir, backend.url), progress)
    planned = plan(snap, now=time.time(), older_than=older_than, grace=bounds.grace, max_size=max_size)
    out = {"cache": backend.url, "dry_run": dry_run, "narinfo_reads": snap.narinfo_reads, **planned.to_json()}
    if not dry_run:
        result = await sweep(backend, snap, planned.candidates, bounds, progress)
        out["deleted"] = {
            "objects": result.deleted, "bytes": result.bytes, "spared": result.spared, "not_checked": result.given_up,
        }  # fmt: skip
    return out
