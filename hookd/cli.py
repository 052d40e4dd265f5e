"""The `hookd` command line: thin click commands over the library."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from . import __version__
from .config import Config, ConfigError, load
from .lifecycle import STATES
from .render import ProgressLine, setup_logging

if TYPE_CHECKING:
    from .backends import Backend

T = TypeVar("T")


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors a person can act on (imported when one is raised: the command line starts fast)."""
    from .backends import BackendError
    from .catalog import GcError
    from .intake import DaemonError
    from .operator import OperatorError
    from .pins import PinError
    from .store import StoreError

    return (BackendError, ConfigError, DaemonError, GcError, OperatorError, PinError, StoreError)


class _Commands(click.Group):
    """A user error ends the command with its message (exit 1); any other exception is a bug: its traceback shows."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as e:
            if isinstance(e, _user_errors()):
                raise click.ClickException(str(e)) from None
            raise


def load_config(config_file: Path | None, _validate: bool = True, **overrides: Any) -> Config:
    cfg = load(config_file, overrides=overrides)
    return cfg.validate() if _validate else cfg


@click.group(cls=_Commands)
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
    from .daemon import serve

    setup_logging(log_level, log_format)
    serve(load_config(config_file, **overrides))


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


def _backend(config_file: Path | None, cache: str | None) -> tuple[Config, Backend]:
    from .backends import open_backend

    cfg = load_config(config_file, cache=cache)
    return cfg, open_backend(cfg.cache, cfg)


def _on_cache(backend: Backend, work: Callable[[Backend], Awaitable[T]]) -> T:
    """Run `work` against the cache, and close it."""

    async def go() -> T:
        async with backend:
            return await work(backend)

    return asyncio.run(go())


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
    from . import gc as gcmod
    from .render import gc_report
    from .safety import BoundsError
    from .units import parse_duration, parse_size

    setup_logging("warning")
    try:
        retention, lease_s = parse_duration(older_than), parse_duration(lease)
        grace_s = parse_duration(grace) if grace else None
        budget = parse_size(max_size) if max_size else None
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    cfg, backend = _backend(config_file, cache)
    bounds = dataclasses.replace(cfg.bounds, grace=cfg.gc_grace if grace_s is None else grace_s)
    try:
        bounds.check()
    except BoundsError as e:
        raise click.BadParameter(str(e)) from None
    out = _on_cache(backend, lambda b: gcmod.collect(
        b, cfg.state_dir, bounds, older_than=retention, max_size=budget, lease=lease_s, dry_run=dry_run,
        progress=ProgressLine(),
    ))  # fmt: skip
    click.echo(json.dumps(out, indent=2) if as_json else "\n".join(gc_report(out)))


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
    from .keys import read_public_key
    from .render import verify_report
    from .signing import KeyFileError
    from .verify import verify as run_verify

    setup_logging("warning")
    try:
        key = read_public_key(public_key_file) if public_key_file else None
    except (OSError, KeyFileError) as e:
        raise click.ClickException(f"public key {public_key_file}: {e}") from None
    _, backend = _backend(config_file, cache)
    report = _on_cache(backend, lambda b: run_verify(b, key, deep, repair, ProgressLine()))
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else "\n".join(verify_report(report, deep)))
    if not report.whole and not repair:
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

    if list_:
        _, backend = _backend(config_file, cache)
        for n, p in sorted(_on_cache(backend, pins.list_pins).items()):
            click.echo(f"{n}\t{p}")
        return
    if not name or not store_path:
        raise click.UsageError("give NAME and STORE-PATH, or --list")
    _, backend = _backend(config_file, cache)
    _on_cache(backend, lambda b: pins.pin(b, name, store_path))
    click.echo(f"pinned {store_path} as {name}")


@main.command()
@click.argument("name")
@cache_option
@config_option
def unpin(name: str, cache: str | None, config_file: Path | None) -> None:
    """Remove the pin NAME (GC may then collect what only it kept)."""
    from . import pins

    _, backend = _backend(config_file, cache)
    if not _on_cache(backend, lambda b: pins.unpin(b, name)):
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
    from . import hook, operator, pins, protocol

    if not closure:
        raise click.UsageError("hookd uploads closures only: a path whose references are missing is unusable")
    cfg = load_config(config_file, cache=cache or "file:///unused", _validate=False)
    store_paths, sent = operator.push(cfg, paths)
    if sent.outcome == hook.REFUSED:  # spooling the same request would not change the daemon's mind
        raise click.ClickException(f"the daemon refused: {sent.detail}")
    if sent.outcome == hook.LOST:
        raise click.ClickException(f"daemon: {sent.detail}; spool {cfg.spool_path}: {sent.error}")
    if sent.outcome == hook.SPOOLED:
        click.echo(f"daemon: {sent.detail}; spooled to {sent.spooled} (the daemon picks it up when it starts)")
        if wait:
            raise click.ClickException("not waiting: the daemon is not running")
    else:
        click.echo(f"queued {len(store_paths)} paths ({sent.detail})")
    if pin_name:
        _, backend = _backend(config_file, cache)
        _on_cache(backend, lambda b: pins.pin(b, pin_name, store_paths[-1], require_present=False))
        click.echo(f"pinned {store_paths[-1]} as {pin_name}")
    request_id = protocol.queued_id(sent.detail)
    if wait and request_id is not None:
        sys.exit(_wait_for(cfg, request_id))


def _wait_for(cfg: Config, request_id: int) -> int:
    """Follow one request until each path it planned is uploaded, failed or blocked; the exit status."""
    from . import render
    from .operator import RequestWatch, watch_request

    tty = sys.stdout.isatty()
    start = time.monotonic()
    watch = RequestWatch(request_id)
    for watch in watch_request(cfg, request_id):
        if watch.note:
            click.echo(f"not planned yet: {watch.note} (retrying)", err=True)
        if tty:
            click.echo(render.request_bar(watch, time.monotonic() - start), nl=False)
        for p in watch.new if not tty else ():
            click.echo(render.path_ended(p, watch.paths[p]))
    if tty:
        click.echo()
        for line in render.unsuccessful(watch.unsuccessful):
            click.echo(line)
    if cause := watch.root_cause:
        click.echo(f"root cause: {cause}", err=True)
    return 1 if watch.unsuccessful else 0


# --- the queue ----------------------------------------------------------------------------------


def _operator_cfg(config_file: Path | None) -> Config:
    return load_config(config_file, cache=None, _validate=False)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True)
def status(config_file: Path | None, as_json: bool) -> None:
    """Is the daemon up, how deep is the queue, how fast is it going, what went wrong, does the cache answer?"""
    from . import operator, render

    st = operator.status(_operator_cfg(config_file))
    click.echo(json.dumps(st, indent=2) if as_json else "\n".join(render.status(st)))


@main.group(invoke_without_command=True)
@click.option("--state", type=click.Choice(list(STATES)))
@click.option("--json", "as_json", is_flag=True)
@config_option
@click.pass_context
def queue(ctx: click.Context, state: str | None, as_json: bool, config_file: Path | None) -> None:
    """List the queue (newest first); subcommands show, retry and drop act on it."""
    from . import operator, render

    ctx.obj = config_file
    if ctx.invoked_subcommand:
        return
    rows = operator.list_queue(_operator_cfg(config_file), state)
    click.echo(json.dumps(rows, indent=2) if as_json else "\n".join(render.queue_table(rows, state, time.time())))


@queue.command("show")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def queue_show(config_file: Path | None, path: str, as_json: bool) -> None:
    """A path's state, attempts, last error, next retry and history."""
    from . import operator, render

    row = operator.path_detail(_operator_cfg(config_file), path)
    click.echo(json.dumps(row, indent=2) if as_json else "\n".join(render.path_detail(row, time.time())))


@queue.command("retry")
@click.argument("paths", nargs=-1)
@click.option("--failed", is_flag=True, help="Every failed path.")
@click.pass_obj
def queue_retry(config_file: Path | None, paths: tuple[str, ...], failed: bool) -> None:
    """Try failed (or backing-off) paths again now."""
    from .operator import retry

    if not paths and not failed:
        raise click.UsageError("give paths, or --failed")
    n = retry(_operator_cfg(config_file), list(paths), failed)
    click.echo(f"{n} paths queued for another try")


@queue.command("drop")
@click.argument("paths", nargs=-1, required=True)
@click.pass_obj
def queue_drop(config_file: Path | None, paths: tuple[str, ...]) -> None:
    """Stop trying to upload paths (and the queued paths that need them)."""
    from .operator import drop

    dropped = drop(_operator_cfg(config_file), list(paths))
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
    from .operator import write_launcher

    dest = write_launcher(dest, python)
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
