"""What the store knows of a valid path: its NAR's hash and size, references, deriver, content address and
signatures. One type for every way it is asked (`nix path-info` in store.py, the daemon's socket in
nixdaemon.py) and for everything downstream; pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import nixbase32


@dataclass(frozen=True)
class PathInfo:
    path: str
    nar_hash: bytes  # SHA-256
    nar_size: int
    references: tuple[str, ...]  # full store paths, sorted
    deriver: str | None = None
    ca: str | None = None  # as narinfos write it: `fixed:r:sha256:<nix32>`, `text:sha256:<nix32>`
    sigs: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "narHash": nixbase32.format_hash(self.nar_hash),
            "narSize": self.nar_size,
            "references": list(self.references),
            "deriver": self.deriver,
            "ca": self.ca,
            "signatures": list(self.sigs),
        }
