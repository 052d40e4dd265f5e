"""What the operator CLI needs from a daemon that may or may not be running: ask it over the socket
when it is up, read (or, for retry and drop, change) the queue database directly when it is not; hand
it paths the way the hook does (`push`) and follow what becomes of them (`watch_request`)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import hook, protocol
from .config import Config
from .lifecycle import FAILED, FINAL, REQUEST_FAILED, REQUEST_NEW, REQUEST_PLANNED, UNSUCCESSFUL
from .queue import Queue


class OperatorError(RuntimeError):
    """A message for the operator (permissions, no state, refusal)."""


def ask(cfg: Config, command: protocol.Command, timeout: float = 10) -> dict[str, Any] | None:
    """The daemon's answer, or None when no daemon listens on the socket."""
    try:
        ok, detail = hook.send(str(cfg.socket_path), command.encode(), timeout)
    except FileNotFoundError:
        return None
    except ConnectionRefusedError:
        return None
    except PermissionError:
        raise OperatorError(
            f"cannot use the daemon's socket {cfg.socket_path}: run as root or as a member of its group"
            + (f" ({cfg.socket_group})" if cfg.socket_group else "")
        ) from None
    except OSError as e:
        raise OperatorError(f"the daemon's socket {cfg.socket_path}: {e.strerror or e}") from None
    if not ok:
        raise OperatorError(f"the daemon refused: {detail}")
    return dict(json.loads(detail))


async def open_queue(cfg: Config, write: bool = False) -> Queue:
    try:
        if write:
            return await Queue.open(cfg.db_path, cfg.store_dir)
        return await Queue.open_readonly(cfg.db_path, cfg.store_dir)
    except FileNotFoundError as e:
        raise OperatorError(str(e)) from None
    except Exception as e:  # sqlite3.OperationalError for permissions, mostly
        if isinstance(e, PermissionError) or "unable to open" in str(e) or "readonly" in str(e):
            raise OperatorError(
                f"cannot {'change' if write else 'read'} {cfg.db_path}: run as root or as a member of the "
                f"daemon's group (state directory {cfg.state_dir})"
            ) from None
        raise


async def with_queue(cfg: Config, fn: Any, write: bool = False, attempts: int = 3) -> Any:
    """fn(queue); read again if the queue was read without locks and the daemon wrote to it meanwhile
    (Queue.open_readonly): the second read takes the daemon's WAL index, or finds it stopped again."""
    for _ in range(attempts):
        queue = await open_queue(cfg, write)
        try:
            result = await fn(queue)
        finally:
            await queue.close()
        if queue.unchanged():
            return result
    raise OperatorError(f"{cfg.db_path} kept changing while it was read; try again")


def status(cfg: Config, check_cache: bool = True) -> dict[str, Any]:
    """The daemon's status (read from the queue when it is down) and whether the cache answers."""
    st = ask(cfg, protocol.Command("STATUS"))
    if st is not None:
        st["daemon"]["up"] = True
    else:
        st = asyncio.run(with_queue(cfg, lambda q: q.stats()))
        st["daemon"] = {"up": False}
    if check_cache:
        cache_error = cache_answers(cfg) if cfg.cache else "no cache configured"
        st["cache"] = {"url": cfg.cache or None, "answers": cache_error is None, "error": cache_error}
    return st


def cache_answers(cfg: Config, timeout: float = 10) -> str | None:
    """None if the cache answers, else why not."""
    from .backends import open_backend

    async def check() -> str | None:
        try:
            async with open_backend(cfg.cache, cfg) as backend:
                await asyncio.wait_for(backend.exists("nix-cache-info"), timeout)
            return None
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    return asyncio.run(check())


def retry(cfg: Config, paths: list[str], failed: bool) -> int:
    args = tuple(paths) + (("--failed",) if failed else ())
    answer = ask(cfg, protocol.Command("RETRY", args))
    if answer is not None:
        return int(answer["retried"])
    return int(asyncio.run(with_queue(cfg, lambda q: q.retry(paths, failed=failed), write=True)))


def drop(cfg: Config, paths: list[str]) -> list[str]:
    answer = ask(cfg, protocol.Command("DROP", tuple(paths)))
    if answer is not None:
        return list(answer["dropped"])
    return list(asyncio.run(with_queue(cfg, lambda q: q.drop(paths), write=True)))


def store_path(cfg: Config, path: str) -> str:
    """A path given on the command line as the store path it names (a result symlink is resolved)."""
    return path if path.startswith(cfg.store_dir + "/") else os.path.realpath(path)


def list_queue(cfg: Config, state: str | None = None) -> list[dict[str, Any]]:
    """The queue's paths, newest first (in one state, or all)."""
    return list(asyncio.run(with_queue(cfg, lambda q: q.list_paths(state))))


def path_detail(cfg: Config, path: str) -> dict[str, Any]:
    """One path's row, references and history."""
    path = store_path(cfg, path)
    row = asyncio.run(with_queue(cfg, lambda q: q.path_detail(path)))
    if row is None:
        raise OperatorError(f"{path} is not in the queue")
    return dict(row)


def push(cfg: Config, paths: Sequence[str]) -> tuple[tuple[str, ...], hook.Delivery]:
    """Queue store paths (a .drv: its outputs) with the daemon as the hook does, spooled for its next start
    when it does not answer; unlike the hook's, a request the daemon refuses is not spooled (it would
    refuse it again). The store paths, and what became of the request."""
    store_paths = tuple(store_path(cfg, p) for p in paths)
    if any(p.endswith(".drv") for p in store_paths):  # its outputs, on every Nix (see Store.resolve)
        from .store import Store, StoreError

        try:
            store_paths = tuple(asyncio.run(Store(cfg.store_dir, cfg.nix_store).resolve(store_paths)))
        except StoreError as e:
            raise OperatorError(str(e)) from None
    request, spooled = protocol.Command("PUSH", store_paths), protocol.Enqueue(None, store_paths)
    sent = hook.deliver(
        str(cfg.socket_path), str(cfg.spool_path), request.encode(), timeout=10, spool_request=spooled.encode(),
        spool_refused=False,
    )  # fmt: skip
    return store_paths, sent


@dataclass
class RequestWatch:
    """What `push --wait` knows of its request after a look: the paths it planned and how each ended."""

    request_id: int
    planned: bool = False
    paths: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> {"state", "error"}
    ended: dict[str, str] = field(default_factory=dict)  # path -> the final state it was first seen in
    new: list[str] = field(default_factory=list)  # the paths that ended since the last look
    note: str = ""  # why it is not planned yet, when that is news (the planner retries)

    @property
    def finished(self) -> bool:
        return self.planned and len(self.ended) == len(self.paths)

    @property
    def unsuccessful(self) -> dict[str, dict[str, Any]]:
        return {p: self.paths[p] for p, state in self.ended.items() if state in UNSUCCESSFUL}

    @property
    def root_cause(self) -> str | None:
        causes = sorted({row["error"] for row in self.unsuccessful.values() if row["state"] == FAILED})
        return causes[0] if causes else None


def watch_request(cfg: Config, request_id: int, interval: float = 0.2) -> Iterator[RequestWatch]:
    """Follow one request until each path it planned is in a final state; the watch after each look."""
    watch = RequestWatch(request_id)
    said = ""
    while True:
        status = ask(cfg, protocol.Command("REQUEST", (str(request_id),)))
        if status is None:
            raise OperatorError(f"the daemon stopped; request {request_id} stays queued for its next start")
        if status["state"] == REQUEST_FAILED:
            raise OperatorError(f"request {request_id} failed: {status['error']}")
        watch.note = ""
        if status["state"] == REQUEST_NEW and status["error"] and status["error"] != said:
            watch.note = said = status["error"]
        watch.planned = status["state"] == REQUEST_PLANNED
        watch.paths = status["paths"]
        watch.new = [p for p, row in watch.paths.items() if row["state"] in FINAL and p not in watch.ended]
        watch.ended.update((p, watch.paths[p]["state"]) for p in watch.new)
        yield watch
        if watch.finished:
            return
        time.sleep(interval)


def write_launcher(dest: Path, python: str) -> Path:
    """Write the fast post-build-hook launcher to `dest` (atomically); its absolute path.

    The launcher starts Python with -I -S (no site-packages scan, no PYTHON* variables from nix-daemon's
    environment) and imports only hookd.hook: about a third of the start-up time of the `hookd-hook`
    console script, which nix-daemon waits for after every build."""
    import tempfile

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = (
        f"#!{python} -IS\n"
        "# hookd post-build-hook launcher, written by `hookd install-hook`\n"
        "import sys\n"
        f"sys.path.insert(0, {package_root!r})\n"
        "from hookd.hook import main\n"
        "main()\n"
    )
    dest = dest.absolute()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)
    return dest


def state_of(cfg: Config, paths: list[str]) -> dict[str, dict[str, Any]]:
    async def read(q: Queue) -> dict[str, dict[str, Any]]:
        out = {}
        for p in paths:
            row = await q.path_row(p)
            if row is not None:
                out[p] = row
        return out

    return dict(asyncio.run(with_queue(cfg, read)))
