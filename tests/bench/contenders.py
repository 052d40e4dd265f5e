"""One push of a closure by each contender, on either side, measured the same way: hookd's daemon (time from
the request until the top narinfo is in the cache, which hookd publishes last) and `nix copy` (time until it
exits). Meanwhile sampled: bytes in the staging directory and a private TMPDIR, free space, peak RSS."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .measure import Sampler, cpu_seconds, peak_rss_mib
from .sides import Nix, Side

MiB = 1 << 20


def enqueue(sock: Path, path: str) -> None:
    """What the post-build hook sends: queue `path` (its closure goes along)."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock))
    s.sendall(f"ENQUEUE - {path}\n".encode())
    answer = s.recv(200)
    s.close()
    if not answer.startswith(b"OK"):
        raise RuntimeError(f"hookd refused the request: {answer!r}")


def run_hookd(
    side: Side,
    nix: Nix,
    state: Path,
    url: str,
    top: str,
    done: Callable[[], bool],
    extra_env: Mapping[str, str] = {},
    poll: float = 0.005,
    during: Callable[[Callable[[], bool]], Any] | None = None,
    timeout: float = 3600,
    extra_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Start a hookd daemon on `side` (state dir `state`, as the side sees it), queue `top`, wait for `done`."""
    host_state = side.host_path(state)
    tmp = state.parent / f"{state.name}.tmp"  # a TMPDIR of its own: what it spools there counts as staged
    side.host_path(tmp).mkdir()
    argv = [side.hookd, "daemon", "--cache", url, "--state-dir", str(state), "--store-dir", nix.store_dir,
            "--log-level", "warning", *extra_args]  # fmt: skip
    env = {**nix.env, "HOOKD_CONFIG": "/dev/null", "TMPDIR": str(tmp), **extra_env}
    log_file = host_state.parent / f"{host_state.name}.log"
    with open(log_file, "ab") as log:
        proc = side.popen(argv, env, log, start_new_session=True)

    def alive() -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"{side.name} hookd exited {proc.returncode}:\n{log_file.read_text()[-3000:]}")

    try:
        deadline = time.monotonic() + 30
        while not (host_state / "hookd.sock").exists():
            alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{side.name} hookd did not start:\n{log_file.read_text()[-3000:]}")
            time.sleep(0.02)
        sampler = Sampler(host_state.parent, [host_state / "staging", side.host_path(tmp)], proc.pid)
        sampler.start()
        t = time.perf_counter()
        enqueue(host_state / "hookd.sock", top)
        extra = during(done) if during else None
        while not done():
            alive()
            if time.perf_counter() - t > timeout:
                raise RuntimeError(
                    f"{side.name} hookd did not finish in {timeout:g} s:\n{log_file.read_text()[-3000:]}"
                )
            time.sleep(poll)
        seconds = time.perf_counter() - t
        sampler.finish()
        return {
            "seconds": seconds,
            "peak_rss_mib": peak_rss_mib(proc.pid),
            "peak_tree_rss_mib": sampler.peak_tree_rss_mib,
            "cpu_seconds": cpu_seconds(proc.pid),
            "peak_staging_mib": sampler.peak_staging / MiB,
            "disk_drop_mib": sampler.disk_drop / MiB,
            "during": extra,
        }
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(side.host_path(tmp), ignore_errors=True)


def run_nix_copy(side: Side, nix: Nix, url: str, key: Path, top: str, log_file: Path) -> dict[str, Any]:
    """`nix copy --to URL?compression=zstd&secret-key=…` of `top` on `side`. It reads the store directly
    (NIX_REMOTE=local, as root, like the Nix manual's post-build-hook), so its CPU and RSS include reading
    NARs; it gets a TMPDIR of its own, whose size counts as staged."""
    sep = "&" if "?" in url else "?"
    argv = ["nix", "copy", "--to", f"{url}{sep}compression=zstd&secret-key={key}", top]
    tmp = nix.root / f"nix-copy-{uuid.uuid4().hex[:8]}.tmp"
    side.host_path(tmp).mkdir()
    with open(log_file, "ab") as log:
        proc = side.popen(argv, dict(nix.env, NIX_REMOTE="local", TMPDIR=str(tmp)), log)
    sampler = Sampler(side.host_path(nix.root), [side.host_path(tmp)], proc.pid)
    sampler.start()
    t = time.perf_counter()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.finish()
    shutil.rmtree(side.host_path(tmp), ignore_errors=True)
    if proc.returncode:
        raise RuntimeError(f"{side.name}: nix copy exited {proc.returncode}:\n{log_file.read_text()[-3000:]}")
    return {
        "seconds": seconds,
        "peak_rss_mib": sampler.peak_rss_mib,
        "peak_tree_rss_mib": sampler.peak_tree_rss_mib,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_staging_mib": sampler.peak_staging / MiB,
        "disk_drop_mib": sampler.disk_drop / MiB,
    }


def hook_probes(launcher: str, state: Path, probe: str, bare: list[str]) -> Callable[[Callable[[], bool]], Any]:
    """While a push runs: the post-build hook (queueing `probe`) and a bare interpreter start, in turn, each
    timed, until `done`; their latencies in seconds."""
    env = {"PATH": os.environ["PATH"], "HOOKD_STATE_DIR": str(state), "DRV_PATH": "", "OUT_PATHS": probe}

    def during(done: Callable[[], bool]) -> dict[str, list[float]]:
        hook: list[float] = []
        interp: list[float] = []
        while not done():
            t = time.perf_counter()
            subprocess.run([launcher], env=env, check=True, stderr=subprocess.DEVNULL)
            hook.append(time.perf_counter() - t)
            t = time.perf_counter()
            subprocess.run(bare, check=True)
            interp.append(time.perf_counter() - t)
        return {"hook": hook, "bare": interp}

    return during
