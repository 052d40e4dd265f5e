"""The local Nix store, read through Nix's own commands: path info in batches, .drv outputs, closures.

One subprocess answers for many paths. The JSON of `nix path-info --json` changed shape across Nix
versions (a list of objects with `sha256:<nix32>` hashes in 2.8; an object keyed by path with SRI hashes
later; structured hash objects and base-name references later still): `parse_path_info` reads them all.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from . import nixbase32, storepath

NIX_FLAGS = ("--extra-experimental-features", "nix-command")
TIMEOUT = 300.0


class StoreError(RuntimeError):
    """Nix could not answer (not installed, daemon down, bad store): usually transient."""


class InvalidPathError(StoreError):
    """A path is not valid in the store (never built, or garbage-collected)."""

    def __init__(self, path: str, detail: str = "") -> None:
        super().__init__(f"{path} is not a valid path in the Nix store{': ' + detail if detail else ''}")
        self.path = path


@dataclass(frozen=True)
class PathInfo:
    path: str
    nar_hash: bytes
    nar_size: int
    references: tuple[str, ...]  # full store paths, sorted
    deriver: str | None = None
    ca: str | None = None
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


def _hash(value: Any) -> bytes:
    if isinstance(value, dict):  # {"algorithm": "sha256", "format": "base64", "hash": "..."}
        algo, fmt, text = value.get("algorithm"), value.get("format", "base64"), value.get("hash", "")
        if algo != "sha256":
            raise ValueError(f"unsupported NAR hash algorithm {algo!r}")
        if fmt == "base64":
            return base64.b64decode(text)
        if fmt in ("nix32", "base32"):
            return nixbase32.decode(text)
        if fmt in ("base16", "hex"):
            return bytes.fromhex(text)
        return nixbase32.parse_hash(text)
    if isinstance(value, str):
        return nixbase32.parse_hash(value)
    raise ValueError(f"unexpected NAR hash {value!r}")


def _full(path: str, store_dir: str) -> str:
    return path if "/" in path else f"{store_dir}/{path}"


def parse_path_info(data: Any, store_dir: str) -> dict[str, PathInfo]:
    """Parse `nix path-info --json` output of any supported Nix version into {path: PathInfo}.

    Raises InvalidPathError for paths reported invalid (newer Nix reports them as null or without narHash).
    """
    if isinstance(data, list):
        items = [(entry.get("path"), entry) for entry in data]
    elif isinstance(data, dict):
        items = list(data.items())
    else:
        raise StoreError(f"unexpected `nix path-info --json` output of type {type(data).__name__}")
    out: dict[str, PathInfo] = {}
    for raw_path, entry in items:
        path = _full(str(raw_path), store_dir)
        if entry is None or entry.get("valid") is False or "narHash" not in entry:
            raise InvalidPathError(path)
        try:
            deriver = entry.get("deriver")
            ca = entry.get("ca")
            out[path] = PathInfo(
                path=path,
                nar_hash=_hash(entry["narHash"]),
                nar_size=int(entry["narSize"]),
                references=tuple(sorted(_full(r, store_dir) for r in entry.get("references", []))),
                deriver=_full(deriver, store_dir) if deriver else None,
                ca=ca if isinstance(ca, str) else _render_ca(ca) if ca else None,
                sigs=tuple(entry.get("signatures", [])),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"cannot parse path info of {path}: {e}") from None
    return out


def _render_ca(ca: dict[str, Any]) -> str | None:
    """Newer Nix gives CA as {"method": "nar", "hash": {...}}; narinfos want `fixed:r:sha256:<nix32>`."""
    try:
        digest = _hash(ca["hash"])
        method = ca["method"]
    except (KeyError, ValueError, TypeError):
        return None
    prefix = {"nar": "fixed:r:", "flat": "fixed:", "text": "text:"}.get(method)
    return f"{prefix}{nixbase32.format_hash(digest)}" if prefix else None


class Store:
    """Read-only access to a Nix store through the `nix` and `nix-store` commands."""

    def __init__(self, store_dir: str = storepath.DEFAULT_STORE_DIR, store_uri: str | None = None) -> None:
        self.store_dir = store_dir
        self.store_uri = store_uri

    def check(self, path: str) -> str:
        return storepath.check(path, self.store_dir)

    async def _run(self, argv: Sequence[str]) -> bytes:
        if self.store_uri:
            argv = [argv[0], "--store", self.store_uri, *argv[1:]]
        env = dict(os.environ, NIX_STORE_DIR=self.store_dir)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
        except OSError as e:
            raise StoreError(f"cannot run {argv[0]}: {e.strerror} (is Nix installed and on PATH?)") from None
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise StoreError(f"{argv[0]} did not answer within {TIMEOUT:g} s") from None
        if proc.returncode != 0:
            message = stderr.decode(errors="replace").strip().splitlines()
            detail = message[-1] if message else f"exit status {proc.returncode}"
            for word in detail.replace("'", " ").split():
                if word.startswith(self.store_dir + "/") and "is not valid" in detail:
                    raise InvalidPathError(word, detail)
            raise StoreError(f"{' '.join(argv[:3])} …: {detail}")
        return stdout

    async def path_info(self, paths: Iterable[str], recursive: bool = False) -> dict[str, PathInfo]:
        """Path info for `paths` (and, with `recursive`, their whole closure) in one subprocess."""
        paths = list(paths)
        if not paths:
            return {}
        argv = ["nix", *NIX_FLAGS, "path-info", "--json", *(["--recursive"] if recursive else []), *paths]
        out = await self._run(argv)
        try:
            data = json.loads(out)
        except ValueError as e:
            raise StoreError(f"`nix path-info --json` printed invalid JSON: {e}") from None
        infos = parse_path_info(data, self.store_dir)
        for p in paths:
            if p not in infos:
                raise InvalidPathError(p, "missing from `nix path-info` output")
        return infos

    async def closure(self, paths: Iterable[str]) -> dict[str, PathInfo]:
        return await self.path_info(paths, recursive=True)

    async def read_log(self, drv: str) -> bytes | None:
        """The build log of a .drv, if Nix kept one."""
        try:
            return await self._run(["nix-store", "--read-log", drv])
        except InvalidPathError:
            return None
        except StoreError as e:
            if "build log" in str(e) and "not available" in str(e):
                return None
            raise

    async def outputs(self, drvs: Iterable[str]) -> list[str]:
        """The output paths of the given .drv files (all that exist in the store)."""
        drvs = list(drvs)
        if not drvs:
            return []
        out = await self._run(["nix-store", "--query", "--outputs", *drvs])
        return [line for line in out.decode().split() if line]
