"""Synthetic binary caches for GC tests and benchmarks: real narinfo text, made-up store paths."""

from __future__ import annotations

import hashlib
from pathlib import Path

from hookd import nixbase32
from hookd.narinfo import NarInfo, nar_key


def synthetic(n: int, salt: str = "") -> list[tuple[str, bytes]]:
    """n narinfos in chains of 10 (each references its predecessor), each with a 64-byte NAR."""
    objects: list[tuple[str, bytes]] = [("nix-cache-info", b"StoreDir: /nix/store\n")]
    prev = None
    for i in range(n):
        h = nixbase32.encode(hashlib.sha256(f"{salt}p{i}".encode()).digest()[:20])
        nar = hashlib.sha256(f"{salt}n{i}".encode()).digest() * 2
        fh = hashlib.sha256(nar).digest()
        ni = NarInfo(store_path=f"/nix/store/{h}-p{i}", url=nar_key(fh, "none"), nar_hash=fh, nar_size=64,
                     compression="none", file_hash=fh, file_size=64,
                     references=[prev] if prev and i % 10 else [], sigs=["k:" + "A" * 86 + "=="])  # fmt: skip
        prev = f"{h}-p{i}"
        objects += [(f"{h}.narinfo", ni.render().encode()), (ni.url, nar)]
    return objects


def write_tree(root: Path, objects: list[tuple[str, bytes]]) -> None:
    for key, data in objects:
        p = root / key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
