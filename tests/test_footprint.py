"""The memory an upload holds (hookd/footprint.py) against what a process really holds while it streams a
NAR (peak RSS, in a fresh interpreter) to nothing and to real S3 servers; and the scheduler keeping what
uploads in flight hold within its budget, with at most one threaded stream per core."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from hookd import footprint, narstream
from hookd.backends import open_backend
from hookd.config import Config
from hookd.metrics import Metrics
from hookd.pathinfo import PathInfo
from hookd.scheduler import Scheduler
from hookd.signing import SecretKey

from .servers import ACCESS_KEY, SECRET_KEY, S3Server

MiB = 1 << 20

# Streams a 48 MiB file of ELF code (threaded zstd) to nothing, or to S3 through S3Backend.put_nar, in a
# fresh interpreter with the daemon's malloc settings; prints the peak RSS above what the process held once everything was loaded.
MEASURE = r"""
import asyncio, hashlib, json, os, sys
from hookd import nar, narstream
from hookd.backends import open_backend
from hookd.config import Config
from hookd.daemon import tune_malloc
from hookd.pathinfo import PathInfo

tune_malloc()  # glibc set as in the daemon
src, url = sys.argv[1], sys.argv[2]

def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) << 10 for l in f if l.startswith(field + ":"))

h, size = hashlib.sha256(), 0
for chunk in nar.dump(src):
    h.update(chunk)
    size += len(chunk)
info = PathInfo(src, h.digest(), size, ())
enc = narstream.encoding("zstd", 3, size)

async def main():
    be = open_backend(url, Config()) if url else None
    if be is not None:  # the clients, their pools and the hashing threads exist before the measure
        await be.put_nar("warm", narstream.NarStream(info, narstream.Encoding("none", 0)), "x", 6 << 20)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = status("VmRSS")
    stream = narstream.NarStream(info, enc)
    if be is None:
        async for _ in stream:
            await asyncio.sleep(0.002)  # a consumer a little slower than the producer: pieces queue up
    else:
        await be.put_nar("nar/x.nar.zst", stream, "application/x-nix-nar", size)
        await be.close()
    print(json.dumps({"size": size, "threaded": enc.threaded, "peak": status("VmHWM") - base}))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def elf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 MiB of the machine's shared libraries: compresses like a store's binaries."""
    out = tmp_path_factory.mktemp("footprint") / "libs"
    with open(out, "wb") as w:
        left = 48 * MiB
        for lib in sorted(Path("/usr/lib").rglob("*.so*")):
            if left <= 0:
                break
            if lib.is_file() and not lib.is_symlink():
                data = lib.read_bytes()[:left]
                w.write(data)
                left -= len(data)
    assert left <= 0, "not enough shared libraries on this machine for 48 MiB"
    return out


def measure(src: Path, url: str = "", env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(src), url],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_stream_holds_no_more_than_its_footprint(elf_file: Path) -> None:
    """Streamed to nothing (as to HTTP or a file: the backend holds no parts): the compressor and the
    pieces in flight."""
    got = measure(elf_file)
    assert got["threaded"]
    enc = narstream.encoding("zstd", 3, got["size"])
    predicted = footprint.upload_memory(got["size"], enc, max(1, os.cpu_count() or 1), 0)
    assert 0 < got["peak"] <= predicted, (got["peak"] / MiB, predicted / MiB)
    print(f"peak {got['peak'] / MiB:.1f} MiB, footprint {predicted / MiB:.1f} MiB")


def test_an_s3_upload_holds_no_more_than_its_footprint(elf_file: Path, s3server: S3Server) -> None:
    """Streamed to S3 as a multipart upload: the compressor, the pieces, and the parts the backend
    holds (in flight, filling, being joined), as S3Backend.nar_memory says."""
    bucket = f"hookd-{uuid.uuid4().hex[:12]}"
    s3server.make_bucket(bucket)
    url = f"s3://{bucket}?endpoint={s3server.url}&region=us-east-1&addressing=path"
    got = measure(elf_file, url, {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    enc = narstream.encoding("zstd", 3, got["size"])
    be = open_backend(url, Config())
    predicted = footprint.upload_memory(got["size"], enc, max(1, os.cpu_count() or 1), be.nar_memory(got["size"]))
    assert be.nar_memory(got["size"]) > 0
    assert 0 < got["peak"] <= predicted, (got["peak"] / MiB, predicted / MiB)
    print(f"peak {got['peak'] / MiB:.1f} MiB, footprint {predicted / MiB:.1f} MiB")
    keys = s3server.keys(bucket)
    assert "nar/x.nar.zst" in keys


def test_footprint_counts_what_each_kind_of_upload_holds() -> None:
    small = narstream.encoding("zstd", 3, 100_000)
    large = narstream.encoding("zstd", 3, 1 << 30)
    assert not small.threaded and large.threaded
    # a small NAR: its compressed copies, not a compressor (that lives in the encoding pool)
    assert 2 * 100_000 < footprint.upload_memory(100_000, small, 2, 0) < 1 * MiB
    # a large one over HTTP: threaded zstd's buffers and the pieces, whatever its size
    http = footprint.upload_memory(1 << 30, large, 2, 0)
    assert http == footprint.upload_memory(100 << 30, large, 2, 0)
    assert 15 * MiB < http < 40 * MiB
    # more workers, more buffers; S3 adds its parts
    assert footprint.upload_memory(1 << 30, large, 8, 0) > http
    assert footprint.upload_memory(1 << 30, large, 2, 36 * MiB) == http + 36 * MiB
    # xz's compressor is the largest part of a streamed xz NAR
    assert footprint.upload_memory(1 << 30, narstream.encoding("xz", 6, 1 << 30), 2, 0) > 94 * MiB


class _Queue:
    async def upstream_references(self, path: str) -> set[str]:
        return set()


@pytest.mark.parametrize("budget_mib", [64, 1024])
async def test_the_scheduler_keeps_uploads_within_budget_and_one_threaded_stream_per_core(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget_mib: int
) -> None:
    """Many uploads started at once (an in-process stand-in for upload_path records what is in flight):
    what they hold, as footprint.py counts it, never exceeds the budget, and threaded streams never
    outnumber the cores (with a budget too large to bind, as many as there are cores); every upload
    still runs."""
    cfg = Config(cache=f"file://{tmp_path / 'cache'}", max_bytes_in_flight=budget_mib * MiB)
    backend = open_backend(cfg.cache, cfg)
    scheduler = Scheduler(cfg, _Queue(), backend, SecretKey.generate("t-1"), Metrics())  # type: ignore[arg-type]
    sizes = [1 << 30] * 6 + [3 * MiB] * 20 + [40 * MiB] * 6 + [10_000] * 30
    infos = [PathInfo(f"/nix/store/{i:032d}-p", b"\0" * 32, n, ()) for i, n in enumerate(sizes)]
    held: dict[str, int] = {}
    threaded_now = peak_threaded = peak_bytes = 0
    done: list[str] = []

    async def fake_upload_path(info: PathInfo, *args: object) -> Any:
        nonlocal threaded_now, peak_threaded, peak_bytes
        nbytes, threaded = scheduler.memory(info)
        held[info.path] = nbytes
        threaded_now += threaded
        peak_threaded = max(peak_threaded, threaded_now)
        peak_bytes = max(peak_bytes, sum(held.values()))
        await asyncio.sleep(0.01)
        threaded_now -= threaded
        del held[info.path]
        done.append(info.path)

    monkeypatch.setattr("hookd.scheduler.upload_path", fake_upload_path)
    await asyncio.gather(*(scheduler.upload(i) for i in infos))
    assert sorted(done) == sorted(i.path for i in infos)
    cores = max(1, os.cpu_count() or 1)
    assert 1 <= peak_threaded <= cores
    assert peak_bytes <= cfg.max_bytes_in_flight
    if budget_mib == 64:
        assert peak_bytes > cfg.max_bytes_in_flight // 2  # uploads did overlap
    else:
        assert peak_threaded == min(6, cores)
