"""The `hookd` command line: thin click commands over the library."""

from __future__ import annotations

import asyncio
import logging
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
