"""Benchmark: pushing a closure of many small paths, and one large path, to an HTTP cache (nginx WebDAV)
on loopback and through a proxy adding 20 ms to every request, side by side with `nix copy`; and to S3
(moto's server) alone. Reports wall time, throughput, requests and hookd's peak RSS.

    sudo .venv/bin/python -m tests.bench.upload [--small 1000] [--big-mib 1024] [--skip-big]

Needs root, Debian's nix-bin and nginx, and the test extras (run .ci/setup first).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from hookd import narinfo
from hookd.keys import write_keypair
from hookd.selftest import HookdProcess, NixEnv

from ..servers import ACCESS_KEY, SECRET_KEY, FaultProxy, Moto, Nginx


def make_small_closure(nix: NixEnv, root: Path, n: int) -> str:
    """n small added paths and one top-level path that references them all; returns the top."""
    src = root / "small-src"
    src.mkdir()
    files = []
    for i in range(n):
        f = src / f"small-{i}"
        f.write_bytes(os.urandom(512) + b"x" * 2048)
        files.append(str(f))
    paths: list[str] = []
    for i in range(0, n, 200):
        paths += nix.nix("nix-store", "--add", *files[i : i + 200]).stdout.split()
    expr = nix.write_expr(
        "top.nix",
        '{ paths }: derivation { name = "small-top"; system = builtins.currentSystem; builder = "/bin/sh";'
        ' deps = map builtins.storePath paths; passAsFile = [ "deps" ];'
        ' args = [ "-c" "/bin/cp $depsPath $out" ]; }',
    )
    listing = nix.write_expr("paths.nix", "[" + " ".join(f'"{p}"' for p in paths) + "]")
    argv = ["nix-build", str(expr), "--no-out-link", "--arg", "paths", f"import {listing}"]
    return nix.nix(*argv).stdout.strip()


def make_big(nix: NixEnv, root: Path, mib: int) -> str:
    f = root / "big.bin"
    with open(f, "wb") as out:
        for _ in range(mib):
            out.write(os.urandom(1 << 20))
    path = nix.nix("nix-store", "--add", str(f)).stdout.strip()
    f.unlink()
    return path


def enqueue(sock: Path, path: str) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock))
    s.sendall(f"ENQUEUE - {path}\n".encode())
    assert s.recv(100).startswith(b"OK")
    s.close()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_hookd(nix: NixEnv, root: Path, url: str, path: str, closure: list[str], has, env: dict[str, str]) -> dict:
    state = root / f"hookd-{uuid.uuid4().hex[:6]}"
    hookd = HookdProcess(nix, state, url, ("--log-level", os.environ.get("HOOKD_BENCH_LOG", "warning")), env)
    hookd.start()
    t = time.perf_counter()
    enqueue(hookd.socket, path)
    last = narinfo.narinfo_key(path)  # the top-level narinfo goes last (references first)
    while not has(last):
        assert hookd.proc is not None and hookd.proc.poll() is None, hookd.log()
        time.sleep(0.02)
    elapsed = time.perf_counter() - t
    assert hookd.proc is not None
    rss = peak_rss_mib(hookd.proc.pid)
    hookd.stop()
    missing = [p for p in closure if not has(narinfo.narinfo_key(p))]
    assert not missing, f"{len(missing)} paths missing after hookd finished"
    return {"seconds": elapsed, "peak_rss_mib": rss}


def run_nix_copy(nix: NixEnv, url: str, key: Path, path: str) -> dict:
    sep = "&" if "?" in url else "?"
    argv = ["nix", "copy", "--to", f"{url}{sep}compression=zstd&secret-key={key}", path]
    t = time.perf_counter()
    subprocess.run(argv, env=dict(nix.env), check=True, capture_output=True)
    return {"seconds": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hkbu-", dir="/tmp"))
    root.chmod(0o755)
    nix = NixEnv(root, None, {})
    nix.start()
    nginx = Nginx(root, root / "www")
    moto = Moto(root)
    delayed = FaultProxy(root, nginx.url, delay_ms=20)
    key = root / "key.sec"
    write_keypair("bench-1", key, root / "key.pub")
    results: dict[str, dict] = {}
    try:
        print("creating paths…", flush=True)
        workloads = {"small": make_small_closure(nix, root, args.small)}
        if not args.skip_big:
            workloads["big"] = make_big(nix, root, args.big_mib)
        for name, path in workloads.items():
            closure = nix.closure([path])
            for p in closure:  # warm the page cache, so the first contender is not the only one reading disk
                subprocess.run(["nix-store", "--dump", p], env=dict(nix.env), stdout=subprocess.DEVNULL, check=True)
            size = sum(int(i["narSize"]) for i in nix.path_info(closure))  # type: ignore[call-overload]
            for where, base in (("loopback", nginx.url), ("20ms proxy", delayed.url)):
                for tool in ("hookd", "nix copy"):
                    sub = uuid.uuid4().hex[:8]
                    (nginx.root / sub).mkdir()
                    url = f"{base}/{sub}"

                    def has(k: str, sub: str = sub) -> bool:
                        return (nginx.root / sub / k).exists()

                    if tool == "hookd":
                        r = run_hookd(nix, root, url, path, closure, has, {})
                    else:
                        r = run_nix_copy(nix, url, key, path)
                        assert all(has(narinfo.narinfo_key(p)) for p in closure)
                    r.update(paths=len(closure), mib=size / 2**20, mib_s=size / 2**20 / r["seconds"])
                    results[f"{name}: {tool} → nginx {where}"] = r
                    print(f"{name}: {tool} → nginx {where}: {r['seconds']:.2f}s", flush=True)
                    shutil.rmtree(nginx.root / sub)
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            moto.make_bucket(bucket)
            env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
            c = moto.client()

            def has_s3(k: str, bucket: str = bucket, c: Any = c) -> bool:
                try:
                    c.head_object(Bucket=bucket, Key=k)
                    return True
                except Exception:
                    return False

            url = f"s3://{bucket}?endpoint={moto.url}&region=us-east-1&addressing=path"
            r = run_hookd(nix, root, url, path, closure, has_s3, env)
            r.update(paths=len(closure), mib=size / 2**20, mib_s=size / 2**20 / r["seconds"])
            results[f"{name}: hookd → S3 (moto)"] = r
            print(f"{name}: hookd → S3 (moto): {r['seconds']:.2f}s", flush=True)
    finally:
        for p in (delayed, moto, nginx):
            p.stop()
        nix.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{'run':42} {'paths':>6} {'MiB':>8} {'seconds':>8} {'MiB/s':>8} {'peak RSS':>9}")
    for name, r in results.items():
        rss = f"{r['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in r else ""
        print(f"{name:42} {r['paths']:6d} {r['mib']:8.1f} {r['seconds']:8.2f} {r['mib_s']:8.1f} {rss:>9}")
    for name in ("small", "big"):
        for where in ("loopback", "20ms proxy"):
            h, n = (
                results.get(f"{name}: hookd → nginx {where}"),
                results.get(f"{name}: nix copy → nginx {where}"),
            )
            if h and n:
                print(f"{name}, {where}: nix copy / hookd = {n['seconds'] / h['seconds']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
