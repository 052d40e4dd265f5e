"""Each backend against a real server (file system, moto's S3 server, Ceph's radosgw, nginx WebDAV), directly
and through a proxy that injects faults."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hookd.backends import Backend, BackendError, PermanentBackendError, open_backend
from hookd.backends.retry import AdaptiveRate, parse_retry_after
from hookd.backends.s3 import S3Backend
from hookd.config import Config
from hookd.narstream import NarMismatchError
from hookd.scheduler import Parallelism

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


async def pieces(data: bytes, size: int = 1 << 20, fail: BaseException | None = None) -> AsyncIterator[bytes]:
    """`data` as a stream of pieces, as narstream.NarStream hands them on; `fail` raised at its end."""
    for i in range(0, len(data), size):
        yield data[i : i + size]
        await asyncio.sleep(0)
    if fail is not None:
        raise fail


async def put_nar(be: Backend, key: str, data: bytes, tries: int = 10) -> None:
    """A streamed PUT is one attempt (its body cannot be sent twice): through a faulty proxy, the caller
    tries again with a fresh stream, as the scheduler does with the path."""
    for attempt in range(tries):
        try:
            await be.put_nar(key, pieces(data), "application/x-nix-nar", len(data))
            return
        except BackendError:
            if attempt == tries - 1:
                raise


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
    await put_nar(backend, "nar/small.nar.zst", small)
    big = tmp_path / "big"
    big.write_bytes(os.urandom((21 << 20) + 12345))  # more than four 5 MiB parts on S3
    await put_nar(backend, "nar/big.nar", big.read_bytes())
    assert await backend.get("nar/big.nar") == big.read_bytes()
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


@pytest.mark.parametrize("kind", ["file", *S3_SERVERS, "nginx"])
@pytest.mark.parametrize("mib", [1, 20])
async def test_a_stream_that_fails_its_check_commits_nothing(
    kind: str, mib: int, request: pytest.FixtureRequest, tmp_path: Path, aws_env: None
) -> None:
    """The NarHash check fails at the stream's end (after every byte but the last went out): the server
    keeps nothing. S3: the multipart upload is aborted (20 MiB: four 5 MiB parts sent before the end)
    or the single PUT never sent (1 MiB); HTTP: the chunked body is cut before its last chunk; file://:
    the temp file goes."""
    cfg = Config(multipart_threshold=5 << 20, part_size=5 << 20)
    bucket = None
    if kind == "file":
        be = open_backend(f"file://{tmp_path / 'cache'}", cfg)
    elif kind in S3_SERVERS:
        s3: S3Server = request.getfixturevalue(kind)
        bucket, url = s3_url(s3)
        be = open_backend(url, cfg)
    else:
        nginx: Nginx = request.getfixturevalue("nginx")
        url = http_url(nginx)
        be = open_backend(url, cfg)
    data = os.urandom(mib << 20)
    with pytest.raises(NarMismatchError):
        await be.put_nar("nar/x.nar", pieces(data, fail=NarMismatchError("differs")), "application/x-nix-nar", len(data))
    await asyncio.sleep(0.5)  # a server that committed late would show it now
    assert await be.stat("nar/x.nar") is None
    assert [o.key async for o in be.list()] == []
    await put_nar(be, "nar/x.nar", data)  # the same backend is fine afterwards
    assert await be.get("nar/x.nar") == data
    await be.close()
    if kind == "file":
        assert sorted(p.name for p in (tmp_path / "cache").rglob("*")) == ["nar", "x.nar"]  # no temp file left
    elif bucket is not None:
        assert request.getfixturevalue(kind).client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    else:
        assert [p.name for p in (nginx.root / url.rsplit("/", 1)[1]).rglob("*")] == ["nar", "x.nar"]


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
    await put_nar(be, "nar/x.nar", data)
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
    await put_nar(be, "nar/x.nar", big.read_bytes())
    await be.put("x.narinfo", b"StorePath: x\n", "text/x-nix-narinfo")
    # The GC's narinfo index trusts ETags from HEAD and listings: they must name a multipart object too
    # (Ceph 16.2 answers CompleteMultipartUpload with an empty ETag; hookd never reads that one).
    stat = await be.stat("nar/x.nar")
    listed = {o.key: o.etag async for o in be.list("nar/")}
    assert stat is not None and stat.etag and listed == {"nar/x.nar": stat.etag}
    await be.close()
    parts = {r["path"] for r in proxy.records() if r["method"] == "PUT" and "partNumber=" in str(r["path"])}
    assert len(parts) == 5
    # Writes and HEADs are hookd's own requests, a PUT's payload SHA-256 signed (s3wire.py); the rest is
    # botocore's, and one HEAD of a probe key, from which hookd learns where to send.
    records = proxy.records_when(lambda rs: any(r["method"] == "GET" for r in rs))  # the listing: the last
    puts = [r for r in records if r["method"] == "PUT"]
    assert puts and all(r["client"] == "hookd" and r["payload"] == "signed" for r in puts), puts
    assert [r["method"] for r in records if r["client"] == "hookd" and r["method"] != "PUT"] == ["HEAD"]
    boto = [r for r in records if r["client"] == "aiobotocore"]
    assert [r["method"] for r in boto if ".hookd-probe-wire" in str(r["path"])] == ["HEAD"]
    assert {r["method"] for r in boto if ".hookd-probe-wire" not in str(r["path"])} == {"POST", "GET"}
    head = s3server.client().head_object(Bucket=bucket, Key="nar/x.nar")
    assert head["ContentType"] == "application/x-nix-nar" and "ContentEncoding" not in head
    assert s3server.client().head_object(Bucket=bucket, Key="x.narinfo")["ContentType"] == "text/x-nix-narinfo"
    proxy.stop()


async def test_s3_nar_bytes_changed_on_the_way_are_refused_and_sent_again(
    tmp_path: Path, radosgw: S3Server, aws_env: None
) -> None:
    """NAR bytes are hashed off the event loop and their SHA-256 signed (s3wire.py). A byte changed between
    hookd and the server, in a part or in a small NAR's one PUT, is refused (XAmzContentSHA256Mismatch) and
    sent again: the objects hold the NAR's bytes. Against radosgw: moto checks neither that hash nor a
    Content-MD5."""
    proxy = FaultProxy(tmp_path, radosgw.url, s3=True, corrupt=0.3, seed=3)
    bucket, url = s3_url(radosgw, proxy.url)
    be = open_backend(url, Config(multipart_threshold=5 << 20, part_size=5 << 20, request_attempts=20))
    big, small = os.urandom((21 << 20) + 1), os.urandom(3 << 20)
    await be.put_nar("nar/big.nar", pieces(big), "application/x-nix-nar", len(big))
    assert await be.put_new("nar/small.nar", small, "application/x-nix-nar")
    await be.close()
    changed = [r for r in proxy.records() if r["fault"] == "corrupt"]
    proxy.stop()
    assert any("partNumber=" in str(r["path"]) for r in changed), "no part was changed: the test means nothing"
    assert changed and all(r["status"] == 400 and r["payload"] == "signed" for r in changed), changed
    client = radosgw.client()
    assert client.get_object(Bucket=bucket, Key="nar/big.nar")["Body"].read() == big
    assert client.get_object(Bucket=bucket, Key="nar/small.nar")["Body"].read() == small


async def test_s3_writes_are_signed_by_hookd_when_other_requests_run_beside_the_first(
    tmp_path: Path, moto: S3Server, aws_env: None
) -> None:
    """Where hookd's own requests go is learned from one HEAD that botocore signs; HEADs of other keys that
    botocore signs meanwhile (a touch looks at a narinfo first) must not be taken for it."""
    proxy = FaultProxy(tmp_path, moto.url, s3=True)
    _, url = s3_url(moto, proxy.url)
    be = open_backend(url)
    touched = [be.touch(f"{i:04}.narinfo", "text/x-nix-narinfo") for i in range(40)]
    await asyncio.gather(*touched[:20], be.put("x.narinfo", b"StorePath: x\n", "text/x-nix-narinfo"), *touched[20:])
    await be.put("y.narinfo", b"StorePath: y\n", "text/x-nix-narinfo")
    await be.close()
    records = proxy.records_when(lambda rs: sum(r["method"] == "PUT" for r in rs) >= 2)
    puts = [r for r in records if r["method"] == "PUT"]
    proxy.stop()
    assert len(puts) == 2 and all(r["client"] == "hookd" and r["payload"] == "signed" for r in puts), puts


async def test_s3_writes_refused_for_the_region_go_through_botocore(
    tmp_path: Path, moto: S3Server, aws_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    """hookd's own writes do not follow a region redirect, botocore's do: after the first answer that says
    the request went to the wrong region, every write goes through botocore, and nothing is lost. (The
    proxy answers hookd's requests as S3 answers a request signed for another region.)"""
    proxy = FaultProxy(tmp_path, moto.url, s3=True, wrong_region_for="hookd")
    bucket, url = s3_url(moto, proxy.url)
    be = open_backend(url, Config(multipart_threshold=5 << 20, part_size=5 << 20, request_attempts=3))
    big = os.urandom((16 << 20) + 1)
    with caplog.at_level(logging.INFO, logger="hookd.backend"):
        await be.put_nar("nar/big.nar", pieces(big), "application/x-nix-nar", len(big))
        await be.put("x.narinfo", b"StorePath: x\n", "text/x-nix-narinfo")
        assert await be.put_new("nar/small.nar", b"small", "application/x-nix-nar")
        there = await be.stat("x.narinfo")
    await be.close()
    assert there is not None and there.size == len(b"StorePath: x\n")
    records = proxy.records_when(lambda rs: any(r["method"] == "HEAD" and str(r["path"]).endswith("/x.narinfo") for r in rs))
    refused = [r for r in records if r["fault"] == "region"]
    after = max(float(r["end"]) for r in refused)
    later = [r for r in records if r["method"] in ("PUT", "HEAD") and r["start"] > after]
    proxy.stop()
    assert 1 <= len(refused) <= 2, refused  # the parts in flight when the first answer came
    assert later and all(r["client"] == "aiobotocore" and r["status"] in (200, 404, 412) for r in later), later
    assert len([m for m in caplog.messages if "goes through botocore from now on" in m]) == 1
    client = moto.client()
    assert client.get_object(Bucket=bucket, Key="nar/big.nar")["Body"].read() == big
    assert client.get_object(Bucket=bucket, Key="x.narinfo")["Body"].read() == b"StorePath: x\n"
    assert client.get_object(Bucket=bucket, Key="nar/small.nar")["Body"].read() == b"small"


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
            await be.put_nar(f"nar/{i}.nar", pieces(big.read_bytes()), "application/x-nix-nar", 30 << 20)
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


def test_congestion_follows_latency_against_its_best() -> None:
    rate = AdaptiveRate()
    assert not rate.congested
    for _ in range(50):
        rate.on_success(0.020)  # a 20 ms link: latency-bound, not congested
    assert not rate.congested
    for _ in range(30):
        rate.on_success(0.120)  # answers six times slower: the server is saturated
    assert rate.congested
    for _ in range(200):
        rate.on_success(0.021)
    assert not rate.congested
    rate.on_throttle()
    assert rate.congested


def test_parallelism_grows_while_uncongested_and_backs_off_once_a_second() -> None:
    p = Parallelism(8.0, ceiling=64)
    for _ in range(8 + 16):
        p.update(False, 0.0)
    assert p.slots == 32  # slow start: doubled in each of two rounds
    p.update(True, 1.0)
    assert p.slots == 24 and not p.slow_start
    for _ in range(200):
        p.update(False, 2.0)
    assert 24 + 6 <= p.slots <= 24 + 9  # then about one more per round of uploads
    for _ in range(2000):
        p.update(False, 2.0)
    assert p.slots == 64
    p.update(True, 10.0)
    p.update(True, 10.5)  # the same burst of bad answers: one cut
    assert p.slots == 48
    for t in range(11, 40):
        p.update(True, float(t))
    assert p.slots == 1
    kept = Parallelism(8.0, ceiling=64, floor=8)
    for t in range(40):
        kept.update(True, float(t))
    assert kept.slots == 8


@pytest.mark.parametrize("kind", [*S3_SERVERS, "nginx"])
async def test_stat_top_answers_for_many_keys_within_its_budget(
    kind: str, request: pytest.FixtureRequest, aws_env: None
) -> None:
    """A listing of the top level answers for many narinfos at once, and is given up (None: ask per key)
    when it would cost more than its budget of requests."""
    if kind == "nginx":
        be = open_backend(http_url(request.getfixturevalue("nginx")))
        small, too_small = 5, 0  # 37 PROPFIND entries fit in 5 requests' worth of answer, not in none
    else:
        _, url = s3_url(request.getfixturevalue(kind), prefix="/pre")
        be = open_backend(url)
        assert isinstance(be, S3Backend)
        be.list_page = 10
        small, too_small = 5, 3  # 37 entries: 4 pages of 10
    present = [f"{i:032d}.narinfo" for i in range(35)]
    for key in present:
        await be.put(key, b"x", "text/x-nix-narinfo")
    await put_nar(be, "nar/a.nar", b"nar")  # below the top level: one directory entry, not a key
    await be.put("nix-cache-info", b"StoreDir: /nix/store\n", "text/x-nix-cache-info")
    absent = [f"{i:032d}.narinfo" for i in range(100, 120)]
    found = await be.stat_top([*present[::2], *absent], budget=small)
    assert found is not None and sorted(found) == present[::2]
    assert all(o.mtime > 0 and o.size == 1 for o in found.values())
    assert await be.stat_top(present, budget=too_small) is None
    await be.close()


async def test_s3_conditional_writes_probed_once_for_concurrent_uploads(
    tmp_path: Path, s3server: S3Server, aws_env: None
) -> None:
    proxy = FaultProxy(tmp_path, s3server.url)
    _, url = s3_url(s3server, proxy.url)
    be = open_backend(url)
    created = await asyncio.gather(*(be.put_new(f"nar/{i % 4}.nar", b"x", "application/x-nix-nar") for i in range(16)))
    await be.close()
    assert sorted(created) == [False] * 12 + [True] * 4  # each key created once: the server enforces it
    records = proxy.records_when(lambda rs: sum(r["method"] == "PUT" and "/nar/" in str(r["path"]) for r in rs) == 16)
    probes = [r for r in records if "hookd-probe" in str(r["path"]) and r["method"] == "PUT"]
    proxy.stop()
    assert len(probes) == 2  # one probe (two conditional PUTs of one key), not one per upload
