"""Benchmark: dedup against the local state and against the cache.

1. Re-enqueueing a 2000-path closure that is already uploaded and recorded: time until planned, PUTs.
   Measured both ways a request arrives: the paths themselves, and only the .drv (Nix 2.8's hook).
2. A 2000-path closure of which half is already in the cache but unknown locally (a fresh state
   directory): what gets uploaded, and how many existence requests each path costs.

    sudo .venv/bin/python -m tests.bench.dedup [--paths 2000]

Requests are counted by a proxy in front of nginx (WebDAV). Needs root, nix-bin and nginx.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sqlite3
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from hookd import narinfo
from hookd.selftest import HookdProcess, NixEnv

from ..servers import FaultProxy, Nginx
from .workloads import make_small_closure


def enqueue(hookd: HookdProcess, line: str) -> int:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(hookd.socket))
    s.sendall(line.encode() + b"\n")
    answer = s.recv(200).decode()
    s.close()
    assert answer.startswith("OK queued "), answer
    return int(answer.split()[-1])


def wait_planned(hookd: HookdProcess, rid: int, timeout: float = 300) -> None:
    db = sqlite3.connect(f"file:{hookd.state_dir / 'queue.sqlite'}?mode=ro", uri=True)
    deadline = time.monotonic() + timeout
    while True:
        row = db.execute("SELECT state FROM requests WHERE id = ?", (rid,)).fetchone()
        if row and row[0] != "new":
            assert row[0] == "planned", row
            return
        assert time.monotonic() < deadline
        time.sleep(0.005)


def wait_key(root: Path, key: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not (root / key).exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def classify(records: list[dict[str, object]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for r in records:
        path = str(r["path"]).split("?")[0]
        kind = "narinfo" if path.endswith(".narinfo") else "nar" if "/nar/" in path else "other"
        out[f"{r['method']} {kind}"] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--paths", type=int, default=2000)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hkbd-", dir="/tmp"))
    root.chmod(0o755)
    nix = NixEnv(root, None, {})
    nix.start()
    nginx = Nginx(root, root / "www")
    proxy = FaultProxy(root, nginx.url)
    try:
        top = make_small_closure(nix, root, args.paths - 1)
        closure = nix.closure([top])
        drv = nix.nix("nix-store", "--query", "--deriver", top).stdout.strip()
        print(f"closure of {len(closure)} paths")

        # 1. uploaded and recorded, then asked for again
        sub = uuid.uuid4().hex[:8]
        (nginx.root / sub).mkdir()
        hookd = HookdProcess(nix, root / "state-a", f"{proxy.url}/{sub}", ("--log-level", "warning"))
        hookd.start()
        t = time.perf_counter()
        enqueue(hookd, f"ENQUEUE - {top}")
        wait_key(nginx.root / sub, narinfo.narinfo_key(top))
        print(f"first upload of the closure: {time.perf_counter() - t:.2f}s")
        time.sleep(0.5)
        for label, line in (
            ("all paths", "ENQUEUE - " + " ".join(closure)),
            ("the .drv only", f"ENQUEUE {drv}"),
        ):
            before = len(proxy.records())
            t = time.perf_counter()
            wait_planned(hookd, enqueue(hookd, line))
            elapsed = time.perf_counter() - t
            time.sleep(0.3)
            new = classify(proxy.records()[before:])
            puts = sum(v for k, v in new.items() if k.startswith("PUT"))
            print(f"re-enqueue, recorded, {label}: planned in {elapsed:.3f}s; PUTs {puts}; requests {dict(new)}")
        hookd.stop()

        # 2. half of it in the cache, unknown to a fresh state directory
        sub = uuid.uuid4().hex[:8]
        (nginx.root / sub).mkdir()
        half = [p for p in closure if p != top][: len(closure) // 2]
        seeder = HookdProcess(nix, root / "state-b", f"{proxy.url}/{sub}", ("--log-level", "warning"))
        seeder.start()
        enqueue(seeder, "ENQUEUE - " + " ".join(half))
        for p in half:
            wait_key(nginx.root / sub, narinfo.narinfo_key(p))
        seeder.stop()
        before = len(proxy.records())
        fresh = HookdProcess(nix, root / "state-c", f"{proxy.url}/{sub}", ("--log-level", "warning"))
        fresh.start()
        t = time.perf_counter()
        enqueue(fresh, f"ENQUEUE - {top}")
        wait_key(nginx.root / sub, narinfo.narinfo_key(top))
        elapsed = time.perf_counter() - t
        time.sleep(0.3)
        fresh.stop()
        new = classify(proxy.records()[before:])
        print(
            f"half cached, unknown locally: {elapsed:.2f}s; {len(closure)} paths, {len(half)} cached; "
            f"requests {dict(new)}"
        )
        print(
            f"  narinfo existence checks per path: {new['HEAD narinfo'] / len(closure):.2f}; "
            f"narinfos written: {new['PUT narinfo']} (missing: {len(closure) - len(half)})"
        )
    finally:
        proxy.stop()
        nginx.stop()
        nix.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
