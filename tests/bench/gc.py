"""Benchmark: GC planning over a large cache, against a bare listing of the same cache.

Generates N narinfos (default 100,000) with their NARs straight into a directory and into moto's S3
server, then measures, in one run: a bare listing, the first GC plan (listing plus one read per
narinfo), and a repeat plan over the unchanged cache (listing only: narinfos come from the index).
Bare listings and repeat plans alternate for --rounds rounds on the directory (its timings are noisy);
the figures are medians.

    .venv/bin/python -m tests.bench.gc [--narinfos 100000] [--rounds 5] [--skip-s3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hookd.backends import Backend, open_backend
from hookd.config import Config
from hookd.plan import plan
from hookd.snapshot import NarinfoIndex, snapshot

from ..cachegen import synthetic, write_tree
from ..servers import ACCESS_KEY, SECRET_KEY, Moto


async def bare_listing(backend: Backend) -> tuple[float, int]:
    t = time.perf_counter()
    count = 0
    async for _ in backend.list():
        count += 1
    return time.perf_counter() - t, count


async def gc_plan(backend: Backend, index_file: Path) -> tuple[float, int]:
    """One GC plan as `hookd gc --dry-run` makes it: a fresh index object over the index file."""
    t = time.perf_counter()
    snap = await snapshot(backend, NarinfoIndex(index_file))
    plan(snap, now=time.time(), older_than=86400, grace=3600)
    return time.perf_counter() - t, snap.narinfo_reads


async def measure(backend: Backend, index_file: Path, rounds: int) -> dict[str, float]:
    """The first plan once; then bare listings and repeat plans alternately, `rounds` of each (medians)."""
    out: dict[str, float] = {}
    out["first plan s"], out["first plan narinfo reads"] = await gc_plan(backend, index_file)
    listings, repeats, reads = [], [], 0
    for _ in range(rounds):
        seconds, out["objects"] = await bare_listing(backend)
        listings.append(seconds)
        seconds, n = await gc_plan(backend, index_file)
        repeats.append(seconds)
        reads += n
    out["bare listing s"], out["repeat plan s"] = statistics.median(listings), statistics.median(repeats)
    out["repeat plan narinfo reads"] = reads
    out["ratio min"] = min(r / lst for r, lst in zip(repeats, listings, strict=True))
    out["ratio max"] = max(r / lst for r, lst in zip(repeats, listings, strict=True))
    await backend.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--narinfos", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5, help="bare listings and repeat plans, alternately")
    ap.add_argument("--skip-s3", action="store_true", help="the directory only (moto takes ~40 min for 100k)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hkbg-", dir="/tmp"))
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    moto = Moto(root)
    try:
        objects = synthetic(args.narinfos)
        cache = root / "cache"
        write_tree(cache, objects)
        targets = [("directory", f"file://{cache}")]
        if not args.skip_s3:
            moto.make_bucket("gc-bench")
            client = moto.client()
            t = time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda kv: client.put_object(Bucket="gc-bench", Key=kv[0], Body=kv[1]), objects))
            print(f"S3 upload of {len(objects)} objects: {time.perf_counter() - t:.0f}s")
            targets.append(("S3 (moto)", f"s3://gc-bench?endpoint={moto.url}&region=us-east-1&addressing=path"))
        print(f"generated {args.narinfos} narinfos with NARs ({len(objects)} objects)")
        for name, url in targets:
            rounds = args.rounds if name == "directory" else 1
            r = asyncio.run(measure(open_backend(url, Config(cache=url)), root / f"index-{name[0]}.json", rounds))
            print(
                f"{name}: {int(r['objects'])} objects; bare listing {r['bare listing s']:.2f}s; "
                f"first plan {r['first plan s']:.2f}s ({int(r['first plan narinfo reads'])} narinfo reads); "
                f"repeat plan {r['repeat plan s']:.2f}s ({int(r['repeat plan narinfo reads'])} reads) = "
                f"{r['repeat plan s'] / r['bare listing s']:.2f}x the bare listing"
                + (
                    f" (medians of {rounds}; per round {r['ratio min']:.2f}x to {r['ratio max']:.2f}x)"
                    if rounds > 1
                    else ""
                )
            )
    finally:
        moto.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
