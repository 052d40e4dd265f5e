"""What the operator CLI needs from a daemon that may or may not be running: ask it over the socket
when it is up, read (or, for retry and drop, change) the queue database directly when it is not."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from . import hook, protocol
from .config import Config
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


def status(cfg: Config) -> dict[str, Any]:
    daemon = ask(cfg, protocol.Command("STATUS"))
    if daemon is not None:
        daemon["daemon"]["up"] = True
        return daemon
    stats: dict[str, Any] = asyncio.run(with_queue(cfg, lambda q: q.stats()))
    stats["daemon"] = {"up": False}
    return stats


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


def state_of(cfg: Config, paths: list[str]) -> dict[str, dict[str, Any]]:
    async def read(q: Queue) -> dict[str, dict[str, Any]]:
        out = {}
        for p in paths:
            row = await q.path_row(p)
            if row is not None:
                out[p] = row
        return out

    return dict(asyncio.run(with_queue(cfg, read)))
