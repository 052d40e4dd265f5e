"""GC's sweep: deleting a plan's candidates while uploaders keep using the cache (hookd/safety.py).

`SweepState` holds the rules and no I/O, so they can be driven by any schedule in tests: narinfos go
referrers first, a narinfo that is spared becomes a root whose closure is spared with it, and NARs
and the other objects are decided only once every narinfo is. `sweep` drives it against a backend,
enforcing the protocol's bounds on each decision.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .backends import Backend, ObjectStat
from .backends.retry import send_before
from .catalog import Catalog, Progress, no_progress
from .safety import Bounds
from .snapshot import Snapshot

log = logging.getLogger("hookd.gc")

CONCURRENCY = 32


class Decision(enum.Enum):
    DELETED = "deleted"
    SPARED = "spared"  # young, changed, given up or failed: it stays, and so does its closure
    GONE = "gone"  # already missing when checked


class SweepState:
    """Which candidates may be decided now, and what each decision implies for the rest.

    A narinfo candidate is ready once every candidate that refers to it is decided. Sparing a
    narinfo spares its whole closure (those rows are decided without a check). Once no narinfo is
    left undecided, `nars` and `others` say which NARs, listings and logs may go.
    """

    def __init__(self, cat: Catalog, candidates: Iterable[int]) -> None:
        self.cat = cat
        self.candidates = set(candidates)
        self.pending_referrers: dict[int, int] = dict.fromkeys(self.candidates, 0)
        for row in self.candidates:
            for ref in cat.refs[row]:
                if ref in self.pending_referrers:
                    self.pending_referrers[ref] += 1
        self.undecided = set(self.candidates)
        self.started: set[int] = set()
        self.decided: dict[int, Decision] = {}

    def ready(self) -> list[int]:
        """Candidates whose every candidate referrer is decided and that are not yet being checked."""
        out = [r for r in self.undecided if self.pending_referrers[r] == 0 and r not in self.started]
        self.started.update(out)
        return sorted(out)

    def decide(self, row: int, decision: Decision) -> None:
        if row not in self.undecided:
            return
        self._settle(row, decision)
        if decision is Decision.SPARED:
            todo = [row]
            while todo:  # the closure of a spared narinfo is spared: a root, as if it had been marked
                for ref in self.cat.refs[todo.pop()]:
                    if ref in self.undecided:
                        self._settle(ref, Decision.SPARED)
                        todo.append(ref)

    def _settle(self, row: int, decision: Decision) -> None:
        self.undecided.discard(row)
        self.decided[row] = decision
        for ref in self.cat.refs[row]:
            if ref in self.pending_referrers:
                self.pending_referrers[ref] -= 1

    def give_up(self) -> None:
        """Spare every candidate not yet decided (the sweep's window closed, or a cycle)."""
        for row in sorted(self.undecided):
            self.decide(row, Decision.SPARED)

    @property
    def done(self) -> bool:
        return not self.undecided

    def deleted_rows(self) -> set[int]:
        return {r for r, d in self.decided.items() if d is not Decision.SPARED}

    def nars(self, listed: Sequence[ObjectStat]) -> list[ObjectStat]:
        """Listed NARs that no narinfo still in the cache points at (malformed ones count: they keep theirs)."""
        assert self.done, "NARs are decided after every narinfo"
        return self.cat.unreferenced_nars(listed, self.deleted_rows())

    def others(self, listed: Sequence[ObjectStat], realisations: Mapping[str, str] | None = None) -> list[ObjectStat]:
        """Listings of narinfos no longer in the cache, build logs only deleted narinfos named, and the
        realisations (key -> output) of outputs no longer in the cache."""
        assert self.done
        gone = self.deleted_rows()
        listings, logs = self.cat.leftovers(listed, gone)
        return listings + logs + self.cat.orphan_realisations(realisations or {}, listed, gone)


@dataclass
class SweepResult:
    deleted: int = 0
    bytes: int = 0
    spared: int = 0  # found young, changed, or not deletable within the bounds: kept, with its closure
    given_up: int = 0  # not checked at all: the sweep's window closed first


class Sweeper:
    """Carries out one sweep: each check, and each delete within `check_to_delete` of its check."""

    def __init__(self, backend: Backend, bounds: Bounds, window_ends: float) -> None:
        self.backend = backend
        self.bounds = bounds
        self.window_ends = window_ends  # time.monotonic() after which nothing more is deleted
        self.gate = asyncio.Semaphore(CONCURRENCY)
        self.result = SweepResult()

    def window_open(self) -> bool:
        return time.monotonic() < self.window_ends

    async def remove(self, key: str, listed_mtime: float) -> Decision:
        """Check one object's age and delete it if it is old and unchanged since the listing."""
        async with self.gate:
            if not self.window_open():
                self.result.given_up += 1
                return Decision.SPARED
            # both bounds count from when the check was sent: the bucket may apply it any time before
            # it answers, and a touch landing just before that must be seen as young
            checked, checked_wall = time.monotonic(), time.time()
            try:
                async with asyncio.timeout(self.bounds.request_timeout):
                    obj = await self.backend.stat(key)
            except Exception as e:
                log.warning("GC: cannot check %s (%s): kept", key, e)
                self.result.spared += 1
                return Decision.SPARED
            if obj is None:
                return Decision.GONE
            # changed since the listing (touched, re-uploaded): a HEAD's time may be the listing's
            # truncated to the second (radosgw), so only a later second counts as a change
            if obj.mtime >= listed_mtime + 1.0 or self.bounds.young(obj.mtime, checked_wall):
                self.result.spared += 1
                return Decision.SPARED
            try:
                with send_before(min(checked + self.bounds.check_to_delete, self.window_ends)):
                    if time.monotonic() > checked + self.bounds.check_to_delete:
                        raise TimeoutError("its age check is too old")
                    async with asyncio.timeout(self.bounds.request_timeout):
                        await self.backend.delete(key)
            except Exception as e:  # it may or may not be gone: either way, what it refers to stays
                log.warning("GC: delete of %s given up (%s): kept, with what it refers to", key, e or type(e).__name__)
                self.result.spared += 1
                return Decision.SPARED
            self.result.deleted += 1
            self.result.bytes += obj.size
            return Decision.DELETED


async def sweep(
    backend: Backend,
    snap: Snapshot,
    candidates: Iterable[int],
    bounds: Bounds,
    progress: Progress = no_progress,
) -> SweepResult:
    """Delete the plan's candidates safely: narinfos referrers first, then NARs, listings and logs."""
    cat = snap.narinfos
    state = SweepState(cat, candidates)
    sweeper = Sweeper(backend, bounds, snap.started + bounds.sweep_window)
    total = len(state.candidates)

    async def decide(row: int) -> None:
        decision = await sweeper.remove(cat.keys[row], cat.mtimes[row])
        state.decide(row, decision)

    running: set[asyncio.Task[None]] = set()
    while not state.done:
        for row in state.ready():
            running.add(asyncio.create_task(decide(row)))
        if not running:  # nothing ready yet nothing running: a reference cycle; keep what is left
            log.warning("GC: %d narinfos refer to each other in a cycle: kept", len(state.undecided))
            state.give_up()
            break
        finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for task in finished:
            task.result()
        progress("deleting narinfos", total - len(state.undecided), total)

    young = time.time() - bounds.grace
    others = state.others(snap.others, snap.realisations)
    for phase, objs in (("NARs", state.nars(snap.nars)), ("listings, logs and realisations", others)):
        old = [o for o in objs if o.mtime < young]
        await asyncio.gather(*(sweeper.remove(o.key, o.mtime) for o in old))
        progress(f"deleting {phase}", len(old), len(old))
    if sweeper.result.given_up:
        log.warning(
            "GC: %d objects were not checked: the sweep may only decide within %.0fs of its listing "
            "(half the grace period less gc_request_timeout); the next run continues",
            sweeper.result.given_up, bounds.sweep_window,
        )  # fmt: skip
    return sweeper.result

