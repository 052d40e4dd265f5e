"""The physical limits an uploader is measured against, in the same run and on the same bytes:

- reading the NARs from the page cache (`nix-store --export` of the closure to /dev/null);
- the same stream through `zstd -T0 -3 | sha256sum` (all cores; what hashing and compressing can reach), and
  through `zstd -T0 -1 | sha256sum` (the fastest level hookd compresses at: an uploader that compresses
  every NAR at zstd level 1 or above goes no faster here);
- a raw PUT of the precompressed NARs (one zstd -3 file per path) to the same nginx, N in flight (aiohttp);
- a raw PUT of the same bytes to S3 (boto3): objects below the part size in one PUT, larger ones as multipart
  uploads of 8 MiB parts, a few parts in flight.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyzstd

from .sides import Nix

MiB = 1 << 20


def timed_pipeline(nix: Nix, closure: list[str], pipeline: str) -> float:
    """Seconds for `nix-store --export CLOSURE | PIPELINE` (bash), NARs read through the daemon."""
    argv = ["bash", "-o", "pipefail", "-c", f'nix-store --export "$@" | {pipeline}', "limit", *closure]
    t = time.perf_counter()
    nix.side.run(argv, nix.env)
    return time.perf_counter() - t


def read_seconds(nix: Nix, closure: list[str]) -> float:
    return timed_pipeline(nix, closure, "cat >/dev/null")


def zstd_seconds(nix: Nix, closure: list[str], level: int = 3) -> float:
    return timed_pipeline(nix, closure, f"zstd -T0 -{level} -q | sha256sum >/dev/null")


def zstd_fast_seconds(nix: Nix, closure: list[str]) -> float:
    return zstd_seconds(nix, closure, level=1)


@dataclass(frozen=True)
class Compressed:
    path: str
    file: Path
    size: int


def precompress(nix: Nix, closure: list[str], dest: Path, level: int = 3) -> list[Compressed]:
    """Each path's NAR compressed with zstd at `level` into its own file under `dest` (not timed)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, path in enumerate(closure):
        f = dest / f"{i}.nar.zst"
        c = pyzstd.ZstdCompressor(level)
        argv, env = nix.side.argv(["nix-store", "--dump", path], nix.env)
        with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE) as proc, open(f, "wb") as w:
            assert proc.stdout is not None
            while chunk := proc.stdout.read(4 * MiB):
                w.write(c.compress(chunk))
            w.write(c.flush())
        if proc.returncode:
            raise RuntimeError(f"nix-store --dump {path} exited {proc.returncode}")
        out.append(Compressed(path, f, f.stat().st_size))
    return out


def raw_put_http(base_url: str, files: list[Compressed], concurrency: int) -> float:
    """Seconds to PUT every file (read into memory first) to base_url/nar/<i>.nar.zst, `concurrency` at once."""
    from aiohttp import ClientSession, ClientTimeout, TCPConnector

    bodies = [(i, f.file.read_bytes()) for i, f in enumerate(files)]

    async def go() -> float:
        sem = asyncio.Semaphore(concurrency)
        async with ClientSession(
            connector=TCPConnector(limit=concurrency), timeout=ClientTimeout(total=3600)
        ) as session:

            async def put(i: int, body: bytes) -> None:
                async with sem, session.put(f"{base_url}/nar/{i}.nar.zst", data=body) as r:
                    if r.status >= 300:
                        raise RuntimeError(f"raw PUT: HTTP {r.status}")

            t = time.perf_counter()
            await asyncio.gather(*(put(i, b) for i, b in bodies))
            return time.perf_counter() - t

    return asyncio.run(go())


def raw_put_s3(
    client: Callable[[], Any],
    bucket: str,
    files: list[Compressed],
    part_size: int = 8 * MiB,
    parts_in_flight: int = 4,
    objects_in_flight: int = 16,
) -> float:
    """Seconds to put every file (read into memory first) into `bucket` with boto3: small ones with one PUT,
    `objects_in_flight` at once; larger ones as multipart uploads, `parts_in_flight` parts at once."""
    bodies = [(f"nar/{i}.nar.zst", f.file.read_bytes()) for i, f in enumerate(files)]
    s3 = client()
    parts_pool = ThreadPoolExecutor(parts_in_flight)

    def put(key: str, body: bytes) -> None:
        if len(body) < part_size:
            s3.put_object(Bucket=bucket, Key=key, Body=body)
            return
        upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        view = memoryview(body)

        def part(n: int) -> dict[str, Any]:
            chunk = view[(n - 1) * part_size : n * part_size]
            r = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=n, Body=bytes(chunk))
            return {"PartNumber": n, "ETag": r["ETag"]}

        parts = list(parts_pool.map(part, range(1, (len(body) + part_size - 1) // part_size + 1)))
        s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})

    t = time.perf_counter()
    with ThreadPoolExecutor(objects_in_flight) as pool:
        list(pool.map(lambda kb: put(*kb), bodies))
    seconds = time.perf_counter() - t
    parts_pool.shutdown()
    return seconds
