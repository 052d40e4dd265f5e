"""Realisations of content-addressed derivations: which store path a derivation's output was built to.

A client evaluating a floating content-addressed derivation (`__contentAddressed = true`) cannot compute its
output paths; it asks the cache for the realisation of each output, then substitutes the path it names.
Two layouts exist (read from Nix's source; the first is measured with Nix 2.8.0, 2.26.3 and 2.34.8):

- Nix 2.4 to 2.34: `realisations/<id>.doi`, `<id>` = `sha256:<hex of the derivation's hash modulo>!<output>`,
  the body `{"dependentRealisations": {ID: OUTBASE}, "id": ID, "outPath": OUTBASE, "signatures": [NAME:SIG]}`;
  a signature covers the body without `signatures`, as compact JSON with sorted keys.
- Nix 2.35: `build-trace-v2/<drv base name>/<output>.doi`, keyed by the *resolved* derivation's path; the body
  is the value only, `{"outPath": OUTBASE, "signatures": [{"keyName": NAME, "sig": SIG}]}`; a signature covers
  `{"key": {"drvPath": DRVBASE, "outputName": OUT}, "value": {"outPath": OUTBASE}}` (compact, sorted).
  Older clients never read it; 2.35 no longer reads `realisations/`. (Written from the documented format:
  no Nix 2.35 runs here.)

The hash modulo is Nix's to compute, so hookd takes realisations from the store (`nix realisation info
--json`) as Nix reports them: the old shape up to 2.34, `{"key", "value"}` from 2.35. A derivation that has
no input derivations is its own resolution, so its old-shape realisations give its 2.35 entries too.

Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from . import storepath
from .signing import PublicKey, SecretKey

CONTENT_TYPE = "application/json"
LEGACY_PREFIX = "realisations/"
TRACE_PREFIX = "build-trace-v2/"
_ID = re.compile(r"^(sha256|sha512|sha1|md5):[0-9a-z+/=]+![A-Za-z0-9+\-._?=]+$")
_OUTPUT = re.compile(r"^[A-Za-z0-9+\-._?=]+$")


class RealisationError(ValueError):
    """A realisation (from Nix or from a cache) is malformed."""


def _json(value: Any) -> str:
    """Compact JSON with sorted keys: what nlohmann's `dump()` writes for these (ASCII) values."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _base(path: str, what: str) -> str:
    base = storepath.basename(path)
    try:
        storepath.check_basename(base)
    except storepath.StorePathError as e:
        raise RealisationError(f"{what}: {e}") from None
    return base


def _signature(sig: Any) -> str:
    """`name:base64`, from a string or 2.35's {"keyName", "sig"}."""
    if isinstance(sig, str) and ":" in sig:
        return sig
    if isinstance(sig, dict) and isinstance(sig.get("keyName"), str) and isinstance(sig.get("sig"), str):
        return f"{sig['keyName']}:{sig['sig']}"
    raise RealisationError(f"unexpected signature {sig!r}")


@dataclass(frozen=True)
class Realisation:
    """One output's realisation, in the layout Nix gave it: `id` set (up to 2.34) or `drv_path` (2.35)."""

    out_path: str  # base name
    output: str
    id: str | None = None  # sha256:<hex>!<output>
    drv_path: str | None = None  # base name of the (resolved) derivation
    dependent: dict[str, str] = field(default_factory=dict)  # id -> out base name (old layout only)
    signatures: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Where this realisation lives in a cache."""
        if self.id is not None:
            return f"{LEGACY_PREFIX}{self.id}.doi"
        return f"{TRACE_PREFIX}{self.drv_path}/{self.output}.doi"

    def fingerprint(self) -> str:
        if self.id is not None:
            return _json({"dependentRealisations": self.dependent, "id": self.id, "outPath": self.out_path})
        return _json(
            {"key": {"drvPath": self.drv_path, "outputName": self.output}, "value": {"outPath": self.out_path}}
        )

    def signed(self, key: SecretKey) -> Realisation:
        """With `key`'s signature added (ed25519 is deterministic: the same as Nix's own with that key)."""
        sigs = sorted({*self.signatures, key.sign(self.fingerprint())})
        return replace(self, signatures=tuple(sigs))

    def verify(self, public_key: PublicKey) -> bool:
        return any(public_key.verify(self.fingerprint(), s) for s in self.signatures)

    def render(self) -> bytes:
        """The `.doi` body, as Nix writes it."""
        sigs = sorted(self.signatures)
        if self.id is not None:
            return _json(
                {"dependentRealisations": self.dependent, "id": self.id, "outPath": self.out_path, "signatures": sigs}
            ).encode()
        structured = [{"keyName": n, "sig": s} for n, _, s in (sig.partition(":") for sig in sigs)]
        return _json({"outPath": self.out_path, "signatures": structured}).encode()

    def as_trace(self, drv_path: str) -> Realisation:
        """This old-layout realisation as the 2.35 entry of `drv_path`, which must be its own resolution
        (a derivation without input derivations); unsigned (the fingerprint differs)."""
        return Realisation(self.out_path, self.output, drv_path=_base(drv_path, "drvPath"))


def parse_store(data: Any, store_dir: str) -> list[Realisation]:
    """`nix realisation info --json` of any supported Nix: a list of realisations, and for paths that are
    not realisations (input-addressed outputs, opaque paths) `{"opaquePath": …}`, which are skipped."""
    if not isinstance(data, list):
        raise RealisationError(f"expected a list from `nix realisation info --json`, got {type(data).__name__}")
    out = []
    for entry in data:
        if not isinstance(entry, dict):
            raise RealisationError(f"unexpected entry {entry!r}")
        if "opaquePath" in entry:
            continue
        out.append(_from_json(entry))
    return out


def _from_json(entry: dict[str, Any]) -> Realisation:
    try:
        if "key" in entry and "value" in entry:  # Nix 2.35
            k, v = entry["key"], entry["value"]
            return _trace(str(k["drvPath"]), str(k["outputName"]), v)
        ident = str(entry["id"])
        if not _ID.match(ident):
            raise RealisationError(f"malformed realisation id {ident!r}")
        dependent = entry.get("dependentRealisations") or {}
        if not isinstance(dependent, dict):
            raise RealisationError("dependentRealisations is not an object")
        return Realisation(
            out_path=_base(str(entry["outPath"]), "outPath"),
            output=ident.rsplit("!", 1)[1],
            id=ident,
            dependent={str(d): _base(str(p), "dependentRealisations") for d, p in dependent.items()},
            signatures=tuple(sorted({_signature(s) for s in entry.get("signatures") or []})),
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise RealisationError(f"malformed realisation {entry!r:.200}: {type(e).__name__} {e}") from None


def _trace(drv_path: str, output: str, value: Any) -> Realisation:
    if not isinstance(value, dict):
        raise RealisationError("a build trace value must be an object")
    if not _OUTPUT.match(output):
        raise RealisationError(f"malformed output name {output!r}")
    return Realisation(
        out_path=_base(str(value["outPath"]), "outPath"),
        output=output,
        drv_path=_base(drv_path, "drvPath"),
        signatures=tuple(sorted({_signature(s) for s in value.get("signatures") or []})),
    )


def parse_cached(key: str, data: bytes) -> Realisation:
    """A realisation read from a cache at `key` (either layout); raises RealisationError."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise RealisationError(f"not JSON: {e}") from None
    if not isinstance(body, dict):
        raise RealisationError("not a JSON object")
    try:
        if key.startswith(LEGACY_PREFIX):
            r = _from_json(body)
            if r.key != key:
                raise RealisationError(f"holds the realisation of {r.id}, which belongs under another key")
            return r
        if key.startswith(TRACE_PREFIX) and key.endswith(".doi") and key.count("/") == 2:
            _, drv, output = key[: -len(".doi")].split("/")
            return _trace(drv, output, body)
    except KeyError as e:
        raise RealisationError(f"missing field {e}") from None
    raise RealisationError(f"{key} is not a realisation's key")


def is_key(key: str) -> bool:
    return key.endswith(".doi") and key.startswith((LEGACY_PREFIX, TRACE_PREFIX))
