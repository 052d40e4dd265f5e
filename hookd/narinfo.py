"""narinfo files: rendering exactly as Nix writes them, lenient parsing of what real caches hold, and
the fingerprint that signatures cover.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from . import encoding, nixbase32, storepath

COMPRESSION_EXT = {"zstd": ".zst", "xz": ".xz", "bzip2": ".bz2", "br": ".br", "gzip": ".gz", "none": ""}
CONTENT_TYPE = "text/x-nix-narinfo"


class NarInfoError(ValueError):
    """A narinfo is malformed (the message names the field)."""


@dataclass
class NarInfo:
    store_path: str
    url: str
    nar_hash: bytes
    nar_size: int
    compression: str = "none"
    file_hash: bytes | None = None
    file_size: int | None = None
    references: list[str] = field(default_factory=list)  # base names
    deriver: str | None = None  # base name
    sigs: list[str] = field(default_factory=list)
    ca: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # fields read but never written

    @property
    def store_dir(self) -> str:
        return self.store_path.rsplit("/", 1)[0]

    @property
    def hash_part(self) -> str:
        return storepath.hash_part(self.store_path)

    @property
    def reference_paths(self) -> list[str]:
        return [f"{self.store_dir}/{r}" for r in self.references]

    def fingerprint(self) -> str:
        return fingerprint(self.store_path, self.nar_hash, self.nar_size, self.reference_paths)

    def render(self) -> str:
        """The narinfo text, field for field as Nix writes it (no unknown fields)."""
        lines = [f"StorePath: {self.store_path}", f"URL: {self.url}", f"Compression: {self.compression}"]
        if self.file_hash is not None:
            lines.append(f"FileHash: {nixbase32.format_hash(self.file_hash)}")
        if self.file_size is not None:
            lines.append(f"FileSize: {self.file_size}")
        lines.append(f"NarHash: {nixbase32.format_hash(self.nar_hash)}")
        lines.append(f"NarSize: {self.nar_size}")
        lines.append("References: " + " ".join(sorted(self.references)))
        if self.deriver:
            lines.append(f"Deriver: {self.deriver}")
        lines.extend(f"Sig: {s}" for s in self.sigs)
        if self.ca:
            lines.append(f"CA: {self.ca}")
        return "".join(line + "\n" for line in lines)


def fingerprint(store_path: str, nar_hash: bytes, nar_size: int, references: Iterable[str]) -> str:
    """`1;<path>;sha256:<nix32>;<size>;<sorted full reference paths, comma-joined>`."""
    refs = ",".join(sorted(references))
    return f"1;{store_path};{nixbase32.format_hash(nar_hash)};{nar_size};{refs}"


def parse(text: str | bytes, store_dir: str | None = None) -> NarInfo:
    """Parse a narinfo as found in the wild: any field order, SRI or hex hashes, CRLF, unknown fields, and
    bytes still in their Content-Encoding (a transport that does not decode, such as S3's GetObject)."""
    fields, sigs = _fields(text)
    path = _need(fields, "StorePath")
    try:
        storepath.check(path, store_dir or path.rsplit("/", 1)[0])
    except storepath.StorePathError as e:
        raise NarInfoError(f"StorePath: {e}") from None
    url = _need(fields, "URL")
    try:
        nar_hash = nixbase32.parse_hash(_need(fields, "NarHash"))
        file_hash = nixbase32.parse_hash(fields.pop("FileHash")) if "FileHash" in fields else None
    except (ValueError, KeyError) as e:
        raise NarInfoError(f"bad hash: {e}") from None
    try:
        nar_size = int(_need(fields, "NarSize"))
        file_size = int(fields.pop("FileSize")) if "FileSize" in fields else None
    except ValueError as e:
        raise NarInfoError(f"bad size: {e}") from None
    if nar_size < 0 or (file_size is not None and file_size < 0):
        raise NarInfoError("negative size")
    return NarInfo(
        store_path=path,
        url=url,
        nar_hash=nar_hash,
        nar_size=nar_size,
        compression=fields.pop("Compression", "bzip2"),
        file_hash=file_hash,
        file_size=file_size,
        references=_references(fields.pop("References", "")),
        deriver=_deriver(fields.pop("Deriver", None)),
        sigs=sigs,
        ca=fields.pop("CA", None) or None,
        extra=fields,
    )


def _fields(text: str | bytes) -> tuple[dict[str, str], list[str]]:
    """The `Name: value` lines: each field once, but `Sig` any number of times."""
    if isinstance(text, bytes):
        try:
            text = encoding.decode(text).decode()  # stored with a Content-Encoding (gzip, zstd)?
        except encoding.EncodingError as e:
            raise NarInfoError(f"narinfo {e}") from None
        except UnicodeDecodeError:
            raise NarInfoError("narinfo is not UTF-8 text") from None
    fields: dict[str, str] = {}
    sigs: list[str] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r")
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep or not key or " " in key:
            raise NarInfoError(f"line {n} is not 'Name: value': {line[:80]!r}")
        value = value.strip()
        if key == "Sig":
            sigs.append(value)
        elif key in fields:
            raise NarInfoError(f"field {key} appears twice")
        else:
            fields[key] = value
    return fields, sigs


def _need(fields: dict[str, str], key: str) -> str:
    if key not in fields:
        raise NarInfoError(f"missing mandatory field {key}")
    return fields.pop(key)


def _references(value: str) -> list[str]:
    refs = []
    for r in value.split():
        base = storepath.basename(r)
        try:
            storepath.check_basename(base)
        except storepath.StorePathError as e:
            raise NarInfoError(f"References: {e}") from None
        refs.append(base)
    return refs


def _deriver(value: str | None) -> str | None:
    if value in (None, "", "unknown-deriver"):
        return None
    return storepath.basename(value)


def nar_key(file_hash: bytes, compression: str) -> str:
    """Where a compressed NAR lives: `nar/<nix32 of the file's sha256>.nar<ext>`."""
    return f"nar/{nixbase32.encode(file_hash)}.nar{COMPRESSION_EXT[compression]}"


def narinfo_key(store_path: str) -> str:
    return f"{storepath.hash_part(store_path)}.narinfo"


def cache_info(store_dir: str, priority: int) -> str:
    return f"StoreDir: {store_dir}\nWantMassQuery: 1\nPriority: {priority}\n"
