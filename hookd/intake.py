"""Intake: the daemon's Unix socket and the hook's spool, where requests enter the queue.

Whatever arrives is a hint from a peer that may be wrong or hostile: the peer is checked with
SO_PEERCRED, the line against the protocol, every path against the store directory and the file
system. A request is committed to the queue before the peer hears "OK"; a spool file is removed only
after its request is committed, and a malformed one is set aside, never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import protocol, storepath
from .config import Config
from .metrics import Metrics
from .queue import Queue

log = logging.getLogger("hookd")

READ_TIMEOUT = 10.0
SD_LISTEN_FDS_START = 3

CommandHandler = Callable[[protocol.Command], Awaitable[bytes]]


class RequestRejected(ValueError):
    """A request names paths hookd must not touch (outside the store, malformed, missing)."""


class DaemonError(RuntimeError):
    """The daemon cannot start (state directory locked, socket unusable, …)."""


def validate(req: protocol.Enqueue, store_dir: str) -> None:
    """Check every path of a request against the store directory and the file system."""
    paths = ([req.drv] if req.drv else []) + list(req.outs)
    for p in paths:
        try:
            storepath.check(p, store_dir)
        except storepath.StorePathError as e:
            raise RequestRejected(str(e)) from None
    if req.drv and not req.drv.endswith(".drv"):
        raise RequestRejected(f"{req.drv!r} is given as DRV_PATH but does not end in .drv")
    for p in paths:
        if not os.path.lexists(p):
            raise RequestRejected(f"{p} does not exist in the store")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


@dataclass(eq=False)
class Intake:
    """Serves the socket and drains the spool into the queue; `on_request` wakes the planner."""

    cfg: Config
    queue: Queue
    metrics: Metrics
    on_request: Callable[[], None]
    command: CommandHandler  # operator commands, answered by the daemon
    stopping: asyncio.Event
    allowed_uids: set[int] = field(init=False)
    _server: asyncio.base_events.Server | None = field(default=None, init=False)
    _owns_socket: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.allowed_uids = set(self.cfg.allowed_uids) | {os.getuid()}

    # --- the socket ---------------------------------------------------------------------------------

    async def start(self) -> None:
        sock = _systemd_socket()
        if sock is None:
            sock = self._bind_socket()
            self._owns_socket = True
        self._server = await asyncio.start_unix_server(self._handle, sock=sock, limit=protocol.MAX_LINE + 1)

    def _bind_socket(self) -> socket.socket:
        """Bound under a temporary name, given its group and mode, listening, and only then renamed into
        place: whoever finds the path (a hook, the tests' readiness check) can connect. The path used to
        appear at bind(), before listen(), and a connection in between was refused."""
        path = self.cfg.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        new = path.with_name(path.name + "~")
        with contextlib.suppress(FileNotFoundError):
            new.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(new))
        finally:
            os.umask(old)
        if self.cfg.socket_group:
            import grp

            try:
                gid = grp.getgrnam(self.cfg.socket_group).gr_gid
            except KeyError:
                sock.close()
                raise DaemonError(f"socket_group {self.cfg.socket_group!r} does not exist") from None
            os.chown(new, -1, gid)
        os.chmod(new, 0o660)
        sock.listen(128)
        os.replace(new, path)  # also replaces the socket a killed daemon left behind
        return sock

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            if self._owns_socket:
                with contextlib.suppress(FileNotFoundError):
                    self.cfg.socket_path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answer = b""
        try:
            answer = await self._serve(reader, writer)
        except Exception as e:  # never let one connection take the daemon down
            log.exception("internal error while serving a request")
            answer = protocol.error(f"internal error: {type(e).__name__}")
        finally:
            with contextlib.suppress(Exception):
                if answer:
                    writer.write(answer)
                    await asyncio.wait_for(writer.drain(), 5)
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        _, uid, _ = peer_credentials(writer.get_extra_info("socket"))
        if not self.peer_allowed(uid):
            log.warning("refused a connection from uid %d: not in allowed_uids %s", uid, sorted(self.allowed_uids))
            return protocol.error(
                f"uid {uid} is not allowed to use this socket (ask the operator to add it to allowed_uids)"
            )
        try:
            line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
        except ValueError:
            log.warning("rejected a request from uid %d: longer than %d bytes", uid, protocol.MAX_LINE)
            return protocol.error(f"request longer than {protocol.MAX_LINE} bytes")
        except TimeoutError:
            log.warning("rejected a request from uid %d: no complete line within %gs", uid, READ_TIMEOUT)
            return protocol.error(f"no complete request line within {READ_TIMEOUT:g} s")
        if not line:
            return b""
        try:
            req = protocol.parse_request(line)
            if isinstance(req, protocol.Ping):
                return protocol.ok("pong")
            if isinstance(req, protocol.Command) and req.verb != "PUSH":
                return await self.command(req)
            source = "socket"
            if isinstance(req, protocol.Command):  # PUSH from the CLI: checked against the cache
                req, source = protocol.Enqueue(None, req.args), "cli"
            validate(req, self.cfg.store_dir)
        except (protocol.ProtocolError, RequestRejected) as e:
            log.warning("rejected a request from uid %d: %s", uid, e)
            return protocol.error(str(e))
        if self.stopping.is_set():
            return protocol.error("hookd is shutting down")
        rid = await self.queue.add_request(req.drv, req.outs, source)
        self.metrics.requests.inc()
        log.info("queued request %d: %s", rid, req.drv if not req.outs else " ".join(req.outs))
        self.on_request()
        return protocol.queued(rid)

    def peer_allowed(self, uid: int) -> bool:
        if uid in self.allowed_uids:
            return True
        if not (self.cfg.socket_group and self.cfg.allowed_group_members):
            return False
        import grp
        import pwd

        try:
            group = grp.getgrnam(self.cfg.socket_group)
            user = pwd.getpwuid(uid)
        except KeyError:
            return False
        return user.pw_gid == group.gr_gid or user.pw_name in group.gr_mem

    # --- the spool ----------------------------------------------------------------------------------

    async def drain_spool(self) -> int:
        """Queue every request the hook spooled while we were away; set aside the malformed ones."""
        spool = self.cfg.spool_path
        try:
            names = sorted(os.listdir(spool))
        except FileNotFoundError:
            return 0
        count = 0
        for name in names:
            path = spool / name
            if name.startswith(".") and name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - path.stat().st_mtime > 3600:
                        path.unlink()
                continue
            if not name.endswith(".req"):
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read(protocol.MAX_LINE + 2)
                req = protocol.parse_request(data)
                if not isinstance(req, protocol.Enqueue):
                    raise protocol.ProtocolError("spool file holds no ENQUEUE request")
                validate(req, self.cfg.store_dir)
            except FileNotFoundError:
                continue
            except (protocol.ProtocolError, RequestRejected) as e:
                self._reject_spool_file(path, str(e))
                continue
            await self.queue.add_request(req.drv, req.outs, "spool")
            path.unlink()
            count += 1
        if count:
            log.info("queued %d spooled requests from %s", count, spool)
            self.on_request()
        return count

    def _reject_spool_file(self, path: Path, reason: str) -> None:
        rejected = path.parent / "rejected"
        rejected.mkdir(exist_ok=True)
        os.replace(path, rejected / path.name)
        log.error("spool file %s rejected: %s (moved to %s)", path.name, reason, rejected)


def _systemd_socket() -> socket.socket | None:
    """The listening socket systemd passed (socket activation), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return socket.socket(fileno=SD_LISTEN_FDS_START)
