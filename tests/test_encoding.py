"""Content-Encoding of narinfos, listings and build logs (never NARs): the bytes and headers on real servers,
touches that keep the encoding, the servers that cannot keep it, and Nix (this block's) reading an encoded
S3 cache over HTTP: substitution with signatures required, `nix store verify`, `nix log`."""

from __future__ import annotations

import gzip
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hookd import encoding, narinfo
from hookd.backends import Backend, PermanentBackendError, open_backend
from hookd.backends.http import HttpBackend
from hookd.config import Config, ConfigError
from hookd.selftest import CHAIN_NIX, NixEnv

from .conftest import HookdFactory
from .servers import ACCESS_KEY, SECRET_KEY, Moto, Nginx, S3Server
from .test_e2e_remote import RemoteCache, start

LOG_NIX = r"""
{ salt }:
derivation {
  name = "logged";
  inherit salt;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo hello-log-$salt; echo $salt > $out" ];
}
"""
TEXT = b"StorePath: /nix/store/00000000000000000000000000000000-x\nURL: nar/x.nar\n" * 20


def fetch(url: str) -> tuple[bytes, str | None]:
    """The body as the server sends it (urllib decodes nothing) and its Content-Encoding."""
    with urllib.request.urlopen(url, timeout=10) as r:
        return bytes(r.read()), r.headers.get("Content-Encoding")


# --- units -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gzip", "zstd"])
def test_encode_decode(method: str) -> None:
    for key in ("abc.narinfo", "abc.ls", "log/x.drv"):
        body, enc = encoding.encode(key, TEXT, method)
        assert enc == method and body != TEXT and encoding.decode(body) == TEXT
    for key in ("nar/x.nar.zst", "nix-cache-info", "realisations/sha256:x!out.doi", "sub/x.narinfo"):
        assert encoding.encode(key, TEXT, method) == (TEXT, None)
    assert encoding.decode(TEXT) == TEXT  # plain text passes through (a transport that decoded already)
    assert gzip.decompress(encoding.encode("a.ls", TEXT, "gzip")[0]) == TEXT
    with pytest.raises(encoding.EncodingError):
        encoding.decode(encoding.encode("a.ls", TEXT, method)[0][:-4])


def test_config_refuses_what_cannot_work() -> None:
    with pytest.raises(ConfigError, match="file:// cache cannot"):
        Config(cache="file:///tmp/c", content_encoding="gzip").validate()
    with pytest.raises(ConfigError, match="content_encoding 'br'"):
        Config(cache="s3://b", content_encoding="br").validate()
    Config(cache="s3://b", content_encoding="zstd").validate()
    Config(cache="file:///tmp/c").validate()


async def test_file_backend_refuses_an_encoding(tmp_path: Path) -> None:
    be = open_backend(f"file://{tmp_path}", Config())
    with pytest.raises(PermanentBackendError, match="cannot store a Content-Encoding"):
        await be.put("x.narinfo", b"x", narinfo.CONTENT_TYPE, content_encoding="gzip")


# --- backends on real servers -------------------------------------------------------------------------


@pytest.fixture
async def s3(s3server: S3Server, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Backend, str]]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    bucket = f"hookd-{uuid.uuid4().hex[:12]}"
    s3server.make_bucket(bucket)
    be = open_backend(f"s3://{bucket}?endpoint={s3server.url}&region=us-east-1&addressing=path", Config())
    yield be, f"{s3server.url}/{bucket}"
    await be.close()


async def test_s3_keeps_the_encoding_through_touches(s3: tuple[Backend, str]) -> None:
    be, read_url = s3
    body, enc = encoding.encode("abc.narinfo", TEXT, "zstd")
    await be.put("abc.narinfo", body, narinfo.CONTENT_TYPE, content_encoding=enc)
    await be.put("nar/x.nar", b"nar bytes", "application/x-nix-nar")
    assert fetch(f"{read_url}/abc.narinfo") == (body, "zstd")
    before = await be.stat("abc.narinfo")
    time.sleep(1.1)  # S3 stamps whole seconds
    assert await be.touch("abc.narinfo", narinfo.CONTENT_TYPE)
    after = await be.stat("abc.narinfo")
    assert before is not None and after is not None and after.mtime > before.mtime
    assert fetch(f"{read_url}/abc.narinfo") == (body, "zstd")  # a plain copy-onto-itself would drop it
    assert await be.touch("nar/x.nar", "application/x-nix-nar")
    assert fetch(f"{read_url}/nar/x.nar") == (b"nar bytes", None)
    assert not await be.touch("gone.narinfo", narinfo.CONTENT_TYPE)


async def test_http_sends_the_header(moto: Moto, nginx: Nginx) -> None:
    """An HTTP server that keeps the header (moto's S3, read and written over plain HTTP) serves it back;
    nginx's WebDAV drops it: an encoded cache there would be unreadable (the README says so)."""
    bucket = f"hookd-{uuid.uuid4().hex[:12]}"
    moto.make_bucket(bucket)
    sub = uuid.uuid4().hex[:12]
    (nginx.root / sub).mkdir()
    body, enc = encoding.encode("abc.ls", TEXT, "gzip")
    for base, kept in ((f"{moto.url}/{bucket}", True), (f"{nginx.url}/{sub}", False)):
        be = HttpBackend(base)
        try:
            await be.put("abc.ls", body, "application/json", content_encoding=enc)
            assert fetch(f"{base}/abc.ls") == (body, "gzip" if kept else None)
            assert encoding.decode(await be.get("abc.ls") or b"") == TEXT
        finally:
            await be.close()


# --- Nix reading an encoded cache -------------------------------------------------------------------


@pytest.mark.nix
@pytest.mark.parametrize("method", ["gzip", "zstd"])
def test_nix_reads_an_encoded_cache(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path, s3server: S3Server, method: str
) -> None:
    remote = RemoteCache(s3server, tmp_path, rate=0.0)
    hookd = None
    try:
        hookd = start(hookd_factory, remote, HOOKD_CONTENT_ENCODING=method, HOOKD_UPLOAD_BUILD_LOGS="1")
        salt = str(time.time_ns())
        expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
        outs = nixenv.build(expr, ["top"], user=build_user, args={"salt": salt})
        outs += nixenv.build(nixenv.write_expr("logged.nix", LOG_NIX), [], user=build_user, args={"salt": salt})
        closure = nixenv.closure(outs)
        remote.wait_for(closure)
        for path in closure:
            key = narinfo.narinfo_key(path)
            body, enc = fetch(f"{remote.read_url}/{key}")
            assert enc == method, key
            info = narinfo.parse(encoding.decode(body))
            assert fetch(f"{remote.read_url}/{info.url}")[1] is None  # NARs: never
            assert fetch(f"{remote.read_url}/{key[:32]}.ls")[1] == method
        nixenv.substitute_fresh(outs, remote.read_url, hookd.public_key, tmp_path / "fresh")
        nixenv.verify_cache(outs, remote.read_url, hookd.public_key)
        deadline = time.monotonic() + 60
        drv = narinfo.parse(encoding.decode(fetch(f"{remote.read_url}/{narinfo.narinfo_key(outs[-1])}")[0])).deriver
        while not remote.has(f"log/{drv}"):
            assert time.monotonic() < deadline, "the build log never arrived"
            time.sleep(0.2)
        assert fetch(f"{remote.read_url}/log/{drv}")[1] == method
        log = nixenv.nix("nix", "log", "--store", remote.read_url, outs[-1])
        assert f"hello-log-{salt}" in log.stdout
    finally:
        remote.proxy.stop()
        if hookd is not None:
            print("\n".join(line for line in hookd.log().splitlines() if " DEBUG " not in line)[-6000:])  # shown when the test fails
