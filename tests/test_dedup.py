"""Dedup, upstream skipping and cache liveness, against real servers, counting requests through a proxy."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hookd import narinfo
from hookd.planner import IDENTITY_KEY
from hookd.selftest import CHAIN_NIX, HookdProcess, NixEnv

from .conftest import HookdFactory
from .servers import ACCESS_KEY, SECRET_KEY, FaultProxy, Nginx, S3Server

ALL_OUTPUTS = ["top", "multi.out", "multi.dev", "multi.doc"]


def enqueue(hookd: HookdProcess, *paths: str) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(hookd.socket))
    s.sendall(("ENQUEUE - " + " ".join(paths) + "\n").encode())
    assert s.recv(100).startswith(b"OK")
    s.close()


def wait_log(hookd: HookdProcess, text: str, count: int = 1, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while hookd.log().count(text) < count:
        if time.monotonic() >= deadline and hookd.proc is not None:
            os.kill(hookd.proc.pid, signal.SIGUSR1)
            time.sleep(1)
        assert time.monotonic() < deadline, f"waited for {count}x {text!r}:\n{hookd.log()[-3000:]}"
        time.sleep(0.05)


def wait_idle(hookd: HookdProcess, timeout: float = 60) -> None:
    """Until every request is planned and nothing is pending (read from the daemon's queue)."""
    db = sqlite3.connect(f"file:{hookd.state_dir / 'queue.sqlite'}?mode=ro", uri=True)
    deadline = time.monotonic() + timeout
    while True:
        [(new,)] = db.execute("SELECT COUNT(*) FROM requests WHERE state = 'new'").fetchall()
        [(pending,)] = db.execute("SELECT COUNT(*) FROM paths WHERE state IN ('pending', 'uploading')").fetchall()
        [(total,)] = db.execute("SELECT COUNT(*) FROM requests").fetchall()
        if total and not new and not pending:
            db.close()
            return
        assert time.monotonic() < deadline, hookd.log()[-3000:]
        time.sleep(0.05)


class S3Cache:
    def __init__(self, server: S3Server, tmp: Path, delay_ms: float = 0.0) -> None:
        self.server = server
        self.bucket = f"hookd-{uuid.uuid4().hex[:12]}"
        server.make_bucket(self.bucket)
        self.proxy = FaultProxy(tmp, server.url, delay_ms=delay_ms)
        self.url = f"s3://{self.bucket}?endpoint={self.proxy.url}&region=us-east-1&addressing=path"
        self.read_url = f"{server.url}/{self.bucket}"
        self.env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    def objects(self) -> set[str]:
        return set(self.server.keys(self.bucket))

    def writes(self) -> list[dict[str, object]]:
        return [r for r in self.proxy.records() if r["method"] in ("PUT", "POST", "DELETE")]

    def last_modified(self, key: str) -> float:
        return float(self.server.client().head_object(Bucket=self.bucket, Key=key)["LastModified"].timestamp())

    def wait_for(self, paths: list[str], hookd: HookdProcess, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        want = {narinfo.narinfo_key(p) for p in paths}
        while not want <= self.objects():
            missing = sorted(want - self.objects())[:5]
            if time.monotonic() >= deadline and hookd.proc is not None:
                os.kill(hookd.proc.pid, signal.SIGUSR1)
                time.sleep(1)
            assert time.monotonic() < deadline, f"missing: {missing}\n{hookd.log()[-4000:]}"
            time.sleep(0.1)


@pytest.fixture
def cache(s3server: S3Server, tmp_path: Path) -> Iterator[S3Cache]:
    """A fresh bucket on each S3 server, written through a proxy that counts requests (stopped however the
    test ends)."""
    cache = S3Cache(s3server, tmp_path)
    yield cache
    cache.proxy.stop()


def start(hookd_factory: HookdFactory, cache: S3Cache, **env: str) -> HookdProcess:
    return hookd_factory(args=("--cache", cache.url), env={**cache.env, **env})


def test_rebuilding_an_uploaded_closure_puts_nothing(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path, cache: S3Cache
) -> None:
    hookd = start(hookd_factory, cache)
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    salt = str(time.time_ns())
    outs = nixenv.build(expr, ALL_OUTPUTS, user=build_user, args={"salt": salt})
    closure = nixenv.closure(outs)
    cache.wait_for(closure, hookd)
    wait_idle(hookd)
    writes_before = len(cache.writes())
    # Delete the top-level outputs from the store and build them again: the hook fires once more.
    nixenv.nix("nix-store", "--delete", outs[0], outs[1], outs[2], outs[3])
    again = nixenv.build(expr, ALL_OUTPUTS, user=build_user, args={"salt": salt})
    assert again == outs
    wait_idle(hookd)
    assert len(cache.writes()) == writes_before, cache.writes()[writes_before:]


def test_an_emptied_bucket_is_refilled(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path, cache: S3Cache
) -> None:
    hookd = start(hookd_factory, cache)
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    outs = nixenv.build(expr, ["top"], user=build_user, args={"salt": str(time.time_ns())})
    closure = nixenv.closure(outs)
    cache.wait_for(closure, hookd)
    assert IDENTITY_KEY in cache.objects()
    c = cache.server.client()
    for key in cache.objects():  # someone empties the throwaway bucket behind hookd's back
        c.delete_object(Bucket=cache.bucket, Key=key)
    assert cache.objects() == set()
    enqueue(hookd, outs[0])  # one path of the closure is asked for again
    cache.wait_for(closure, hookd)
    assert {"nix-cache-info", IDENTITY_KEY} <= cache.objects()
    assert "new identity" in hookd.log()
    nixenv.substitute_fresh(outs, cache.read_url, hookd.public_key, tmp_path / "fresh")


BURST_NIX = r"""
{ salt }:
let
  mk = name: deps: derivation {
    inherit name salt deps;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo ${name}-$salt $deps > $out" ];
  };
  base = mk "burst-base" [];
  shared = mk "burst-shared" [ base ];
in builtins.genList (i: mk "burst-leaf-${toString i}" [ shared base ]) 12
"""


def test_a_burst_sharing_references_uploads_each_path_once(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path, s3server: S3Server
) -> None:
    """Twelve builds in a burst, all referring to the same two paths, each with its own hook request:
    a plan that found a shared path missing while its upload ran must not queue it again (issue 12,
    defect 2). Every request is slowed by a proxy, which widens exactly that window."""
    cache = S3Cache(s3server, tmp_path, delay_ms=150)
    hookd = start(hookd_factory, cache, HOOKD_MAX_PARALLEL="4")
    expr = nixenv.write_expr("burst.nix", BURST_NIX)
    leaves = nixenv.build(expr, [], user=build_user, args={"salt": str(time.time_ns())})
    closure = nixenv.closure(leaves)
    assert len(leaves) == 12 and len(closure) == 14
    cache.wait_for(closure, hookd)
    wait_idle(hookd)
    uploads = [line.split()[5].rstrip(":") for line in hookd.log().splitlines() if " hookd: uploaded /" in line]
    assert sorted(u for u in uploads if u in closure) == sorted(closure), "each path uploaded exactly once"
    puts: dict[str, int] = {}
    for r in cache.writes():
        if r["method"] == "PUT" and str(r["path"]).endswith(".narinfo"):
            puts[str(r["path"])] = puts.get(str(r["path"]), 0) + 1
    assert len(puts) == len(closure) and set(puts.values()) == {1}, puts
    assert "queued request" in hookd.log() and hookd.log().count("queued request") >= 12
    cache.proxy.stop()


def test_upstream_paths_are_skipped(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path, nginx: Nginx, cache: S3Cache
) -> None:
    from click.testing import CliRunner

    from hookd.cli import main

    up_key, up_pub = tmp_path / "up.sec", tmp_path / "up.pub"
    CliRunner().invoke(main, ["keygen", "upstream-1", "--secret-key-file", str(up_key),
                              "--public-key-file", str(up_pub)])  # fmt: skip
    sub = uuid.uuid4().hex[:8]
    (nginx.root / sub).mkdir()
    up_proxy = FaultProxy(tmp_path, nginx.url)
    upstream_url = f"{up_proxy.url}/{sub}"

    hookd = hookd_factory(start=False)  # not yet: the builds below spool their requests
    hookd.start()
    hookd.stop()
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    salt = str(time.time_ns())
    a, b = nixenv.build(expr, ["a", "b"], user=build_user, args={"salt": salt})
    # b (and a, in its closure) are in the upstream cache; a is also signed by upstream in the store
    nixenv.nix("nix", "copy", "--to", f"{nginx.url}/{sub}?secret-key={up_key}", b)
    nixenv.nix("nix", "store", "sign", "--key-file", str(up_key), a)
    [top] = nixenv.build(expr, ["top"], user=build_user, args={"salt": salt})
    closure = nixenv.closure([top])

    hookd = hookd_factory(
        args=("--cache", cache.url),
        env={
            **cache.env,
            "HOOKD_UPSTREAM_CACHES": upstream_url,
            "HOOKD_UPSTREAM_KEYS": up_pub.read_text().strip(),
        },
    )
    ours = [p for p in closure if p not in (a, b)]
    cache.wait_for(ours, hookd)
    wait_idle(hookd)
    assert narinfo.narinfo_key(a) not in cache.objects() and narinfo.narinfo_key(b) not in cache.objects()
    asked = [str(r["path"]) for r in up_proxy.records() if r["method"] == "GET"]
    assert not any(narinfo.narinfo_key(a) in p for p in asked)  # its local signature was enough
    assert sum(narinfo.narinfo_key(b) in p for p in asked) == 1
    # consumers substitute b and a from upstream, the rest from us
    fresh = tmp_path / "fresh"
    conf = fresh / "etc"
    conf.mkdir(parents=True)
    (conf / "nix.conf").write_text("experimental-features = nix-command\n")
    env = dict(nixenv.env, NIX_CONF_DIR=str(conf), NIX_REMOTE="")
    subprocess.run(
        ["nix-store", "--store", str(fresh / "root"), "--realise", top, "--max-jobs", "0",
         "--option", "substituters", f"{cache.read_url} {nginx.url}/{sub}",
         "--option", "trusted-public-keys", f"{hookd.public_key} {up_pub.read_text().strip()}",
         "--option", "require-sigs", "true"],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    up_proxy.stop()


def test_dedup_hit_refreshes_age_at_most_once_per_interval(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path, cache: S3Cache
) -> None:
    hookd = start(hookd_factory, cache, HOOKD_REFRESH_INTERVAL="4")
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    [top] = nixenv.build(expr, ["top"], user=build_user, args={"salt": str(time.time_ns())})
    key = narinfo.narinfo_key(top)
    cache.wait_for([top], hookd)
    uploaded_at = time.time()
    first = cache.last_modified(key)

    def copies() -> int:
        return sum(1 for r in cache.writes() if r["method"] == "PUT" and str(r["path"]).endswith(key))

    uploads = copies()
    enqueue(hookd, top)  # asked again within the interval: no refresh
    wait_idle(hookd)
    assert copies() == uploads and cache.last_modified(key) == first
    time.sleep(max(0.0, uploaded_at + 4.5 - time.time()))
    enqueue(hookd, top)  # the interval has passed: its age is reset, once
    wait_log(hookd, "refreshed the age of 1 cached paths")
    enqueue(hookd, top)
    enqueue(hookd, top)
    wait_idle(hookd)
    assert copies() == uploads + 1
    assert cache.last_modified(key) > first
    assert hookd.log().count("refreshed the age") == 1
