"""The `hookd` command line: thin click commands over the library."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .config import Config, ConfigError, load

log = logging.getLogger("hookd")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Their debug output carries request headers (signatures, access key ids): never let it through.
    for noisy in ("botocore", "aiobotocore", "aiohttp", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def load_config(config_file: Path | None, **overrides: Any) -> Config:
    try:
        return load(config_file, overrides=overrides).validate()
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


@click.group()
@click.version_option(__version__, prog_name="hookd")
def main() -> None:
    """hookd: upload every path your Nix builder realises to a signed binary cache."""


@main.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--cache", help="Cache URL, for example file:///var/cache/nix.")
@click.option(
    "--state-dir", type=click.Path(path_type=Path), help="Queue, socket, spool (default /var/lib/hookd)."
)
@click.option(
    "--socket", type=click.Path(path_type=Path), help="Socket path (default <state-dir>/hookd.sock)."
)
@click.option("--spool-dir", type=click.Path(path_type=Path), help="Spool (default <state-dir>/spool).")
@click.option("--secret-key-file", type=click.Path(path_type=Path), help="Signing key (Nix format).")
@click.option("--compression", type=click.Choice(["zstd", "xz", "none"]))
@click.option("--compression-level", type=int)
@click.option("--store-dir", help="Nix store directory (default /nix/store).")
@click.option("--max-parallel", type=int, help="Paths uploaded at the same time.")
@click.option("--log-level", default="info", show_default=True)
def daemon(config_file: Path | None, log_level: str, **overrides: Any) -> None:
    """Run the upload daemon."""
    from .backends import PermanentBackendError, open_backend
    from .daemon import Daemon, DaemonError
    from .keys import KeyPermissionError, default_key_name, load_secret_key, write_keypair
    from .signing import KeyFileError
    from .store import Store

    setup_logging(log_level)
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
config_option = click.option(
    "--config", "config_file", type=click.Path(path_type=Path), help="TOML config file."
)


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
    from .gc import GcError

    try:
        return asyncio.run(coro)
    except (GcError, BackendError, ValueError) as e:
        raise click.ClickException(str(e)) from None


@main.command()
@cache_option
@config_option
@click.option("--older-than", default="30d", show_default=True, help="Retention: keep paths modified since.")
@click.option("--max-size", help="Budget for the kept closure (for example 50G): oldest roots go first.")
@click.option("--grace", default="1h", show_default=True, help="Never delete anything younger than this.")
@click.option("--lease", default="2h", show_default=True, help="How long the GC lease holds.")
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def gc(
    cache: str | None, config_file: Path | None, older_than: str, max_size: str | None, grace: str,
    lease: str, dry_run: bool, as_json: bool,
) -> None:  # fmt: skip
    """Garbage-collect a throwaway cache: keep pins and recent closures, delete the rest safely."""
    import json
    import time

    from . import gc as gcmod
    from .units import format_size, parse_duration, parse_size

    setup_logging("warning")
    try:
        retention, grace_s, lease_s = parse_duration(older_than), parse_duration(grace), parse_duration(lease)
        budget = parse_size(max_size) if max_size else None
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    cfg, backend = _backend(config_file, cache)
    progress = ProgressLine()

    async def go() -> dict[str, Any]:
        lock = gcmod.Lease(backend, lease_s)
        try:
            if not dry_run:
                await lock.acquire()
            try:
                cfg.state_dir.mkdir(parents=True, exist_ok=True)
                index = gcmod.NarinfoIndex(gcmod.index_path(cfg.state_dir, backend.url))
            except OSError:
                index = gcmod.NarinfoIndex(None)
            try:
                snap = await gcmod.snapshot(backend, index, progress)
            finally:
                index.close()
            plan = gcmod.plan(snap, now=time.time(), older_than=retention, grace=grace_s, max_size=budget)
            out = {
                "cache": backend.url,
                "dry_run": dry_run,
                "narinfo_reads": snap.narinfo_reads,
                **plan.to_json(),
            }
            if not dry_run:
                result = await gcmod.sweep(backend, plan, progress)
                out["deleted"] = {"objects": result.deleted, "bytes": result.bytes, "spared": result.spared}
                await lock.release()
            return out
        finally:
            await backend.close()

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
            f"deleted {d['objects']} objects ({format_size(d['bytes'])}); "
            f"{d['spared']} spared (refreshed meanwhile)"
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
        try:
            return await run_verify(backend, key, deep, repair, ProgressLine())
        finally:
            await backend.close()

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
def pin_cmd(
    name: str | None, store_path: str | None, list_: bool, cache: str | None, config_file: Path | None
) -> None:
    """Pin STORE-PATH (and its closure) in the cache under NAME, so GC keeps it."""
    from . import gc as gcmod

    _, backend = _backend(config_file, cache)

    async def go() -> Any:
        try:
            if list_:
                return await gcmod.list_pins(backend)
            if not name or not store_path:
                raise click.UsageError("give NAME and STORE-PATH, or --list")
            await gcmod.pin(backend, name, store_path)
            return None
        finally:
            await backend.close()

    pins = _run(go())
    if list_:
        for n, p in sorted(pins.items()):
            click.echo(f"{n}\t{p}")
    else:
        click.echo(f"pinned {store_path} as {name}")


@main.command()
@click.argument("name")
@cache_option
@config_option
def unpin(name: str, cache: str | None, config_file: Path | None) -> None:
    """Remove the pin NAME (GC may then collect what only it kept)."""
    from . import gc as gcmod

    _, backend = _backend(config_file, cache)

    async def go() -> bool:
        try:
            return await gcmod.unpin(backend, name)
        finally:
            await backend.close()

    if not _run(go()):
        raise click.ClickException(f"no pin named {name!r}")
    click.echo(f"unpinned {name}")


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--pin", "pin_name", help="Also pin the (last) path under this name.")
@cache_option
@config_option
def push(paths: tuple[str, ...], pin_name: str | None, cache: str | None, config_file: Path | None) -> None:
    """Queue store paths (with their closures) for upload by the running daemon."""
    from . import gc as gcmod
    from . import hook, protocol

    cfg = load_config(config_file, cache=cache or "file:///unused")
    store_paths = tuple(p if p.startswith(cfg.store_dir + "/") else os.path.realpath(p) for p in paths)
    request = protocol.Enqueue(None, store_paths).encode()
    try:
        ok, detail = hook.send(str(cfg.socket_path), request, timeout=10)
    except OSError as e:
        ok, detail = False, f"cannot reach {cfg.socket_path}: {e.strerror or e}"
    if not ok:
        try:
            spooled = hook.spool(str(cfg.spool_path), request)
        except OSError as e:
            raise click.ClickException(f"daemon: {detail}; spool {cfg.spool_path}: {e.strerror}") from None
        click.echo(f"daemon: {detail}; spooled to {spooled} (the daemon picks it up when it starts)")
    else:
        click.echo(f"queued {len(paths)} paths ({detail})")
    if pin_name:
        _, backend = _backend(config_file, cache)

        async def go() -> None:
            try:
                await gcmod.pin(backend, pin_name, store_paths[-1], require_present=False)
            finally:
                await backend.close()

        _run(go())
        click.echo(f"pinned {store_paths[-1]} as {pin_name}")


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
