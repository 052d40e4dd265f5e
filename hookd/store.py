"""The local Nix store, read through Nix's own commands: path info in batches, .drv outputs, closures.

One subprocess answers for many paths. `nix path-info --json` changed shape across versions (measured
in tests/fixtures/path-info): a list of objects with `path` (2.8, and Lix today); a map keyed by full
path (2.19+), with nulls for absent fields and invalid paths (2.23+); `--json-format 2` (2.33+; a bare
`--json` is deprecated from 2.34) wraps a map keyed by base name in {"version", "storeDir", "info"}
with a structured `ca`; format 3 (2.35) adds structured signatures. `parse_path_info` reads them all,
and `Store` asks for format 2 where the installed Nix takes it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from . import derivation, nixbase32, nixdaemon, storepath
from .pathinfo import PathInfo
from .realisation import Realisation, RealisationError, parse_store

T = TypeVar("T")

NIX_FLAGS = ("--extra-experimental-features", "nix-command")
CA_FLAGS = ("--extra-experimental-features", "nix-command ca-derivations")
# What Nix says when asked about outputs that are known only once built (2.8, 2.26; 2.34's wording;
# realisations of outputs not built yet)
FLOATING = ("floating content-address",)
UNBUILT = ("unbuilt",)
TIMEOUT = 300.0


class StoreError(RuntimeError):
    """Nix could not answer (not installed, daemon down, bad store): usually transient."""


class InvalidPathError(StoreError):
    """A path is not valid in the store (never built, or garbage-collected)."""

    def __init__(self, path: str, detail: str = "") -> None:
        super().__init__(f"{path} is not a valid path in the Nix store{': ' + detail if detail else ''}")
        self.path = path


_SIZES = {"sha256": 32, "sha512": 64, "sha1": 20, "md5": 16}


def _typed_hash(value: Any) -> tuple[str, bytes]:
    """Any hash Nix's JSON holds, as (algorithm, digest): `algo:<nix32|hex|base64>` (2.8's narinfo style),
    SRI `algo-<base64>` (2.19+, formats 2 and 3, Lix) or {"algorithm", "format", "hash"} (some 2.3x)."""
    if isinstance(value, dict):
        algo, fmt, text = value.get("algorithm"), value.get("format", "base64"), value.get("hash")
        if algo not in _SIZES or not isinstance(text, str):
            raise ValueError(f"unsupported hash {value!r}")
        if fmt == "base64":
            digest = base64.b64decode(text, validate=True)
        elif fmt in ("nix32", "base32"):
            digest = nixbase32.decode(text)
        elif fmt in ("base16", "hex"):
            digest = bytes.fromhex(text)
        else:
            raise ValueError(f"unknown hash format {fmt!r}")
        if len(digest) != _SIZES[algo]:
            raise ValueError(f"{algo} hash of {len(digest)} bytes")
        return algo, digest
    if isinstance(value, str):
        for algo in _SIZES:
            if value.startswith((algo + ":", algo + "-")):
                return algo, nixbase32.parse_hash(value, algo)
    raise ValueError(f"unexpected hash {value!r}")


def _nar_hash(value: Any) -> bytes:
    algo, digest = _typed_hash(value)
    if algo != "sha256":
        raise ValueError(f"unsupported NAR hash algorithm {algo!r}")
    return digest


_CA_PREFIX = {"nar": "fixed:r:", "flat": "fixed:", "text": "text:", "git": "fixed:git:"}


def _render_ca(ca: Any) -> str | None:
    """A content address as narinfos write it (`fixed:r:sha256:<nix32>`, `text:sha256:<nix32>`, …): format 1
    and Lix give that string; formats 2 and 3 give {"method": "nar", "hash": <SRI or structured hash>}."""
    if ca is None or isinstance(ca, str):
        return ca or None
    if not isinstance(ca, dict) or ca.get("method") not in _CA_PREFIX:
        raise ValueError(f"unsupported content address {ca!r}")
    algo, digest = _typed_hash(ca.get("hash"))
    return _CA_PREFIX[ca["method"]] + nixbase32.format_hash(digest, algo)


def _signature(sig: Any) -> str:
    """`keyname:base64`: a string up to format 2, {"keyName", "sig"} in format 3 (Nix 2.35)."""
    if isinstance(sig, str):
        return sig
    if isinstance(sig, dict) and isinstance(sig.get("keyName"), str) and isinstance(sig.get("sig"), str):
        return f"{sig['keyName']}:{sig['sig']}"
    raise ValueError(f"unexpected signature {sig!r}")


def _full(path: str, store_dir: str) -> str:
    return path if "/" in path else f"{store_dir}/{path}"


def _entries(data: Any, store_dir: str) -> list[tuple[Any, Any]]:
    """(path, entry) pairs from any shape of `nix path-info --json`'s answer."""
    if isinstance(data, list):  # Nix 2.8 to 2.18 and Lix: [{"path": …, …}, {"path": …, "valid": false}]
        return [(entry.get("path") if isinstance(entry, dict) else None, entry) for entry in data]
    if not isinstance(data, dict):
        raise StoreError(f"unexpected `nix path-info --json` output of type {type(data).__name__}")
    if isinstance(data.get("version"), int) and isinstance(data.get("info"), dict):
        # --json-format 2 and 3: {"version": N, "storeDir": …, "info": {<base name>: … | null}}
        reported = data.get("storeDir", store_dir)
        if reported != store_dir:
            raise StoreError(f"Nix reports the store directory {reported}, but hookd is set up for {store_dir}")
        return list(data["info"].items())
    return list(data.items())  # 2.19+ format 1: {<full path>: … | null} (null for invalid paths since 2.23)


def parse_path_info(data: Any, store_dir: str) -> dict[str, PathInfo]:
    """Parse `nix path-info --json` output of any supported Nix version into {path: PathInfo}.

    Raises InvalidPathError for paths reported invalid (null, `"valid": false`, or no narHash).
    """
    out: dict[str, PathInfo] = {}
    for raw_path, entry in _entries(data, store_dir):
        if not isinstance(raw_path, str) or not raw_path:
            raise StoreError(f"`nix path-info --json` gave an entry without a path: {entry!r}")
        path = _full(raw_path, store_dir)
        if not isinstance(entry, dict) or entry.get("valid") is False or entry.get("narHash") is None:
            raise InvalidPathError(path)
        try:
            deriver = entry.get("deriver")
            out[path] = PathInfo(
                path=path,
                nar_hash=_nar_hash(entry["narHash"]),
                nar_size=int(entry["narSize"]),
                references=tuple(sorted(_full(r, store_dir) for r in entry.get("references") or [])),
                deriver=_full(deriver, store_dir) if deriver else None,
                ca=_render_ca(entry.get("ca")),
                sigs=tuple(_signature(s) for s in entry.get("signatures") or []),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"cannot parse path info of {path}: {e}") from None
    return out


def nix_version(version: str) -> tuple[int, int]:
    """(major, minor) from `nix --version` (Nix, Determinate Nix or Lix); (0, 0) if unrecognised."""
    m = re.search(r"\((?:Determinate )?Nix\b[^)]*\) (\d+)\.(\d+)", version) or re.search(r"(\d+)\.(\d+)", version)
    return (int(m[1]), int(m[2])) if m else (0, 0)


def outputs_installable(drv: str, version: tuple[int, int], output: str = "*") -> str:
    """A .drv's outputs as an installable: `drv^*` (Nix 2.13+), the bare path before (2.8 reads it as
    its outputs; 2.26 as the .drv file itself)."""
    return f"{drv}^{output}" if version >= (2, 13) else drv


def json_format_args(version: str) -> tuple[str, ...]:
    """The flags that ask `nix path-info` for JSON, from `nix --version`: `--json-format 2` where Nix takes
    it (2.33+; 2.34 warns that a bare `--json` will become an error), a bare `--json` on older Nix and on
    Lix, which reject the flag."""
    m = re.search(r"\((?:Determinate )?Nix\b[^)]*\) (\d+)\.(\d+)", version)
    if m and (int(m[1]), int(m[2])) >= (2, 33):
        return ("--json", "--json-format", "2")
    return ("--json",)


class Store:
    """Read-only access to a Nix store through the `nix` and `nix-store` commands."""

    def __init__(self, store_dir: str = storepath.DEFAULT_STORE_DIR, store_uri: str | None = None) -> None:
        self.store_dir = store_dir
        self.store_uri = store_uri
        self._json_args: tuple[str, ...] | None = None  # decided once, from `nix --version`
        self._version: str | None = None
        # path info straight from nix-daemon's socket (nixdaemon.py), when `nix` would ask that daemon
        self._socket = nixdaemon.socket_for(store_uri, os.environ)
        self._daemon: nixdaemon.DaemonConnection | None = None
        self._daemon_lock = asyncio.Lock()

    async def close(self) -> None:
        if self._daemon is not None:
            self._daemon.close()
            self._daemon = None

    def check(self, path: str) -> str:
        return storepath.check(path, self.store_dir)

    async def _run(self, argv: Sequence[str], with_store: bool = True) -> bytes:
        if self.store_uri and with_store:
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
            lines = stderr.decode(errors="replace").strip().splitlines()
            message = [line for line in lines if not line.startswith("Try '")] or lines  # not the usage hint
            detail = message[-1] if message else f"exit status {proc.returncode}"
            for word in detail.replace("'", " ").split():
                if word.startswith(self.store_dir + "/") and "is not valid" in detail:
                    raise InvalidPathError(word, detail)
            raise StoreError(f"{' '.join(argv[:3])} …: {detail}")
        return stdout

    async def version(self) -> str:
        """`nix --version`, asked once per Store."""
        if self._version is None:
            self._version = (await self._run(["nix", "--version"], with_store=False)).decode()
        return self._version

    async def json_args(self) -> tuple[str, ...]:
        """How to ask this Nix for path-info JSON (see `json_format_args`)."""
        if self._json_args is None:
            self._json_args = json_format_args(await self.version())
        return self._json_args

    async def path_info(self, paths: Iterable[str], recursive: bool = False) -> dict[str, PathInfo]:
        """Path info for `paths` (and, with `recursive`, their whole closure) in one subprocess.

        Give no .drv here (resolve it with `outputs` first): Nix 2.8 answers for a .drv's outputs, 2.26+
        for the .drv itself.
        """
        paths = list(paths)
        if not paths:
            return {}
        if self._socket is not None:
            answers = await self._ask_daemon(self._socket, paths, recursive)
            if answers is not None:
                return answers
        flags = await self.json_args()
        try:
            out = await self._run(
                ["nix", *NIX_FLAGS, "path-info", *flags, *(["--recursive"] if recursive else []), *paths]
            )
        except StoreError as e:
            if "--json-format" not in flags or "json-format" not in str(e):
                raise
            # A Nix that reports 2.33+ but does not take the flag (a patched or development build).
            self._json_args = ("--json",)
            out = await self._run(
                ["nix", *NIX_FLAGS, "path-info", "--json", *(["--recursive"] if recursive else []), *paths]
            )
        try:
            data = json.loads(out)
        except ValueError as e:
            raise StoreError(f"`nix path-info --json` printed invalid JSON: {e}") from None
        infos = parse_path_info(data, self.store_dir)
        for p in paths:
            if p not in infos:
                raise InvalidPathError(p, "missing from `nix path-info` output")
        return infos

    async def _ask_daemon(self, socket: str, paths: list[str], recursive: bool) -> dict[str, PathInfo] | None:
        """Path info over the daemon's socket, on a connection kept between calls (the daemon starts a
        process for each); None when the daemon's protocol is too old (then `nix` is asked, from now on)."""
        async with self._daemon_lock:
            for kept in (True, False):
                try:
                    async with asyncio.timeout(TIMEOUT):  # the handshake too: a daemon that never answers
                        if self._daemon is None:
                            kept = False
                            self._daemon = await nixdaemon.DaemonConnection.open(socket)
                        ask = self._daemon.closure if recursive else self._daemon.path_infos
                        answers = await ask(paths)
                    break
                except nixdaemon.Unsupported:
                    self._socket = None
                    return None
                except (nixdaemon.DaemonError, OSError, TimeoutError) as e:
                    await self.close()  # what it still has to say is unknown: never read it again
                    if kept and isinstance(e, nixdaemon.Closed | ConnectionError):
                        continue  # closed while it waited (the daemon was restarted): once more on a new one
                    what = f"no answer within {TIMEOUT:g} s" if isinstance(e, TimeoutError) else str(e)
                    raise StoreError(f"nix-daemon ({socket}): {what}") from None
        out: dict[str, PathInfo] = {}
        for path, info in answers.items():
            if info is None:
                raise InvalidPathError(path)
            out[path] = info
        return out

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
        """The output paths of the given .drv files, whether built or not (`nix-store --query --outputs`,
        which every Nix answers the same way, unlike `nix path-info X.drv`)."""
        drvs = list(drvs)
        if not drvs:
            return []

        async def query(some: list[str]) -> list[str]:
            return (await self._run(["nix-store", "--query", "--outputs", *some])).decode().split()

        async def realised(drv: str) -> list[str]:
            # a floating content-addressed .drv has no output path until built: the built ones are in
            # its realisations (Nix 2.8 passes the hook no OUT_PATHS, so this is how its outputs are found)
            return [f"{self.store_dir}/{r.out_path}" for r in await self.realisations([drv])]

        return await _at_once_or_each(drvs, query, FLOATING, realised)

    async def realisations(self, drvs: Iterable[str]) -> list[Realisation]:
        """The realisations of every built output of these .drv files (`nix realisation info --json`), one
        call for all. Nix answers for all of a .drv's outputs or fails when one is not built (an output
        nobody asked for): then each .drv is asked alone, then (2.13+) each output, and what is not built
        is left out."""
        drvs = list(drvs)
        if not drvs:
            return []
        version = nix_version(await self.version())

        async def ask(installables: list[str]) -> list[Realisation]:
            out = await self._run(["nix", *CA_FLAGS, "realisation", "info", "--json", *installables])
            try:
                return parse_store(json.loads(out), self.store_dir)
            except (ValueError, RealisationError) as e:
                raise StoreError(f"`nix realisation info --json` printed something unexpected: {e}") from None

        async def of_drvs(some: list[str]) -> list[Realisation]:
            return await ask([outputs_installable(d, version) for d in some])

        async def by_output(drv: str) -> list[Realisation]:
            if version < (2, 13):
                return []  # no way to name one output: the .drv's resolution carries them
            try:
                with open(drv, "rb") as f:
                    names = [o.name for o in derivation.parse(f.read()).outputs]
            except (OSError, derivation.DerivationError):
                return []

            async def of_outputs(some: list[str]) -> list[Realisation]:
                return await ask([outputs_installable(drv, version, n) for n in some])

            return await _at_once_or_each(names, of_outputs, UNBUILT, _nothing, at_once=False)

        return await _at_once_or_each(drvs, of_drvs, UNBUILT, by_output)

    async def resolve(self, paths: Iterable[str]) -> list[str]:
        """`paths` with every .drv replaced by those of its outputs that are in the store, in order; a .drv
        with none of its outputs built is an error."""
        paths = list(paths)
        drvs = [p for p in paths if p.endswith(".drv")]
        if not drvs:
            return paths
        built = {d: [o for o in await self.outputs([d]) if os.path.lexists(o)] for d in drvs}
        for d, outs in built.items():
            if not outs:
                raise StoreError(f"none of the outputs of {d} is in the store (build it first)")
        return [o for p in paths for o in built.get(p, [p])]


async def _at_once_or_each(
    items: list[str],
    ask: Callable[[list[str]], Awaitable[list[T]]],
    refusals: Iterable[str],
    fallback: Callable[[str], Awaitable[list[T]]],
    at_once: bool = True,
) -> list[T]:
    """Ask Nix about all `items` at once, or (when it refuses with one of `refusals`, or `at_once` is
    off) one at a time, taking `fallback(item)` for an item it refuses alone."""
    if at_once:
        try:
            return await ask(items)
        except StoreError as e:
            if not any(w in str(e) for w in refusals):
                raise
    found: list[T] = []
    for item in items:
        try:
            found += await ask([item])
        except StoreError as e:
            if not any(w in str(e) for w in refusals):
                raise
            found += await fallback(item)
    return found


async def _nothing(_item: str) -> list[T]:
    return []
