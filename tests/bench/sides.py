"""Where a contender runs: on this machine, or in a Debian chroot (.ci/chroot) with that release's Nix and
Python. The benchmark drives both from one process: a chroot shares the network namespace (it reaches the
servers on 127.0.0.1), its files are visible from here under its directory, and its processes' /proc entries
(peak RSS) too.

A private Nix per side, with the same store directory string on both (a different directory on disk), so
store paths, NARs and narinfos are identical and a closure exported here imports there unchanged.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from hookd.selftest import NixQueries

NIX_CONF = """build-users-group =
sandbox = false
substituters =
require-sigs = true
experimental-features = nix-command
max-jobs = 2
"""


class Side:
    """Runs commands here (`chroot` None) or in the chroot at `chroot`, with a clean environment there."""

    def __init__(self, name: str, chroot: Path | None = None) -> None:
        self.name = name
        self.chroot = chroot

    def host_path(self, path: str | Path) -> Path:
        """Where this machine sees the side's `path`."""
        return Path(path) if self.chroot is None else self.chroot / str(path).lstrip("/")

    def argv(self, argv: Sequence[str], env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
        """The command line and environment that run `argv` with `env` on this side."""
        if self.chroot is None:
            return list(argv), dict(env)
        settings = [f"{k}={v}" for k, v in env.items()]
        return ["chroot", str(self.chroot), "/usr/bin/env", "-i", *settings, *argv], {"PATH": os.environ["PATH"]}

    def run(
        self, argv: Sequence[str], env: Mapping[str, str], check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        full, e = self.argv(argv, env)
        kw.setdefault("capture_output", "stdout" not in kw)
        proc: subprocess.CompletedProcess[str] = subprocess.run(full, env=e, text=True, check=False, **kw)
        if check and proc.returncode:
            raise RuntimeError(
                f"{self.name}: {' '.join(argv)} exited {proc.returncode}:\n{(proc.stderr or '')[-3000:]}"
            )
        return proc

    def popen(self, argv: Sequence[str], env: Mapping[str, str], log: IO[bytes], **kw: Any) -> subprocess.Popen[bytes]:
        full, e = self.argv(argv, env)
        return subprocess.Popen(full, env=e, stdout=log, stderr=log, **kw)

    @property
    def path_env(self) -> str:
        return (
            os.environ["PATH"]
            if self.chroot is None
            else "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        )

    @property
    def hookd(self) -> str:
        """The hookd command of this side's checkout (the chroot's is /src, set up by .ci/chroot)."""
        if self.chroot is None:
            return shutil.which("hookd", path=os.path.dirname(sys.executable)) or "hookd"
        return "/src/.venv/bin/hookd"

    def versions(self) -> dict[str, str]:
        """Debian, Nix and the Python that runs hookd, on this side."""
        env = {"PATH": self.path_env}
        py = (
            platform.python_version()
            if self.chroot is None
            else self.run(
                ["/src/.venv/bin/python", "-c", "import platform; print(platform.python_version())"], env
            ).stdout.strip()
        )
        return {
            "debian": self.host_path("/etc/debian_version").read_text().strip(),
            "nix": self.run(["nix", "--version"], env).stdout.split()[-1],
            "python": py,
        }


class Nix(NixQueries):
    """A private Nix on a side: store, state, config and nix-daemon under `root` (the same on every side)."""

    def __init__(self, side: Side, root: Path) -> None:
        self.side = side
        self.root = root
        self.store_dir = str(root / "nix" / "store")
        self.socket = root / "nix-daemon.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment for talking to this Nix as a client of its daemon (paths as the side sees them)."""
        return {
            "PATH": self.side.path_env,
            "HOME": str(self.root / "home"),
            "XDG_CACHE_HOME": str(self.root / "home" / ".cache"),
            "NIX_STORE_DIR": self.store_dir,
            "NIX_STATE_DIR": str(self.root / "nix" / "var" / "nix"),
            "NIX_LOG_DIR": str(self.root / "nix" / "var" / "log" / "nix"),
            "NIX_CONF_DIR": str(self.root / "etc"),
            "NIX_DAEMON_SOCKET_PATH": str(self.socket),
            "NIX_REMOTE": "daemon",
        }

    def start(self) -> None:
        host = self.side.host_path
        for d in ("etc", "home", "nix/store", "nix/var/nix", "nix/var/log/nix"):
            host(self.root / d).mkdir(parents=True, exist_ok=True)
        host(self.root).chmod(0o755)
        (host(self.root / "etc") / "nix.conf").write_text(NIX_CONF)
        log = open(host(self.root / "nix-daemon.log"), "ab")  # noqa: SIM115 - the daemon keeps it open
        # "local", not "auto": with auto, a daemon that cannot write its state connects to its own socket
        self.proc = self.side.popen(["nix-daemon"], dict(self.env, NIX_REMOTE="local"), log, start_new_session=True)
        deadline = time.monotonic() + 20
        while not host(self.socket).exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.side.name}: nix-daemon did not start; see {host(self.root / 'nix-daemon.log')}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        from hookd.selftest import stop_group

        if self.proc:
            stop_group(self.proc)

    def nix(self, *argv: str, user: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.side.run(argv, self.env, check=check)

    def write_expr(self, name: str, text: str) -> Path:
        path = self.root / name
        self.side.host_path(path).write_text(text)
        return path

    def delete(self, paths: Iterable[str]) -> None:
        """Delete paths and whatever refers to them (the top's .drv names its inputs), so the next workload has
        the page cache and the disk to itself."""
        paths = self.nix("nix-store", "--query", "--referrers-closure", *paths).stdout.split()
        # as root on the store itself: the daemon refuses --ignore-liveness (its clients' temporary roots)
        self.side.run(["nix-store", "--delete", "--ignore-liveness", *paths], dict(self.env, NIX_REMOTE="local"))


def copy_closure(src: Nix, dest: Nix, closure: list[str]) -> None:
    """The closure from one side's store to another's, NARs and references unchanged (export | import)."""
    exp_argv, exp_env = src.side.argv(["nix-store", "--export", *closure], src.env)
    imp_argv, imp_env = dest.side.argv(["nix-store", "--import"], dest.env)
    exporter = subprocess.Popen(exp_argv, env=exp_env, stdout=subprocess.PIPE)
    assert exporter.stdout is not None
    imported = subprocess.run(imp_argv, env=imp_env, stdin=exporter.stdout, capture_output=True, text=True)
    exporter.stdout.close()
    if exporter.wait() or imported.returncode:
        raise RuntimeError(f"copying the closure to {dest.side.name} failed:\n{imported.stderr[-3000:]}")
