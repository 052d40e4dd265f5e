"""Everything hookd shows a person or a log reader: log lines, tables, human sizes and durations, progress.

The library returns data (dicts, dataclasses); this module turns it into text, so that the wording of the
command line lives in one place and the library stays free of presentation. Pure, except `ProgressLine`
and `setup_logging`, which write to stderr.

Tables are two of them (the queue, the GC's tally), with fixed columns: a few lines of format strings
serve them better than a table library would (no dependency, the same output on every terminal and in
the tests' pipes).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .lifecycle import BLOCKED, DONE, DROPPED, FAILED, PENDING, UNSUCCESSFUL, UPSTREAM

if TYPE_CHECKING:
    from .operator import RequestWatch
    from .verify import Report

# --- logs -------------------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": record.created, "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}  # fmt: skip
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


class JournalFormatter(logging.Formatter):
    """journald adds the time; a <N> prefix gives it the syslog priority of each line."""

    PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return "\n".join(f"<{self.PRIORITY.get(record.levelname, 6)}>{line}" for line in text.splitlines())


def setup_logging(level: str, fmt: str = "text") -> None:
    """One line per event on stderr: text, JSON, or journald's format when journald reads stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif fmt == "journal" or (fmt == "text" and os.environ.get("JOURNAL_STREAM")):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # Their debug output carries request headers (signatures, access key ids): never let it through.
    for noisy in ("botocore", "aiobotocore", "aiohttp", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


# --- units ------------------------------------------------------------------------------------------


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def format_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_time(t: float, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return time.strftime(fmt, time.localtime(t))


# --- progress ---------------------------------------------------------------------------------------


class ProgressLine:
    """One self-overwriting line on a terminal; silent otherwise (a `catalog.Progress`)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.tty or (now - self.last < 0.1 and done != total):
            return
        self.last = now
        text = f"{stage}: {done}/{total}" if total else f"{stage}: {done}"
        sys.stderr.write(f"\r\033[K{text}")
        if done == total and total:
            sys.stderr.write("\n")
        sys.stderr.flush()


# --- gc and verify ----------------------------------------------------------------------------------


def gc_report(out: Mapping[str, Any]) -> list[str]:
    """`hookd gc` for a person: the plan's tally, what it found wrong, what the sweep did."""
    lines = [f"{'dry run: ' if out['dry_run'] else ''}GC of {out['cache']} ({out['narinfo_reads']} narinfos read)"]
    for name, cat in out["stats"].items():
        lines.append(f"  {name:42} {cat['count']:>8}  {format_size(cat['bytes']):>10}")
    if out["dropped_roots"]:
        lines.append(f"  over the size budget: the {out['dropped_roots']} oldest roots are not kept")
    lines += [f"  broken: {key}: {why}" for key, why in list(out["broken"].items())[:20]]
    lines += [f"  malformed (kept, skipped): {key}: {why}" for key, why in list(out["malformed"].items())[:20]]
    lines += [f"  unknown object (kept): {key}" for key in out["unknown"][:20]]
    if "deleted" in out:
        d = out["deleted"]
        lines.append(
            f"deleted {d['objects']} objects ({format_size(d['bytes'])}); {d['spared']} spared (refreshed or "
            f"re-uploaded meanwhile, with what they refer to)"
            + (f"; {d['not_checked']} left for the next run (sweep window closed)" if d["not_checked"] else "")
        )
    return lines


def verify_report(report: Report, deep: bool) -> list[str]:
    lines = [f"broken: {k}: {why}" for k, why in sorted(report.broken.items())]
    lines += [f"bad: {k}: {why}" for k, why in sorted(report.bad.items())]
    lines += [f"unknown object: {k}" for k in report.unknown[:20]]
    faults = [f"{n} broken narinfos" for n in [len(report.broken)] if n]
    faults += [f"{n} bad listings or realisations" for n in [len(report.bad)] if n]
    state = "whole" if report.whole else ", ".join(faults)
    lines.append(
        f"{report.narinfos} narinfos, {report.listings} listings, {report.realisations} realisations checked"
        f"{' (deep)' if deep else ''}: {state}"
    )
    if report.repaired:
        lines.append(f"repaired: deleted {len(report.repaired)} broken narinfos, listings or realisations")
    return lines


# --- the daemon and its queue -----------------------------------------------------------------------


def status(st: Mapping[str, Any]) -> list[str]:
    """`hookd status` for a person (`operator.status` with its `cache` entry)."""
    d, c, cache = st["daemon"], st["counts"], st["cache"]
    up = f"up (pid {d['pid']}, for {format_duration(d['uptime'])})" if d["up"] else "NOT RUNNING"
    answers = "answers" if cache["answers"] else "DOES NOT ANSWER: " + cache["error"]
    lines = [
        f"{'daemon':10} {up}",
        f"{'cache':10} {cache['url'] or '-'}: {answers}",
        f"{'queue':10} {c['pending']} pending, {c['uploading']} uploading, {c['failed']} failed, "
        f"{c['blocked']} blocked, {c['done']} done, {c['upstream']} upstream, {c['dropped']} dropped; "
        f"{c['requests to plan']} requests to plan",
    ]
    rates = "  ".join(f"{k}: {v['paths']} paths, {format_size(v['bytes'])}" for k, v in st["uploaded"].items())
    total = st["uploaded_total"]
    lines += [f"{'uploaded':10} {rates}", f"{'':10} in all: {total['paths']} paths, {format_size(total['bytes'])}"]
    if r := st.get("realisations"):
        waiting = r.get("pending", 0)
        lines.append(f"{'realisations':10} {r.get('published', 0)} published, {waiting} waiting for their output")
    if o := st["oldest_pending"]:
        lines.append(f"{'oldest':10} {o['path']} (waiting {format_duration(o['age'])})")
    if st["last_errors"]:
        lines.append("last errors:")
        for err in st["last_errors"]:
            lines.append(f"  {format_time(err['time'], '%H:%M:%S')} {err['state']:8} {err['path']}: {err['error']}")
    return lines


def queue_table(rows: list[dict[str, Any]], state: str | None, now: float) -> list[str]:
    """`hookd queue`: one row a path, newest first."""
    if not rows:
        return ["the queue is empty" + (f" (state {state})" if state else "")]
    width = max(len(r["path"]) for r in rows)
    lines = [f"{'PATH':{width}}  {'STATE':9} {'TRIES':>5}  {'SIZE':>10}  {'NEXT TRY':>9}  ERROR"]
    for r in rows:
        nxt = format_duration(r["next_try"] - now) if r["state"] == PENDING and r["next_try"] > now else ""
        size = format_size(r["file_size"]) if r["file_size"] else ""
        err = (r["last_error"] or "").removeprefix(r["path"] + ": ")[:80] if r["state"] != DONE else ""
        lines.append(f"{r['path']:{width}}  {r['state']:9} {r['attempts']:>5}  {size:>10}  {nxt:>9}  {err}")
    return lines


def path_detail(row: Mapping[str, Any], now: float) -> list[str]:
    """`hookd queue show`: a path's state, attempts, last error, next retry and history."""
    lines = [f"path        {row['path']}", f"state       {row['state']}", f"attempts    {row['attempts']}"]
    if row["state"] == PENDING and row["next_try"] > now:
        lines.append(f"next try    {format_time(row['next_try'])}")
    if row["last_error"]:
        lines.append(f"last error  {row['last_error']}")
    lines += [f"references  {len(row['references'])}", "history:"]
    for ev in row["history"]:
        detail = f" ({ev['detail']})" if ev["detail"] else ""
        lines.append(f"  {format_time(ev['time'])}  {ev['event']}{detail}")
    return lines


# --- push --wait ------------------------------------------------------------------------------------

ENDED = {DONE: "uploaded", UPSTREAM: "left to upstream", FAILED: "FAILED", BLOCKED: "BLOCKED", DROPPED: "dropped"}


def path_ended(path: str, row: Mapping[str, Any]) -> str:
    """One line a path as it reaches a final state (what `push --wait` prints to a pipe)."""
    err = f": {row['error']}" if row["state"] in UNSUCCESSFUL else ""
    return f"{ENDED[row['state']]} {path}{err}"


def request_bar(watch: RequestWatch, elapsed: float) -> str:
    """The self-overwriting progress line `push --wait` shows on a terminal."""
    failed = sum(1 for v in watch.ended.values() if v in UNSUCCESSFUL)
    bar_done = int(30 * len(watch.ended) / max(1, len(watch.paths))) if watch.planned else 0
    return (
        f"\r\033[K[{'#' * bar_done}{'.' * (30 - bar_done)}] {len(watch.ended)}/{len(watch.paths)} paths"
        f"{f', {failed} failed' if failed else ''} ({format_duration(elapsed)})"
    )


def unsuccessful(rows: Mapping[str, Mapping[str, Any]]) -> Iterable[str]:
    return (f"{row['state']}: {p}: {row['error'] or row['state']}" for p, row in rows.items())
