"""Benchmark: what nix-daemon waits for when its post-build-hook runs.

p50/p99 over N invocations of hookd-hook (daemon up; daemon down, so the request is spooled) for a
small output and a 256 MiB output, beside the bare interpreter start and the Nix manual's
`nix copy` hook uploading the same paths to the same kind of file:// cache, all in one run.

    sudo .venv/bin/python -m tests.bench.hook_latency [--runs 200] [--copy-runs 10]

Needs root and Debian's nix-bin (run .ci/setup first). Uses a private nix-daemon (hookd.selftest).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hookd.keys import write_keypair
from hookd.selftest import HookdProcess, NixEnv, console_hook, install_launcher


def timed(fn: Callable[[], object], runs: int, before: Callable[[], object] | None = None) -> list[float]:
    out = []
    for _ in range(runs):
        if before:
            before()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return sorted(out)


def pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--copy-runs", type=int, default=10, help="runs of the nix copy hook on the 256 MiB path")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="hkb-", dir="/tmp"))
    state = root / "hookd"
    nix = NixEnv(root, None, {})
    nix.start()
    hookd = HookdProcess(nix, state, f"file://{root / 'cache'}")
    results: dict[str, list[float]] = {}
    try:
        small_file = root / "small.txt"
        small_file.write_text("hello\n")
        big_file = root / "big.bin"
        with open(big_file, "wb") as f:
            for _ in range(256):
                f.write(os.urandom(1 << 20))
        small = nix.nix("nix-store", "--add", str(small_file)).stdout.strip()
        big = nix.nix("nix-store", "--add", str(big_file)).stdout.strip()
        hookd.start()
        launcher = install_launcher(root / "hookd-hook")
        base_env = {"PATH": os.environ["PATH"], "HOOKD_STATE_DIR": str(state), "DRV_PATH": ""}

        def run_hook(path: str, hook: str = launcher) -> Callable[[], object]:
            env = dict(base_env, OUT_PATHS=path)
            return lambda: subprocess.run([hook], env=env, check=True, stderr=subprocess.DEVNULL)

        results["python3 -I -S -c pass"] = timed(
            lambda: subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True), args.runs
        )
        results["hook launcher, daemon up, small"] = timed(run_hook(small), args.runs)
        results["hook launcher, daemon up, 256 MiB"] = timed(run_hook(big), args.runs)
        results["hookd-hook console script, daemon up, small"] = timed(run_hook(small, console_hook()), args.runs)
        hookd.stop()
        spool = state / "spool"
        results["hook launcher, daemon down (spool), small"] = timed(run_hook(small), args.runs)
        results["hook launcher, daemon down (spool), 256 MiB"] = timed(run_hook(big), args.runs)
        spooled = len(list(spool.glob("*.req")))
        assert spooled == 2 * args.runs, f"expected {2 * args.runs} spool files, found {spooled}"

        # The Nix manual's post-build-hook: nix copy to the cache, signing on the way.
        key = root / "key.sec"
        write_keypair("bench-1", key, root / "key.pub")
        copy_cache = root / "copy-cache"
        copy_env = dict(nix.env, NIX_REMOTE="daemon")

        def nix_copy(path: str) -> Callable[[], object]:
            argv = ["nix", "copy", "--to", f"file://{copy_cache}?compression=zstd&secret-key={key}", path]
            return lambda: subprocess.run(argv, env=copy_env, check=True, capture_output=True)

        def wipe() -> None:
            shutil.rmtree(copy_cache, ignore_errors=True)

        results["nix copy hook, small"] = timed(nix_copy(small), args.runs, before=wipe)
        results["nix copy hook, 256 MiB"] = timed(nix_copy(big), args.copy_runs, before=wipe)
    finally:
        hookd.stop()
        nix.stop()
        shutil.rmtree(root, ignore_errors=True)

    bare99 = pct(results["python3 -I -S -c pass"], 99)
    print(f"{'what':48} {'n':>4} {'p50 ms':>9} {'p99 ms':>9}")
    for name, xs in results.items():
        print(f"{name:48} {len(xs):4d} {pct(xs, 50):9.1f} {pct(xs, 99):9.1f}")
    up_big = pct(results["hook launcher, daemon up, 256 MiB"], 99)
    copy_big = pct(results["nix copy hook, 256 MiB"], 50)
    print(f"\nhook p99 / bare interpreter p99: {up_big / bare99:.2f}x (target <= 2x)")
    print(f"nix copy hook p50 / hookd-hook p99, 256 MiB: {copy_big / up_big:.0f}x (target >= 20x)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {k: {"p50_ms": pct(v, 50), "p99_ms": pct(v, 99), "n": len(v)} for k, v in results.items()},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
