"""Benchmark: pushing real workloads to a binary cache, hookd beside `nix copy` and beside the physical limits,
all in one run (issue 14).

Workloads (tests/bench/workloads.py): `small` (1000 small paths and a top path), `random` (1 GiB, one path),
`compressible` (1 GiB, one path of files sampled from /usr/lib and /usr/share), `corpus` (/usr/lib and
/usr/share subtrees, about 1 GiB as ~500 paths of mixed sizes, and a top path). Targets: nginx (WebDAV) on
loopback and through a proxy adding 20 ms to every request, and S3 (moto's server and Ceph's radosgw). Servers
keep their data in a tmpfs, so the cache's disk is not what is measured.

Contenders, each pushing the workload's top path (so its whole closure) into an empty directory or bucket:
hookd (this checkout) and `nix copy` of this machine's Nix (bookworm: 2.8), and with --sid-chroot the same in a
Debian sid chroot (Nix 2.34, Python 3.14) against the same servers; the chroot's store gets the same closure
(exported here, imported there: the same store paths and NARs). nix copy has no S3 here (Debian's Nix is built
without it). Limits, on the same bytes: reading the NARs, `zstd -T0 -3 | sha256sum` and `-1`, and a raw PUT of the
precompressed NARs to each target (nginx: aiohttp, 16 in flight; S3: boto3, 8 MiB parts, 4 in flight); each
limit is the best of --limit-runs (3). Each contender pushes --runs (3) times, hookd and nix copy in turn, and
its best time counts too (a push of 0.5 s varies by ±20 % from one run to the next on this machine; the ratio
of two single runs was mostly that noise); a round longer than 20 s is not repeated.

Measured per push: wall time, MiB/s of NAR, requests per path (the server's log), peak RSS (VmHWM of hookd's
daemon or of nix copy; in the JSON also the largest summed RSS of its process tree), CPU seconds, peak bytes
staged on disk (polled: hookd's staging directory, and a private TMPDIR for every contender) and the largest
drop of free space on the file system of the state dir (noisy: other writers on the machine count).
Also the hook's p50/p99 latency while hookd pushes the random workload, beside a bare interpreter start timed
in turn with it. Prints one table with ratios and issue 14's targets; --json writes every record.

    sudo .venv/bin/python -m tests.bench.upload [--quick] [--json FILE]      # this machine only
    sudo .ci/bench-upload [--quick] [--json FILE]                            # and the sid side (kept chroot)

Needs root and .ci/setup (nix-bin, nginx, radosgw, zstd, the test extras).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hookd import narinfo
from hookd.keys import write_keypair
from hookd.selftest import install_launcher

from ..servers import ACCESS_KEY, SECRET_KEY, FaultProxy, Moto, Nginx, Radosgw, S3Server
from . import limits, workloads
from .contenders import hook_probes, run_hookd, run_nix_copy
from .measure import RequestLog
from .report import LOCAL, RAW, READ, ZSTD, ZSTD_FAST, Run, best_of, hook_summary, table, targets
from .sides import Nix, Side, copy_closure

MiB = 1 << 20
WORKLOADS = ("small", "random", "compressible", "corpus")
TARGETS = ("nginx loopback", "nginx 20 ms", "moto", "radosgw")
S3_ENV = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
REPEAT_UNDER = 20.0
"""A round of pushes (hookd and nix copy in turn) that took longer than this is not repeated: --runs is for
the short pushes, whose times vary most from one run to the next here (±20 % on a 0.5 s push)."""


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def s3_client(server: S3Server) -> Callable[[], Any]:
    """boto3 clients without the optional checksums (hookd asks for them only where required, too)."""

    def make() -> Any:
        from botocore.config import Config

        return server.client(
            Config(
                max_pool_connections=32,
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
        )

    return make


@contextlib.contextmanager
def env_var(name: str, value: str) -> Iterator[None]:
    """This process's environment variable set for a while (what child processes started meanwhile inherit)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def warm(sides: list[Side], closure: list[str]) -> None:
    """Read every file of the closure on every side, so that no contender is the one that reads the disk."""
    for side in sides:
        for p in closure:
            for d, _, files in os.walk(side.host_path(p)):
                for name in files:
                    f = os.path.join(d, name)
                    if not os.path.islink(f):
                        with open(f, "rb") as fh:
                            while fh.read(8 * MiB):
                                pass


class Bench:
    """One run: the servers, a private Nix per side, and every record measured."""

    def __init__(self, args: argparse.Namespace, root: Path, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.root = root
        self.runs: list[Run] = []
        self.meta: dict[str, dict[str, Any]] = {}
        self.hook: dict[str, Any] | None = None
        self.sides = [Side("host")] + ([Side("sid", args.sid_chroot.resolve())] if args.sid_chroot else [])
        self.nix: dict[str, Nix] = {}
        for side in self.sides:
            if side.chroot is not None:
                side.host_path(root).mkdir(parents=True)
                stack.callback(shutil.rmtree, side.host_path(root), ignore_errors=True)
            nix = self.nix[side.name] = Nix(side, root)
            stack.callback(nix.stop)
            nix.start()
        self.versions = {s.name: s.versions() for s in self.sides}
        srv = root / "srv"  # the servers' data in memory: the cache's disk is not the uploader's speed
        srv.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16g,mode=0755", "tmpfs", str(srv)], check=True)
        stack.callback(subprocess.run, ["umount", "-l", str(srv)], check=False)
        if args.keep:  # the servers' logs outlive their tmpfs
            stack.callback(
                shutil.copytree, srv, root / "srv-logs", ignore=shutil.ignore_patterns("www", "mon", "osd", "run")
            )
        self.nginx = Nginx(srv, srv / "www")
        stack.callback(self.nginx.stop)
        self.access = RequestLog(srv / "nginx" / "access.log")
        self.proxy = FaultProxy(srv, self.nginx.url, delay_ms=20)
        stack.callback(self.proxy.stop)
        self.s3: dict[str, tuple[S3Server, RequestLog]] = {}
        if "moto" in args.targets:
            (srv / "tmp").mkdir()
            with env_var("TMPDIR", str(srv / "tmp")):  # moto spools large objects to temporary files
                moto = Moto(srv)
            stack.callback(moto.stop)
            self.s3["moto"] = (moto, RequestLog(srv / "moto.log"))
        if "radosgw" in args.targets:
            rgw = Radosgw(srv)
            stack.callback(rgw.stop)
            self.s3["radosgw"] = (rgw, RequestLog(srv / "ceph" / "log" / "client.rgw.log"))
        self.key = root / "key.sec"
        write_keypair("bench-1", self.key, root / "key.pub")
        for side in self.sides:
            if side.chroot is not None:
                shutil.copy(self.key, side.host_path(self.key))

    def version(self, side: Side, who: str) -> str:
        v = self.versions[side.name]
        return f"Py {v['python']}" if who == "hookd" else v["nix"]

    def record(self, workload: str, target: str, who: str, side: Side | None, closure: list[str], **kw: Any) -> Run:
        run = Run(
            workload=workload,
            target=target,
            who=who,
            side=side.name if side else "",
            version=self.version(side, who) if side else kw.pop("version", ""),
            paths=len(closure),
            nar_bytes=self.meta[workload]["nar_bytes"],
            **kw,
        )
        self.runs.append(run)
        rpp = f", {run.requests_per_path:.2f} requests/path" if run.requests_per_path else ""
        of = f" (best of {', '.join(f'{x:.2f}' for x in run.samples)})" if len(run.samples) > 1 else ""
        say(f"{workload}: {run.label} → {target}: {run.seconds:.2f} s{of}, {run.mib_s:.1f} MiB/s{rpp}")
        return run

    # -- one workload ------------------------------------------------------------------------------------------

    def make(self, name: str) -> str:
        a, host = self.args, self.nix["host"]
        if name == "small":
            return workloads.make_small_closure(host, self.root, a.small)
        if name == "random":
            return workloads.make_random(host, self.root, a.random_mib * MiB)
        if name == "compressible":
            return workloads.make_compressible(host, self.root, a.compressible_mib * MiB)
        return workloads.make_corpus(host, self.root, a.corpus_mib * MiB)

    def workload(self, name: str) -> None:
        host = self.nix["host"]
        t = time.perf_counter()
        top = self.make(name)
        closure = host.closure([top])
        nar_bytes = sum(int(i["narSize"]) for i in host.path_info(closure))
        say(
            f"{name}: {len(closure)} path{'s' if len(closure) != 1 else ''}, {nar_bytes / MiB:.1f} MiB of NAR, made in {time.perf_counter() - t:.1f} s"
        )
        hashes = {str(i["path"]): i["narHash"] for i in host.path_info(closure)}
        for side in self.sides[1:]:
            t = time.perf_counter()
            copy_closure(host, self.nix[side.name], closure)
            theirs = {str(i["path"]): i["narHash"] for i in self.nix[side.name].path_info(closure)}
            if theirs != hashes:
                raise RuntimeError(f"{name}: the {side.name} store's closure differs from this machine's")
            say(f"{name}: imported into the {side.name} store in {time.perf_counter() - t:.1f} s (same NAR hashes)")
        zst = self.root / "zst"
        try:
            files = limits.precompress(host, closure, zst)
            self.meta[name] = {
                "paths": len(closure),
                "nar_bytes": nar_bytes,
                "zstd_bytes": sum(f.size for f in files),
                **workloads.describe(Path(p) for p in closure),
            }
            warm(self.sides, closure)
            limit_runs = (
                (READ, limits.read_seconds),
                (ZSTD, limits.zstd_seconds),
                (ZSTD_FAST, limits.zstd_fast_seconds),
            )
            for who, fn in limit_runs:
                seconds = min(fn(host, closure) for _ in range(self.args.limit_runs))
                self.record(name, LOCAL, who, None, closure, seconds=seconds)
            for target in ("nginx loopback", "nginx 20 ms"):
                if target in self.args.targets:
                    self.nginx_target(name, target, top, closure, files)
            for target, (server, log) in self.s3.items():
                self.s3_target(name, target, server, log, top, closure, files)
            if name == "random" and not self.args.no_hook_latency:
                self.hook_latency(name, top, closure)
        finally:
            shutil.rmtree(zst, ignore_errors=True)
            for side in self.sides:  # the next workload gets the page cache and the disk to itself
                self.nix[side.name].delete(closure)

    def nginx_target(
        self, name: str, target: str, top: str, closure: list[str], files: list[limits.Compressed]
    ) -> None:
        base = self.nginx.url if target == "nginx loopback" else self.proxy.url

        def fresh() -> tuple[str, str, Path, int]:
            sub = uuid.uuid4().hex[:8]
            (self.nginx.root / sub).mkdir()
            return sub, f"{base}/{sub}", self.nginx.root / sub, self.access.mark()

        n = self.args.raw_concurrency
        best: tuple[float, dict[str, int]] | None = None
        for _ in range(self.args.limit_runs):
            sub, url, d, mark = fresh()
            seconds = limits.raw_put_http(url, files, n)
            if best is None or seconds < best[0]:
                best = (seconds, dict(self.access.since(mark, f"/{sub}/")))
            shutil.rmtree(d)
        assert best
        self.record(name, target, RAW, None, closure, seconds=best[0], version=f"({n} in flight)", requests=best[1])
        for side in self.sides:  # hookd and nix copy in turn, each round; the best of each counts
            nix = self.nix[side.name]
            runs: dict[str, list[dict[str, Any]]] = {"hookd": [], "nix copy": []}
            for _ in range(self.args.runs):
                began = time.perf_counter()
                sub, url, d, mark = fresh()
                state = self.root / f"hookd-{side.name}-{sub}"
                r = run_hookd(
                    side, nix, state, url, top, (d / narinfo.narinfo_key(top)).exists, extra_args=self.args.hookd_arg
                )
                self.check_cache(d, closure, f"hookd ({side.name})")
                r.pop("during")
                runs["hookd"].append(dict(r, requests=dict(self.access.since(mark, f"/{sub}/"))))
                shutil.rmtree(d)
                shutil.rmtree(side.host_path(state), ignore_errors=True)
                sub, url, d, mark = fresh()
                r = run_nix_copy(side, nix, url, self.key, top, self.root / f"nix-copy-{side.name}.log")
                self.check_cache(d, closure, f"nix copy ({side.name})")
                runs["nix copy"].append(dict(r, requests=dict(self.access.since(mark, f"/{sub}/"))))
                shutil.rmtree(d)
                if time.perf_counter() - began > REPEAT_UNDER:
                    break
            for who, results in runs.items():
                self.record(name, target, who, side, closure, **best_of(results))

    @staticmethod
    def check_cache(d: Path, closure: list[str], who: str) -> None:
        missing = [p for p in closure if not (d / narinfo.narinfo_key(p)).exists()]
        if missing:
            raise RuntimeError(f"{who} left {len(missing)} of {len(closure)} narinfos out, {missing[0]} first")

    def s3_target(
        self, name: str, target: str, server: S3Server, log: RequestLog, top: str, closure: list[str],
        files: list[limits.Compressed],
    ) -> None:  # fmt: skip
        make = s3_client(server)
        client = make()
        best: tuple[float, dict[str, int]] | None = None
        for _ in range(self.args.limit_runs):
            bucket = f"raw-{uuid.uuid4().hex[:8]}"
            server.make_bucket(bucket)
            mark = log.mark()
            seconds = limits.raw_put_s3(make, bucket, files)
            if best is None or seconds < best[0]:
                best = (seconds, dict(log.since(mark, f"/{bucket}/")))
            self.empty(server, client, bucket)
        assert best
        self.record(name, target, RAW, None, closure, seconds=best[0], version="(8 MiB parts, 4 in flight)",
                    requests=best[1])  # fmt: skip
        side, nix = self.sides[0], self.nix["host"]
        runs = []
        for _ in range(self.args.runs):
            runs.append(self.s3_hookd(target, server, log, client, side, nix, top, closure))
            if runs[-1]["seconds"] > REPEAT_UNDER:
                break
        self.record(name, target, "hookd", side, closure, **best_of(runs))

    def s3_hookd(
        self, target: str, server: S3Server, log: RequestLog, client: Any, side: Side, nix: Nix, top: str,
        closure: list[str],
    ) -> dict[str, Any]:  # fmt: skip
        """One push of `top` by hookd into a new bucket of `server`; the bucket is emptied after."""
        bucket = f"hookd-{uuid.uuid4().hex[:8]}"
        server.make_bucket(bucket)
        url = f"s3://{bucket}?endpoint={server.url}&region=us-east-1&addressing=path"
        polls = 0

        def done() -> bool:
            nonlocal polls
            polls += 1
            try:
                client.head_object(Bucket=bucket, Key=narinfo.narinfo_key(top))
                return True
            except client.exceptions.ClientError:
                return False

        mark = log.mark()
        state = self.root / f"hookd-{side.name}-{bucket}"
        r = run_hookd(side, nix, state, url, top, done, S3_ENV, poll=0.05, extra_args=self.args.hookd_arg)
        requests = log.since(mark, f"/{bucket}/")
        requests["HEAD"] -= polls  # the benchmark's own look for the top narinfo
        keys = set(server.keys(bucket))
        missing = [p for p in closure if narinfo.narinfo_key(p) not in keys]
        if missing:
            raise RuntimeError(f"hookd left {len(missing)} of {len(closure)} narinfos out of {target}")
        r.pop("during")
        shutil.rmtree(state, ignore_errors=True)
        self.empty(server, client, bucket)
        return dict(r, requests=dict(+requests))

    @staticmethod
    def empty(server: S3Server, client: Any, bucket: str) -> None:
        """Delete the bucket's objects (moto and radosgw's memstore hold them in memory)."""
        keys = server.keys(bucket)
        for i in range(0, len(keys), 1000):
            client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})
        client.delete_bucket(Bucket=bucket)
        if isinstance(server, Radosgw):  # multipart tails wait for radosgw's GC (2 h by default)
            server._run("radosgw-admin", "-n", "client.admin", "gc", "process", "--include-all")

    def hook_latency(self, name: str, top: str, closure: list[str]) -> None:
        """The hook's latency while hookd pushes `top` to nginx on loopback, a bare interpreter start in turn."""
        host, nix = self.sides[0], self.nix["host"]
        bare = [sys.executable, "-I", "-S", "-c", "pass"]
        idle = []
        for _ in range(self.args.idle_runs):
            t = time.perf_counter()
            subprocess.run(bare, check=True)
            idle.append(time.perf_counter() - t)
        probe_src = self.root / "hook-probe"
        probe_src.write_text("a path the hook queues while the push runs\n")
        (probe,) = workloads.add_paths(nix, [str(probe_src)])
        launcher = install_launcher(self.root / "hookd-hook")
        sub = uuid.uuid4().hex[:8]
        d = self.nginx.root / sub
        d.mkdir()
        state = self.root / f"hookd-hook-{sub}"
        during = hook_probes(launcher, state, probe, bare)
        r = run_hookd(host, nix, state, f"{self.nginx.url}/{sub}", top, (d / narinfo.narinfo_key(top)).exists,
                      during=during, extra_args=self.args.hookd_arg)  # fmt: skip
        self.hook = hook_summary(r["during"], idle, f"hookd pushes {name} to nginx on loopback")
        self.hook["push_seconds"] = r["seconds"]
        say(
            f"hook latency during the push: p50 {self.hook['hook_p50_ms']:.1f} ms, p99 {self.hook['hook_p99_ms']:.1f} ms;"
            f" bare interpreter p99 {self.hook['bare_p99_ms']:.1f} ms (idle {self.hook['bare_idle_p99_ms']:.1f} ms);"
            f" n = {self.hook['n']}"
        )
        shutil.rmtree(d)
        shutil.rmtree(state, ignore_errors=True)
        nix.delete([probe])

    # -- output --------------------------------------------------------------------------------------------------

    def report(self, elapsed: float) -> dict[str, Any]:
        print()
        for name, v in self.versions.items():
            print(f"{name}: Debian {v['debian']}, Nix {v['nix']}, Python {v['python']}")
        print(table(self.runs, self.meta))
        if self.hook:
            h = self.hook
            print(
                f"\nhook latency while {h['during']} (n = {h['n']}): p50 {h['hook_p50_ms']:.1f} ms, p99 "
                f"{h['hook_p99_ms']:.1f} ms; bare interpreter start in turn: p50 {h['bare_p50_ms']:.1f} ms, p99 "
                f"{h['bare_p99_ms']:.1f} ms (idle: p99 {h['bare_idle_p99_ms']:.1f} ms)"
            )
        checks = targets(self.runs, self.hook)
        print("\nissue 14's targets:")
        for c in checks:
            print(f"  {'PASS' if c.ok else 'FAIL'}  {c.what}: {c.measured}")
        print(f"\nthe whole run took {elapsed / 60:.1f} min")
        return {
            "versions": self.versions,
            "workloads": self.meta,
            "runs": [r.to_json() for r in self.runs],
            "hook_latency": self.hook,
            "targets": [{"ok": c.ok, "what": c.what, "measured": c.measured} for c in checks],
            "seconds": elapsed,
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (50 paths, 64 MiB) to check the harness")
    ap.add_argument("--small", type=int, help="small paths (default 1000; --quick 50)")
    ap.add_argument("--random-mib", type=int, help="size of the random path (default 1024; --quick 64)")
    ap.add_argument("--compressible-mib", type=int, help="size of the compressible path (default 1024; --quick 64)")
    ap.add_argument("--corpus-mib", type=int, help="size of the /usr corpus (default 1024; --quick 64)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    ap.add_argument("--sid-chroot", type=Path, help="a chroot made by `.ci/chroot build sid DIR`, mounted")
    ap.add_argument("--raw-concurrency", type=int, default=16, help="PUTs in flight for the raw PUT to nginx")
    ap.add_argument("--limit-runs", type=int, default=3, help="runs of each limit; the best counts")
    ap.add_argument("--runs", type=int, default=3,
                    help=f"pushes of each contender, in turn, while a round takes under {REPEAT_UNDER:g} s; the best counts")  # fmt: skip
    ap.add_argument("--no-hook-latency", action="store_true")
    ap.add_argument("--idle-runs", type=int, default=100, help="bare interpreter starts timed before the pushes")
    ap.add_argument("--hookd-arg", action="append", default=[], metavar="ARG",
                    help="an argument added to every `hookd daemon` (repeat: --hookd-arg=--max-parallel --hookd-arg=16)")  # fmt: skip
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs) for a look")
    args = ap.parse_args(argv)
    sizes = {"small": (1000, 50), "random_mib": (1024, 64), "compressible_mib": (1024, 64), "corpus_mib": (1024, 64)}
    for k, (full, quick) in sizes.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if args.quick else full)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.targets = [t for t in args.targets.split(",") if t]
    for w in args.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}")
    for t in args.targets:
        if t not in TARGETS:
            ap.error(f"unknown target {t!r}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark starts its own nix-daemons and mounts a tmpfs")
    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="hkbu-", dir="/var/tmp"))  # on disk, like a store; the same in a chroot
    root.chmod(0o755)
    with contextlib.ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, root, ignore_errors=True)
        else:
            stack.callback(say, f"kept {root}")
        bench = Bench(args, root, stack)
        say(
            f"work directory {root}; "
            + "; ".join(f"{k}: Nix {v['nix']}, Python {v['python']}" for k, v in bench.versions.items())
        )
        for name in args.workloads:
            bench.workload(name)
        out = bench.report(time.monotonic() - start)
        if args.json:
            args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
