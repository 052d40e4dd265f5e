"""What the upload benchmark reads while a contender runs: the staging directory's size and the file system's
free space (sampled by a thread), a process's peak RSS and CPU time from /proc, and the requests a server
logged for one run (nginx's access log, moto's and radosgw's request lines)."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path

# nginx's and radosgw's access lines, and moto's (werkzeug colours some with ANSI escapes)
REQUEST_LINE = re.compile(
    r'"(?:\x1b\[[0-9;]*m)*(GET|PUT|HEAD|POST|DELETE|PROPFIND|MKCOL|OPTIONS|MOVE|COPY) (\S+) HTTP/[0-9.]+'
)


def count_requests(lines: str, prefix: str) -> Counter[str]:
    """Requests per method among log lines, for paths under `prefix` (one run's directory or bucket)."""
    out: Counter[str] = Counter()
    for m in REQUEST_LINE.finditer(lines):
        if m.group(2).startswith(prefix):
            out[m.group(1)] += 1
    return out


class RequestLog:
    """A server's log, read from a mark: the requests of what ran since."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def since(self, mark: int, prefix: str, settle: float = 0.2) -> Counter[str]:
        time.sleep(settle)  # nginx writes its access log line after the response; moto after the request
        with open(self.path, "rb") as f:
            f.seek(mark)
            return count_requests(f.read().decode(errors="replace"), prefix)


def tree_bytes(path: Path) -> int:
    """Bytes allocated on disk by the files under `path` (0 when it does not exist)."""
    total = 0
    try:
        entries = list(os.scandir(path))
    except OSError:
        return 0
    for e in entries:
        try:
            if e.is_dir(follow_symlinks=False):
                total += tree_bytes(Path(e.path))
            else:
                total += e.stat(follow_symlinks=False).st_blocks * 512
        except OSError:
            continue  # a staged file gone between listing and stat
    return total


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class Sampler(threading.Thread):
    """Every `interval` s while a run goes: the free space of the file system holding `fs_path`, the bytes
    under `dirs` (a staging directory, a private TMPDIR) and the peak RSS of `pid` (VmHWM, read while it runs:
    wait4's maxrss would count the benchmark's own memory, which a child inherits until it execs), and the
    largest sum of the resident sets of `pid` and its descendants (worker processes, if any)."""

    def __init__(self, fs_path: Path, dirs: list[Path], pid: int | None = None, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.fs_path = fs_path
        self.dirs = dirs
        self.pid = pid
        self.interval = interval
        self.start_free = free_bytes(fs_path)
        self.min_free = self.start_free
        self.peak_staging = 0
        self.peak_rss_mib = 0.0
        self.peak_tree_rss_mib = 0.0
        self.samples = 0
        self._done = threading.Event()

    def sample(self) -> None:
        self.min_free = min(self.min_free, free_bytes(self.fs_path))
        self.peak_staging = max(self.peak_staging, sum(tree_bytes(d) for d in self.dirs))
        if self.pid is not None:
            with contextlib.suppress(OSError, RuntimeError):  # gone: the last sample stands
                self.peak_rss_mib = max(self.peak_rss_mib, peak_rss_mib(self.pid))
            self.peak_tree_rss_mib = max(self.peak_tree_rss_mib, tree_rss_mib(self.pid))
        self.samples += 1

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def finish(self) -> None:
        self._done.set()
        self.join()
        self.sample()

    @property
    def disk_drop(self) -> int:
        return max(0, self.start_free - self.min_free)


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's peak resident set (children not included)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and of its children it has waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def tree_rss_mib(pid: int) -> float:
    """The resident sets of `pid` and all its descendants, summed (shared pages counted in each)."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat_file.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat_file.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return total / (1 << 20)
