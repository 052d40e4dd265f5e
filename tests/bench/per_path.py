"""Where a small path's upload time goes: hookd's per-path pipeline (`upload_path`) run in-process against
nginx on loopback, without the daemon, its queue or its planner (issue 14's small-path target).

Three measurements, each the median of --rounds over --paths small paths (2.5 KiB files, 64 at a time,
as the daemon's slots):

- upload: `upload_path` to nginx (NAR, listing, a HEAD of the narinfo (the daemon's planner usually
  answers that one), narinfo): what one path costs the daemon's single event-loop thread;
- no requests: the same with the backend's requests answered at once (encoding, signing, the listing
  and the narinfo's text, the pipeline's tasks): what is left when HTTP costs nothing;
- one PUT: `HttpBackend.put` of a 600-byte body, per request.

Figures are µs of wall time and of this process's CPU per path (or request). On loopback the event loop is
the bottleneck, so the two are close; a gap means it waited. nginx keeps its files in /dev/shm (memory), as
the upload benchmark's servers do in a tmpfs. Needs nginx (`.ci/setup`), not root.

    .venv/bin/python -m tests.bench.per_path [--paths 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from hookd import narstream
from hookd.backends.base import ObjectStat
from hookd.backends.http import HttpBackend
from hookd.config import Config
from hookd.freshness import Freshness
from hookd.keys import write_keypair
from hookd.pathinfo import PathInfo
from hookd.publish import Extras
from hookd.upload import upload_path

from ..servers import Nginx
from .protocol import store_path

IN_FLIGHT = 64


class Unanswered(HttpBackend):
    """Requests that cost nothing: every write succeeds, every object is absent."""

    async def put(self, key: str, data: bytes, content_type: str, *, content_encoding: str | None = None) -> None:
        return None

    async def put_new(self, key: str, data: bytes, content_type: str) -> bool:
        return True

    async def stat(self, key: str) -> ObjectStat | None:
        return None


def small_paths(store: Path, n: int, tag: str) -> list[PathInfo]:
    """n small regular files (random bytes and a compressible tail, as the upload benchmark's) under `store`."""
    return [store_path(store, f"small-{tag}-{i}", os.urandom(512) + b"x" * 2048) for i in range(n)]


async def timed(n: int, run: Callable[[int], Awaitable[object]]) -> tuple[float, float]:
    """µs of wall time and CPU per item for `run(i)` of items 0..n-1, IN_FLIGHT at a time."""
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def one(i: int) -> None:
        async with slots:
            await run(i)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(i) for i in range(n)))
    return (time.perf_counter() - wall) / n * 1e6, (time.process_time() - cpu) / n * 1e6


async def measure(root: Path, nginx: Nginx, paths: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    store = root / "store"
    store.mkdir()
    key = write_keypair("bench-1", root / "key.sec", root / "key.pub")
    out: dict[str, list[tuple[float, float]]] = {"upload": [], "no requests": [], "one PUT": []}
    body = os.urandom(600)
    for r in range(rounds):
        for what, cls in (("upload", HttpBackend), ("no requests", Unanswered)):
            sub = f"{what.replace(' ', '-')}-{r}"
            (nginx.root / sub).mkdir()
            url = f"{nginx.url}/{sub}"
            cfg = Config(cache=url, store_dir=str(store))
            backend = cls(url)  # Remote()'s defaults: the daemon's (64 connections)
            infos = small_paths(store, paths, sub)
            freshness = Freshness(backend, cfg.bounds)
            extras, levels = Extras(backend), narstream.Levels(cfg.level, cfg.adaptive_level)

            async def push(i: int, infos: list[PathInfo] = infos, backend: HttpBackend = backend,
                           freshness: Freshness = freshness, extras: Extras = extras,
                           levels: narstream.Levels = levels) -> None:  # fmt: skip
                await upload_path(infos[i], backend, key, "zstd", levels, freshness, 0, (), extras)

            try:
                await push(0)  # the first connection and compressor outside the figures
                out[what].append(await timed(paths - 1, lambda i, push=push: push(i + 1)))
                if what == "upload":

                    async def put(i: int, backend: HttpBackend = backend) -> None:
                        await backend.put(f"put-{i}", body, "application/octet-stream")

                    out["one PUT"].append(await timed(paths * 3, put))
            finally:
                await backend.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    memory = "/dev/shm" if os.path.isdir("/dev/shm") else None  # the server's disk is not what is measured
    with tempfile.TemporaryDirectory(prefix="hkpp-", dir="/var/tmp") as tmp, tempfile.TemporaryDirectory(
        prefix="hkpp-srv-", dir=memory
    ) as srv:
        root = Path(tmp)
        nginx = Nginx(Path(srv), Path(srv) / "www")
        try:
            results = asyncio.run(measure(root, nginx, args.paths, args.rounds))
        finally:
            nginx.stop()
    print(f"{args.paths} small paths, {IN_FLIGHT} at a time; median of {args.rounds} rounds (µs per path or request)")
    for what, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        per = "request" if what == "one PUT" else "path"
        print(f"  {what:12s} {wall:7.0f} µs wall  {cpu:7.0f} µs CPU  per {per}")


if __name__ == "__main__":
    main()
