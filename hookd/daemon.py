"""The hookd daemon's life cycle: start-up, signals, systemd notify and shutdown.

The work is done by three parts sharing one sqlite queue on one asyncio loop, each in its own module
and each runnable in-process against fakes: intake (socket and spool: requests are committed before
the hook hears "OK"), the planner (requests into closures, one `nix` call per batch) and the
scheduler (uploads of ready paths within the limits, outcomes recorded in batches).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import time

from . import planner as planning
from . import protocol
from .backends import Backend
from .config import Config
from .intake import DaemonError, Intake
from .lifecycle import DONE, FAILED, PENDING
from .metrics import Metrics
from .metrics import serve as serve_metrics
from .planner import Planner
from .publish import Realisations
from .queue import EVENT_RETENTION, Queue
from .scheduler import Scheduler
from .signing import SecretKey
from .store import Store

log = logging.getLogger("hookd")

MAINTENANCE_INTERVAL = 3600.0

__all__ = ["Daemon", "DaemonError", "serve"]


def serve(cfg: Config) -> None:
    """`hookd daemon`: the signing key (made in the state directory the first time, unless the config
    names one), the cache, the store; then the daemon until it is told to stop."""
    from .backends import PermanentBackendError, open_backend
    from .keys import KeyPermissionError, default_key_name, load_secret_key, write_keypair
    from .signing import KeyFileError

    try:
        if cfg.secret_key_file is None and not cfg.key_path.exists():
            cfg.state_dir.mkdir(parents=True, exist_ok=True)
            key = write_keypair(default_key_name(), cfg.key_path, cfg.state_dir / "public-key")
            log.warning("generated signing key %s; clients trust it with: trusted-public-keys = %s",
                        cfg.key_path, key.public)  # fmt: skip
        key = load_secret_key(cfg.key_path)
        backend = open_backend(cfg.cache, cfg)
    except (OSError, KeyFileError, KeyPermissionError, PermanentBackendError) as e:
        raise DaemonError(str(e)) from None
    log.info("signing with key %s (public: %s)", key.name, key.public)
    main = Daemon(cfg, backend, Store(cfg.store_dir, cfg.nix_store), key).run()
    if cfg.event_loop == "uvloop":
        import uvloop  # its loop and transports are native code: what a small path costs is mostly requests

        uvloop.run(main)
    else:
        asyncio.run(main)


class Daemon:
    def __init__(self, cfg: Config, backend: Backend, store: Store, key: SecretKey) -> None:
        self.cfg = cfg
        self.backend = backend
        self.store = store
        self.key = key
        self.stopping = asyncio.Event()
        self.plan_wake = asyncio.Event()
        self.metrics = Metrics()
        self.started = time.monotonic()
        self._lock_fd: int | None = None
        self.queue: Queue | None = None
        self.scheduler: Scheduler | None = None
        policy = getattr(backend, "policy", None)
        if policy is not None:
            policy.on_retry = self.metrics.retries.inc

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            log.info(
                "stopping: no new uploads; waiting up to %gs for %d in flight",
                self.cfg.shutdown_timeout,
                len(self.scheduler.inflight) if self.scheduler else 0,
            )
        self.stopping.set()
        self.plan_wake.set()
        if self.scheduler is not None:
            self.scheduler.stop_starting()
            self.scheduler.wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGUSR1, _log_tasks)
        tune_malloc()
        self._prepare_dirs()
        queue = self.queue = await Queue.open(self.cfg.db_path, self.cfg.store_dir)
        scheduler = self.scheduler = Scheduler(self.cfg, queue, self.backend, self.key, self.metrics)
        planner = Planner(self.cfg, queue, self.store, self.backend, self.metrics, scheduler.freshness)
        planner.on_gone = scheduler.wake.set
        realisations = Realisations(self.cfg, queue, self.store, self.backend, self.key, scheduler.freshness)
        realisations.on_gone = scheduler.wake.set
        if self.cfg.realisations:
            planner.realisations = realisations
        intake = Intake(self.cfg, queue, self.metrics, self.plan_wake.set, self._command, self.stopping)
        try:
            if recovered := await queue.recover():
                log.info("%d uploads were interrupted by the last stop: queued again", recovered)
            await scheduler.restore()
            await intake.start()
            await intake.drain_spool()
            counts = await queue.counts()
            log.info(
                "hookd ready: cache %s, key %s, socket %s, event loop %s; queue: %d pending, %d failed, "
                "%d requests to plan",
                self.backend.url, self.key.name, self.cfg.socket_path, type(asyncio.get_running_loop()).__module__,
                counts[PENDING], counts[FAILED], counts["requests"],
            )  # fmt: skip
            _sd_notify(f"READY=1\nSTATUS=queue: {counts[PENDING]} pending")
            metrics_runner = None
            if self.cfg.metrics_listen:
                metrics_runner = await serve_metrics(self.metrics, self.cfg.metrics_listen, self._refresh_gauges)

            def planned() -> None:
                if planner.new_cache:  # a new or emptied cache needs its nix-cache-info again
                    planner.new_cache = False  # (the planner made the scheduler's Freshness forget the old one)
                    scheduler.cache_ready = False
                scheduler.wake.set()

            tasks = [
                asyncio.create_task(
                    planning.run(planner, self.stopping, self.plan_wake, intake.drain_spool, planned), name="planner"
                ),
                asyncio.create_task(scheduler.run(self.stopping), name="scheduler"),
                asyncio.create_task(realisations.run(self.stopping), name="realisations"),
            ]
            helpers = [
                asyncio.create_task(self._notifier(), name="notifier"),
                asyncio.create_task(self._maintain(queue), name="maintenance"),
            ]
            await self.stopping.wait()
            for helper in helpers:
                helper.cancel()
            if metrics_runner is not None:
                await metrics_runner.cleanup()
            _sd_notify("STOPPING=1")
            await intake.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            await scheduler.drain(self.cfg.shutdown_timeout)
        finally:
            await intake.stop()
            await queue.close()
            await planner.close()
            await self.store.close()
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
        # hookd 0.1 staged NARs here; nothing is staged any more (upload.py streams them)
        shutil.rmtree(self.cfg.state_dir / "staging", ignore_errors=True)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

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
            assert self.queue is not None and self.scheduler is not None
            counts = await self.queue.counts()
            message = (
                f"STATUS=queue: {counts[PENDING]} pending, {len(self.scheduler.inflight)} uploading, "
                f"{counts[FAILED]} failed, {counts[DONE]} done"
            )
            _sd_notify(message + ("\nWATCHDOG=1" if watchdog else ""))
            await asyncio.sleep(interval)

    async def _maintain(self, queue: Queue) -> None:
        """At start-up and then hourly: prune the queue's old history (a write, so not done by its reads)."""
        while True:
            try:
                if pruned := await queue.prune_events():
                    log.info("forgot %d events older than %.0f days", pruned, EVENT_RETENTION / 86400)
            except Exception:  # the history only grows meanwhile
                log.exception("queue maintenance failed; trying again in %.0fs", MAINTENANCE_INTERVAL)
            await asyncio.sleep(MAINTENANCE_INTERVAL)

    async def _command(self, cmd: protocol.Command) -> bytes:
        """Operator commands from the CLI: STATUS, RETRY, DROP, REQUEST."""
        assert self.queue is not None and self.scheduler is not None
        if cmd.verb == "STATUS":
            stats = await self.queue.stats()
            stats["daemon"] = {
                "pid": os.getpid(),
                "uptime": time.monotonic() - self.started,
                "cache": self.backend.url,
                "key": self.key.name,
                "inflight": sorted(self.scheduler.inflight),
            }
            return protocol.ok(json.dumps(stats))
        if cmd.verb == "REQUEST":
            status = await self.queue.request_status(int(cmd.args[0]))
            if status is None:
                return protocol.error(f"no request {cmd.args[0]}")
            return protocol.ok(json.dumps(status))
        if cmd.verb == "RETRY":
            failed = "--failed" in cmd.args
            count = await self.queue.retry([a for a in cmd.args if a != "--failed"], failed=failed)
            self.scheduler.wake.set()
            log.info("operator: %d paths queued for another try", count)
            return protocol.ok(json.dumps({"retried": count}))
        dropped = await self.queue.drop(list(cmd.args))
        log.info("operator: dropped %d paths: %s", len(dropped), " ".join(dropped[:5]))
        return protocol.ok(json.dumps({"dropped": dropped}))


def tune_malloc() -> None:
    """Have glibc map buffers of 4 MiB and more on their own and unmap them when freed, and keep one heap
    for all the daemon's threads.

    Streamed NARs pass through many short-lived buffers (S3 parts, threaded zstd's jobs) made by
    several threads; glibc's adaptive threshold would keep them in per-thread heaps, and the daemon's
    resident memory would stay at its largest ever (measured: 185 MiB instead of 163 for a 512 MiB
    NAR to S3). The threshold is above the 1 MiB pieces a NAR is read, compressed and sent in: at
    1 MiB, every piece was mapped, faulted in page by page and unmapped, a quarter of the CPU that
    encoding the /usr corpus took (measured: 4.5 CPU-seconds for 1 GiB, 3.5 at 4 MiB with one or two
    heaps; peak RSS 65 MiB, against 79-85; uploading it to moto, one heap peaked lower than two, 144
    MiB against 147-151). No-op elsewhere than glibc.
    """
    import ctypes

    m_mmap_threshold, m_arena_max = -3, -8
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(m_mmap_threshold, 4 << 20)
        libc.mallopt(m_arena_max, 1)


def _log_tasks() -> None:
    """SIGUSR1: log where every task is waiting (for "why is nothing happening?")."""
    import io

    for task in asyncio.all_tasks():
        out = io.StringIO()
        task.print_stack(limit=8, file=out)
        log.warning("task %s:\n%s", task.get_name(), out.getvalue())


def _sd_notify(message: str) -> None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    import sdnotify

    sdnotify.SystemdNotifier().notify(message)
