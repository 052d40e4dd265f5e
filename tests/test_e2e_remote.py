"""End to end through S3 (moto and Ceph's radosgw) and an HTTP cache (nginx WebDAV), with a proxy in front of each
that fails about a fifth of all requests: every path still lands intact, Nix substitutes the results with
signatures required, and no narinfo was ever visible before its NAR and its references."""

from __future__ import annotations

import re
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from hookd import narinfo
from hookd.selftest import CHAIN_NIX, HookdProcess, NixEnv

from .conftest import S3_SERVERS, HookdFactory
from .servers import ACCESS_KEY, SECRET_KEY, FaultProxy, Nginx, S3Server

ALL_OUTPUTS = ["top", "multi.out", "multi.dev", "multi.doc"]

BIG_NIX = r"""
{ salt }:
derivation {
  name = "big";
  inherit salt;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "/usr/bin/head -c 23000000 /dev/urandom > $out" ];
}
"""


def ok(record: dict[str, object]) -> bool:
    return isinstance(record["status"], int) and 200 <= record["status"] < 300


class RemoteCache:
    """One cache behind a fault proxy: where hookd uploads and where Nix reads."""

    def __init__(self, server: S3Server | Nginx, tmp: Path, rate: float) -> None:
        self.kind = "s3" if isinstance(server, S3Server) else "http"
        self.env: dict[str, str] = {}
        if isinstance(server, S3Server):
            self.bucket = f"hookd-{uuid.uuid4().hex[:12]}"
            server.make_bucket(self.bucket)
            self.proxy = FaultProxy(tmp, server.url, rate, s3=True)
            creds = tmp / "aws-credentials"
            creds.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
            self.upload_url = (
                f"s3://{self.bucket}?endpoint={self.proxy.url}&region=us-east-1&addressing=path"
                f"&credentials-file={creds}"
            )
            self.read_url = f"{server.url}/{self.bucket}"
            self.prefix = f"/{self.bucket}/"
        else:
            sub = uuid.uuid4().hex[:12]
            (server.root / sub).mkdir()
            self.proxy = FaultProxy(tmp, server.url, rate)
            self.token = f"tok-{uuid.uuid4().hex}"
            (tmp / "token").write_text(self.token)
            self.env["HOOKD_HTTP_TOKEN_FILE"] = str(tmp / "token")
            self.upload_url = f"{self.proxy.url}/{sub}"
            self.read_url = f"{server.url}/{sub}"
            self.prefix = f"/{sub}/"

    def has(self, key: str) -> bool:
        try:
            with urllib.request.urlopen(f"{self.read_url}/{key}", timeout=10) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def read(self, key: str) -> bytes:
        with urllib.request.urlopen(f"{self.read_url}/{key}", timeout=10) as r:
            return bytes(r.read())

    def wait_for(self, paths: list[str], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        missing = list(paths)
        while missing:
            missing = [p for p in missing if not self.has(narinfo.narinfo_key(p))]
            assert time.monotonic() < deadline, f"{len(missing)} narinfos never arrived"
            time.sleep(0.2)

    def check_order(self, paths: list[str]) -> None:
        """From the proxy's log: each narinfo PUT began after its NAR and its references were in place."""
        records = self.proxy.records()
        done: dict[str, float] = {}  # key -> when a write that created it finished
        for r in records:
            if not ok(r) or r["method"] not in ("PUT", "POST"):
                continue
            path = str(r["path"])
            if r["method"] == "POST" and "uploadId=" not in path:
                continue  # creating a multipart upload makes nothing visible
            if r["method"] == "PUT" and "partNumber=" in path:
                continue  # a part is not an object
            key = path.split("?")[0].removeprefix(self.prefix)
            done.setdefault(key, float(r["end"]))  # type: ignore[arg-type]
        starts = {}
        for r in records:
            key = str(r["path"]).split("?")[0].removeprefix(self.prefix)
            if r["method"] == "PUT" and ok(r) and key.endswith(".narinfo"):
                starts.setdefault(key, float(r["start"]))  # type: ignore[arg-type]
        for p in paths:
            key = narinfo.narinfo_key(p)
            info = narinfo.parse(self.read(key))
            assert key in starts, f"{key} was not uploaded through the proxy"
            assert done[info.url] <= starts[key], f"{key} was written before its NAR {info.url}"
            for ref in info.references:
                if ref[:32] != key[:32]:
                    assert done[f"{ref[:32]}.narinfo"] <= starts[key], f"{key} was written before its reference {ref}"

    def faults(self) -> Counter[str]:
        return Counter(str(r["fault"]) for r in self.proxy.records() if r["fault"])


@pytest.fixture(params=[*S3_SERVERS, "nginx"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RemoteCache]:
    cache = RemoteCache(request.getfixturevalue(request.param), tmp_path, rate=0.2)
    yield cache
    cache.proxy.stop()


def start(hookd_factory: HookdFactory, remote: RemoteCache, *args: str, **env: str) -> HookdProcess:
    hookd = hookd_factory(
        args=("--cache", remote.upload_url, "--log-level", "debug", *args),
        env={**remote.env, "HOOKD_RETRY_BASE": "0.2", "HOOKD_RETRY_MAX": "2", **env},
    )
    return hookd


def test_remote_end_to_end_with_faults(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path, remote: RemoteCache
) -> None:
    hookd = start(hookd_factory, remote)
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    outs = nixenv.build(expr, ALL_OUTPUTS, user=build_user, args={"salt": str(time.time_ns())})
    closure = nixenv.closure(outs)
    remote.wait_for(closure)
    assert remote.has("nix-cache-info")
    nixenv.substitute_fresh(outs, remote.read_url, hookd.public_key, tmp_path / "fresh")
    nixenv.verify_cache(outs, remote.read_url, hookd.public_key)
    remote.check_order(closure)
    faults = remote.faults()
    assert sum(faults.values()) >= 3, f"too few faults were injected to mean anything: {faults}"
    log = hookd.log()
    for secret in (SECRET_KEY, ACCESS_KEY, getattr(remote, "token", SECRET_KEY), "X-Amz-Signature", "Bearer"):
        assert secret not in log, f"{secret[:8]}… appears in the daemon's log"
    if remote.kind == "http":
        assert all(r["auth"] for r in remote.proxy.records())  # the token was sent, every time


def test_s3_multipart_nar_substitutes(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path, s3server: S3Server
) -> None:
    remote = RemoteCache(s3server, tmp_path, rate=0.1)
    try:
        hookd = start(
            hookd_factory,
            remote,
            "--compression",
            "none",
            HOOKD_MULTIPART_THRESHOLD=str(5 << 20),
            HOOKD_PART_SIZE=str(5 << 20),
        )
        expr = nixenv.write_expr("big.nix", BIG_NIX)
        outs = nixenv.build(expr, [], user=build_user, args={"salt": str(time.time_ns())})
        remote.wait_for(outs)
        info = narinfo.parse(remote.read(narinfo.narinfo_key(outs[0])))
        parts = {
            re.sub(r".*partNumber=(\d+).*", r"\1", str(r["path"]))
            for r in remote.proxy.records()
            if r["method"] == "PUT" and "partNumber=" in str(r["path"]) and ok(r)
            and info.url in str(r["path"])
        }  # fmt: skip
        assert len(parts) >= 4, parts
        nixenv.substitute_fresh(outs, remote.read_url, hookd.public_key, tmp_path / "fresh")
        remote.check_order(outs)
    finally:
        remote.proxy.stop()
