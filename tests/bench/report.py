"""The upload benchmark's results: one record per measured run, the table (with ratios against the faster
`nix copy` and against the physical limits of the same run) and issue 14's targets, checked. Pure: no I/O
beyond returning text."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

MiB = 1 << 20
LOCAL = "local"  # the target of the limits that send nothing
READ = "read NARs (nix-store --export)"
ZSTD = "zstd -T0 -3 | sha256sum"
ZSTD_FAST = "zstd -T0 -1 | sha256sum"
"""The fastest level hookd compresses at: a throughput above it is out of reach, on this machine, for an
uploader that compresses every NAR at zstd level 1 or above."""
RAW = "raw PUT"


@dataclass
class Run:
    workload: str
    target: str
    """nginx loopback, nginx 20 ms, moto, radosgw, or local."""
    who: str
    """hookd, nix copy, or a limit (READ, ZSTD, RAW)."""
    side: str
    """host or sid; empty for limits."""
    version: str
    paths: int
    nar_bytes: int
    seconds: float
    requests: dict[str, int] = field(default_factory=dict)
    peak_rss_mib: float | None = None
    """VmHWM of the daemon / of nix copy."""
    peak_tree_rss_mib: float | None = None
    """The largest sum of resident sets of the process and its children, sampled (JSON only)."""
    cpu_seconds: float | None = None
    peak_staging_mib: float | None = None
    disk_drop_mib: float | None = None
    samples: list[float] = field(default_factory=list)
    """Every push's time when the best of several counts (`seconds`); the memory, staging and disk figures
    are then the largest of them."""

    @property
    def mib_s(self) -> float:
        return self.nar_bytes / MiB / self.seconds

    @property
    def requests_per_path(self) -> float | None:
        return sum(self.requests.values()) / self.paths if self.requests else None

    @property
    def label(self) -> str:
        if self.who in ("hookd", "nix copy"):
            return f"{self.who} {self.version} ({self.side})"
        return self.who + (f" {self.version}" if self.version else "")

    def to_json(self) -> dict[str, Any]:
        return dict(asdict(self), mib_s=self.mib_s, requests_per_path=self.requests_per_path)


def best_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of a contender's pushes, as for the limits; its memory, staging and disk figures are the
    largest of all of them, and `samples` holds every time."""
    best = dict(min(results, key=lambda r: r["seconds"]))
    for k in ("peak_rss_mib", "peak_tree_rss_mib", "peak_staging_mib", "disk_drop_mib"):
        seen = [r[k] for r in results if r.get(k) is not None]
        if seen:
            best[k] = max(seen)
    best["samples"] = [r["seconds"] for r in results]
    return best


def _find(runs: Iterable[Run], workload: str, target: str, who: str) -> list[Run]:
    return [r for r in runs if r.workload == workload and r.target == target and r.who == who]


def best_nix(runs: list[Run], workload: str, target: str) -> Run | None:
    copies = _find(runs, workload, target, "nix copy")
    return min(copies, key=lambda r: r.seconds) if copies else None


def limit(runs: list[Run], workload: str, target: str, who: str) -> Run | None:
    found = _find(runs, workload, target, who)
    return found[0] if found else None


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


COLUMNS = (
    ("target", 15), ("contender", 36), ("s", 8), ("MiB/s", 8), ("req/path", 8), ("RSS MiB", 8), ("CPU s", 7),
    ("staged MiB", 10), ("disk Δ MiB", 10), ("x nix", 6), ("% zstd", 6), ("% raw", 6),
)  # fmt: skip


def _row(cells: list[str]) -> str:
    out = []
    for (_, width), cell in zip(COLUMNS, cells, strict=True):
        out.append(cell.ljust(width) if width > 14 else cell.rjust(width))
    return " ".join(out).rstrip()


def table(runs: list[Run], workloads: dict[str, dict[str, Any]]) -> str:
    """Per workload: its size and limits, then per target the raw PUT and every contender, with ratios:
    x nix = the faster nix copy's time / this time; % zstd and % raw = this throughput / the limit's."""
    lines = []
    for name, meta in workloads.items():
        if not any(r.workload == name for r in runs):
            continue
        read, zstd, fast = (limit(runs, name, LOCAL, who) for who in (READ, ZSTD, ZSTD_FAST))
        head = (
            f"== {name}: {meta['paths']} path{'s' if meta['paths'] != 1 else ''}, {meta['nar_bytes'] / MiB:.1f} MiB of NAR, "
            f"{meta['zstd_bytes'] / MiB:.1f} MiB as zstd -3 ({100 * meta['zstd_bytes'] / meta['nar_bytes']:.0f} %)"
        )
        if "files" in meta:
            head += f", {meta['files']} file{'s' if meta['files'] != 1 else ''}, {100 * meta['elf_bytes'] / max(1, meta['file_bytes']):.0f} % of bytes in ELF"
        if read and zstd:
            head += f"; read {read.mib_s:.0f} MiB/s, {ZSTD} {zstd.mib_s:.0f} MiB/s"
            if fast:
                head += f", at -1 {fast.mib_s:.0f} MiB/s"
        lines += ["", head, _row([c for c, _ in COLUMNS])]
        targets = list(dict.fromkeys(r.target for r in runs if r.workload == name and r.target != LOCAL))
        for target in targets:
            nix = best_nix(runs, name, target)
            raw = limit(runs, name, target, RAW)
            first = True
            for r in (x for x in runs if x.workload == name and x.target == target):
                lines.append(
                    _row(
                        [
                            target if first else "",
                            r.label,
                            f"{r.seconds:.2f}",
                            f"{r.mib_s:.1f}",
                            _fmt(r.requests_per_path, ".2f"),
                            _fmt(r.peak_rss_mib, ".0f"),
                            _fmt(r.cpu_seconds, ".1f"),
                            _fmt(r.peak_staging_mib, ".1f"),
                            _fmt(r.disk_drop_mib, ".0f"),
                            f"{nix.seconds / r.seconds:.2f}" if nix else "",
                            f"{100 * r.mib_s / zstd.mib_s:.0f}" if zstd else "",
                            f"{100 * r.mib_s / raw.mib_s:.0f}" if raw else "",
                        ]
                    )
                )
                first = False
    return "\n".join(lines)


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str
    measured: str


COMPRESSING = ("compressible", "corpus")
"""The workloads hookd compresses (most of): their targets are weighed against ZSTD_FAST."""


def _beyond(runs: list[Run], r: Run, need_mib_s: float) -> str:
    """Said of a missed target whose throughput zstd at level 1 does not reach on the same bytes here."""
    fast = limit(runs, r.workload, LOCAL, ZSTD_FAST)
    if fast is None or r.workload not in COMPRESSING or need_mib_s <= fast.mib_s:
        return ""
    return f"; it needs {need_mib_s:.0f} MiB/s, above {ZSTD_FAST}'s {fast.mib_s:.0f}"


def targets(runs: list[Run], hook: dict[str, Any] | None) -> list[Check]:
    """Issue 14's targets, for every hookd run they apply to (both sides)."""
    out: list[Check] = []
    hookds = [r for r in runs if r.who == "hookd"]
    for r in hookds:
        where = f"{r.workload}, {r.target}, {r.label}"
        nix = best_nix(runs, r.workload, r.target)
        if nix:
            speedup = nix.seconds / r.seconds
            need = {
                ("small", "nginx loopback"): 2.0,
                ("small", "nginx 20 ms"): 10.0,
            }.get((r.workload, r.target), 1.5)
            beyond = "" if speedup >= need else _beyond(runs, r, need * nix.mib_s)
            out.append(Check(speedup >= need, f"{where}: ≥ {need:g}x the faster nix copy ({nix.label})",
                             f"{speedup:.2f}x ({r.seconds:.2f} s vs {nix.seconds:.2f} s{beyond})"))  # fmt: skip
        zstd = limit(runs, r.workload, LOCAL, ZSTD)
        if zstd and r.workload in ("random", "compressible") and r.target.startswith("nginx"):
            share = r.mib_s / zstd.mib_s
            out.append(Check(share >= 0.7, f"{where}: ≥ 70 % of {ZSTD}",
                             f"{100 * share:.0f} % ({r.mib_s:.0f} vs {zstd.mib_s:.0f} MiB/s)"))  # fmt: skip
        raw = limit(runs, r.workload, r.target, RAW)
        if raw and r.target in ("moto", "radosgw") and r.workload in ("random", "compressible"):
            share = r.mib_s / raw.mib_s
            beyond = "" if share >= 0.8 else _beyond(runs, r, 0.8 * raw.mib_s)
            out.append(Check(share >= 0.8, f"{where}: ≥ 80 % of a raw multipart PUT",
                             f"{100 * share:.0f} % ({r.mib_s:.0f} vs {raw.mib_s:.0f} MiB/s{beyond})"))  # fmt: skip
    sampled = [r for r in hookds if r.peak_rss_mib is not None]  # runs that sampled memory (every real one)
    if sampled:
        worst = max(sampled, key=lambda r: r.peak_rss_mib or 0)
        out.append(Check((worst.peak_rss_mib or 0) <= 150, "hookd's peak RSS ≤ 150 MiB, every run",
                         f"largest {worst.peak_rss_mib:.0f} MiB ({worst.workload}, {worst.target}, {worst.label})"))  # fmt: skip
    polled = [r for r in hookds if r.peak_staging_mib is not None]
    if polled:
        staged = max(polled, key=lambda r: r.peak_staging_mib or 0)
        out.append(Check(not staged.peak_staging_mib, "zero staging bytes on disk (HTTP and S3), every run",
                         f"largest {staged.peak_staging_mib:.1f} MiB ({staged.workload}, {staged.target}, {staged.label})"))  # fmt: skip
    if hook:
        ratio = hook["hook_p99_ms"] / hook["bare_p99_ms"]
        out.append(Check(ratio <= 2, f"hook p99 ≤ 2x a bare interpreter start while {hook['during']} runs",
                         f"{ratio:.2f}x ({hook['hook_p99_ms']:.1f} vs {hook['bare_p99_ms']:.1f} ms, n = {hook['n']})"))  # fmt: skip
    return out


def percentile_ms(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] * 1000


def hook_summary(samples: dict[str, list[float]], idle: list[float], during: str) -> dict[str, Any]:
    return {
        "during": during,
        "n": len(samples["hook"]),
        "hook_p50_ms": percentile_ms(samples["hook"], 50),
        "hook_p99_ms": percentile_ms(samples["hook"], 99),
        "bare_p50_ms": percentile_ms(samples["bare"], 50),
        "bare_p99_ms": percentile_ms(samples["bare"], 99),
        "bare_idle_p50_ms": percentile_ms(idle, 50),
        "bare_idle_p99_ms": percentile_ms(idle, 99),
    }
