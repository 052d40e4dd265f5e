"""What the upload/GC protocol costs a build that reuses a closure already in the cache (issue 12).

Runs the real uploader code (`upload_path` and its `Freshness`) and, optionally, the real GC in the
simulation's virtual time (tests/sim.py) with production bounds (grace 1 h, check-to-delete 20 s,
request timeout 20 s, so settle 44 s) and requests of 20-60 ms. A build publishes one new path whose
direct references are 1000 paths another builder uploaded earlier; then a second build reusing them
within grace/2; then one after grace/2. Reported per build: protocol requests (touches and existence
checks) per reused object and the publish latency they add.

    .venv/bin/python -m tests.bench.protocol
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import tempfile
import time
from pathlib import Path

from hookd import nar, narinfo, nixbase32
from hookd.pathinfo import PathInfo
from hookd.safety import Bounds

from ..sim import SimBucket, Uploader, gc_loop, run_virtual

BOUNDS = Bounds(grace=3600.0, check_to_delete=20.0, request_timeout=20.0, max_skew=30.0).check()


def store_path(root: Path, name: str, contents: str | bytes, refs: tuple[str, ...] = ()) -> PathInfo:
    """A regular file under `root` named like a store path, with its NAR's hash and size."""
    path = root / f"{nixbase32.encode(hashlib.sha256(name.encode()).digest()[:20])}-{name}"
    path.write_bytes(contents.encode() if isinstance(contents, str) else contents)
    h = hashlib.sha256()
    size = 0
    for chunk in nar.dump(str(path)):
        h.update(chunk)
        size += len(chunk)
    return PathInfo(str(path), h.digest(), size, refs)


async def scenario(root: Path, n: int, with_gc: bool) -> list[dict[str, float]]:
    store = root / "store"
    store.mkdir(parents=True)
    bucket = SimBucket(random.Random(1), apply_within=0.02, answer_within=0.04)
    reused = {p.path: p for p in (store_path(store, f"dep-{i}", f"dep {i}\n") for i in range(n))}
    old = Uploader("old", bucket, reused, BOUNDS, root / "s0")
    for p in reused:
        await old.push(p)
    await asyncio.sleep(BOUNDS.grace * 0.75)  # written long enough ago that a new builder must touch them
    stop = asyncio.Event()
    gc_task = (
        asyncio.create_task(gc_loop(bucket, BOUNDS, 7 * 86400, stop, random.Random(2), pause=120)) if with_gc else None
    )
    builder = Uploader("new", bucket, dict(reused), BOUNDS, root / "s1")
    builder.done.update(reused)  # found in the cache by the planner (its existence checks are not counted)
    results = []
    for build, pause in (("first build", 0.0), ("again within grace/2", 600.0), ("after grace/2", 1800.0)):
        await asyncio.sleep(pause)
        top = store_path(store, f"top-{build.split()[0]}-{pause}", f"top {pause}\n", tuple(sorted(reused)))
        builder.infos[top.path] = top
        touches, checks, requests = builder.freshness.touches, builder.freshness.checks, bucket.requests
        start = time.monotonic()
        await builder.push(top.path)
        elapsed = time.monotonic() - start
        assert narinfo.narinfo_key(top.path) in bucket.objects
        protocol = builder.freshness.touches - touches + builder.freshness.checks - checks
        results.append({
            "build": build, "protocol requests": protocol, "per reused object": protocol / n,
            "all requests": bucket.requests - requests, "publish latency s": elapsed,
        })  # fmt: skip
    stop.set()
    if gc_task is not None:
        await gc_task
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--paths", type=int, default=1000)
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    for with_gc in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            results = run_virtual(scenario(Path(tmp), args.paths, with_gc))
        print(f"\n{'with' if with_gc else 'without'} a GC running (grace {BOUNDS.grace:.0f}s, settle {BOUNDS.settle:.0f}s)")
        for r in results:
            print(f"  {r['build']:22} {r['protocol requests']:6.0f} protocol requests "
                  f"({r['per reused object']:.2f} per reused object), {r['all requests']:6.0f} requests in all, "
                  f"publish latency {r['publish latency s']:6.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
