"""An end-to-end check on a private Nix: hook → daemon → signed file:// cache → substitution.

It runs a nix-daemon of its own (own store directory, state, nix.conf and socket, all under one temp
directory), with hookd-hook as its post-build-hook and a hookd daemon beside it; builds derivations as
an unprivileged user; then substitutes the results into a fresh store that trusts only the cache and
hookd's key, with signatures required and local builds forbidden. The machine's own Nix installation
and nix.conf are never touched. The test suite drives the same classes.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .store import InvalidPathError, json_format_args, parse_path_info

BUILD_USER = "hookd-build"

CHAIN_NIX = r"""
{ salt ? "0" }:
let
  sh = "/bin/sh";
  mk = name: script: derivation {
    inherit name salt;
    system = builtins.currentSystem;
    builder = sh;
    args = [ "-c" script ];
  };
  a = mk "chain-a" "echo a-$salt > $out";
  b = mk "chain-b" "echo b-$salt ${a} > $out";
  c = mk "chain-c" "/bin/mkdir $out; echo ${b} > $out/dep; /bin/ln -s ${a} $out/a";
  top = mk "chain-top"
    "/bin/mkdir -p $out/bin; printf '#!/bin/sh\necho ${c}\n' > $out/bin/top; /bin/chmod +x $out/bin/top";
  multi = derivation {
    name = "multi";
    inherit salt;
    system = builtins.currentSystem;
    builder = sh;
    outputs = [ "out" "dev" "doc" ];
    args = [ "-c" "echo lib-$salt ${a} > $out; /bin/mkdir $dev; echo $out > $dev/include; echo doc > $doc" ];
  };
in { inherit a b c top multi; }
"""


def _run(argv: Sequence[str], env: Mapping[str, str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), env=dict(env), text=True, capture_output=True, check=False, **kw)  # type: ignore[call-overload, no-any-return]


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM a process started with start_new_session (and its children); SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class CommandFailed(RuntimeError):
    def __init__(self, argv: Sequence[str], proc: subprocess.CompletedProcess[str]) -> None:
        super().__init__(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        self.proc = proc


def ensure_user(name: str = BUILD_USER) -> pwd.struct_passwd:
    """An unprivileged user to build with (created when missing; needs root)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
        return pwd.getpwnam(name)


class NixQueries:
    """Path-info queries on a private Nix (its `nix()` runner and store directory), shared by the
    selftest's and the benchmark's Nix sides."""

    store_dir: str
    _json_flags: tuple[str, ...] | None = None

    def nix(self, *argv: str) -> subprocess.CompletedProcess[str]:
        raise NotImplementedError

    def json_flags(self) -> tuple[str, ...]:
        """How to ask this Nix for path-info JSON (`--json-format 2` where it takes it)."""
        if self._json_flags is None:
            self._json_flags = json_format_args(self.nix("nix", "--version").stdout)
        return self._json_flags

    def path_info(self, paths: Iterable[str], recursive: bool = False) -> list[dict[str, Any]]:
        argv = ["nix", "path-info", *self.json_flags(), *(["-r"] if recursive else []), *paths]
        infos = parse_path_info(json.loads(self.nix(*argv).stdout), self.store_dir)
        return [i.to_json() for i in infos.values()]

    def closure(self, paths: Iterable[str]) -> list[str]:
        return sorted(str(i["path"]) for i in self.path_info(paths, recursive=True))


class NixEnv(NixQueries):
    """A private Nix: store, state, config and nix-daemon under `root`."""

    def __init__(
        self,
        root: Path,
        post_build_hook: str | None = None,
        hook_env: Mapping[str, str] = {},
        extra_conf: Sequence[str] = (),
    ) -> None:
        self.root = root
        self.extra_conf = list(extra_conf)  # further nix.conf lines
        self.store_dir = str(root / "nix" / "store")
        self.state_dir = root / "nix" / "var" / "nix"
        self.conf_dir = root / "etc"
        self.socket = root / "nix-daemon.sock"
        self.home = root / "home"
        self.post_build_hook = post_build_hook
        self.hook_env = dict(hook_env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file = root / "nix-daemon.log"

    @property
    def env(self) -> dict[str, str]:
        """Environment for talking to this Nix (as a client of its daemon)."""
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
            "NIX_STORE_DIR": self.store_dir,
            "NIX_STATE_DIR": str(self.state_dir),
            "NIX_LOG_DIR": str(self.root / "nix" / "var" / "log" / "nix"),
            "NIX_CONF_DIR": str(self.conf_dir),
            "NIX_DAEMON_SOCKET_PATH": str(self.socket),
            "NIX_REMOTE": "daemon",
        }

    def start(self) -> None:
        self.root.chmod(0o755)
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o1777)
        conf = [
            "build-users-group =",
            "sandbox = false",
            "substituters =",
            "require-sigs = true",
            "experimental-features = nix-command",
            "max-jobs = 2",
        ]
        if self.post_build_hook:
            conf.append(f"post-build-hook = {self.post_build_hook}")
        conf += self.extra_conf
        (self.conf_dir / "nix.conf").write_text("\n".join(conf) + "\n")
        for d in (Path(self.store_dir), self.state_dir, Path(self.env["NIX_LOG_DIR"])):
            d.mkdir(parents=True, exist_ok=True)
        # "local", not the default "auto": with auto, a daemon that cannot write its state directory
        # connects to its own socket, and every connection forks another.
        env = dict(self.env, NIX_REMOTE="local", **self.hook_env)
        log = open(self.log_file, "ab")  # noqa: SIM115 - the daemon keeps it open
        self.proc = subprocess.Popen(["nix-daemon"], env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nix-daemon did not start; see {self.log_file}:\n{self.log_file.read_text()}")
            time.sleep(0.05)
        self.socket.chmod(0o666)

    def stop(self) -> None:
        if self.proc:
            stop_group(self.proc)

    def nix(self, *argv: str, user: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = _run(argv, self.env, **({"user": user} if user else {}))
        if check and proc.returncode != 0:
            raise CommandFailed(argv, proc)
        return proc

    def write_expr(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(text)
        path.chmod(0o644)
        return path

    def build(self, expr: Path, attrs: Iterable[str], user: str, args: Mapping[str, str] = {}) -> list[str]:
        """Build attributes of `expr` as `user` through the daemon; the output paths."""
        argv = ["nix-build", str(expr), "--no-out-link"]
        for a in attrs:
            argv += ["-A", a]
        for k, v in args.items():
            argv += ["--argstr", k, v]
        return self.nix(*argv, user=user).stdout.split()

    def substitute_fresh(self, paths: Sequence[str], cache_url: str, public_key: str, fresh_root: Path) -> None:
        """Realise `paths` in a new store at `fresh_root` from `cache_url` alone: signatures required,
        builds forbidden. Raises CommandFailed if Nix cannot."""
        conf = fresh_root / "etc"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "nix.conf").write_text("experimental-features = nix-command\n")
        env = dict(self.env, NIX_CONF_DIR=str(conf), NIX_REMOTE="")
        argv = [
            "nix-store", "--store", str(fresh_root / "root"), "--realise", *paths,
            "--option", "substituters", cache_url,
            "--option", "trusted-public-keys", public_key,
            "--option", "require-sigs", "true",
            "--max-jobs", "0",
        ]  # fmt: skip
        proc = _run(argv, env)
        if proc.returncode != 0:
            raise CommandFailed(argv, proc)
        # Ask the fresh store itself, so that a realise that went to some other store cannot pass.
        check = ["nix", "path-info", *self.json_flags(), "--store", str(fresh_root / "root"), *paths]
        proc = _run(check, env)
        if proc.returncode != 0:
            raise CommandFailed(check, proc)
        try:
            valid = set(parse_path_info(json.loads(proc.stdout), self.store_dir))
        except InvalidPathError as e:
            raise RuntimeError(f"the fresh store lacks {e.path} after substitution") from None
        if valid != set(paths):
            raise RuntimeError(f"the fresh store lacks {sorted(set(paths) - valid)} after substitution")

    def verify_cache(self, paths: Sequence[str], cache_url: str, public_key: str) -> None:
        """`nix store verify` on the cache itself: NAR hashes and signatures of the closure of `paths`."""
        env = dict(self.env, NIX_REMOTE="")
        argv = [
            "nix",
            "store",
            "verify",
            "--store",
            cache_url,
            "--trusted-public-keys",
            public_key,
            "-r",
            *paths,
        ]
        proc = _run(argv, env)
        if proc.returncode != 0:
            raise CommandFailed(argv, proc)


class HookdProcess:
    """A `hookd daemon` subprocess uploading to `cache_url`, reading the store of `nix`."""

    def __init__(
        self,
        nix: NixEnv,
        state_dir: Path,
        cache_url: str,
        extra_args: Sequence[str] = (),
        extra_env: Mapping[str, str] = {},
    ) -> None:
        self.nix = nix
        self.extra_env = dict(extra_env)
        self.state_dir = state_dir
        self.cache_url = cache_url
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file = state_dir.parent / f"{state_dir.name}.log"

    @property
    def socket(self) -> Path:
        return self.state_dir / "hookd.sock"

    @property
    def public_key(self) -> str:
        return (self.state_dir / "public-key").read_text().strip()

    def start(self, wait: bool = True) -> None:
        hookd = shutil.which("hookd", path=os.path.dirname(sys.executable)) or "hookd"
        argv = [
            hookd, "daemon", "--cache", self.cache_url, "--state-dir", str(self.state_dir),
            "--store-dir", self.nix.store_dir, *self.extra_args,
        ]  # fmt: skip
        log = open(self.log_file, "ab")  # noqa: SIM115 - the daemon keeps it open
        env = {**self.nix.env, "HOOKD_CONFIG": "/dev/null", **self.extra_env}
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        start = time.monotonic()
        while not self.socket.exists():
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > start + timeout:
                how = "not started" if self.proc is None else f"exit status {self.proc.poll()}"
                raise RuntimeError(
                    f"hookd daemon did not start ({how} after {time.monotonic() - start:.1f} s):\n{self.log()}"
                )
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


def wait_for_narinfos(cache_dir: Path, paths: Iterable[str], timeout: float = 120) -> None:
    """Wait until the cache holds a narinfo for every path."""
    wanted = {Path(p).name[:32] + ".narinfo" for p in paths}
    deadline = time.monotonic() + timeout
    while True:
        missing = [w for w in wanted if not (cache_dir / w).exists()]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(missing)} of {len(wanted)} narinfos still missing after {timeout:g} s")
        time.sleep(0.1)


def console_hook() -> str:
    """The `hookd-hook` console script beside this interpreter."""
    return shutil.which("hookd-hook", path=os.path.dirname(sys.executable)) or "hookd-hook"


def install_launcher(dest: Path) -> str:
    """Write the fast hook launcher (`hookd install-hook`) to `dest`; returns its path."""
    hookd = shutil.which("hookd", path=os.path.dirname(sys.executable)) or "hookd"
    subprocess.run([hookd, "install-hook", str(dest)], check=True, capture_output=True)
    return str(dest)


def run(keep: bool = False, echo: bool = True) -> Path:
    """The whole self-test; returns the temp directory (removed unless `keep`). Raises on failure."""

    def say(msg: str) -> None:
        if echo:
            print(f"hookd selftest: {msg}", flush=True)

    if os.geteuid() != 0:
        raise PermissionError("the self-test starts its own nix-daemon and build user: run it as root")
    if not shutil.which("nix-daemon"):
        raise FileNotFoundError("nix-daemon not found: install Nix (Debian: apt-get install nix-bin)")
    root = Path(tempfile.mkdtemp(prefix="hookd-selftest-", dir="/tmp"))
    user = ensure_user()
    state = root / "hookd"
    cache = root / "cache"
    root.chmod(0o755)
    nix = NixEnv(root, install_launcher(root / "hookd-hook"), {"HOOKD_STATE_DIR": str(state)})
    hookd = HookdProcess(nix, state, f"file://{cache}")
    try:
        say(f"private Nix store {nix.store_dir}, cache {cache}")
        nix.start()
        hookd.start()
        say(f"hookd daemon up; public key {hookd.public_key}")
        expr = nix.write_expr("chain.nix", CHAIN_NIX)
        outs = nix.build(
            expr, ["top", "multi.out", "multi.dev", "multi.doc"], user=user.pw_name, args={"salt": str(time.time_ns())}
        )
        closure = nix.closure(outs)
        say(f"built as {user.pw_name}: {len(outs)} outputs, closure of {len(closure)} paths")
        wait_for_narinfos(cache, closure)
        say(f"cache holds all {len(closure)} narinfos")
        nix.substitute_fresh(outs, f"file://{cache}", hookd.public_key, root / "fresh")
        say("a fresh store substituted every output with require-sigs = true and max-jobs = 0")
        nix.verify_cache(outs, f"file://{cache}", hookd.public_key)
        say("`nix store verify` passes on the cache; all good")
    finally:
        hookd.stop()
        nix.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return root
