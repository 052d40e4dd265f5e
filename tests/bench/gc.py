"""Benchmark: GC planning over a large cache, against a bare listing of the same cache.

Generates N narinfos (default 100,000) with their NARs straight into a directory and into moto's S3
server, then measures, in one run: a bare listing, the first GC plan (listing plus one read per
narinfo), and a repeat plan over the unchanged cache (listing only: narinfos come from the index).

    .venv/bin/python -m tests.bench.gc [--narinfos 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hookd import gc, nixbase32
from hookd.backends import Backend, open_backend
from hookd.config import Config
from hookd.narinfo import NarInfo, nar_key

from ..servers import ACCESS_KEY, SECRET_KEY, Moto


def synthetic(n: int) -> list[tuple[str, bytes]]:
    """n narinfos in chains of 10 (each references its predecessor), each with a 64-byte NAR."""
    objects: list[tuple[str, bytes]] = [("nix-cache-info", b"StoreDir: /nix/store\n")]
    prev = None
    for i in range(n):
        h = nixbase32.encode(hashlib.sha256(f"p{i}".encode()).digest()[:20])
        nar = hashlib.sha256(f"n{i}".encode()).digest() * 2
        fh = hashlib.sha256(nar).digest()
        ni = NarInfo(store_path=f"/nix/store/{h}-p{i}", url=nar_key(fh, "none"), nar_hash=fh, nar_size=64,
                     compression="none", file_hash=fh, file_size=64,
                     references=[prev] if prev and i % 10 else [], sigs=["k:" + "A" * 86 + "=="])  # fmt: skip
        prev = f"{h}-p{i}"
        objects += [(f"{h}.narinfo", ni.render().encode()), (ni.url, nar)]
    return objects


async def measure(backend: Backend, index_file: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    t = time.perf_counter()
    count = 0
    async for _ in backend.list():
        count += 1
    out["bare listing s"] = time.perf_counter() - t
    out["objects"] = count
    for label in ("first plan", "repeat plan"):
        index = gc.NarinfoIndex(index_file)
        t = time.perf_counter()
        snap = await gc.snapshot(backend, index)
        gc.plan(snap, now=time.time(), older_than=86400, grace=3600)
        out[f"{label} s"] = time.perf_counter() - t
        out[f"{label} narinfo reads"] = snap.narinfo_reads
        index.close()
    await backend.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--narinfos", type=int, default=100_000)
    ap.add_argument("--skip-s3", action="store_true", help="the directory only (moto takes ~40 min for 100k)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hkbg-", dir="/tmp"))
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    moto = Moto(root)
    try:
        objects = synthetic(args.narinfos)
        cache = root / "cache"
        for key, data in objects:
            p = cache / key
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
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
            r = asyncio.run(measure(open_backend(url, Config(cache=url)), root / f"index-{name[0]}.sqlite"))
            print(
                f"{name}: {int(r['objects'])} objects; bare listing {r['bare listing s']:.2f}s; "
                f"first plan {r['first plan s']:.2f}s ({int(r['first plan narinfo reads'])} narinfo reads); "
                f"repeat plan {r['repeat plan s']:.2f}s ({int(r['repeat plan narinfo reads'])} reads) = "
                f"{r['repeat plan s'] / r['bare listing s']:.2f}x the bare listing"
            )
    finally:
        moto.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
