"""The durable upload queue (sqlite in WAL mode, through aiosqlite).

Two tables carry the work. `requests` holds what the hook (or the spool) handed over, committed before
the hook is told "queued"; the planner turns each into `paths` rows (the closure, with its references in
`refs`) in one transaction. A path is ready when it is pending, its retry time has come, and every
reference it has in the queue is done: that is what keeps a referrer's narinfo out of the cache until
all its references are there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sqlite3
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import aiosqlite

from .lifecycle import (
    BLOCKED,
    BLOCKING,
    DONE,
    DROPPED,
    EVENT_OF,
    FAILED,
    PENDING,
    REQUEST_FAILED,
    REQUEST_NEW,
    REQUEST_PLANNED,
    SATISFIED,
    STATES,
    UPLOADING,
    UPSTREAM,
    sql_list,
)
from .pathinfo import PathInfo
from .store import parse_path_info

__all__ = ["BLOCKED", "DONE", "DROPPED", "FAILED", "PENDING", "STATES", "UPLOADING", "UPSTREAM", "Outcome", "Queue"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    drv TEXT,
    outs TEXT NOT NULL,              -- space-separated store paths (may be empty)
    source TEXT NOT NULL,            -- socket, spool, cli
    received REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'new',  -- new, planned, failed (lifecycle.REQUEST_*)
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX IF NOT EXISTS requests_state ON requests(state, next_try);
CREATE TABLE IF NOT EXISTS paths (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,             -- see lifecycle.py
    info TEXT NOT NULL,              -- PathInfo as JSON, read from the store when planned
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    nar_size INTEGER,
    file_size INTEGER
);
CREATE INDEX IF NOT EXISTS paths_state ON paths(state, next_try);
CREATE INDEX IF NOT EXISTS paths_ready ON paths(state, nar_size DESC, id);  -- ready(): in order, stops at its limit
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS uploaded (  -- what the cache (of the identity in meta.cache_id) holds
    path TEXT PRIMARY KEY,
    checked REAL NOT NULL,           -- when we last knew its narinfo was there (uploaded or seen)
    refreshed REAL NOT NULL,         -- when its narinfo's age was last reset
    written REAL NOT NULL DEFAULT 0  -- when this daemon began writing its narinfo (the protocol relies on it)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS upstream (  -- answers of upstream caches, kept for their TTLs
    path TEXT PRIMARY KEY,
    present INTEGER NOT NULL,
    checked REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (  -- what happened to each path, for `hookd queue show` and rates
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    path TEXT NOT NULL,
    event TEXT NOT NULL,             -- queued, uploaded, retry, failed, dropped, requeued
    bytes INTEGER,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_path ON events(path, time);
CREATE INDEX IF NOT EXISTS events_time ON events(event, time);
CREATE TABLE IF NOT EXISTS request_paths (  -- the closure each request planned, for `push --wait`
    request_id INTEGER NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (request_id, path)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS refs (
    path TEXT NOT NULL,
    ref TEXT NOT NULL,
    PRIMARY KEY (path, ref)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS realisations (  -- realisations to publish once their output is in the cache
    key TEXT PRIMARY KEY,            -- the cache key (realisations/….doi, build-trace-v2/….doi)
    out_path TEXT NOT NULL,
    body TEXT NOT NULL,              -- as the store reported it, before hookd's signature
    state TEXT NOT NULL,             -- pending, published
    next_try REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS realisations_state ON realisations(state, out_path);
"""

P = ParamSpec("P")
T = TypeVar("T")

PATH_COLUMNS = ("path", "state", "attempts", "next_try", "last_error", "nar_size", "file_size", "created", "updated")
EVENT_RETENTION = 30 * 86400.0


@dataclass(frozen=True)
class Request:
    id: int
    drv: str | None
    outs: tuple[str, ...]
    source: str
    attempts: int


@dataclass(frozen=True)
class Outcome:
    """How one upload attempt ended, to be recorded in a batch."""

    path: str
    state: str
    error: str | None = None
    next_try: float = 0.0
    nar_size: int | None = None
    file_size: int | None = None
    written: float | None = None  # done: when the narinfo's PUT began (wall clock)


def _serialized(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """One coroutine at a time on the connection: a statement of one must never run inside another's
    transaction (it would be committed, or rolled back, with it)."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        self = args[0]
        assert isinstance(self, Queue)
        async with self._lock:
            return await method(*args, **kwargs)

    return wrapper


def _file_state(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


class Queue:
    """The queue's tables; every method is one statement or one transaction."""

    def __init__(self, db: aiosqlite.Connection, store_dir: str) -> None:
        self.db = db
        self.store_dir = store_dir
        self._lock = asyncio.Lock()
        self._immutable: tuple[Path, tuple[int, int, int]] | None = None

    @classmethod
    async def open_readonly(cls, path: Path, store_dir: str) -> Queue:
        """For the operator CLI: reads, no schema changes, no writes.

        A WAL database is read through its -shm index, which the first reader creates. A member of the
        daemon's group cannot create it in the 0750 state directory, so when the daemon has stopped cleanly
        (no -wal left) the file is opened `immutable=1` instead: no -shm, no locks. That is sound because
        while there is no -wal file the main file holds every commit and nothing writes to it: a writer
        creates the -wal first and changes the main file only when it checkpoints. `unchanged()` tells
        afterwards whether this still held during the read (no -wal appeared; same inode, size and mtime),
        and the operator CLI reads again if not.
        """
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (has the daemon ever run with this state directory?)")
        uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
        db = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        snapshot = None
        try:
            await db.execute("PRAGMA busy_timeout=10000")
            await db.execute_fetchall("SELECT COUNT(*) FROM sqlite_master")  # opens the WAL index
        except sqlite3.OperationalError:
            await db.close()
            if os.path.exists(f"{path}-wal") or os.access(path.parent, os.W_OK):
                raise  # not the case above: a daemon running or crashed, or another problem
            snapshot = _file_state(path)
            db = await aiosqlite.connect(uri + "&immutable=1", uri=True, isolation_level=None)
        queue = cls(db, store_dir)
        queue._immutable = (path, snapshot) if snapshot else None
        return queue

    def unchanged(self) -> bool:
        """False if this queue was read as immutable and the file has changed since (see open_readonly)."""
        if self._immutable is None:
            return True
        path, before = self._immutable
        return not os.path.exists(f"{path}-wal") and _file_state(path) == before

    @classmethod
    async def open(cls, path: Path, store_dir: str) -> Queue:
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA busy_timeout=10000")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.executescript(SCHEMA)
        columns = {r[1] for r in await db.execute_fetchall("PRAGMA table_info(uploaded)")}
        if "written" not in columns:  # a queue made by hookd 0.1
            await db.execute("ALTER TABLE uploaded ADD COLUMN written REAL NOT NULL DEFAULT 0")
        return cls(db, store_dir)

    async def close(self) -> None:
        await self.db.close()

    @contextlib.asynccontextmanager
    async def _transaction(self, durable: bool = True) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on any error (the caller holds the queue's lock).

        Not `durable`: committed without waiting for the disk (synchronous=NORMAL: a kill -9 loses
        nothing, a power cut may lose this transaction, never corrupts). Only for what can be lost
        that way: what the hook handed over and what a plan queued are always durable (FULL).
        """
        if not durable:
            await self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
            await self.db.execute("COMMIT")
        finally:
            if not durable:
                await self.db.execute("PRAGMA synchronous=FULL")

    async def recover(self) -> int:
        """At start-up: uploads that were in flight when the daemon died are pending again."""
        cur = await self.db.execute(f"UPDATE paths SET state = '{PENDING}' WHERE state = '{UPLOADING}'")
        return cur.rowcount

    # --- requests -----------------------------------------------------------------------------------

    @_serialized
    async def add_request(self, drv: str | None, outs: Sequence[str], source: str) -> int:
        """Record a request durably; once this returns, the paths will be uploaded."""
        cur = await self.db.execute(
            "INSERT INTO requests (drv, outs, source, received) VALUES (?, ?, ?, ?)",
            (drv, " ".join(outs), source, time.time()),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    @_serialized
    async def due_requests(self, limit: int = 200) -> list[Request]:
        rows = await self.db.execute_fetchall(
            f"SELECT id, drv, outs, source, attempts FROM requests WHERE state = '{REQUEST_NEW}' AND next_try <= ? "
            "ORDER BY id LIMIT ?",
            (time.time(), limit),
        )
        return [Request(r[0], r[1], tuple(r[2].split()), r[3], r[4]) for r in rows]

    async def _scalar(self, sql: str, args: tuple[object, ...] = ()) -> Any:
        cur = await self.db.execute(sql, args)
        row = await cur.fetchone()
        return row[0] if row else None

    @_serialized
    async def next_request_time(self) -> float | None:
        value = await self._scalar(f"SELECT MIN(next_try) FROM requests WHERE state = '{REQUEST_NEW}'")
        return float(value) if value is not None else None

    @_serialized
    async def retry_requests(self, ids: Iterable[int], error: str, next_try: float) -> None:
        await self.db.executemany(
            "UPDATE requests SET attempts = attempts + 1, error = ?, next_try = ? WHERE id = ?",
            [(error, next_try, i) for i in ids],
        )

    @_serialized
    async def fail_request(self, request_id: int, error: str) -> None:
        await self.db.execute(
            f"UPDATE requests SET state = '{REQUEST_FAILED}', error = ? WHERE id = ?", (error, request_id)
        )

    @_serialized
    async def plan(
        self,
        request_ids: Iterable[int],
        infos: dict[str, PathInfo],
        present: Mapping[str, float] | Iterable[str] = (),
        upstream: Iterable[str] = (),
        checked_at: float | None = None,
    ) -> int:
        """Queue a planned closure and mark the requests planned, in one transaction.

        `infos` is the whole closure; paths in `present` are already in the cache (with the narinfo's
        last-modified time, where known) and those in `upstream` are left to an upstream cache: both
        are recorded as satisfied, not uploaded. Every other path is (re)queued as pending, except
        one being uploaded and one that became done after `checked_at` (when the plan's existence
        checks began): the plan could not have seen those. Returns how many paths were queued.
        """
        now = time.time()
        since = now if checked_at is None else checked_at
        ages = dict(present) if isinstance(present, Mapping) else dict.fromkeys(present, 0.0)
        present, upstream = set(ages), set(upstream)
        rows = [
            (
                p,
                DONE if p in present else UPSTREAM if p in upstream else PENDING,
                json.dumps(i.to_json()),
                i.nar_size,
                now,
                now,
            )
            for p, i in infos.items()
        ]
        queued = [r[0] for r in rows if r[1] == PENDING]
        async with self._transaction() as db:
            await db.executemany(
                "INSERT INTO events (time, path, event) SELECT ?, ?, 'queued' WHERE NOT EXISTS "
                f"(SELECT 1 FROM paths WHERE path = ? AND (state IN {sql_list((PENDING, UPLOADING))} "
                f"OR (state = '{DONE}' AND updated >= ?)))",
                [(now, p, p, since) for p in queued],
            )
            await db.executemany(
                "INSERT INTO paths (path, state, info, nar_size, created, updated) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(path) DO UPDATE SET state = excluded.state, attempts = 0, next_try = 0, "
                "last_error = NULL, info = excluded.info, nar_size = excluded.nar_size, updated = excluded.updated "
                f"WHERE paths.state != excluded.state AND paths.state != '{UPLOADING}' "
                f"AND NOT (paths.state = '{DONE}' AND paths.updated >= ?)",
                [(*r, since) for r in rows],
            )
            await db.executemany(
                "INSERT OR IGNORE INTO refs (path, ref) VALUES (?, ?)",
                [(p, r) for p, i in infos.items() for r in i.references if r != p],
            )
            await db.executemany(
                "INSERT INTO uploaded (path, checked, refreshed) VALUES (?, ?, ?) "
                "ON CONFLICT(path) DO UPDATE SET checked = excluded.checked, "
                "refreshed = MAX(refreshed, excluded.refreshed)",
                [(p, now, ages[p]) for p in present],
            )
            ids = list(request_ids)
            await db.executemany(
                "INSERT OR IGNORE INTO request_paths (request_id, path) VALUES (?, ?)",
                [(i, p) for i in ids for p in infos],
            )
            await db.executemany(
                f"UPDATE requests SET state = '{REQUEST_PLANNED}', error = NULL WHERE id = ?", [(i,) for i in ids]
            )
            await self._block_referrers(queued, now)
        return len(queued)

    @_serialized
    async def get_meta(self, key: str) -> str | None:
        value = await self._scalar("SELECT value FROM meta WHERE key = ?", (key,))
        return str(value) if value is not None else None

    @_serialized
    async def set_cache_identity(self, identity: str) -> None:
        """A different cache (or the same one emptied): forget everything we knew it held."""
        async with self._transaction() as db:
            await db.execute("DELETE FROM uploaded")
            await db.execute("UPDATE realisations SET state = 'pending', attempts = 0, next_try = 0")
            await db.execute(
                "INSERT INTO meta (key, value) VALUES ('cache_id', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (identity,),
            )

    @_serialized
    async def known_uploaded(self, paths: Iterable[str], max_age: float) -> set[str]:
        """The paths recorded in the cache within `max_age` seconds (no network needed for those)."""
        return await self._select_paths(
            "SELECT path FROM uploaded WHERE checked >= ? AND path IN ", paths, time.time() - max_age
        )

    @_serialized
    async def due_refresh(self, paths: Iterable[str], interval: float) -> set[str]:
        """Of `paths` (in the cache), those whose narinfo age was not reset within `interval` seconds."""
        return await self._select_paths(
            "SELECT path FROM uploaded WHERE refreshed < ? AND path IN ", paths, time.time() - interval
        )

    @_serialized
    async def mark_refreshed(self, paths: Iterable[str]) -> None:
        now = time.time()
        await self.db.executemany(
            "INSERT INTO uploaded (path, checked, refreshed) VALUES (?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET checked = excluded.checked, refreshed = excluded.refreshed",
            [(p, now, now) for p in paths],
        )

    @_serialized
    async def forget(self, paths: Iterable[str]) -> int:
        """These paths turned out to be gone from the cache (a GC took them): queue them again.
        Returns how many were queued again."""
        rows = [(p,) for p in paths]
        await self.db.executemany("DELETE FROM uploaded WHERE path = ?", rows)
        cur = await self.db.executemany(
            f"UPDATE paths SET state = '{PENDING}', attempts = 0, next_try = 0 WHERE path = ? AND state = '{DONE}'",
            rows,
        )
        return max(0, cur.rowcount)

    @_serialized
    async def add_realisations(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """Queue (key, out path, body) realisations; one already queued with the same body keeps its state."""
        async with self._transaction() as db:
            await db.executemany(
                "INSERT INTO realisations (key, out_path, body, state) VALUES (?, ?, ?, 'pending') "
                "ON CONFLICT(key) DO UPDATE SET out_path = excluded.out_path, body = excluded.body, "
                "state = CASE WHEN realisations.body = excluded.body THEN realisations.state ELSE 'pending' END",
                list(rows),
            )

    @_serialized
    async def ready_realisations(self, limit: int = 100) -> list[tuple[str, str, str, int]]:
        """Pending realisations whose output the cache holds (by our records): (key, out path, body, attempts)."""
        rows = await self.db.execute_fetchall(
            "SELECT r.key, r.out_path, r.body, r.attempts FROM realisations r JOIN uploaded u ON u.path = r.out_path "
            "WHERE r.state = 'pending' AND r.next_try <= ? ORDER BY r.key LIMIT ?",
            (time.time(), limit),
        )
        return [(str(k), str(p), str(b), int(a)) for k, p, b, a in rows]

    @_serialized
    async def finish_realisations(self, published: Iterable[str], retry: Mapping[str, tuple[str, float]]) -> None:
        """Record published realisations, and those to try again (key -> (error, when))."""
        async with self._transaction() as db:
            await db.executemany(
                "UPDATE realisations SET state = 'published', last_error = NULL WHERE key = ?",
                [(k,) for k in published],
            )
            await db.executemany(
                "UPDATE realisations SET attempts = attempts + 1, last_error = ?, next_try = ? WHERE key = ?",
                [(err, when, k) for k, (err, when) in retry.items()],
            )

    @_serialized
    async def written_since(self, since: float) -> dict[str, float]:
        """Paths whose narinfo this daemon wrote after `since` (wall clock), and when: what it may rely
        on after a restart without touching it again (hookd/safety.py)."""
        rows = await self.db.execute_fetchall("SELECT path, written FROM uploaded WHERE written > ?", (since,))
        return {r[0]: r[1] for r in rows}

    @_serialized
    async def upstream_references(self, path: str) -> set[str]:
        """The references of `path` left to an upstream cache (not in ours: nothing to touch there)."""
        rows = await self.db.execute_fetchall(
            f"SELECT r.ref FROM refs r JOIN paths q ON q.path = r.ref WHERE r.path = ? AND q.state = '{UPSTREAM}'",
            (path,),
        )
        return {r[0] for r in rows}

    @_serialized
    async def upstream_answers(self, paths: Iterable[str], positive_ttl: float, negative_ttl: float) -> dict[str, bool]:
        """Cached upstream answers still within their TTL."""
        out: dict[str, bool] = {}
        now = time.time()
        for chunk in _chunks(list(paths)):
            marks = ",".join("?" * len(chunk))
            rows = await self.db.execute_fetchall(
                f"SELECT path, present, checked FROM upstream WHERE path IN ({marks})", chunk
            )
            for path, present, checked in rows:
                if now - checked < (positive_ttl if present else negative_ttl):
                    out[path] = bool(present)
        return out

    @_serialized
    async def record_upstream(self, answers: dict[str, bool]) -> None:
        now = time.time()
        await self.db.executemany(
            "INSERT INTO upstream (path, present, checked) VALUES (?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET present = excluded.present, checked = excluded.checked",
            [(p, int(v), now) for p, v in answers.items()],
        )

    async def _select_paths(self, sql: str, paths: Iterable[str], arg: float) -> set[str]:
        return {r[0] for r in await self._rows(sql, paths, arg)}

    # --- paths --------------------------------------------------------------------------------------

    @_serialized
    async def ready(self, limit: int, exclude: Iterable[str] = ()) -> list[PathInfo]:
        """Pending paths whose retry time has come and whose references are all satisfied, largest first
        (a large NAR started last would be the tail of a closure's upload; small ones fill around it)."""
        return await self._ready(limit, exclude)

    @_serialized
    async def advance(self, outcomes: Sequence[Outcome], limit: int, exclude: Iterable[str] = ()) -> list[PathInfo]:
        """The scheduler's step in one transaction: record these outcomes, then start (mark uploading)
        up to `limit` ready paths, not those in `exclude`, and return them.

        Not durable (see _transaction): after a power cut, outcomes lost this way are attempts that
        happen again (an upload done twice finds its narinfo there, or writes the same bytes again;
        a lost `written` time only makes the protocol touch what it could have relied on), and a lost
        start leaves the path pending, as recover() makes every uploading path at start-up anyway.
        One commit per step instead of one per path (each a wait for the disk: ~1 ms here).
        """
        now = time.time()
        async with self._transaction(durable=False):
            if outcomes:
                await self._record(outcomes, now)
            ready = await self._ready(limit, exclude) if limit > 0 else []
            await self._start([i.path for i in ready], now)
        return ready

    async def _ready(self, limit: int, exclude: Iterable[str]) -> list[PathInfo]:
        excluded = set(exclude)
        rows = await self.db.execute_fetchall(
            # `+next_try`: filtered, not searched by, so paths_ready gives the order and the scan stops at
            # the limit (0.01 ms) instead of sorting every pending path each step (1 ms per 1000)
            f"SELECT p.path, p.info FROM paths p WHERE p.state = '{PENDING}' AND +p.next_try <= ? "
            "AND NOT EXISTS (SELECT 1 FROM refs r JOIN paths q ON q.path = r.ref "
            f"                WHERE r.path = p.path AND q.state NOT IN {sql_list(SATISFIED)}) "
            "ORDER BY p.nar_size DESC NULLS LAST, p.id LIMIT ?",
            (time.time(), limit + len(excluded)),
        )
        out = []
        for path, info in rows:
            if path in excluded:
                continue
            out.append(parse_path_info([json.loads(info)], self.store_dir)[path])
            if len(out) == limit:
                break
        return out

    @_serialized
    async def start(self, paths: Sequence[str]) -> None:
        """These pending paths are being uploaded now: no plan may queue them again meanwhile."""
        async with self._transaction(durable=False):
            await self._start(paths, time.time())

    async def _start(self, paths: Sequence[str], now: float) -> None:
        await self.db.executemany(
            f"UPDATE paths SET state = '{UPLOADING}', updated = ? WHERE path = ? AND state = '{PENDING}'",
            [(now, p) for p in paths],
        )

    @_serialized
    async def next_path_time(self) -> float | None:
        value = await self._scalar(f"SELECT MIN(next_try) FROM paths WHERE state = '{PENDING}'")
        return float(value) if value is not None else None

    @_serialized
    async def record(self, outcomes: Sequence[Outcome]) -> None:
        """Record a batch of attempt outcomes in one transaction; a failure blocks the path's referrers."""
        if not outcomes:
            return
        async with self._transaction(durable=False):
            await self._record(outcomes, time.time())

    async def _record(self, outcomes: Sequence[Outcome], now: float) -> None:
        db = self.db
        await db.executemany(
            "UPDATE paths SET state = ?, last_error = ?, next_try = ?, updated = ?, "
            f"attempts = attempts + (CASE WHEN ? = '{DONE}' THEN 0 ELSE 1 END), "
            "nar_size = COALESCE(?, nar_size), file_size = COALESCE(?, file_size) WHERE path = ?",
            [(o.state, o.error, o.next_try, now, o.state, o.nar_size, o.file_size, o.path) for o in outcomes],
        )
        await db.executemany(
            "INSERT INTO events (time, path, event, bytes, detail) VALUES (?, ?, ?, ?, ?)",
            [(now, o.path, EVENT_OF.get(o.state, "retry"), o.file_size, o.error) for o in outcomes],
        )
        await db.executemany(
            "INSERT INTO uploaded (path, checked, refreshed, written) VALUES (?, ?, ?2, ?) "
            "ON CONFLICT(path) DO UPDATE SET checked = excluded.checked, refreshed = excluded.refreshed, "
            "written = excluded.written",
            [(o.path, now, o.written or 0.0) for o in outcomes if o.state == DONE],
        )
        await self._block_referrers([o.path for o in outcomes if o.state in BLOCKING], now)

    async def _block_referrers(self, paths: Iterable[str], now: float) -> None:
        """Block the queued referrers (transitively) of these paths, if they are failed, dropped or
        blocked; and these paths themselves if one of their references is. Inside a transaction.

        A few statements per round, whatever the number of paths (a plan queues whole closures): each
        round checks the paths found so far, then goes on to the referrers of those that block. None
        at all while no path blocks (the usual plan): one look at the state index, not two queries per
        thousand paths."""
        todo, expanded = set(paths), set()
        if todo and await self._scalar(f"SELECT 1 FROM paths WHERE state IN {sql_list(BLOCKING)} LIMIT 1") is None:
            return
        while todo:
            states = await self._rows("SELECT path, state FROM paths WHERE path IN ", todo)
            causes: dict[str, tuple[str, str, str | None]] = {}
            for path, ref, ref_state, ref_error in await self._rows(
                "SELECT r.path, q.path, q.state, q.last_error FROM refs r JOIN paths q ON q.path = r.ref "
                f"WHERE r.ref != r.path AND q.state IN {sql_list(BLOCKING)} AND r.path IN ",
                [p for p, state in states if state in (PENDING, BLOCKED)],
            ):
                causes.setdefault(path, (ref, ref_state, ref_error))
            blocking = []
            for path, state in states:
                if path in causes and state == PENDING:
                    ref, ref_state, ref_error = causes[path]
                    root = ref_error if ref_state == BLOCKED and ref_error else f"blocked by {ref} ({ref_state})"
                    await self.db.execute(
                        f"UPDATE paths SET state = '{BLOCKED}', last_error = ?, updated = ? WHERE path = ?",
                        (root, now, path),
                    )
                    await self.db.execute(
                        "INSERT INTO events (time, path, event, detail) VALUES (?, ?, 'blocked', ?)", (now, path, root)
                    )
                    state = BLOCKED
                if state in BLOCKING and path not in expanded:
                    blocking.append(path)
            expanded.update(blocking)
            # a referrer checked before one of its references was blocked in this round is checked again
            todo = {r for (r,) in await self._rows("SELECT path FROM refs WHERE path != ref AND ref IN ", blocking)}

    async def _rows(self, sql: str, paths: Iterable[str], *args: object) -> list[tuple[Any, ...]]:
        """`sql` ending in `IN `, for these paths, with `args` before them (in chunks: SQLite bounds a
        statement's parameters)."""
        out: list[tuple[Any, ...]] = []
        for chunk in _chunks(list(paths)):
            rows = await self.db.execute_fetchall(sql + f"({','.join('?' * len(chunk))})", (*args, *chunk))
            out.extend(tuple(r) for r in rows)
        return out

    @_serialized
    async def request_status(self, request_id: int) -> dict[str, Any] | None:
        """A request's state and the state of every path it planned (for `push --wait`)."""
        row = list(await self.db.execute_fetchall("SELECT state, error FROM requests WHERE id = ?", (request_id,)))
        if not row:
            return None
        paths = await self.db.execute_fetchall(
            "SELECT p.path, p.state, p.last_error FROM request_paths rp JOIN paths p ON p.path = rp.path "
            "WHERE rp.request_id = ? ORDER BY p.id",
            (request_id,),
        )
        return {
            "state": row[0][0],
            "error": row[0][1],
            "paths": {p: {"state": st, "error": err} for p, st, err in paths},
        }

    @_serialized
    async def list_paths(self, state: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        where, args = ("WHERE state = ?", (state,)) if state else ("", ())
        cur = await self.db.execute(
            f"SELECT {', '.join(PATH_COLUMNS)} FROM paths {where} ORDER BY id DESC LIMIT ?",
            (*args, limit),
        )
        return [dict(zip(PATH_COLUMNS, row, strict=True)) for row in await cur.fetchall()]

    @_serialized
    async def path_detail(self, path: str) -> dict[str, Any] | None:
        cur = await self.db.execute(
            f"SELECT {', '.join(PATH_COLUMNS)} FROM paths WHERE path = ?",
            (path,),
        )
        row = await cur.fetchone()
        if row is None:
            return None
        out: dict[str, Any] = dict(zip(PATH_COLUMNS, row, strict=True))
        cur = await self.db.execute("SELECT time, event, bytes, detail FROM events WHERE path = ? ORDER BY id", (path,))
        out["history"] = [dict(zip(("time", "event", "bytes", "detail"), r, strict=True)) for r in await cur.fetchall()]
        cur = await self.db.execute("SELECT ref FROM refs WHERE path = ?", (path,))
        out["references"] = [r[0] for r in await cur.fetchall()]
        return out

    @_serialized
    async def retry(self, paths: Sequence[str] = (), failed: bool = False) -> int:
        """Make failed (or backing-off) paths due now, and unblock what waited on them; returns how many."""
        now = time.time()
        targets = list(paths)
        if failed:
            cur = await self.db.execute(f"SELECT path FROM paths WHERE state = '{FAILED}'")
            targets += [r[0] for r in await cur.fetchall()]
        async with self._transaction() as db:
            changed = 0
            for p in dict.fromkeys(targets):
                cur = await db.execute(
                    f"UPDATE paths SET state = '{PENDING}', attempts = 0, next_try = 0, updated = ? "
                    f"WHERE path = ? AND state IN {sql_list((FAILED, PENDING, DROPPED, BLOCKED))}",
                    (now, p),
                )
                if cur.rowcount:
                    changed += 1
                    await db.execute("INSERT INTO events (time, path, event) VALUES (?, ?, 'requeued')", (now, p))
            if changed:  # unblock everything, then block again what still waits on a failure
                blocked = [r[0] for r in await db.execute_fetchall(f"SELECT path FROM paths WHERE state = '{BLOCKED}'")]
                await db.execute(
                    f"UPDATE paths SET state = '{PENDING}', last_error = NULL, updated = ? WHERE state = '{BLOCKED}'",
                    (now,),
                )
                await self._block_referrers(blocked, now)
        return changed

    @_serialized
    async def drop(self, paths: Sequence[str]) -> list[str]:
        """Stop trying to upload these paths, and the queued paths that refer to them (which could
        never be published without them). Returns every path dropped."""
        now = time.time()
        dropped: list[str] = []
        todo = list(paths)
        async with self._transaction() as db:
            while todo:
                p = todo.pop()
                cur = await db.execute(
                    f"UPDATE paths SET state = '{DROPPED}', updated = ? WHERE path = ? "
                    f"AND state IN {sql_list((PENDING, FAILED, BLOCKED))}",
                    (now, p),
                )
                if not cur.rowcount:
                    continue
                dropped.append(p)
                await db.execute("INSERT INTO events (time, path, event) VALUES (?, ?, 'dropped')", (now, p))
                cur = await db.execute("SELECT path FROM refs WHERE ref = ? AND path != ref", (p,))
                todo.extend(r[0] for r in await cur.fetchall())
        return dropped

    @_serialized
    async def stats(self) -> dict[str, Any]:
        """Queue depth by state, upload rates, the oldest pending path and the latest errors."""
        now = time.time()
        counts = await self._state_counts()
        counts["requests to plan"] = counts.pop("requests")
        rates = {}
        for minutes in (1, 5, 15):
            cur = await self.db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM events WHERE event = 'uploaded' AND time >= ?",
                (now - 60 * minutes,),
            )
            n, b = await cur.fetchone()  # type: ignore[misc]
            rates[f"{minutes}m"] = {"paths": n, "bytes": b}
        cur = await self.db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM events WHERE event = 'uploaded'")
        total_n, total_b = await cur.fetchone()  # type: ignore[misc]
        cur = await self.db.execute(
            f"SELECT path, created FROM paths WHERE state IN {sql_list((PENDING, UPLOADING))} ORDER BY created LIMIT 1"
        )
        oldest = await cur.fetchone()
        cur = await self.db.execute(
            "SELECT path, state, last_error, updated FROM paths WHERE last_error IS NOT NULL "
            f"AND state IN {sql_list((PENDING, FAILED, BLOCKED))} ORDER BY updated DESC LIMIT 5"
        )
        errors = [dict(zip(("path", "state", "error", "time"), r, strict=True)) for r in await cur.fetchall()]
        try:
            cur = await self.db.execute("SELECT state, COUNT(*) FROM realisations GROUP BY state")
            realisations = {str(state): int(n) for state, n in await cur.fetchall()}
        except sqlite3.OperationalError:  # a database the daemon has not opened since realisations came
            realisations = {}
        return {
            "counts": counts,
            "realisations": realisations,
            "uploaded": rates,
            "uploaded_total": {"paths": total_n, "bytes": total_b},
            "oldest_pending": {"path": oldest[0], "age": now - oldest[1]} if oldest else None,
            "last_errors": errors,
        }

    @_serialized
    async def prune_events(self, retention: float = EVENT_RETENTION) -> int:
        """Forget the history older than `retention` seconds (it feeds `queue show` and the upload rates
        only); how many events went. The daemon's maintenance calls it: reads never write."""
        cur = await self.db.execute("DELETE FROM events WHERE time < ?", (time.time() - retention,))
        return max(0, cur.rowcount)

    @_serialized
    async def attempts(self, path: str) -> int:
        return int(await self._scalar("SELECT attempts FROM paths WHERE path = ?", (path,)) or 0)

    async def _state_counts(self) -> dict[str, int]:
        """Paths by state, every state present, and the requests still to plan (under "requests")."""
        rows = await self.db.execute_fetchall("SELECT state, COUNT(*) FROM paths GROUP BY state")
        out = dict.fromkeys(STATES, 0)
        out.update({r[0]: r[1] for r in rows})
        out["requests"] = int(await self._scalar(f"SELECT COUNT(*) FROM requests WHERE state = '{REQUEST_NEW}'"))
        return out

    @_serialized
    async def counts(self) -> dict[str, int]:
        return await self._state_counts()

    @_serialized
    async def path_row(self, path: str) -> dict[str, object] | None:
        cur = await self.db.execute(
            "SELECT path, state, attempts, next_try, last_error, nar_size, file_size FROM paths WHERE path = ?",
            (path,),
        )
        row = await cur.fetchone()
        if row is None:
            return None
        keys = ("path", "state", "attempts", "next_try", "last_error", "nar_size", "file_size")
        return dict(zip(keys, row, strict=True))


def _chunks(items: list[str], size: int = 500) -> list[list[str]]:
    """SQLite limits the number of parameters of one statement."""
    return [items[i : i + size] for i in range(0, len(items), size)]
