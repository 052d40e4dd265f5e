"""Unit tests of the upload benchmark's pure parts: reading servers' request lines, cutting the /usr corpus
into store paths, and the ratios and targets it reports (a wrong ratio would mislead every decision)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.bench.measure import count_requests, tree_bytes
from tests.bench.report import LOCAL, RAW, READ, ZSTD, ZSTD_FAST, Run, best_of, table, targets
from tests.bench.workloads import corpus_candidates, pick_corpus, store_name

NGINX = '127.0.0.1 - - [22/Nov/2026:08:29:28 +0000] "PUT /ab12/nar/x.nar.zst HTTP/1.1" 201 0 "-" "Python/3.11 aiohttp/3.14.5"'
MOTO_404 = '127.0.0.1 - - [22/Nov/2026 08:29:27] "\x1b[33mHEAD /bucket/k.narinfo HTTP/1.1\x1b[0m" 404 -'
RGW = (
    "2026-11-22T08:29:28.359+0000 7f1a2c7986c0  1 beast: 0x7f1ab83686e0: 127.0.0.1 - hookd-test "
    '[22/Nov/2026:08:29:28.359 +0000] "GET /bucket/nix-cache-info HTTP/1.1" 404 0 - "aiobotocore/3.10.0" - latency=0s'
)


def test_requests_are_counted_per_method_under_the_runs_prefix() -> None:
    lines = "\n".join([NGINX, NGINX.replace("/ab12/", "/other/"), MOTO_404, RGW, "no request here"])
    assert count_requests(lines, "/ab12/") == {"PUT": 1}
    assert count_requests(lines, "/bucket/") == {"HEAD": 1, "GET": 1}
    assert count_requests(lines, "/none/") == {}


def test_tree_bytes_counts_allocated_blocks_and_a_missing_dir_as_zero(tmp_path: Path) -> None:
    assert tree_bytes(tmp_path / "missing") == 0
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x" * 10000)
    assert tree_bytes(tmp_path) >= 10000


def test_store_names_are_valid() -> None:
    for rel in ("/usr/lib/x86_64-linux-gnu/perl", "/usr/share/doc/libc6 (copy)", "/.hidden", "/usr/lib/a+b=c?"):
        assert re.fullmatch(r"[A-Za-z0-9+._?=-]+", store_name(rel)) and not store_name(rel).startswith(".")


def make_tree(root: Path) -> None:
    """a/ small, b/ larger than the cap with loose files and a subdirectory, and loose files at the top."""
    (root / "a").mkdir()
    (root / "a" / "f").write_bytes(b"a" * 100)
    (root / "b" / "sub").mkdir(parents=True)
    for i in range(5):
        (root / "b" / f"loose{i}").write_bytes(b"b" * 400)
    (root / "b" / "sub" / "g").write_bytes(b"g" * 300)
    (root / "b" / "link").symlink_to("/nowhere")
    (root / "top").write_bytes(b"t" * 50)


def test_corpus_splits_large_trees_and_groups_loose_files_under_the_cap(tmp_path: Path) -> None:
    make_tree(tmp_path)
    cands = corpus_candidates([tmp_path], cap=1000)
    assert len({c.name for c in cands}) == len(cands)
    covered = sorted(str(s.relative_to(tmp_path)) for c in cands for s in c.sources)
    assert covered == ["a", "b/link", "b/loose0", "b/loose1", "b/loose2", "b/loose3", "b/loose4", "b/sub", "top"]
    assert all(c.size <= 1000 for c in cands)
    assert sum(c.size for c in cands) == 100 + 5 * 400 + 300 + 50
    picked = pick_corpus(cands, budget=900)
    assert sum(c.size for c in picked) <= 900 and picked == pick_corpus(cands, budget=900)
    assert pick_corpus(cands, budget=10**9) == sorted(cands, key=lambda c: c.name)


def run(who: str, seconds: float, target: str = "nginx loopback", workload: str = "random", **kw: object) -> Run:
    side = "host" if who in ("hookd", "nix copy") else ""
    return Run(workload, target, who, side, kw.pop("version", "v"), 1, 1 << 30, seconds, **kw)  # type: ignore[arg-type]


def test_ratios_and_targets_are_against_the_faster_nix_copy_and_the_limits() -> None:
    runs = [
        run(ZSTD, 2.0, target=LOCAL),
        run(RAW, 1.0),
        run("hookd", 2.5),
        run("nix copy", 5.0, version="2.8"),
        run("nix copy", 4.0, version="2.34"),
        run(RAW, 1.0, target="moto"),
        run("hookd", 1.5, target="moto", peak_rss_mib=160.0, peak_staging_mib=8.0),
    ]
    checks = {c.what: c for c in targets(runs, None)}
    speed = checks["random, nginx loopback, hookd v (host): ≥ 1.5x the faster nix copy (nix copy 2.34 (host))"]
    assert speed.ok and speed.measured.startswith("1.60x")
    zstd = checks["random, nginx loopback, hookd v (host): ≥ 70 % of zstd -T0 -3 | sha256sum"]
    assert zstd.ok and zstd.measured.startswith("80 %")
    s3 = checks["random, moto, hookd v (host): ≥ 80 % of a raw multipart PUT"]
    assert not s3.ok and s3.measured.startswith("67 %")
    assert not checks["hookd's peak RSS ≤ 150 MiB, every run"].ok
    assert not checks["zero staging bytes on disk (HTTP and S3), every run"].ok
    text = table(runs, {"random": {"paths": 1, "nar_bytes": 1 << 30, "zstd_bytes": 1 << 29}})
    hookd_row = next(line for line in text.splitlines() if "hookd v (host)" in line)  # nginx comes first
    assert hookd_row.split()[-3:] == ["1.60", "80", "40"]  # x nix, % zstd, % raw


def test_a_missed_target_above_the_fastest_compression_says_so() -> None:
    """A target that needs more than `zstd -T0 -1 | sha256sum` reaches on the same bytes is out of reach at
    zstd level 1 or above: the check says so, for the workloads hookd compresses, and only when missed."""
    runs = [
        run(ZSTD_FAST, 4.0, target=LOCAL, workload="corpus"),  # 256 MiB/s
        run("hookd", 3.0, workload="corpus"),
        run("nix copy", 3.6, workload="corpus"),  # 1.5x needs 2.4 s: 427 MiB/s
        run(ZSTD_FAST, 4.0, target=LOCAL, workload="compressible"),
        run(RAW, 1.0, target="radosgw", workload="compressible"),  # 80 % is 819 MiB/s
        run("hookd", 3.5, target="radosgw", workload="compressible"),
        run(ZSTD_FAST, 4.0, target=LOCAL, workload="random"),
        run(RAW, 1.0, target="moto", workload="random"),
        run("hookd", 1.5, target="moto", workload="random"),  # sent as itself: no such note
        run("nix copy", 3.0, workload="small"),
        run("hookd", 1.0, workload="small"),  # met: nothing added
    ]
    checks = {c.what: c for c in targets(runs, None)}
    corpus = checks["corpus, nginx loopback, hookd v (host): ≥ 1.5x the faster nix copy (nix copy v (host))"]
    assert not corpus.ok
    assert corpus.measured == "1.20x (3.00 s vs 3.60 s; it needs 427 MiB/s, above zstd -T0 -1 | sha256sum's 256)"
    s3 = checks["compressible, radosgw, hookd v (host): ≥ 80 % of a raw multipart PUT"]
    assert not s3.ok and s3.measured.endswith("; it needs 819 MiB/s, above zstd -T0 -1 | sha256sum's 256)")
    assert checks["random, moto, hookd v (host): ≥ 80 % of a raw multipart PUT"].measured == "67 % (683 vs 1024 MiB/s)"
    small = checks["small, nginx loopback, hookd v (host): ≥ 2x the faster nix copy (nix copy v (host))"]
    assert small.ok and "needs" not in small.measured
    runs += [run(READ, 1.0, target=LOCAL, workload="corpus"), run(ZSTD, 8.0, target=LOCAL, workload="corpus")]
    text = table(runs, {"corpus": {"paths": 1, "nar_bytes": 1 << 30, "zstd_bytes": 1 << 29}})
    assert "; read 1024 MiB/s, zstd -T0 -3 | sha256sum 128 MiB/s, at -1 256 MiB/s" in text
    # none of these runs sampled memory or staging: no check claims anything of them
    assert not any("RSS" in what or "staging" in what for what in checks)


def test_the_best_of_several_pushes_is_the_fastest_with_the_largest_footprint() -> None:
    pushes = [
        {"seconds": 0.52, "peak_rss_mib": 50.0, "cpu_seconds": 0.7, "peak_staging_mib": 0.0, "requests": {"PUT": 3}},
        {"seconds": 0.41, "peak_rss_mib": 48.0, "cpu_seconds": 0.6, "peak_staging_mib": None, "requests": {"PUT": 4}},
        {"seconds": 0.47, "peak_rss_mib": 53.0, "cpu_seconds": 0.8, "peak_staging_mib": 2.0, "requests": {"PUT": 5}},
    ]
    best = best_of(pushes)
    assert best["seconds"] == 0.41 and best["cpu_seconds"] == 0.6 and best["requests"] == {"PUT": 4}
    assert best["peak_rss_mib"] == 53.0 and best["peak_staging_mib"] == 2.0  # the worst of any push
    assert best["samples"] == [0.52, 0.41, 0.47]
    run = Run("small", "nginx loopback", "hookd", "host", "Py", 1, 1 << 20, **best)
    assert run.samples == [0.52, 0.41, 0.47]
