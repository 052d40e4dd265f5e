"""The path lifecycle in the real sqlite queue, and how the scheduler classifies failed attempts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hookd.backends import BackendError, PermanentBackendError
from hookd.lifecycle import BLOCKED, DONE, FAILED, PENDING, UPLOADING
from hookd.pathinfo import PathInfo
from hookd.queue import Outcome, Queue
from hookd.scheduler import classify
from hookd.upload import NarMismatchError, ReferenceGone

STORE = "/nix/store"
A = f"{STORE}/{'a' * 32}-a"
B = f"{STORE}/{'b' * 32}-b"
C = f"{STORE}/{'c' * 32}-c"


def info(path: str, *refs: str) -> PathInfo:
    return PathInfo(path, b"\0" * 32, 8, tuple(sorted(refs)))


CLOSURE = {A: info(A), B: info(B, A), C: info(C, B)}  # c -> b -> a


async def states(q: Queue) -> dict[str, str]:
    return {p: str((await q.path_row(p) or {})["state"]) for p in CLOSURE}


@pytest.fixture
async def queue(tmp_path: Path) -> Queue:
    return await Queue.open(tmp_path / "queue.sqlite", STORE)


async def test_a_stale_plan_never_requeues_a_path_in_flight_or_just_done(queue: Queue) -> None:
    """Defect 2 of issue 12: a plan whose existence checks began before an upload finished found the
    path missing; it must not turn the fresh `done` row back into `pending`."""
    r1 = await queue.add_request(None, [C], "socket")
    await queue.plan([r1], CLOSURE)
    assert [i.path for i in await queue.ready(8)] == [A]
    await queue.start([A])
    checked_before = time.time()
    r2 = await queue.add_request(None, [B], "socket")
    await queue.plan([r2], {A: CLOSURE[A], B: CLOSURE[B]}, checked_at=checked_before)
    assert (await states(queue))[A] == UPLOADING  # in flight: the plan leaves it alone
    await queue.record([Outcome(A, DONE, written=time.time())])
    await queue.plan([r2], {A: CLOSURE[A]}, checked_at=checked_before)  # saw A missing before it was done
    assert (await states(queue))[A] == DONE
    await queue.plan([r2], {A: CLOSURE[A]}, checked_at=time.time() + 1)  # checked after: really missing
    assert (await states(queue))[A] == PENDING


async def test_a_failure_blocks_its_referrers_until_it_is_retried(queue: Queue) -> None:
    rid = await queue.add_request(None, [C], "cli")
    await queue.plan([rid], CLOSURE)
    await queue.start([A])
    await queue.record([Outcome(A, FAILED, "the contents on disk do not match")])
    assert await states(queue) == {A: FAILED, B: BLOCKED, C: BLOCKED}
    status = await queue.request_status(rid)
    assert status is not None and status["state"] == "planned"
    assert status["paths"][C]["error"] == f"blocked by {A} (failed)"  # the root cause, not the next link
    assert await queue.ready(8) == []
    assert await queue.retry([A]) == 1
    assert await states(queue) == {A: PENDING, B: PENDING, C: PENDING}
    # a new request for the closure tries the failed path again, and so unblocks its referrers
    await queue.start([A])
    await queue.record([Outcome(A, FAILED, "refused")])
    assert await states(queue) == {A: FAILED, B: BLOCKED, C: BLOCKED}
    await queue.plan([await queue.add_request(None, [C], "socket")], CLOSURE)
    assert await states(queue) == {A: PENDING, B: PENDING, C: PENDING}
    # a request for a referrer alone, while its reference is failed, is blocked at once
    await queue.start([A])
    await queue.record([Outcome(A, FAILED, "refused")])
    await queue.plan([await queue.add_request(None, [C], "socket")], {C: CLOSURE[C], B: CLOSURE[B]})
    assert await states(queue) == {A: FAILED, B: BLOCKED, C: BLOCKED}


async def test_restart_recovers_uploads_in_flight(tmp_path: Path) -> None:
    q = await Queue.open(tmp_path / "q.sqlite", STORE)
    await q.plan([await q.add_request(None, [A], "socket")], {A: CLOSURE[A]})
    await q.start([A])
    await q.close()  # killed mid-upload
    q = await Queue.open(tmp_path / "q.sqlite", STORE)
    assert await q.recover() == 1
    assert [i.path for i in await q.ready(8)] == [A]
    await q.close()


async def test_stats_only_read_and_the_maintenance_prunes_old_history(queue: Queue) -> None:
    """`hookd status` reads the stats, maybe while the daemon writes: a read must never delete. Old
    history goes when the daemon's maintenance prunes it, and only the old."""
    await queue.plan([await queue.add_request(None, [C], "cli")], CLOSURE)  # one `queued` event a path
    await queue.db.execute("UPDATE events SET time = time - 31 * 86400 WHERE path != ?", (C,))
    await queue.stats()
    assert [len((await queue.path_detail(p) or {})["history"]) for p in (A, B, C)] == [1, 1, 1]
    assert await queue.prune_events() == 2
    assert [len((await queue.path_detail(p) or {})["history"]) for p in (A, B, C)] == [0, 0, 1]
    await queue.close()


def test_classify_failed_attempts() -> None:
    now = time.time()
    gone = classify(C, ReferenceGone(C, [B]), 1, 2.0, 600.0)
    assert gone.state == PENDING and gone.next_try == 0.0  # waits for B, not for a timer
    refused = classify(A, PermanentBackendError("S3 PutObject x: AccessDenied"), 1, 2.0, 600.0)
    assert refused.state == FAILED and "AccessDenied" in str(refused.error) and "retry" in str(refused.error)
    assert classify(A, NarMismatchError("differs"), 1, 2.0, 600.0).state == FAILED
    assert classify(A, FileNotFoundError(2, "gone", A), 1, 2.0, 600.0).state == FAILED
    transient = classify(A, BackendError("HTTP 503"), 3, 2.0, 600.0)
    assert transient.state == PENDING and now <= transient.next_try <= now + 2.0 * 2**3 + 1
