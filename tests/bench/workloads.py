"""What the upload benchmark pushes: store paths made reproducibly on a private Nix.

- small: many small added paths (random bytes and a compressible tail) under one top-level path;
- random: one large path of seeded pseudo-random bytes (incompressible);
- compressible: one large file made of files sampled across /usr/lib and /usr/share (ELF, Python, text…),
  so it compresses like a real store, not like zeros or random bytes;
- corpus: subtrees of /usr/lib and /usr/share added as hundreds of paths of mixed sizes (a subtree larger
  than a cap is split into its subdirectories, its loose files going together), all under one top-level path.

Each is a closure with one top path, so one push takes it all. Contents depend only on the seed and on this
machine's /usr, never on the time, so a second store gets the same NARs by import (see `upload.py`).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

MiB = 1 << 20
CORPUS_TREES = (Path("/usr/lib"), Path("/usr/share"))


class Store(Protocol):
    """What making a workload asks of a private Nix (hookd.selftest.NixEnv and the benchmark's own)."""

    def nix(self, *argv: str, user: str | None = None, check: bool = True) -> object: ...

    def write_expr(self, name: str, text: str) -> Path: ...


def _stdout(proc: object) -> str:
    out = getattr(proc, "stdout", "")
    return out if isinstance(out, str) else ""


def add_paths(nix: Store, sources: list[str], batch: int = 200) -> list[str]:
    """`nix-store --add` in batches; the store paths in the order of `sources`."""
    paths: list[str] = []
    for i in range(0, len(sources), batch):
        paths += _stdout(nix.nix("nix-store", "--add", *sources[i : i + batch])).split()
    return paths


def make_top(nix: Store, name: str, paths: list[str]) -> str:
    """A top-level path whose contents name every one of `paths` (so it references them all)."""
    expr = nix.write_expr(
        f"{name}.nix",
        f'{{ paths }}: derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh";'
        ' deps = map builtins.storePath paths; passAsFile = [ "deps" ];'
        ' args = [ "-c" "/bin/cp $depsPath $out" ]; }',
    )
    listing = nix.write_expr(f"{name}-paths.nix", "[" + " ".join(f'"{p}"' for p in paths) + "]")
    argv = ["nix-build", str(expr), "--no-out-link", "--arg", "paths", f"import {listing}"]
    return _stdout(nix.nix(*argv)).strip()


def make_small_closure(nix: Store, root: Path, n: int, seed: int = 1) -> str:
    """n small added paths and one top-level path that references them all; returns the top."""
    rng = random.Random(seed)
    src = root / "small-src"
    src.mkdir()
    files = []
    for i in range(n):
        f = src / f"small-{i}"
        f.write_bytes(rng.randbytes(512) + b"x" * 2048)
        files.append(str(f))
    top = make_top(nix, "small-top", add_paths(nix, files))
    shutil.rmtree(src)
    return top


def make_random(nix: Store, root: Path, size: int, seed: int = 2) -> str:
    """One path of `size` seeded pseudo-random bytes."""
    rng = random.Random(seed)
    f = root / "random.bin"
    with open(f, "wb") as out:
        left = size
        while left:
            chunk = min(left, 4 * MiB)
            out.write(rng.randbytes(chunk))
            left -= chunk
    (path,) = add_paths(nix, [str(f)])
    f.unlink()
    return path


def regular_files(trees: Iterable[Path]) -> Iterator[tuple[Path, int]]:
    """Every regular file under `trees` (symlinks not followed), sorted, with its size."""
    for tree in trees:
        for d, dirs, files in os.walk(tree):
            dirs.sort()
            for name in sorted(files):
                p = Path(d) / name
                st = p.lstat()
                if stat.S_ISREG(st.st_mode) and st.st_size:
                    yield p, st.st_size


def _hash_order(name: str, salt: str) -> bytes:
    return hashlib.sha256(f"{salt}:{name}".encode()).digest()


def make_compressible(nix: Store, root: Path, size: int, trees: Iterable[Path] = CORPUS_TREES) -> str:
    """One path of exactly `size` bytes: files of `trees` taken in the order of their names' hashes (an even
    sample of all kinds, not the first directories) and concatenated."""
    files = sorted((p for p, _ in regular_files(trees)), key=lambda p: _hash_order(str(p), "compressible"))
    f = root / "compressible.bin"
    written = 0
    with open(f, "wb") as out:
        while written < size:
            for path in files:
                try:
                    data = path.read_bytes()[: size - written]
                except OSError:
                    continue
                out.write(data)
                written += len(data)
                if written >= size:
                    break
    (path,) = add_paths(nix, [str(f)])
    f.unlink()
    return path


@dataclass(frozen=True)
class Candidate:
    """A would-be store path of the corpus: one subtree, or the loose files of a split directory."""

    name: str
    sources: tuple[Path, ...]
    size: int


def store_name(rel: str) -> str:
    """A valid store path name for a relative source path."""
    name = re.sub(r"[^A-Za-z0-9+._?=-]", "_", rel.strip("/").replace("/", "-")).lstrip(".")
    return name[:200] or "root"


def _tree_sizes(tree: Path) -> dict[Path, int]:
    """Bytes of regular files under every directory of `tree` (symlinks not followed)."""
    sizes: dict[Path, int] = {}
    for d, dirs, files in os.walk(tree, topdown=False):
        total = 0
        for name in files:
            try:
                st = os.lstat(os.path.join(d, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
        for name in dirs:
            total += sizes.get(Path(d) / name, 0)
        sizes[Path(d)] = total
    return sizes


def corpus_candidates(trees: Iterable[Path], cap: int) -> list[Candidate]:
    """Subtrees of `trees` of at most `cap` bytes each (a larger directory is split into its entries)."""
    out: list[Candidate] = []
    for tree in trees:
        sizes = _tree_sizes(tree)

        def split(d: Path, sizes: dict[Path, int] = sizes, tree: Path = tree) -> None:
            loose: list[Path] = []
            loose_size = groups = 0

            def flush() -> None:
                nonlocal loose, loose_size, groups
                if loose:
                    out.append(Candidate(f"{store_name(str(d))}+files{groups}", tuple(loose), loose_size))
                    groups += 1
                loose, loose_size = [], 0

            for entry in sorted(d.iterdir()):
                if entry.is_dir() and not entry.is_symlink():
                    if sizes.get(entry, 0) > cap:
                        split(entry)
                    else:
                        out.append(Candidate(store_name(str(entry)), (entry,), sizes.get(entry, 0)))
                    continue
                st = entry.lstat()
                size = st.st_size if stat.S_ISREG(st.st_mode) else 0
                if loose and loose_size + size > cap:  # loose files go in groups of at most `cap` too
                    flush()
                loose.append(entry)
                loose_size += size
            flush()

        split(tree)
    return out


def pick_corpus(candidates: list[Candidate], budget: int, salt: str = "corpus") -> list[Candidate]:
    """Candidates taken in the order of their names' hashes while they fit in `budget` bytes: an even,
    deterministic sample of the trees, big and small paths alike."""
    order = sorted(candidates, key=lambda c: _hash_order(c.name, salt))
    picked: list[Candidate] = []
    total = 0
    for c in order:
        if total + c.size <= budget:
            picked.append(c)
            total += c.size
    return sorted(picked, key=lambda c: c.name)


def _copy_entry(src: Path, dest: Path) -> None:
    """Copy a file, symlink or directory tree; sockets, FIFOs and devices are left out (Nix refuses them)."""
    st = src.lstat()
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dest)
    elif stat.S_ISREG(st.st_mode):
        shutil.copy2(src, dest, follow_symlinks=False)
    elif stat.S_ISDIR(st.st_mode):
        dest.mkdir()
        for entry in sorted(src.iterdir()):
            _copy_entry(entry, dest / entry.name)
        shutil.copystat(src, dest, follow_symlinks=False)


def make_corpus(nix: Store, root: Path, budget: int, trees: Iterable[Path] = CORPUS_TREES) -> str:
    """Subtrees of /usr/lib and /usr/share, about `budget` bytes in all, as store paths under one top."""
    cap = max(MiB, min(64 * MiB, budget // 16))  # paths of mixed sizes, none a large share of the whole
    picked = pick_corpus(corpus_candidates(trees, cap), budget)
    src = root / "corpus-src"
    src.mkdir()
    sources = []
    for c in picked:
        dest = src / c.name
        if len(c.sources) == 1 and c.sources[0].is_dir() and not c.sources[0].is_symlink():
            _copy_entry(c.sources[0], dest)
        else:
            dest.mkdir()
            for s in c.sources:
                _copy_entry(s, dest / s.name)
        sources.append(str(dest))
    top = make_top(nix, "corpus-top", add_paths(nix, sources))
    shutil.rmtree(src)
    return top


def describe(paths: Iterable[Path]) -> dict[str, int]:
    """What a workload holds: files, their bytes, and the bytes in ELF files (read from the store)."""
    files = file_bytes = elf_bytes = 0
    for path in paths:
        for f, size in regular_files([path]) if path.is_dir() else [(path, path.stat().st_size)]:
            files += 1
            file_bytes += size
            with open(f, "rb") as fh:
                if fh.read(4) == b"\x7fELF":
                    elf_bytes += size
    return {"files": files, "file_bytes": file_bytes, "elf_bytes": elf_bytes}
