"""GC's plan: what to delete, as a pure function of a snapshot and the policy.

Roots are the pins and every narinfo modified within the retention window (uploads and dedup hits reset
a narinfo's age). The mark is the closure of the roots through `References`. A narinfo whose NAR or
references are missing is broken: it and its referrers go. The candidates are the unmarked or broken
narinfos older than the grace period; the plan also forecasts what follows from them (NARs, listings,
logs). `sweep.sweep` carries the candidates out under the protocol of `safety.py`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter
from typing import Any

from .backends import ObjectStat
from .catalog import Catalog, GcError, pausing_gc
from .snapshot import Snapshot


@dataclass
class Category:
    count: int = 0
    bytes: int = 0


@dataclass(repr=False)
class GcPlan:
    now: float
    grace: float
    candidates: list[int] = field(default_factory=list)  # catalog rows to sweep: unmarked or broken, old
    delete_narinfos: list[str] = field(default_factory=list)  # their keys, unmarked then broken
    delete_nars: list[str] = field(default_factory=list)
    delete_other: list[str] = field(default_factory=list)  # listings, logs and realisations
    broken: dict[str, str] = field(default_factory=dict)  # narinfo key -> why
    dropped_roots: int = 0
    stats: dict[str, Category] = field(default_factory=lambda: defaultdict(Category))
    malformed: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"GcPlan({len(self.deletions)} deletions)"

    @property
    def deletions(self) -> list[str]:
        return self.delete_narinfos + self.delete_nars + self.delete_other

    def tally(self, category: str, count: int, nbytes: int) -> None:
        if count:
            cat = self.stats[category]
            cat.count += count
            cat.bytes += nbytes

    def tally_objects(self, category: str, objs: Sequence[ObjectStat]) -> None:
        self.tally(category, len(objs), sum(o.size for o in objs))

    def to_json(self) -> dict[str, Any]:
        return {
            "stats": {k: {"count": v.count, "bytes": v.bytes} for k, v in sorted(self.stats.items())},
            "broken": self.broken,
            "dropped_roots": self.dropped_roots,
            "malformed": self.malformed,
            "unknown": self.unknown,
        }


@pausing_gc
def plan(
    snap: Snapshot,
    *,
    now: float,
    older_than: float,
    grace: float,
    max_size: int | None = None,
    keep_paths: Iterable[str] = (),
) -> GcPlan:
    """What to delete: a pure function of the snapshot and the policy."""
    if grace > older_than:
        raise GcError("the grace period must not be longer than the retention (--older-than)")
    cat = snap.narinfos
    young = now - grace
    out = GcPlan(now=now, grace=grace, malformed=snap.malformed, unknown=list(snap.unknown))
    broken = _broken(cat, set(map(attrgetter("key"), snap.nars)))
    out.broken = {cat.keys[i]: why for i, why in broken.items()}
    pinned = _pinned(cat, [*snap.pins.values(), *keep_paths], broken)
    window = _window(cat, now - older_than, young, broken)
    marked, out.dropped_roots = _fit(cat, pinned, window, max_size)
    out.candidates = _narinfos(out, cat, marked, broken, young)
    gone = set(out.candidates)
    _nars(out, snap.nars, cat.unreferenced_nars(snap.nars, gone), young)
    old_others = [o for o in snap.others if o.mtime < young]
    listings, logs = cat.leftovers(old_others, gone)
    realisations = cat.orphan_realisations(snap.realisations, old_others, gone)
    out.delete_other = [o.key for o in chain(listings, logs, realisations)]
    out.tally_objects("listings deleted", listings)
    out.tally_objects("logs deleted", logs)
    out.tally_objects("realisations deleted", realisations)
    return out


def _broken(cat: Catalog, nar_keys: set[str]) -> dict[int, str]:
    """Rows whose NAR or a reference is missing, then every row that refers to one of them.

    A reference to a malformed narinfo is not missing: nothing is deleted on a malformed object's account."""
    broken: dict[int, str] = {}
    if missing_nars := set(cat.urls) - nar_keys:  # a malformed narinfo's URL included: that NAR is kept
        for i, url in enumerate(cat.urls):
            if url in missing_nars and i not in cat.errors:
                broken[i] = f"its NAR {url} is missing"
    for i, refs in cat.missing.items():
        if i not in broken and i not in cat.errors:
            broken[i] = f"its reference {refs[0]} is missing"
    return cat.spread_broken(broken, lambda i: f"it refers to the broken path {cat.store_paths[i]}")


def _pinned(cat: Catalog, pin_paths: Sequence[str], broken: Collection[int]) -> list[int]:
    """The rows of the pinned store paths that are in the cache and whole."""
    if not pin_paths:
        return []
    row_of = {k[:32]: i for i, k in enumerate(cat.keys)}
    pinned = [row_of[h] for p in pin_paths if (h := p.rsplit("/", 1)[-1][:32]) in row_of]
    return [i for i in pinned if i not in broken]


def _window(cat: Catalog, cutoff: float, young: float, broken: Collection[int]) -> list[int]:
    """The rows modified within the retention window; of the broken ones only the young, which may just
    be racing an upload: what they refer to is kept."""
    window = [i for i, t in enumerate(cat.mtimes) if t >= cutoff]
    if broken:
        window = [i for i in window if i not in broken or cat.mtimes[i] >= young]
    return window


def _mark(cat: Catalog, roots: Iterable[int]) -> set[int]:
    """The closure of the roots, a level at a time: each level is a few set operations over row numbers."""
    frontier = set(roots)
    marked = set(frontier)
    while frontier:
        frontier = set(chain.from_iterable(map(cat.refs.__getitem__, frontier))) - marked
        marked |= frontier
    return marked


def _kept_size(cat: Catalog, marked: set[int]) -> int:
    """The bytes the marked narinfos and their NARs take (several narinfos may share one NAR)."""
    nars = dict(zip(map(cat.urls.__getitem__, marked), map(cat.file_sizes.__getitem__, marked), strict=True))
    return sum(nars.values()) + sum(map(cat.sizes.__getitem__, marked))


def _fit(cat: Catalog, pinned: list[int], window: list[int], max_size: int | None) -> tuple[set[int], int]:
    """The mark, and how many of the oldest window roots are dropped for it to fit `max_size` (pins never are)."""
    marked = _mark(cat, [*pinned, *window])
    if max_size is None or _kept_size(cat, marked) <= max_size:
        return marked, 0
    window.sort(key=cat.mtimes.__getitem__)  # oldest first
    lo, hi = 0, len(window)  # smallest k such that dropping the k oldest roots fits
    while lo < hi:
        mid = (lo + hi) // 2
        if _kept_size(cat, _mark(cat, [*pinned, *window[mid:]])) <= max_size:
            hi = mid
        else:
            lo = mid + 1
    return _mark(cat, [*pinned, *window[lo:]]), lo


def _narinfos(out: GcPlan, cat: Catalog, marked: set[int], broken: Collection[int], young: float) -> list[int]:
    """The candidate rows: neither kept (marked and whole) nor spared (young); malformed ones are left alone."""
    sizes = cat.sizes
    kept = marked - set(broken) - cat.errors.keys()
    out.tally("narinfos kept", len(kept), sum(map(sizes.__getitem__, kept)))
    rest = set(range(len(cat))) - kept - cat.errors.keys()
    spared = [i for i in rest if cat.mtimes[i] >= young]
    out.tally("narinfos spared (younger than grace)", len(spared), sum(map(sizes.__getitem__, spared)))
    deleted = sorted(rest.difference(spared))
    out.delete_narinfos = sorted((cat.keys[i] for i in deleted), key=lambda k: (k in out.broken, k))
    for name, part in (("narinfos deleted", False), ("narinfos broken, deleted", True)):
        chosen = [sizes[i] for i in deleted if (i in broken) == part]
        out.tally(name, len(chosen), sum(chosen))
    return deleted


def _nars(out: GcPlan, nars: Sequence[ObjectStat], unreferenced: Sequence[ObjectStat], young: float) -> None:
    """The NARs no remaining narinfo points to (several narinfos may share one), unless young."""
    nar_bytes = sum(map(attrgetter("size"), nars))
    out.tally("NARs kept", len(nars) - len(unreferenced), nar_bytes - sum(o.size for o in unreferenced))
    out.tally_objects("NARs spared (younger than grace)", [o for o in unreferenced if o.mtime >= young])
    old = [o for o in unreferenced if o.mtime < young]
    out.delete_nars = [o.key for o in old]
    out.tally_objects("NARs deleted", old)
