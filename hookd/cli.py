"""The `hookd` command line: thin click commands over the library."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .config import Config, ConfigError, load
from .lifecycle import STATES

log = logging.getLogger("hookd")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json

        out = {"time": record.created, "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}  # fmt: skip
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


class JournalFormatter(logging.Formatter):
    """journald adds the time; a <N> prefix gives it the syslog priority of each line."""

    PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return "\n".join(f"<{self.PRIORITY.get(record.levelname, 6)}>{line}" for line in text.splitlines())


def setup_logging(level: str, fmt: str = "text") -> None:
    """One line per event on stderr: text, JSON, or journald's format when journald reads stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif fmt == "journal" or (fmt == "text" and os.environ.get("JOURNAL_STREAM")):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # Their debug output carries request headers (signatures, access key ids): never let it through.
    for noisy in ("botocore", "aiobotocore", "aiohttp", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def load_config(config_file: Path | None, _validate: bool = True, **overrides: Any) -> Config:
    try:
        cfg = load(config_file, overrides=overrides)
        return cfg.validate() if _validate else cfg
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


@click.group()
@click.version_option(__version__, prog_name="hookd")
def main() -> None:
    """hookd: upload every path your Nix builder realises to a signed binary cache."""


@main.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--cache", help="Cache URL, for example file:///var/cache/nix.")
@click.option("--state-dir", type=click.Path(path_type=Path), help="Queue, socket, spool (default /var/lib/hookd).")
@click.option("--socket", type=click.Path(path_type=Path), help="Socket path (default <state-dir>/hookd.sock).")
@click.option("--spool-dir", type=click.Path(path_type=Path), help="Spool (default <state-dir>/spool).")
@click.option("--secret-key-file", type=click.Path(path_type=Path), help="Signing key (Nix format).")
@click.option("--compression", type=click.Choice(["zstd", "xz", "none"]))
@click.option("--compression-level", type=int)
@click.option("--store-dir", help="Nix store directory (default /nix/store).")
@click.option("--max-parallel", type=int, help="Paths uploaded at the same time.")
@click.option("--log-level", default="info", show_default=True)
@click.option("--log-format", type=click.Choice(["text", "json", "journal"]), default="text", show_default=True,
              help="text (journald's format when it reads stderr), json: one object per line.")  # fmt: skip
def daemon(config_file: Path | None, log_level: str, log_format: str, **overrides: Any) -> None:
    """Run the upload daemon."""
    from .backends import PermanentBackendError, open_backend
    from .daemon import Daemon, DaemonError
    from .keys import KeyPermissionError, default_key_name, load_secret_key, write_keypair
    from .signing import KeyFileError
    from .store import Store

    setup_logging(log_level, log_format)
    cfg = load_config(config_file, **overrides)
    try:
        if cfg.secret_key_file is None and not cfg.key_path.exists():
            cfg.state_dir.mkdir(parents=True, exist_ok=True)
            key = write_keypair(default_key_name(), cfg.key_path, cfg.state_dir / "public-key")
            log.warning(
                "generated signing key %s; clients trust it with: trusted-public-keys = %s",
                cfg.key_path,
                key.public,
            )
        key = load_secret_key(cfg.key_path)
        backend = open_backend(cfg.cache, cfg)
    except (OSError, KeyFileError, KeyPermissionError, PermanentBackendError) as e:
        raise click.ClickException(str(e)) from None
    log.info("signing with key %s (public: %s)", key.name, key.public)
    store = Store(cfg.store_dir, cfg.nix_store)
    try:
        asyncio.run(Daemon(cfg, backend, store, key).run())
    except DaemonError as e:
        raise click.ClickException(str(e)) from None


@main.command()
@click.argument("name")
@click.option("--secret-key-file", type=click.Path(path_type=Path), required=True)
@click.option("--public-key-file", type=click.Path(path_type=Path), required=True)
def keygen(name: str, secret_key_file: Path, public_key_file: Path) -> None:
    """Create a signing key pair in Nix's format (the secret file gets mode 0600)."""
    from .keys import write_keypair
    from .signing import KeyFileError

    try:
        key = write_keypair(name, secret_key_file, public_key_file)
    except (OSError, KeyFileError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {secret_key_file} (mode 0600) and {public_key_file}")
    click.echo(f"trusted-public-keys = {key.public}")


# --- cache maintenance ----------------------------------------------------------------------------

cache_option = click.option("--cache", help="Cache URL (default: `cache` from the config).")
config_option = click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML config file.")


def _backend(config_file: Path | None, cache: str | None) -> tuple[Config, Any]:
    from .backends import PermanentBackendError, open_backend

    cfg = load_config(config_file, cache=cache)
    try:
        return cfg, open_backend(cfg.cache, cfg)
    except PermanentBackendError as e:
        raise click.ClickException(str(e)) from None


class ProgressLine:
    """One self-overwriting line on a terminal; silent otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        import time

        now = time.monotonic()
        if not self.tty or (now - self.last < 0.1 and done != total):
            return
        self.last = now
        text = f"{stage}: {done}/{total}" if total else f"{stage}: {done}"
        sys.stderr.write(f"\r\033[K{text}")
        if done == total and total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _run(coro: Any) -> Any:
    from .backends import BackendError
    from .catalog import GcError

    try:
        return asyncio.run(coro)
    except (GcError, BackendError, ValueError) as e:
        raise click.ClickException(str(e)) from None


@main.command()
@cache_option
@config_option
@click.option("--older-than", default="30d", show_default=True, help="Retention: keep paths modified since.")
@click.option("--max-size", help="Budget for the kept closure (for example 50G): oldest roots go first.")
@click.option(
    "--grace", default=None, help="Never delete anything younger than this (default: the config's gc_grace, 1h)."
)
@click.option("--lease", default="2h", show_default=True, help="How long the GC lease holds.")
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def gc(
    cache: str | None, config_file: Path | None, older_than: str, max_size: str | None, grace: str | None,
    lease: str, dry_run: bool, as_json: bool,
) -> None:  # fmt: skip
    """Garbage-collect a throwaway cache: keep pins and recent closures, delete the rest safely."""
    import json

    from . import gc as gcmod
    from .safety import BoundsError
    from .units import format_size, parse_duration, parse_size

    setup_logging("warning")
    try:
        retention, lease_s = parse_duration(older_than), parse_duration(lease)
        grace_s = parse_duration(grace) if grace else None
        budget = parse_size(max_size) if max_size else None
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    cfg, backend = _backend(config_file, cache)
    if grace_s is None:
        grace_s = cfg.gc_grace
    bounds = dataclasses.replace(cfg.bounds, grace=grace_s)
    try:
        bounds.check()
    except BoundsError as e:
        raise click.BadParameter(str(e)) from None

    async def go() -> dict[str, Any]:
        async with backend:
            return await gcmod.collect(
                backend, cfg.state_dir, bounds, older_than=retention, max_size=budget, lease=lease_s, dry_run=dry_run,
                progress=ProgressLine(),
            )  # fmt: skip

    out = _run(go())
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"{'dry run: ' if dry_run else ''}GC of {out['cache']} ({out['narinfo_reads']} narinfos read)")
    for name, cat in out["stats"].items():
        click.echo(f"  {name:42} {cat['count']:>8}  {format_size(cat['bytes']):>10}")
    if out["dropped_roots"]:
        click.echo(f"  over the size budget: the {out['dropped_roots']} oldest roots are not kept")
    for key, why in list(out["broken"].items())[:20]:
        click.echo(f"  broken: {key}: {why}")
    for key, why in list(out["malformed"].items())[:20]:
        click.echo(f"  malformed (kept, skipped): {key}: {why}")
    for key in out["unknown"][:20]:
        click.echo(f"  unknown object (kept): {key}")
    if "deleted" in out:
        d = out["deleted"]
        click.echo(
            f"deleted {d['objects']} objects ({format_size(d['bytes'])}); {d['spared']} spared (refreshed or "
            f"re-uploaded meanwhile, with what they refer to)"
            + (f"; {d['not_checked']} left for the next run (sweep window closed)" if d["not_checked"] else "")
        )


@main.command()
@cache_option
@config_option
@click.option("--public-key", "public_key_file", type=click.Path(path_type=Path), help="Check signatures.")
@click.option("--deep", is_flag=True, help="Download and hash every NAR.")
@click.option("--repair", is_flag=True, help="Delete broken narinfos and their referrers.")
@click.option("--json", "as_json", is_flag=True)
def verify(
    cache: str | None, config_file: Path | None, public_key_file: Path | None, deep: bool, repair: bool,
    as_json: bool,
) -> None:  # fmt: skip
    """Check that the cache is whole; exit 1 if it is not (and was not repaired)."""
    import json

    from .keys import read_public_key
    from .signing import KeyFileError
    from .verify import verify as run_verify

    setup_logging("warning")
    try:
        key = read_public_key(public_key_file) if public_key_file else None
    except (OSError, KeyFileError) as e:
        raise click.ClickException(f"public key {public_key_file}: {e}") from None
    _, backend = _backend(config_file, cache)

    async def go() -> Any:
        async with backend:
            return await run_verify(backend, key, deep, repair, ProgressLine())

    report = _run(go())
    if as_json:
        click.echo(json.dumps({"narinfos": report.narinfos, "broken": report.broken,
                               "unknown": report.unknown,
                               "repaired": report.repaired, "whole": report.whole}, indent=2))  # fmt: skip
    else:
        for k, why in sorted(report.broken.items()):
            click.echo(f"broken: {k}: {why}")
        for k in report.unknown[:20]:
            click.echo(f"unknown object: {k}")
        state = "whole" if report.whole else f"{len(report.broken)} broken narinfos"
        click.echo(f"{report.narinfos} narinfos checked{' (deep)' if deep else ''}: {state}")
        if report.repaired:
            click.echo(f"repaired: deleted {len(report.repaired)} broken narinfos")
    if report.broken and not repair:
        sys.exit(1)


@main.command("pin")
@click.argument("name", required=False)
@click.argument("store_path", required=False)
@click.option("--list", "list_", is_flag=True, help="List the pins.")
@cache_option
@config_option
def pin_cmd(name: str | None, store_path: str | None, list_: bool, cache: str | None, config_file: Path | None) -> None:
    """Pin STORE-PATH (and its closure) in the cache under NAME, so GC keeps it."""
    from . import pins

    _, backend = _backend(config_file, cache)

    async def go() -> Any:
        async with backend:
            if list_:
                return await pins.list_pins(backend)
            if not name or not store_path:
                raise click.UsageError("give NAME and STORE-PATH, or --list")
            await pins.pin(backend, name, store_path)
            return None

    listed = _run(go())
    if list_:
        for n, p in sorted(listed.items()):
            click.echo(f"{n}\t{p}")
    else:
        click.echo(f"pinned {store_path} as {name}")


@main.command()
@click.argument("name")
@cache_option
@config_option
def unpin(name: str, cache: str | None, config_file: Path | None) -> None:
    """Remove the pin NAME (GC may then collect what only it kept)."""
    from . import pins

    _, backend = _backend(config_file, cache)

    async def go() -> bool:
        async with backend:
            return await pins.unpin(backend, name)

    if not _run(go()):
        raise click.ClickException(f"no pin named {name!r}")
    click.echo(f"unpinned {name}")


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--closure/--no-closure", default=True, show_default=True,
              help="Paths always go up with their closures (a narinfo without its references would be "
                   "unusable); the flag is accepted for clarity.")  # fmt: skip
@click.option("--wait", is_flag=True, help="Wait until every path of the closures is uploaded; exit 1 if one failed.")
@click.option("--pin", "pin_name", help="Also pin the (last) path in the cache under this name.")
@cache_option
@config_option
def push(
    paths: tuple[str, ...], closure: bool, wait: bool, pin_name: str | None, cache: str | None,
    config_file: Path | None,
) -> None:  # fmt: skip
    """Queue store paths for upload (for example after a substitution, which post-build-hook never sees)."""
    from . import hook, pins, protocol

    if not closure:
        raise click.UsageError("hookd uploads closures only: a path whose references are missing is unusable")
    cfg = load_config(config_file, cache=cache or "file:///unused", _validate=False)
    store_paths = tuple(p if p.startswith(cfg.store_dir + "/") else os.path.realpath(p) for p in paths)
    if any(p.endswith(".drv") for p in store_paths):  # its outputs, on every Nix (see Store.resolve)
        from .store import Store, StoreError

        try:
            store_paths = tuple(asyncio.run(Store(cfg.store_dir, cfg.nix_store).resolve(store_paths)))
        except StoreError as e:
            raise click.ClickException(str(e)) from None
    answered = True
    try:
        ok, detail = hook.send(str(cfg.socket_path), protocol.Command("PUSH", store_paths).encode(), timeout=10)
    except OSError as e:
        ok, detail, answered = False, f"cannot reach {cfg.socket_path}: {e.strerror or e}", False
    if not ok:
        if answered:  # the daemon said no: spooling the same request would not change its mind
            raise click.ClickException(f"the daemon refused: {detail}")
        try:
            spooled = hook.spool(str(cfg.spool_path), protocol.Enqueue(None, store_paths).encode())
        except OSError as e:
            raise click.ClickException(f"daemon: {detail}; spool {cfg.spool_path}: {e.strerror}") from None
        click.echo(f"daemon: {detail}; spooled to {spooled} (the daemon picks it up when it starts)")
        if wait:
            raise click.ClickException("not waiting: the daemon is not running")
    else:
        click.echo(f"queued {len(store_paths)} paths ({detail})")
    if pin_name:
        _, backend = _backend(config_file, cache)

        async def go() -> None:
            async with backend:
                await pins.pin(backend, pin_name, store_paths[-1], require_present=False)

        _run(go())
        click.echo(f"pinned {store_paths[-1]} as {pin_name}")
    if wait and ok:
        sys.exit(_wait_for(cfg, int(detail.split()[-1])))


def _wait_for(cfg: Config, request_id: int) -> int:
    """Follow one request until each path it planned is uploaded, failed or blocked; the exit status."""
    import time

    from . import protocol
    from .lifecycle import FINAL, UNSUCCESSFUL
    from .operator import OperatorError, ask
    from .units import format_duration

    tty = sys.stdout.isatty()
    label = {"done": "uploaded", "upstream": "left to upstream", "failed": "FAILED", "blocked": "BLOCKED",
             "dropped": "dropped"}  # fmt: skip
    reported: dict[str, str] = {}
    start = time.monotonic()
    said = ""
    while True:
        try:
            status = ask(cfg, protocol.Command("REQUEST", (str(request_id),)))
        except OperatorError as e:
            raise click.ClickException(str(e)) from None
        if status is None:
            raise click.ClickException(f"the daemon stopped; request {request_id} stays queued for its next start")
        if status["state"] == "failed":
            raise click.ClickException(f"request {request_id} failed: {status['error']}")
        if status["state"] == "new" and status["error"] and status["error"] != said:
            said = status["error"]
            click.echo(f"not planned yet: {said} (retrying)", err=True)
        rows: dict[str, dict[str, Any]] = status["paths"]
        for p, row in rows.items():
            if row["state"] in FINAL and p not in reported:
                reported[p] = row["state"]
                if not tty:
                    err = f": {row['error']}" if row["state"] in UNSUCCESSFUL else ""
                    click.echo(f"{label[row['state']]} {p}{err}")
        planned = status["state"] == "planned"
        if tty:
            failed = sum(1 for v in reported.values() if v in UNSUCCESSFUL)
            total = max(1, len(rows))
            bar_done = int(30 * len(reported) / total) if planned else 0
            click.echo(f"\r\033[K[{'#' * bar_done}{'.' * (30 - bar_done)}] {len(reported)}/{len(rows)} paths"
                       f"{f', {failed} failed' if failed else ''} ({format_duration(time.monotonic() - start)})",
                       nl=False)  # fmt: skip
        if planned and len(reported) == len(rows):
            break
        time.sleep(0.2)
    if tty:
        click.echo()
    bad = {p: rows[p] for p, st in reported.items() if st in UNSUCCESSFUL}
    for p, row in bad.items() if tty else ():
        click.echo(f"{row['state']}: {p}: {row['error'] or row['state']}")
    causes = sorted({row["error"] for row in bad.values() if row["state"] == "failed"})
    if causes:
        click.echo(f"root cause: {causes[0]}", err=True)
    return 1 if bad else 0


# --- the queue ----------------------------------------------------------------------------------


def _operator_cfg(config_file: Path | None) -> Config:
    return load_config(config_file, cache=None, _validate=False)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True)
def status(config_file: Path | None, as_json: bool) -> None:
    """Is the daemon up, how deep is the queue, how fast is it going, what went wrong, does the cache answer?"""
    import json
    import time

    from .operator import OperatorError, cache_answers
    from .operator import status as get_status
    from .units import format_duration, format_size

    cfg = _operator_cfg(config_file)
    try:
        st = get_status(cfg)
    except OperatorError as e:
        raise click.ClickException(str(e)) from None
    cache_error = cache_answers(cfg) if cfg.cache else "no cache configured"
    st["cache"] = {"url": cfg.cache or None, "answers": cache_error is None, "error": cache_error}
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    d, c = st["daemon"], st["counts"]
    up = f"up (pid {d['pid']}, for {format_duration(d['uptime'])})" if d["up"] else "NOT RUNNING"
    click.echo(f"{'daemon':10} {up}")
    click.echo(
        f"{'cache':10} {cfg.cache or '-'}: {'answers' if cache_error is None else 'DOES NOT ANSWER: ' + cache_error}"
    )
    click.echo(
        f"{'queue':10} {c['pending']} pending, {c['uploading']} uploading, {c['failed']} failed, "
        f"{c['blocked']} blocked, {c['done']} done, {c['upstream']} upstream, {c['dropped']} dropped; "
        f"{c['requests to plan']} requests to plan"
    )
    rates = "  ".join(f"{k}: {v['paths']} paths, {format_size(v['bytes'])}" for k, v in st["uploaded"].items())
    click.echo(f"{'uploaded':10} {rates}")
    total = st["uploaded_total"]
    click.echo(f"{'':10} in all: {total['paths']} paths, {format_size(total['bytes'])}")
    if st["oldest_pending"]:
        o = st["oldest_pending"]
        click.echo(f"{'oldest':10} {o['path']} (waiting {format_duration(o['age'])})")
    if st["last_errors"]:
        click.echo("last errors:")
        for err in st["last_errors"]:
            when = time.strftime("%H:%M:%S", time.localtime(err["time"]))
            click.echo(f"  {when} {err['state']:8} {err['path']}: {err['error']}")


@main.group(invoke_without_command=True)
@click.option("--state", type=click.Choice(list(STATES)))
@click.option("--json", "as_json", is_flag=True)
@config_option
@click.pass_context
def queue(ctx: click.Context, state: str | None, as_json: bool, config_file: Path | None) -> None:
    """List the queue (newest first); subcommands show, retry and drop act on it."""
    import json
    import time

    from .operator import OperatorError, ask, with_queue
    from .protocol import Command
    from .units import format_duration, format_size

    ctx.obj = config_file
    if ctx.invoked_subcommand:
        return
    cfg = _operator_cfg(config_file)
    try:
        inflight = set((ask(cfg, Command("STATUS")) or {"daemon": {}})["daemon"].get("inflight", []))
        rows = asyncio.run(with_queue(cfg, lambda q: q.list_paths(None if state == "uploading" else state)))
    except OperatorError as e:
        raise click.ClickException(str(e)) from None
    for r in rows:
        if r["path"] in inflight:
            r["state"] = "uploading"
    if state == "uploading":
        rows = [r for r in rows if r["state"] == "uploading"]
    elif state == "pending":
        rows = [r for r in rows if r["state"] == "pending"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("the queue is empty" + (f" (state {state})" if state else ""))
        return
    now = time.time()
    width = max(len(r["path"]) for r in rows)
    click.echo(f"{'PATH':{width}}  {'STATE':9} {'TRIES':>5}  {'SIZE':>10}  {'NEXT TRY':>9}  ERROR")
    for r in rows:
        nxt = format_duration(r["next_try"] - now) if r["state"] == "pending" and r["next_try"] > now else ""
        size = format_size(r["file_size"]) if r["file_size"] else ""
        err = (r["last_error"] or "").removeprefix(r["path"] + ": ")[:80] if r["state"] != "done" else ""
        click.echo(f"{r['path']:{width}}  {r['state']:9} {r['attempts']:>5}  {size:>10}  {nxt:>9}  {err}")


@queue.command("show")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def queue_show(config_file: Path | None, path: str, as_json: bool) -> None:
    """A path's state, attempts, last error, next retry and history."""
    import json
    import time

    from .operator import OperatorError, with_queue

    cfg = _operator_cfg(config_file)
    path = path if path.startswith(cfg.store_dir + "/") else os.path.realpath(path)
    try:
        row = asyncio.run(with_queue(cfg, lambda q: q.path_detail(path)))
    except OperatorError as e:
        raise click.ClickException(str(e)) from None
    if row is None:
        raise click.ClickException(f"{path} is not in the queue")
    if as_json:
        click.echo(json.dumps(row, indent=2))
        return

    def at(t: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))

    click.echo(f"path        {row['path']}\nstate       {row['state']}\nattempts    {row['attempts']}")
    if row["state"] == "pending" and row["next_try"] > time.time():
        click.echo(f"next try    {at(row['next_try'])}")
    if row["last_error"]:
        click.echo(f"last error  {row['last_error']}")
    click.echo(f"references  {len(row['references'])}")
    click.echo("history:")
    for ev in row["history"]:
        detail = f" ({ev['detail']})" if ev["detail"] else ""
        click.echo(f"  {at(ev['time'])}  {ev['event']}{detail}")


@queue.command("retry")
@click.argument("paths", nargs=-1)
@click.option("--failed", is_flag=True, help="Every failed path.")
@click.pass_obj
def queue_retry(config_file: Path | None, paths: tuple[str, ...], failed: bool) -> None:
    """Try failed (or backing-off) paths again now."""
    from .operator import OperatorError, retry

    if not paths and not failed:
        raise click.UsageError("give paths, or --failed")
    try:
        n = retry(_operator_cfg(config_file), list(paths), failed)
    except OperatorError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{n} paths queued for another try")


@queue.command("drop")
@click.argument("paths", nargs=-1, required=True)
@click.pass_obj
def queue_drop(config_file: Path | None, paths: tuple[str, ...]) -> None:
    """Stop trying to upload paths (and the queued paths that need them)."""
    from .operator import OperatorError, drop

    try:
        dropped = drop(_operator_cfg(config_file), list(paths))
    except OperatorError as e:
        raise click.ClickException(str(e)) from None
    for p in dropped:
        click.echo(f"dropped {p}")
    if not dropped:
        click.echo("nothing to drop (not pending or failed)")


@main.command("install-hook")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--python", "python", default=sys.executable, show_default=True, help="Interpreter to run it.")
def install_hook(dest: Path, python: str) -> None:
    """Write a fast post-build-hook launcher to DEST.

    The launcher starts Python with -I -S (no site-packages scan, no PYTHON* variables from
    nix-daemon's environment) and imports only hookd.hook: about a third of the start-up time of the
    `hookd-hook` console script, which nix-daemon waits for after every build.
    """
    import os
    import tempfile

    import hookd

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(hookd.__file__)))
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
    click.echo(f"wrote {dest}; in nix.conf: post-build-hook = {dest}")


@main.command()
@click.option("--keep", is_flag=True, help="Keep the temp directory (stores, cache, logs) for a look.")
def selftest(keep: bool) -> None:
    """End to end on a private Nix: build as an unprivileged user, upload, substitute with signatures."""
    from . import selftest as st

    try:
        root = st.run(keep=keep)
    except (st.CommandFailed, RuntimeError, TimeoutError, OSError) as e:
        raise click.ClickException(f"self-test failed: {e}") from None
    if keep:
        click.echo(f"kept {root}")


if __name__ == "__main__":
    main()
