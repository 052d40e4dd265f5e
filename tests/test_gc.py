"""hookd gc, pins and hookd verify: the pure plan on made-up caches, then real caches built by uploads."""

from __future__ import annotations

import asyncio
import bz2
import json
import lzma
import os
import re
import time
from pathlib import Path

import pytest
import pyzstd
from click.testing import CliRunner

from hookd import narinfo
from hookd.backends import ObjectStat, open_backend
from hookd.catalog import LEASE_KEY, Catalog, GcError, Record, split_listing
from hookd.cli import main
from hookd.config import Config
from hookd.lease import Lease
from hookd.plan import GcPlan, plan
from hookd.selftest import CHAIN_NIX, HookdProcess, NixEnv, wait_for_narinfos
from hookd.snapshot import NarinfoIndex, Snapshot, snapshot
from hookd.verify import Inflater

from .cachegen import synthetic, write_tree
from .conftest import FAST_BOUNDS, HookdFactory
from .servers import ACCESS_KEY, SECRET_KEY, FaultProxy, S3Server

NOW = 1_000_000_000.0
DAY = 86400.0


def h(n: int) -> str:
    return f"{n:032d}".replace("0", "a")[:32]


class Cache:
    """A made-up cache: narinfo n points at nar/n.nar.zst; references are by number."""

    def __init__(self) -> None:
        self.objects: dict[str, ObjectStat] = {}
        self.records: dict[str, Record] = {}

    def add(self, n: int, refs: tuple[int, ...] = (), age: float = 10 * DAY, nar: bool = True,
            size: int = 1000, deriver: str | None = None) -> None:  # fmt: skip
        key, url = f"{h(n)}.narinfo", f"nar/{n}.nar.zst"
        self.objects[key] = ObjectStat(key, 100, NOW - age)
        if nar:
            self.objects[url] = ObjectStat(url, size, NOW - age)
        self.records[key] = {"store_path": f"/nix/store/{h(n)}-p{n}", "url": url, "deriver": deriver,
                             "references": [h(r) for r in refs], "file_size": size}  # fmt: skip

    def snap(self, pins: dict[str, str] | None = None) -> Snapshot:
        narinfos, nars, others = split_listing(sorted(self.objects.values()))
        return Snapshot(Catalog.build(narinfos, self.records), nars, others, pins or {})


def run(snap: Snapshot, **kw: object) -> GcPlan:
    args = {"now": NOW, "older_than": DAY, "grace": 3600.0, **kw}
    return plan(snap, **args)  # type: ignore[arg-type]


def deleted(p: GcPlan) -> set[str]:
    return set(p.deletions)


def test_retention_keeps_recent_closures() -> None:
    c = Cache()
    c.add(1)
    c.add(2, (1,))
    c.add(3, (2,), age=3600 * 2)  # recent root: keeps 2 and 1
    c.add(4)  # old, unreferenced
    p = run(c.snap())
    assert deleted(p) == {f"{h(4)}.narinfo", "nar/4.nar.zst"}
    assert p.delete_narinfos == [f"{h(4)}.narinfo"] and p.delete_nars == ["nar/4.nar.zst"]


def test_pins_keep_their_closure() -> None:
    c = Cache()
    c.add(1)
    c.add(2, (1,))
    c.add(3)
    p = run(c.snap(pins={"release": f"/nix/store/{h(2)}-p2"}))
    assert deleted(p) == {f"{h(3)}.narinfo", "nar/3.nar.zst"}


def test_grace_spares_young_objects() -> None:
    c = Cache()
    c.add(1)
    c.objects["nar/stray-young.nar.zst"] = ObjectStat("nar/stray-young.nar.zst", 5, NOW - 60)  # mid-upload
    c.objects["nar/stray-old.nar.zst"] = ObjectStat("nar/stray-old.nar.zst", 5, NOW - 2 * DAY)
    p = run(c.snap())
    assert deleted(p) == {f"{h(1)}.narinfo", "nar/1.nar.zst", "nar/stray-old.nar.zst"}
    assert p.stats["NARs spared (younger than grace)"].count == 1


def test_broken_paths_and_their_referrers_go() -> None:
    c = Cache()
    c.add(1, nar=False, age=2 * 3600)  # recent but its NAR is gone
    c.add(2, (1,), age=2 * 3600)
    c.add(3, (9,), age=2 * 3600)  # refers to a path that is not there
    c.add(4, (2,), age=60)  # young: spared by grace, even though broken
    p = run(c.snap())
    assert set(p.broken) == {f"{h(n)}.narinfo" for n in (1, 2, 3, 4)}
    assert deleted(p) == {f"{h(n)}.narinfo" for n in (1, 2, 3)} | {"nar/2.nar.zst", "nar/3.nar.zst"}


def test_a_malformed_narinfo_never_causes_deletions() -> None:
    c = Cache()
    c.add(2, (1,), age=3600 * 2)  # refers to 1, whose narinfo is malformed
    c.objects[f"{h(1)}.narinfo"] = ObjectStat(f"{h(1)}.narinfo", 10, NOW - DAY * 5)
    c.objects["nar/1.nar.zst"] = ObjectStat("nar/1.nar.zst", 10, NOW - DAY * 5)
    c.records[f"{h(1)}.narinfo"] = {"error": "truncated", "url": "nar/1.nar.zst"}
    p = run(c.snap())
    assert p.broken == {} and deleted(p) == set()
    assert p.malformed == {f"{h(1)}.narinfo": "truncated"}


def test_size_budget_drops_the_oldest_roots() -> None:
    c = Cache()
    for n, age in ((1, 20 * 3600), (2, 10 * 3600), (3, 5 * 3600)):
        c.add(n, age=age, size=1000)
    c.add(4, (3,), age=2 * 3600, size=1000)
    # everything is a root; 3 NARs of 1000 bytes (+100 per narinfo) fit in 3500
    p = run(c.snap(), max_size=3500)
    assert p.dropped_roots == 1
    assert deleted(p) == {f"{h(1)}.narinfo", "nar/1.nar.zst"}
    p = run(c.snap(pins={"x": f"/nix/store/{h(1)}-p1"}), max_size=2300)  # pins are never dropped
    assert f"{h(1)}.narinfo" not in deleted(p) and f"{h(4)}.narinfo" in deleted(p)


def test_listings_and_logs_of_deleted_paths_go() -> None:
    c = Cache()
    c.add(1, deriver="x-p1.drv")
    c.add(2, age=60, deriver="y-p2.drv")
    for key in (f"{h(1)}.ls", f"{h(2)}.ls", "log/x-p1.drv", "log/y-p2.drv", "log/other.drv"):
        c.objects[key] = ObjectStat(key, 10, NOW - 2 * DAY)
    p = run(c.snap())
    assert p.delete_other == [f"{h(1)}.ls", "log/x-p1.drv"]


def test_realisations_of_deleted_outputs_go() -> None:
    c = Cache()
    c.add(1)  # old, unrooted: deleted
    c.add(2, age=60)  # young: kept
    outputs = {
        "realisations/sha256:01!out.doi": f"{h(1)}-p1",  # old, its output goes: deleted
        "build-trace-v2/x-p1.drv/out.doi": f"{h(1)}-p1",  # the same in 2.35's layout
        "realisations/sha256:02!out.doi": f"{h(2)}-p2",  # its output stays
        "realisations/sha256:03!out.doi": f"{h(3)}-p3",  # its output was never there: a leftover
        "realisations/sha256:04!out.doi": "",  # unreadable: kept
    }
    for key in outputs:
        c.objects[key] = ObjectStat(key, 10, NOW - 2 * DAY)
    young = "realisations/sha256:05!out.doi"  # names a deleted output, but young (being published?): kept
    c.objects[young] = ObjectStat(young, 10, NOW - 60)
    snap = c.snap()
    snap.realisations = {**outputs, young: f"{h(1)}-p1"}
    p = run(snap)
    assert sorted(p.delete_other) == sorted(
        ["realisations/sha256:01!out.doi", "build-trace-v2/x-p1.drv/out.doi", "realisations/sha256:03!out.doi"]
    )
    assert p.stats["realisations deleted"].count == 3


def test_grace_longer_than_retention_is_refused() -> None:
    with pytest.raises(GcError, match="grace"):
        run(Cache().snap(), grace=2 * DAY)


# --- the narinfo index ------------------------------------------------------------------------------


async def test_the_index_reads_each_narinfo_once(tmp_path: Path) -> None:
    objects = synthetic(30)
    write_tree(tmp_path / "cache", objects)
    url = f"file://{tmp_path / 'cache'}"
    backend = open_backend(url, Config(cache=url))
    first = await snapshot(backend, NarinfoIndex(tmp_path / "index.json"))
    assert first.narinfo_reads == 30 and len(first.narinfos) == 30 and len(first.nars) == 30
    again = await snapshot(backend, NarinfoIndex(tmp_path / "index.json"))  # as a new `hookd gc` would
    assert again.narinfo_reads == 0
    assert [again.narinfos.record(i) for i in range(30)] == [first.narinfos.record(i) for i in range(30)]

    # one narinfo rewritten, one deleted: only the rewritten one is read; the deleted one's referrer breaks
    rewritten, removed, referrer = (objects[1 + 2 * i][0] for i in (2, 4, 5))  # p5 refers to p4
    os.utime(tmp_path / "cache" / rewritten, (time.time() - 60, time.time() - 60))
    (tmp_path / "cache" / removed).unlink()
    changed = await snapshot(backend, NarinfoIndex(tmp_path / "index.json"))
    assert changed.narinfo_reads == 1 and len(changed.narinfos) == 29
    broken = run(changed, now=time.time()).broken
    assert broken[referrer] == f"its reference {removed[:32]} is missing"
    assert set(broken) == {objects[1 + 2 * i][0] for i in range(5, 10)}  # and the rest of that chain

    # a garbled index costs a re-read, nothing else
    good = (tmp_path / "index.json").read_text()
    for garbled in (
        '{"version": 2, "keys": [1, 2',
        '{"version": 2}',
        re.sub(r'"refs": \[\[[0-9, ]*\]', '"refs": [[99]', good),
    ):
        (tmp_path / "index.json").write_text(garbled)
        assert (await snapshot(backend, NarinfoIndex(tmp_path / "index.json"))).narinfo_reads == 29
    await backend.close()


async def test_the_index_takes_mtimes_from_the_listing_on_s3(
    s3server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dedup hit on S3 copies the narinfo onto itself: a new mtime, the same ETag, nothing to re-read."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    bucket = f"index-{time.time_ns()}"
    s3server.make_bucket(bucket)
    client = s3server.client()
    for key, data in synthetic(5, salt=bucket):
        client.put_object(Bucket=bucket, Key=key, Body=data)
    url = f"s3://{bucket}?endpoint={s3server.url}&region=us-east-1&addressing=path"
    backend = open_backend(url, Config(cache=url))
    index = NarinfoIndex(None)  # kept in memory
    first = await snapshot(backend, index)
    assert first.narinfo_reads == 5 and all(first.narinfos.etags)
    time.sleep(1.1)
    key = first.narinfos.keys[0]
    assert await backend.touch(key, "text/x-nix-narinfo")
    again = await snapshot(backend, index)
    assert again.narinfo_reads == 0
    assert (
        again.narinfos.mtimes[0] > first.narinfos.mtimes[0] and again.narinfos.mtimes[1:] == first.narinfos.mtimes[1:]
    )
    await backend.close()


async def test_the_lease_is_renewed_released_and_lost_loudly(tmp_path: Path) -> None:
    url = f"file://{tmp_path}"
    backend = open_backend(url, Config(cache=url))
    lease_file = tmp_path / LEASE_KEY

    async with Lease(backend, 0.6):  # renewed every 0.2 s
        first = json.loads(lease_file.read_text())["expires"]
        await asyncio.sleep(0.9)  # longer than the lease itself
        assert json.loads(lease_file.read_text())["expires"] > first + 0.3
        with pytest.raises(GcError, match="another GC holds"):
            await Lease(backend, 60).acquire()
    assert not lease_file.exists()

    with pytest.raises(RuntimeError, match="sweep failed"):  # released after a failure too
        async with Lease(backend, 60):
            raise RuntimeError("sweep failed")
    assert not lease_file.exists()

    # another GC takes it meanwhile: this one stops at the next renewal with a clear error, and leaves
    # the other's lease alone
    started = time.monotonic()
    with pytest.raises(GcError, match="while this one ran"):
        async with Lease(backend, 0.6):
            lease_file.write_text(json.dumps({"owner": "elsewhere", "expires": time.time() + 600}))
            await asyncio.sleep(30)
    assert time.monotonic() - started < 5
    assert json.loads(lease_file.read_text())["owner"] == "elsewhere"
    await backend.close()


# --- real caches ------------------------------------------------------------------------------------


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=FAST_BOUNDS)
    return result.exit_code, result.output


def listing(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime) for p in root.rglob("*") if p.is_file()}


def backdate(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_gc_on_a_file_cache_built_by_real_uploads(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    hookd = hookd_factory()
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    salt = str(time.time_ns())
    top, out, dev, doc = nixenv.build(expr, ["top", "multi.out", "multi.dev", "multi.doc"], user=build_user,
                                      args={"salt": salt})  # fmt: skip
    closure = nixenv.closure([top, out, dev, doc])
    wait_for_narinfos(cache, closure)
    hookd.stop()
    for f in cache.rglob("*"):
        if f.is_file() and f.name not in ("nix-cache-info", "hookd-cache-id"):
            backdate(f, 10 * DAY)
    backdate(cache / narinfo.narinfo_key(top), 2 * 3600)  # used two hours ago: a root
    url = f"file://{cache}"
    state = ["--config", "/dev/null"]

    code, text = invoke("pin", "dev", dev, "--cache", url, *state)
    assert code == 0, text
    code, text = invoke("pin", "--list", "--cache", url, *state)
    assert text.strip() == f"dev\t{dev}"

    before = listing(cache)
    code, text = invoke("gc", "--cache", url, "--older-than", "1d", "--grace", "1h", "--dry-run", "--json", *state)
    assert code == 0, text
    dry = json.loads(text)
    assert listing(cache) == before  # a dry run changes nothing
    assert dry["stats"]["narinfos deleted"]["count"] == 1  # multi-doc: neither recent nor pinned
    assert dry["stats"]["narinfos kept"]["count"] == len(closure) - 1

    code, text = invoke("gc", "--cache", url, "--older-than", "1d", "--grace", "1h", *state)
    assert code == 0, text
    assert not (cache / narinfo.narinfo_key(doc)).exists()
    for p in (top, out, dev):
        assert (cache / narinfo.narinfo_key(p)).exists()
    assert not (cache / "hookd-gc-lease").exists()
    code, text = invoke("verify", "--cache", url, "--public-key", str(hookd.state_dir / "public-key"), *state)
    assert code == 0, text
    nixenv.substitute_fresh([top, dev], url, hookd.public_key, tmp_path / "fresh")

    # a second run over the unchanged cache reads no narinfo: listings only
    code, text = invoke("gc", "--cache", url, "--older-than", "1d", "--grace", "1h", "--json", *state)
    assert json.loads(text)["narinfo_reads"] == 0

    # unpinning lets the pinned closure go (out is dev's reference, so it goes too)
    assert invoke("unpin", "dev", "--cache", url, *state)[0] == 0
    code, text = invoke("gc", "--cache", url, "--older-than", "1d", "--grace", "1h", *state)
    assert not (cache / narinfo.narinfo_key(dev)).exists() and not (cache / narinfo.narinfo_key(out)).exists()
    assert (cache / narinfo.narinfo_key(top)).exists()


def test_gc_budget_and_lease(nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    hookd = hookd_factory()
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    tops = [nixenv.build(expr, ["top"], user=build_user, args={"salt": f"{time.time_ns()}-{i}"})[0] for i in range(3)]
    wait_for_narinfos(cache, nixenv.closure(tops))
    hookd.stop()
    for i, t in enumerate(tops):  # three closures used 3, 2 and 1 hours ago
        for p in nixenv.closure([t]):
            backdate(cache / narinfo.narinfo_key(p), (3 - i) * 3600)
    url, state = f"file://{cache}", ["--config", "/dev/null"]
    (cache / "hookd-gc-lease").write_text(json.dumps({"owner": "elsewhere", "expires": time.time() + 600}))
    code, text = invoke("gc", "--cache", url, "--older-than", "1d", "--grace", "1m", *state)
    assert code != 0 and "another GC holds" in text and "elsewhere" in text
    (cache / "hookd-gc-lease").unlink()

    def cost(p: str) -> int:
        ni = cache / narinfo.narinfo_key(p)
        return ni.stat().st_size + (cache / narinfo.parse(ni.read_text()).url).stat().st_size

    one = sum(cost(p) for p in nixenv.closure(tops[2:]))
    code, text = invoke("gc", "--cache", url, "--older-than", "1d", "--grace", "1m", "--max-size", str(one + 10),
                        "--json", *state)  # fmt: skip
    assert code == 0, text
    assert json.loads(text)["dropped_roots"] >= 2
    assert (cache / narinfo.narinfo_key(tops[2])).exists()  # the newest closure fits the budget
    assert not (cache / narinfo.narinfo_key(tops[0])).exists() and not (cache / narinfo.narinfo_key(tops[1])).exists()
    assert invoke("verify", "--cache", url, *state)[0] == 0


def test_verify_catches_and_repairs(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    hookd = hookd_factory()
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    salt = str(time.time_ns())
    top, dev, doc, out = nixenv.build(expr, ["top", "multi.dev", "multi.doc", "multi.out"], user=build_user,
                                      args={"salt": salt})  # fmt: skip
    wait_for_narinfos(cache, nixenv.closure([top, dev, doc]))
    hookd.stop()
    url, key = f"file://{cache}", str(hookd.state_dir / "public-key")
    state = ["--config", "/dev/null"]
    assert invoke("verify", "--cache", url, "--public-key", key, "--deep", *state)[0] == 0

    def info(p: str) -> narinfo.NarInfo:
        return narinfo.parse((cache / narinfo.narinfo_key(p)).read_text())

    # a forged signature
    forged = info(doc)
    from hookd.signing import SecretKey

    forged.sigs = [SecretKey.generate(forged.sigs[0].split(":")[0]).sign(forged.fingerprint())]
    (cache / narinfo.narinfo_key(doc)).write_text(forged.render())
    code, text = invoke("verify", "--cache", url, "--public-key", key, *state)
    assert code == 1 and f"{narinfo.narinfo_key(doc)}: no valid signature" in text
    # a NAR corrupted in place (same size): only --deep sees it
    nar = cache / info(out).url
    data = bytearray(nar.read_bytes())
    data[-9] ^= 0xFF
    nar.write_bytes(bytes(data))
    code, text = invoke("verify", "--cache", url, *state)
    assert narinfo.narinfo_key(out) not in text
    code, text = invoke("verify", "--cache", url, "--deep", *state)
    assert code == 1 and narinfo.narinfo_key(out) in text
    # a truncated NAR and a missing reference
    c_path = nixenv.closure([top])
    chain_c = next(p for p in c_path if p.endswith("-chain-c"))
    chain_a = next(p for p in c_path if p.endswith("-chain-a"))
    nar = cache / info(chain_c).url
    nar.write_bytes(nar.read_bytes()[:-10])
    (cache / narinfo.narinfo_key(chain_a)).unlink()
    code, text = invoke("verify", "--cache", url, "--json", *state)
    report = json.loads(text)
    assert code == 1
    assert "has" in report["broken"][narinfo.narinfo_key(chain_c)]  # wrong size
    chain_b = next(p for p in c_path if p.endswith("-chain-b"))
    assert "reference" in report["broken"][narinfo.narinfo_key(chain_b)]
    assert narinfo.narinfo_key(top) in report["broken"]  # refers to broken paths
    # repair deletes the broken narinfos and their referrers; the rest is whole again
    code, text = invoke("verify", "--cache", url, "--public-key", key, "--deep", "--repair", *state)
    assert code == 0, text
    code, text = invoke("verify", "--cache", url, "--public-key", key, "--deep", *state)
    assert code == 0, text
    assert not (cache / narinfo.narinfo_key(top)).exists()


def test_deep_verify_inflates_in_bounded_pieces_and_sees_truncation() -> None:
    zeros = bytes(16 << 20)
    packed = {"zstd": pyzstd.compress(zeros), "xz": lzma.compress(zeros, preset=0), "bzip2": bz2.compress(zeros)}
    for method, data in packed.items():
        whole = Inflater(method)
        pieces = [p for chunk in (data[:100], data[100:]) for p in whole.feed(chunk)]
        assert sum(map(len, pieces)) == len(zeros) and max(map(len, pieces)) <= Inflater.PIECE, method
        assert whole.complete(), method
        cut = Inflater(method)
        list(cut.feed(data[: len(data) // 2]))
        assert not cut.complete(), method
    frames = Inflater("zstd")  # several zstd frames make one NAR
    assert b"".join(frames.feed(pyzstd.compress(b"a" * 10) + pyzstd.compress(b"b" * 10))) == b"a" * 10 + b"b" * 10
    assert frames.complete()
    with pytest.raises(ValueError, match="unsupported compression"):
        Inflater("lz4")


def test_gc_and_verify_survive_garbage_in_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "nar").mkdir(parents=True)
    (cache / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    (cache / f"{h(1)}.narinfo").write_text("StorePath: /nix/store/aaaa")  # truncated
    (cache / f"{h(2)}.narinfo").write_bytes(os.urandom(64))
    (cache / "README.txt").write_text("hello")
    url, state = f"file://{cache}", ["--config", "/dev/null"]
    code, text = invoke("gc", "--cache", url, "--older-than", "1m", "--grace", "10s", "--json", *state)
    assert code == 0, text
    out = json.loads(text)
    assert set(out["malformed"]) == {f"{h(1)}.narinfo", f"{h(2)}.narinfo"} and out["unknown"] == ["README.txt"]
    assert (cache / "README.txt").exists() and (cache / f"{h(1)}.narinfo").exists()
    code, text = invoke("verify", "--cache", url, *state)
    assert code == 1 and "cannot be parsed" in text


def test_gc_on_http_needs_propfind(tmp_path: Path, nginx: object) -> None:
    import uuid

    from .servers import Nginx

    assert isinstance(nginx, Nginx)
    sub = uuid.uuid4().hex[:8]
    (nginx.root / sub / "nar").mkdir(parents=True)
    (nginx.root / sub / "nar" / "x.nar").write_bytes(b"x" * 10)
    (nginx.root / sub / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    code, text = invoke("gc", "--cache", f"{nginx.url}/{sub}", "--older-than", "1d", "--grace", "1h", "--dry-run",
                        "--json", "--config", "/dev/null")  # fmt: skip
    assert code == 0, text
    assert json.loads(text)["stats"]["NARs spared (younger than grace)"]["count"] == 1
    # a server that cannot list gets a clear refusal
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class NoDav(BaseHTTPRequestHandler):
        def do_PROPFIND(self) -> None:
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), NoDav)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code, text = invoke("gc", "--cache", f"http://127.0.0.1:{server.server_address[1]}/c", "--dry-run",
                        "--config", "/dev/null")  # fmt: skip
    server.shutdown()
    assert code != 0 and "cannot be listed" in text and "PROPFIND" in text


def test_uploads_while_gc_runs_again_and_again(
    nixenv: NixEnv,
    hookd_factory: HookdFactory,
    build_user: str,
    tmp_path: Path,
    s3server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two uploader daemons (own state directories) build and upload continuously into one bucket while
    `hookd gc` with a short grace runs again and again, every GC request delayed 200 ms by a proxy (a
    remote bucket); `hookd verify` passes after every GC run, and at the end the pinned and the newest
    closures substitute with signatures required (issue 12)."""
    import uuid

    bucket = f"hookd-{uuid.uuid4().hex[:12]}"
    s3server.make_bucket(bucket)
    url = f"s3://{bucket}?endpoint={s3server.url}&region=us-east-1&addressing=path"
    proxy = FaultProxy(tmp_path, s3server.url, 0.0, delay_ms=200, s3=True)
    gc_url = f"s3://{bucket}?endpoint={proxy.url}&region=us-east-1&addressing=path"
    env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "HOOKD_GC_GRACE": "10",
        "HOOKD_REFRESH_INTERVAL": "1",
        "HOOKD_RECHECK_INTERVAL": "1",
        **FAST_BOUNDS,
    }
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, env[k])
    a = hookd_factory(args=("--cache", url), env=env)
    b_key = tmp_path / "b.sec"
    code, text = invoke("keygen", "uploader-b-1", "--secret-key-file", str(b_key), "--public-key-file",
                        str(tmp_path / "b.pub"))  # fmt: skip
    assert code == 0, text
    b = HookdProcess(nixenv, tmp_path / "state-b", url, ("--cache", url, "--secret-key-file", str(b_key)), env)
    try:
        b.start()
        race_gc(nixenv, build_user, tmp_path, a, b, url, gc_url, env, proxy, s3server, bucket)
    finally:
        b.stop()
        proxy.stop()


def race_gc(
    nixenv: NixEnv, build_user: str, tmp_path: Path, a: HookdProcess, b: HookdProcess, url: str, gc_url: str,
    env: dict[str, str], proxy: FaultProxy, s3server: S3Server, bucket: str,
) -> None:  # fmt: skip
    """The body of test_uploads_while_gc_runs_again_and_again, whose daemon b and proxy it stops."""
    import subprocess
    import sys
    import threading

    from .test_dedup import enqueue, wait_idle

    gc_env = dict(os.environ, **env)
    stop = threading.Event()
    runs: list[int] = []
    deleted: list[int] = []
    outputs: list[str] = []
    checks: list[int] = []
    reports: list[str] = []

    def gc_loop() -> None:
        while not stop.is_set():
            proc = subprocess.run(
                [sys.executable, "-m", "hookd.cli", "gc", "--cache", gc_url, "--older-than", "12s", "--grace", "10s",
                 "--config", "/dev/null"],
                env=gc_env, capture_output=True, text=True,
            )  # fmt: skip
            runs.append(proc.returncode)
            reports.append(proc.stdout[-600:])
            deleted.extend(int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("deleted "))
            if proc.returncode != 0:
                outputs.append(proc.stdout + proc.stderr)
            check = subprocess.run([sys.executable, "-m", "hookd.cli", "verify", "--cache", url, "--config", "/dev/null"],
                                   env=gc_env, capture_output=True, text=True)  # fmt: skip
            checks.append(check.returncode)
            if check.returncode != 0:
                outputs.append("verify: " + check.stdout + check.stderr)
            time.sleep(0.3)

    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    thread = threading.Thread(target=gc_loop, daemon=True)
    thread.start()
    tops: list[str] = []
    try:
        # 40 s of builds, and on a loaded machine (each GC run is a new interpreter) on until the GC ran
        # often and deleted enough to have raced with the uploads (the asserts below), within 180 s
        start = time.monotonic()
        i = 0

        def racing() -> bool:
            return len(runs) >= 5 and sum(deleted) > 20

        while time.monotonic() < start + 40 or (not racing() and time.monotonic() < start + 180):
            top, dev = nixenv.build(expr, ["top", "multi.dev"], user=build_user, args={"salt": f"gc-{time.time_ns()}"})
            tops.append(top)
            if i == 1:
                wait_for_s3 = time.monotonic() + 30
                while invoke("pin", "first", tops[0], "--cache", url, "--config", "/dev/null")[0] != 0:
                    assert time.monotonic() < wait_for_s3
                    time.sleep(0.2)
            enqueue(b, dev)  # the other uploader is asked for something the first is uploading
            if len(tops) > 3:
                enqueue(b, tops[-4])  # and for old closures, which a GC may have taken meanwhile
            i += 1
            time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    assert len(runs) >= 5 and not outputs, outputs[:2]
    assert sum(deleted) > 20, f"the GC runs deleted too little to have raced with anything: {deleted}\n{reports[-1]}"
    assert len(checks) == len(runs) and set(checks) == {0}
    assert any(r.get("method") == "DELETE" for r in proxy.records()), "GC's requests did not go through the proxy"
    for d in (a, b):
        wait_idle(d, timeout=120)
    code, text = invoke("verify", "--cache", url, "--config", "/dev/null")
    assert code == 0, text
    keys = f"{a.public_key} {(tmp_path / 'b.pub').read_text().strip()}"
    nixenv.substitute_fresh([tops[0], tops[-1]], f"{s3server.url}/{bucket}", keys, tmp_path / "fresh")
