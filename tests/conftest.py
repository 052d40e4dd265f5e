"""Shared fixtures. The Nix fixtures start a private nix-daemon (see hookd.selftest) once per session."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hookd import selftest
from hookd.selftest import HookdProcess, NixEnv

from .servers import Moto, Nginx, Radosgw, S3Server

VECTORS = Path(__file__).resolve().parent / "vectors"  # made by real Nix 2.8.0; see its README


@pytest.fixture(scope="session")
def vectors() -> Path:
    return VECTORS


def _require_nix() -> None:
    if os.geteuid() != 0 or not shutil.which("nix-daemon"):
        pytest.fail("these tests need root and Debian's nix-bin (run .ci/run, which installs it)", pytrace=False)


@pytest.fixture(scope="session")
def build_user() -> str:
    _require_nix()
    return selftest.ensure_user().pw_name


@pytest.fixture(scope="session")
def nixenv() -> Iterator[NixEnv]:
    """A private nix-daemon whose post-build-hook is hookd-hook, talking to <root>/hookd."""
    _require_nix()
    root = Path(tempfile.mkdtemp(prefix="hk-", dir="/tmp"))
    env = NixEnv(root, selftest.install_launcher(root / "hookd-hook"), {"HOOKD_STATE_DIR": str(root / "hookd")})
    env.start()
    yield env
    env.stop()
    shutil.rmtree(root, ignore_errors=True)


HookdFactory = Callable[..., HookdProcess]

FAST_BOUNDS = {"HOOKD_GC_CHECK_TO_DELETE": "0.5", "HOOKD_GC_REQUEST_TIMEOUT": "1", "HOOKD_MAX_CLOCK_SKEW": "2"}
"""The upload/GC protocol's bounds for tests with grace periods of seconds (hookd/safety.py): GC and
uploaders of one cache must share them."""


@pytest.fixture(scope="session")
def servers_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hks-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def moto(servers_dir: Path) -> Iterator[Moto]:
    """moto's S3 server on 127.0.0.1 (a real HTTP server speaking S3)."""
    server = Moto(servers_dir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def radosgw(servers_dir: Path) -> Iterator[Radosgw]:
    """Ceph's radosgw on a throw-away one-node cluster on 127.0.0.1 (a real S3 server; ~1-3 s to start)."""
    server = Radosgw(servers_dir)
    yield server
    server.stop()


S3_SERVERS = ["moto", "radosgw"]


@pytest.fixture(params=S3_SERVERS)
def s3server(request: pytest.FixtureRequest) -> S3Server:
    """Each S3 test runs against every S3 server: moto (AWS's behaviour as modelled) and radosgw (a real one)."""
    server: S3Server = request.getfixturevalue(request.param)
    return server


@pytest.fixture(scope="session")
def nginx(servers_dir: Path) -> Iterator[Nginx]:
    """nginx with WebDAV PUT/DELETE on 127.0.0.1, serving servers_dir/www."""
    server = Nginx(servers_dir, servers_dir / "www")
    yield server
    server.stop()


@pytest.fixture
def hookd_factory(nixenv: NixEnv, tmp_path: Path) -> Iterator[HookdFactory]:
    """Start hookd daemons on the state directory the hook talks to; each test gets fresh state, and a fresh
    log (tests count lines in it: one test's lines must not count in the next)."""
    state = nixenv.root / "hookd"
    shutil.rmtree(state, ignore_errors=True)
    started: list[HookdProcess] = []

    def make(
        cache: Path | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        start: bool = True,
    ) -> HookdProcess:
        proc = HookdProcess(nixenv, state, f"file://{cache or tmp_path / 'cache'}", args, env or {})
        if start:
            proc.start()
        started.append(proc)
        return proc

    yield make
    for p in started:
        p.stop()
        p.log_file.unlink(missing_ok=True)
    shutil.rmtree(state, ignore_errors=True)
