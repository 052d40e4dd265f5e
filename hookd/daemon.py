"""The hookd daemon: socket server, planner and upload scheduler wired together on one asyncio loop.

Three loops share one sqlite queue. The server commits each hook request before answering "OK". The
planner turns requests into closures (outputs of a .drv when the hook got none, then every path those
outputs need) with one `nix` call per batch. The scheduler starts uploads of ready paths (pending, due,
all references done) up to the concurrency limit and records their outcomes in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import random
import signal
import socket
import struct
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from . import narinfo, protocol, storepath
from .backends import Backend, BackendError
from .config import Config
from .metrics import Metrics
from .metrics import serve as serve_metrics
from .planner import Planner
from .queue import DONE, FAILED, PENDING, Outcome, Queue, Request
from .signing import SecretKey
from .store import PathInfo, Store
from .upload import NarMismatchError, upload_path

log = logging.getLogger("hookd")

READ_TIMEOUT = 10.0
SPOOL_POLL = 5.0
PLAN_DELAY = 0.05  # gather the requests of a burst of builds into one `nix path-info` call
SD_LISTEN_FDS_START = 3


class RequestRejected(ValueError):
    """A request names paths hookd must not touch (outside the store, malformed, missing)."""


class ReferenceGone(Exception):
    """A reference recorded as cached was deleted (by a GC): it is queued again, the referrer waits."""


class DaemonError(RuntimeError):
    """The daemon cannot start (state directory locked, socket unusable, …)."""


def backoff(attempts: int, base: float, cap: float) -> float:
    """Seconds to wait before the next attempt: exponential with full jitter."""
    return random.uniform(0, min(cap, base * 2 ** min(attempts, 32)))


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


class ByteBudget:
    """Bounds the NAR bytes being staged and uploaded at once (paths in flight are bounded apart)."""

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.used = 0
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        n = min(max(nbytes, 1), self.total)  # a path larger than the budget goes alone
        async with self._cond:
            await self._cond.wait_for(lambda: self.used + n <= self.total)
            self.used += n
        try:
            yield
        finally:
            async with self._cond:
                self.used -= n
                self._cond.notify_all()


class Daemon:
    def __init__(self, cfg: Config, backend: Backend, store: Store, key: SecretKey) -> None:
        self.cfg = cfg
        self.backend = backend
        self.store = store
        self.key = key
        self.queue: Queue | None = None
        self.planner: Planner | None = None
        self.stopping = asyncio.Event()
        self.plan_wake = asyncio.Event()
        self.sched_wake = asyncio.Event()
        self.inflight: dict[str, asyncio.Task[None]] = {}
        self.bytes = ByteBudget(cfg.max_bytes_in_flight)
        self.outcomes: list[Outcome] = []
        self.cache_ready = False
        self.staging = cfg.state_dir / "staging"
        self._lock_fd: int | None = None
        self._server: asyncio.base_events.Server | None = None
        self._owns_socket = False
        self.allowed_uids = set(cfg.allowed_uids) | {os.getuid()}
        self.metrics = Metrics()
        self.started = time.monotonic()
        policy = getattr(backend, "policy", None)
        if policy is not None:
            policy.on_retry = self.metrics.retries.inc

    # --- life cycle ---------------------------------------------------------------------------------

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            log.info(
                "stopping: no new uploads; waiting up to %gs for %d in flight",
                self.cfg.shutdown_timeout,
                len(self.inflight),
            )
        self.stopping.set()
        self.plan_wake.set()
        self.sched_wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGUSR1, _log_tasks)
        self._prepare_dirs()
        self.queue = await Queue.open(self.cfg.db_path, self.cfg.store_dir)
        self.planner = Planner(self.cfg, self.queue, self.store, self.backend, self.metrics)
        try:
            await self._start_server()
            await self.drain_spool()
            counts = await self.queue.counts()
            log.info(
                "hookd ready: cache %s, key %s, socket %s; queue: %d pending, %d failed, %d requests to plan",
                self.backend.url,
                self.key.name,
                self.cfg.socket_path,
                counts[PENDING],
                counts[FAILED],
                counts["requests"],
            )
            _sd_notify(f"READY=1\nSTATUS=queue: {counts[PENDING]} pending")
            metrics_runner = None
            if self.cfg.metrics_listen:
                metrics_runner = await serve_metrics(self.metrics, self.cfg.metrics_listen, self._refresh_gauges)
            planner = asyncio.create_task(self._planner(), name="planner")
            scheduler = asyncio.create_task(self._scheduler(), name="scheduler")
            notifier = asyncio.create_task(self._notifier(), name="notifier")
            await self.stopping.wait()
            notifier.cancel()
            if metrics_runner is not None:
                await metrics_runner.cleanup()
            _sd_notify("STOPPING=1")
            await self._stop_server()
            await asyncio.gather(planner, scheduler, return_exceptions=True)
            await self._drain_inflight()
        finally:
            await self._stop_server()
            if self.queue is not None:
                await self.queue.close()
            if self.planner is not None:
                await self.planner.close()
            await self.backend.close()
            self._release_lock()
        log.info("hookd stopped")

    def _prepare_dirs(self) -> None:
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        lock_path = self.cfg.state_dir / "lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonError(
                f"another hookd daemon is running with state directory {self.cfg.state_dir} (it holds {lock_path})"
            ) from None
        self._lock_fd = fd
        self.cfg.spool_path.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.staging.mkdir(exist_ok=True, mode=0o700)
        for leftover in self.staging.iterdir():  # staged NARs of a run that was killed
            leftover.unlink(missing_ok=True)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _start_server(self) -> None:
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

    async def _stop_server(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            if self._owns_socket:
                with contextlib.suppress(FileNotFoundError):
                    self.cfg.socket_path.unlink()

    async def _refresh_gauges(self) -> None:
        assert self.queue is not None
        for state, n in (await self.queue.counts()).items():
            if state != "requests":
                self.metrics.queue.labels(state).set(n)

    async def _notifier(self) -> None:
        """systemd: STATUS= with the queue depth, and WATCHDOG=1 at half the unit's WatchdogSec."""
        watchdog = int(os.environ.get("WATCHDOG_USEC", "0") or 0) / 1e6
        if os.environ.get("WATCHDOG_PID") not in (None, "", str(os.getpid())):
            watchdog = 0
        if not os.environ.get("NOTIFY_SOCKET"):
            return
        interval = min(watchdog / 2, 10.0) if watchdog else 10.0
        while True:
            assert self.queue is not None
            counts = await self.queue.counts()
            message = (
                f"STATUS=queue: {counts[PENDING]} pending, {len(self.inflight)} uploading, "
                f"{counts[FAILED]} failed, {counts[DONE]} done"
            )
            _sd_notify(message + ("\nWATCHDOG=1" if watchdog else ""))
            await asyncio.sleep(interval)

    async def _drain_inflight(self) -> None:
        tasks = list(self.inflight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.cfg.shutdown_timeout)
            for t in pending:
                t.cancel()
            if pending:
                log.warning("stopping: %d uploads did not finish in time; they stay queued", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        await self._flush_outcomes()

    # --- the socket ---------------------------------------------------------------------------------

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
        if not self._peer_allowed(uid):
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
            if isinstance(req, protocol.Command):
                return await self._command(req)
            validate(req, self.cfg.store_dir)
        except (protocol.ProtocolError, RequestRejected) as e:
            log.warning("rejected a request from uid %d: %s", uid, e)
            return protocol.error(str(e))
        if self.stopping.is_set():
            return protocol.error("hookd is shutting down")
        assert self.queue is not None
        rid = await self.queue.add_request(req.drv, req.outs, "socket")
        self.metrics.requests.inc()
        log.info("queued request %d: %s", rid, req.drv if not req.outs else " ".join(req.outs))
        self.plan_wake.set()
        return protocol.ok(f"queued {rid}")

    async def _command(self, cmd: protocol.Command) -> bytes:
        """Operator commands from the CLI: STATUS, RETRY, DROP."""
        assert self.queue is not None
        if cmd.verb == "STATUS":
            stats = await self.queue.stats()
            stats["daemon"] = {
                "pid": os.getpid(),
                "uptime": time.monotonic() - self.started,
                "cache": self.backend.url,
                "key": self.key.name,
                "inflight": sorted(self.inflight),
            }
            return protocol.ok(json.dumps(stats))
        if cmd.verb == "RETRY":
            failed = "--failed" in cmd.args
            count = await self.queue.retry([a for a in cmd.args if a != "--failed"], failed=failed)
            self.sched_wake.set()
            log.info("operator: %d paths queued for another try", count)
            return protocol.ok(json.dumps({"retried": count}))
        dropped = await self.queue.drop(list(cmd.args))
        log.info("operator: dropped %d paths: %s", len(dropped), " ".join(dropped[:5]))
        return protocol.ok(json.dumps({"dropped": dropped}))

    def _peer_allowed(self, uid: int) -> bool:
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
        assert self.queue is not None
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
            self.plan_wake.set()
        return count

    def _reject_spool_file(self, path: Path, reason: str) -> None:
        rejected = path.parent / "rejected"
        rejected.mkdir(exist_ok=True)
        os.replace(path, rejected / path.name)
        log.error("spool file %s rejected: %s (moved to %s)", path.name, reason, rejected)

    # --- planning -----------------------------------------------------------------------------------

    async def _planner(self) -> None:
        assert self.queue is not None
        while not self.stopping.is_set():
            try:
                reqs = await self.queue.due_requests()
                if reqs:
                    await self._plan(reqs)
                    continue
                nxt = await self.queue.next_request_time()
                timeout = SPOOL_POLL if nxt is None else max(0.05, min(SPOOL_POLL, nxt - time.time()))
                await _wait(self.plan_wake, timeout)
                if not self.stopping.is_set():
                    await self.drain_spool()
                    await _wait(self.stopping, PLAN_DELAY, clear=False)
            except Exception:
                log.exception("planner error; retrying in %gs", SPOOL_POLL)
                await _wait(self.stopping, SPOOL_POLL, clear=False)

    async def _plan(self, reqs: Sequence[Request]) -> None:
        assert self.planner is not None
        plan = await self.planner.plan(reqs)
        if self.planner.new_cache:
            self.planner.new_cache = False
            self.cache_ready = False  # a new or emptied cache needs its nix-cache-info again
        if plan is not None:
            self.sched_wake.set()

    # --- uploading ----------------------------------------------------------------------------------

    async def _scheduler(self) -> None:
        assert self.queue is not None
        failures = 0
        while not self.stopping.is_set():
            try:
                await self._flush_outcomes()
                if not self.cache_ready:
                    await self._ensure_cache_info()
                free = self.cfg.max_parallel - len(self.inflight)
                if free > 0:
                    # finished but not yet recorded counts as busy too, or it would be picked again
                    busy = set(self.inflight) | {o.path for o in self.outcomes}
                    for info in await self.queue.ready(free, exclude=busy):
                        self.inflight[info.path] = asyncio.create_task(self._upload(info), name=info.path)
                nxt = await self.queue.next_path_time()
                timeout = 1.0 if nxt is None else max(0.01, min(1.0, nxt - time.time()))
                failures = 0
                await _wait(self.sched_wake, timeout)
            except Exception as e:
                failures += 1
                delay = backoff(failures, self.cfg.retry_base, self.cfg.retry_max)
                log.error("cache %s: %s (retry in %.0fs)", self.backend.url, e, delay)
                await _wait(self.stopping, delay, clear=False)

    async def _ensure_cache_info(self) -> None:
        if not await self.backend.exists("nix-cache-info"):
            text = narinfo.cache_info(self.cfg.store_dir, self.cfg.priority)
            await self.backend.put("nix-cache-info", text.encode(), "text/x-nix-cache-info")
            log.info("wrote nix-cache-info to %s", self.backend.url)
        await self.backend.cleanup()
        self.cache_ready = True

    async def _flush_outcomes(self) -> None:
        if self.outcomes and self.queue is not None:
            batch, self.outcomes = self.outcomes, []
            try:
                await self.queue.record(batch)
            except BaseException:
                self.outcomes[:0] = batch
                raise

    async def _touch_stale_references(self, info: PathInfo) -> None:
        """Touch references found in the cache more than half a GC grace period ago (see DESIGN.md).

        A reference found gone (a GC took it) is queued again, and this path waits for it.
        """
        assert self.queue is not None
        refs = [r for r in info.references if r != info.path]
        stale = await self.queue.due_refresh(refs, self.cfg.gc_grace / 2)
        touched, gone = [], []
        for ref in stale:
            if await self.backend.touch(narinfo.narinfo_key(ref), narinfo.CONTENT_TYPE):
                touched.append(ref)
            else:
                gone.append(ref)
        await self.queue.mark_refreshed(touched)
        if gone:
            await self.queue.forget(gone)
            raise ReferenceGone(f"{len(gone)} references of {info.path} are gone from the cache; uploading them first")

    async def _upload(self, info: PathInfo) -> None:
        assert self.queue is not None
        start = time.monotonic()
        try:
            await self._touch_stale_references(info)
            async with self.bytes.hold(info.nar_size):
                res = await upload_path(
                    info,
                    self.backend,
                    self.key,
                    self.cfg.compression,
                    self.cfg.level,
                    self.staging,
                    self.cfg.worker_nice,
                )
        except asyncio.CancelledError:
            raise
        except ReferenceGone as e:
            log.warning("%s", e)
            self.outcomes.append(Outcome(info.path, PENDING, str(e), 0.0))
        except NarMismatchError as e:
            self.metrics.failures.labels("refused").inc()
            log.error("refused %s", e)
            self.outcomes.append(Outcome(info.path, FAILED, str(e)))
        except FileNotFoundError as e:
            msg = f"{info.path} is gone from the store ({e.filename}); it was garbage-collected before upload"
            log.error("%s", msg)
            self.outcomes.append(Outcome(info.path, FAILED, msg))
        except Exception as e:
            attempts = await self.queue.attempts(info.path) + 1
            delay = backoff(attempts, self.cfg.retry_base, self.cfg.retry_max)
            level = logging.WARNING if isinstance(e, BackendError | OSError) else logging.ERROR
            log.log(
                level,
                "upload of %s failed (attempt %d): %s; retry in %.0fs",
                info.path,
                attempts,
                e or type(e).__name__,
                delay,
                exc_info=level == logging.ERROR,
            )
            self.outcomes.append(Outcome(info.path, PENDING, str(e) or type(e).__name__, time.time() + delay))
            self.metrics.failures.labels("transient").inc()
        else:
            log.info(
                "uploaded %s: NAR %d bytes, compressed %d, %.2fs",
                info.path, res.nar_size, res.file_size, time.monotonic() - start,
            )  # fmt: skip
            self.outcomes.append(Outcome(info.path, DONE, None, 0.0, res.nar_size, res.file_size))
            self.metrics.uploads.inc()
            self.metrics.nar_bytes.inc(res.nar_size)
            self.metrics.compressed_bytes.inc(res.file_size)
            self.metrics.upload_seconds.observe(time.monotonic() - start)
        finally:
            self.inflight.pop(info.path, None)
            self.sched_wake.set()


async def _wait(event: asyncio.Event, timeout: float, clear: bool = True) -> None:
    """Wait for a wake-up or the timeout; consume the wake-up (a later set() is kept for next time)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
    if clear:
        event.clear()


def _log_tasks() -> None:
    """SIGUSR1: log where every task is waiting (for "why is nothing happening?")."""
    import io

    for task in asyncio.all_tasks():
        out = io.StringIO()
        task.print_stack(limit=8, file=out)
        log.warning("task %s:\n%s", task.get_name(), out.getvalue())


def _systemd_socket() -> socket.socket | None:
    """The listening socket systemd passed (socket activation), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return socket.socket(fileno=SD_LISTEN_FDS_START)


def _sd_notify(message: str) -> None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    import sdnotify

    sdnotify.SystemdNotifier().notify(message)
