"""Each backend against a real server (file system, moto's S3 server, Ceph's radosgw, nginx WebDAV), directly
and through a proxy that injects faults."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hookd.backends import Backend, Blob, PermanentBackendError, open_backend
from hookd.backends.retry import AdaptiveRate, parse_retry_after
from hookd.config import Config

from .conftest import S3_SERVERS
from .servers import ACCESS_KEY, SECRET_KEY, FaultProxy, Nginx, S3Server


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def s3_url(server: S3Server, endpoint: str | None = None, prefix: str = "") -> tuple[str, str]:
    bucket = f"hookd-{uuid.uuid4().hex[:12]}"
    server.make_bucket(bucket)
    return bucket, f"s3://{bucket}{prefix}?endpoint={endpoint or server.url}&region=us-east-1&addressing=path"


def http_url(nginx: Nginx, base: str | None = None) -> str:
    sub = uuid.uuid4().hex[:12]
    (nginx.root / sub).mkdir()
    return f"{base or nginx.url}/{sub}"


@pytest.fixture(params=["file", "moto", "radosgw", "http", "moto-faults", "radosgw-faults", "http-faults"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path, aws_env: None) -> AsyncIterator[Backend]:
    kind = request.param
    server_name = kind.removesuffix("-faults")
    cfg = Config(multipart_threshold=5 << 20, part_size=5 << 20, request_attempts=10)
    if kind == "file":
        url = f"file://{tmp_path / 'cache'}"
    elif server_name in S3_SERVERS:
        s3: S3Server = request.getfixturevalue(server_name)
        proxy = FaultProxy(tmp_path, s3.url, 0.2, s3=True) if kind.endswith("faults") else None
        _, url = s3_url(s3, proxy.url if proxy else None, prefix="/some/prefix")
    else:
        nginx: Nginx = request.getfixturevalue("nginx")
        proxy = FaultProxy(tmp_path, nginx.url, 0.2) if kind.endswith("faults") else None
        url = http_url(nginx, proxy.url if proxy else None)
    be = open_backend(url, cfg)
    yield be
    await be.close()
    if kind.endswith("faults"):
        assert proxy is not None
        faults = Counter(r["fault"] for r in proxy.records() if r["fault"])
        proxy.stop()
        assert sum(faults.values()) >= 3, f"the proxy injected too few faults to mean anything: {faults}"


async def test_round_trip(backend: Backend, tmp_path: Path) -> None:
    assert not await backend.exists("nix-cache-info")
    assert await backend.get("nix-cache-info") is None
    assert await backend.stat("nix-cache-info") is None
    await backend.put("nix-cache-info", b"StoreDir: /nix/store\n", "text/x-nix-cache-info")
    await backend.put("nix-cache-info", b"StoreDir: /nix/store\nPriority: 30\n", "text/x-nix-cache-info")
    assert await backend.get("nix-cache-info") == b"StoreDir: /nix/store\nPriority: 30\n"
    assert await backend.exists("nix-cache-info")
    stat = await backend.stat("nix-cache-info")
    assert stat is not None and stat.size == 34 and stat.mtime > 0

    small = os.urandom(1000)
    assert await backend.put_stream("nar/small.nar.zst", Blob(len(small), data=small), "application/x-nix-nar")
    big = tmp_path / "big"
    big.write_bytes(os.urandom((21 << 20) + 12345))  # more than four 5 MiB parts on S3
    assert await backend.put_stream("nar/big.nar", Blob(big.stat().st_size, path=big), "application/x-nix-nar")
    assert await backend.get("nar/big.nar") == big.read_bytes()
    # an existing NAR key is never overwritten
    assert not await backend.put_stream("nar/small.nar.zst", Blob(3, data=b"xyz"), "application/x-nix-nar")
    assert await backend.get("nar/small.nar.zst") == small

    # streamed: the same bytes in bounded chunks (after a fault, from the start again)
    async def digest(chunks: AsyncIterator[bytes]) -> tuple[str, int]:
        h, biggest = hashlib.sha256(), 0
        async for chunk in chunks:
            h.update(chunk)
            biggest = max(biggest, len(chunk))
        return h.hexdigest(), biggest

    streamed = await backend.read("nar/big.nar", digest)
    assert streamed is not None and streamed[0] == hashlib.sha256(big.read_bytes()).hexdigest()
    assert 0 < streamed[1] <= 1 << 20
    assert await backend.read("nar/missing.nar", digest) is None

    await backend.delete("nar/small.nar.zst")
    assert not await backend.exists("nar/small.nar.zst")


@pytest.mark.parametrize("kind", [*S3_SERVERS, "nginx"])
async def test_a_read_cut_mid_body_starts_again(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, aws_env: None
) -> None:
    """The consumer sees a fresh stream after a cut, never the half it already had twice."""
    server: S3Server | Nginx = request.getfixturevalue(kind)
    proxy = FaultProxy(tmp_path, server.url, 0.5, s3=isinstance(server, S3Server))
    url = s3_url(server, proxy.url)[1] if isinstance(server, S3Server) else http_url(server, proxy.url)
    be = open_backend(url, Config(request_attempts=30))
    data = os.urandom(3 << 20)
    await be.put_stream("nar/x.nar", Blob(len(data), data=data), "application/x-nix-nar")
    starts = 0

    async def digest(chunks: AsyncIterator[bytes]) -> bytes:
        nonlocal starts
        starts += 1
        h = hashlib.sha256()
        async for chunk in chunks:
            h.update(chunk)
        return h.digest()

    for _ in range(12):
        assert await be.read("nar/x.nar", digest) == hashlib.sha256(data).digest()
    await be.close()
    cuts = [r for r in proxy.records() if r["method"] == "GET" and r["status"] == "reset"]
    proxy.stop()
    assert cuts and starts == 12 + len(cuts)


async def test_s3_multipart_parts_and_content_types(tmp_path: Path, s3server: S3Server, aws_env: None) -> None:
    proxy = FaultProxy(tmp_path, s3server.url)
    bucket, url = s3_url(s3server, proxy.url)
    be = open_backend(url, Config(multipart_threshold=5 << 20, part_size=5 << 20))
    big = tmp_path / "big"
    big.write_bytes(os.urandom((21 << 20) + 1))
    await be.put_stream("nar/x.nar", Blob(big.stat().st_size, path=big), "application/x-nix-nar")
    await be.put("x.narinfo", b"StorePath: x\n", "text/x-nix-narinfo")
    # The GC's narinfo index trusts ETags from HEAD and listings: they must name a multipart object too
    # (Ceph 16.2 answers CompleteMultipartUpload with an empty ETag; hookd never reads that one).
    stat = await be.stat("nar/x.nar")
    listed = {o.key: o.etag async for o in be.list("nar/")}
    assert stat is not None and stat.etag and listed == {"nar/x.nar": stat.etag}
    await be.close()
    parts = {r["path"] for r in proxy.records() if r["method"] == "PUT" and "partNumber=" in str(r["path"])}
    assert len(parts) == 5
    head = s3server.client().head_object(Bucket=bucket, Key="nar/x.nar")
    assert head["ContentType"] == "application/x-nix-nar" and "ContentEncoding" not in head
    assert s3server.client().head_object(Bucket=bucket, Key="x.narinfo")["ContentType"] == "text/x-nix-narinfo"
    proxy.stop()


async def test_s3_failed_multipart_is_aborted(tmp_path: Path, s3server: S3Server, aws_env: None) -> None:
    """Parts fail for good (the retry budget is one try): the upload is aborted, nothing lingers."""
    proxy = FaultProxy(tmp_path, s3server.url, rate=0.25, s3=True, seed=7)
    bucket, url = s3_url(s3server, proxy.url)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(30 << 20))
    failures = 0
    for i in range(10):
        be = open_backend(url, Config(multipart_threshold=5 << 20, part_size=5 << 20, request_attempts=1))
        try:
            await be.put_stream(f"nar/{i}.nar", Blob(big.stat().st_size, path=big), "application/x-nix-nar")
        except Exception:
            failures += 1
        finally:
            await be.close()
    assert failures >= 3
    started = [
        r for r in proxy.records() if r["method"] == "POST" and "uploads" in str(r["path"]) and r["status"] == 200
    ]
    assert started, "no multipart upload got as far as starting"
    # Uploads whose creation answer the proxy cut off are unknown to the client: only a bucket
    # lifecycle rule can clean those. Every other one was aborted.
    lost = [
        r for r in proxy.records() if r["method"] == "POST" and "uploads" in str(r["path"]) and r["status"] == "reset"
    ]
    assert len(s3server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == len(lost)
    proxy.stop()


async def test_http_token_is_sent_and_never_shown(tmp_path: Path, nginx: Nginx) -> None:
    token = f"tok-{uuid.uuid4().hex}"
    (tmp_path / "token").write_text(token + "\n")
    proxy = FaultProxy(tmp_path, nginx.url, rate=1.0)  # every request fails
    url = http_url(nginx, proxy.url)
    be = open_backend(url, Config(http_token_file=tmp_path / "token", request_attempts=2))
    with pytest.raises(Exception) as err:
        await be.put("x.narinfo", b"x", "text/x-nix-narinfo")
    await be.close()
    assert token not in str(err.value) and "x.narinfo" in str(err.value)
    assert all(r["auth"] for r in proxy.records())
    proxy.stop()


async def test_http_auth_failure_is_permanent(tmp_path: Path) -> None:
    """A server that says 401 is not retried for ever: the error says what to check."""
    from aiohttp import web

    async def deny(request: web.Request) -> web.Response:
        return web.Response(status=401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", deny)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    be = open_backend(f"http://user:hunter2@127.0.0.1:{port}/c", Config())
    with pytest.raises(PermanentBackendError, match="credentials") as err:
        await be.put("x.narinfo", b"x", "text/x-nix-narinfo")
    assert "hunter2" not in str(err.value) and "hunter2" not in be.url
    await be.close()
    await runner.cleanup()


def test_open_backend_rejects_bad_urls() -> None:
    for url, message in [
        ("ftp://x/y", "not supported"),
        ("s3:///prefix", "no bucket"),
        ("s3://bucket?regoin=eu", "unknown parameter"),
        ("file://host/dir", "no host"),
        ("s3://bucket?addressing=sideways", "addressing"),
    ]:
        with pytest.raises(PermanentBackendError, match=message):
            open_backend(url, Config())


def test_retry_after_parsing() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("-1") == 0.0
    assert parse_retry_after("100000") == 300.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


async def test_adaptive_rate_halves_once_per_window_and_recovers() -> None:
    rate = AdaptiveRate(max_rate=100, min_rate=1, growth=1.5, window=10)
    assert rate.rate is None
    rate.on_throttle()
    first = rate.rate
    rate.on_throttle()  # the same burst: no second cut
    assert first == rate.rate == 50
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(5):
        await rate.acquire()
    assert loop.time() - start >= 4 / 50 * 0.9  # paced
    for _ in range(5):
        rate.on_success()
    assert rate.rate is None  # back above max_rate: unlimited again
