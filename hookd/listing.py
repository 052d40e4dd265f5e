"""NAR listings (`<hashpart>.ls`): the JSON tree of a NAR, as Nix writes it with `write-nar-listing=true`.

`{"version": 1, "root": NODE}`; a NODE is `{"type": "regular", "size": N, "executable": true, "narOffset": N}`
(`executable` only when set; `narOffset` is where the file's contents start in the uncompressed NAR),
`{"type": "symlink", "target": T}` or `{"type": "directory", "entries": {NAME: NODE, …}}`. Clients that read
a listing (`nix store ls`/`cat` on a lazy NAR accessor, cache indexers) fetch a file's bytes with a range
request at `narOffset`, so every offset must be exact.

Every offset follows from the NAR's structure alone (names, types, sizes and symlink targets, never file
contents), so a listing is computed two ways, with the same result: from one lstat walk of the path on disk
(`from_path`), or from the NAR byte stream as it is dumped (`ListingBuilder`, fed chunk by chunk; it skips
file contents without keeping them). `nar_size` gives the NAR length a listing implies, which `hookd verify`
compares with the narinfo's NarSize without reading the NAR.

Pure: no I/O beyond the lstat walk of `from_path`.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from typing import Any

from . import encoding

CONTENT_TYPE = "application/json"
VERSION = 1
_U64 = struct.Struct("<Q")
_SKIP = 1 << 62  # flags a parser request to skip bytes (file contents) rather than read them

Node = dict[str, Any]


class ListingError(ValueError):
    """A listing (or the NAR it is built from) is malformed, or a name cannot be written as JSON."""


def key(hash_part: str) -> str:
    """Where the listing of a store path lives in a cache: next to its narinfo."""
    return f"{hash_part}.ls"


def _tok(n: int) -> int:
    """Bytes a NAR string of length n takes: the u64 length, the bytes, zero padding to 8."""
    return 8 + n + (-n % 8)


_OPEN = _tok(1)  # "(" and ")"
_TYPE = _tok(4) + _tok(7)  # "type" "regular" / "symlink"
_DIR_TYPE = _tok(4) + _tok(9)  # "type" "directory"
_EXEC = _tok(10) + _tok(0)  # "executable" ""
_CONTENTS = _tok(8)  # "contents"
_TARGET = _tok(6)  # "target"
_ENTRY = _tok(5) + _OPEN + _tok(4)  # "entry" "(" "name"
_NODE = _tok(4)  # "node"
_MAGIC = _tok(len(b"nix-archive-1"))


def _name(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        # Nix's JSON writer refuses such a name too (it writes no listing for the path)
        raise ListingError(f"name {raw!r} is not UTF-8: a listing cannot hold it") from None


def _regular(offset: int, size: int, executable: bool) -> tuple[Node, int]:
    """A regular file node starting at `offset` (its "("), and the offset after its ")"."""
    node: Node = {"type": "regular", "size": size}
    if executable:
        node["executable"] = True
    start = offset + _OPEN + _TYPE + (_EXEC if executable else 0) + _CONTENTS + 8
    node["narOffset"] = start
    return node, start + size + (-size % 8) + _OPEN


def _symlink(offset: int, target: bytes) -> tuple[Node, int]:
    return {"type": "symlink", "target": _name(target)}, offset + _OPEN + _TYPE + _TARGET + _tok(len(target)) + _OPEN


# --- from the file system ---------------------------------------------------------------------------


def from_path(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The listing of the NAR that `nar.dump(path)` writes, from one lstat walk (file contents are not read)."""
    root, _ = _walk(os.fsencode(path), _MAGIC)
    return {"version": VERSION, "root": root}


def _walk(path: bytes, offset: int) -> tuple[Node, int]:
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        return _regular(offset, st.st_size, bool(st.st_mode & stat.S_IXUSR))
    if stat.S_ISLNK(st.st_mode):
        return _symlink(offset, os.readlink(path))
    if not stat.S_ISDIR(st.st_mode):
        raise ListingError(f"{os.fsdecode(path)}: cannot list a file of type {stat.S_IFMT(st.st_mode):o}")
    entries: dict[str, Node] = {}
    offset += _OPEN + _DIR_TYPE
    for name in sorted(os.listdir(path)):
        offset += _ENTRY + _tok(len(name)) + _NODE
        entries[_name(name)], offset = _walk(path + b"/" + name, offset)
        offset += _OPEN
    return {"type": "directory", "entries": entries}, offset + _OPEN


# --- from the NAR byte stream -----------------------------------------------------------------------


class ListingBuilder:
    """Builds the listing of a NAR fed to it in chunks of any size, as it is dumped or downloaded.

    Memory holds the tree and at most one token (names and targets, bounded); file contents are counted
    and skipped. `finish()` returns the listing once the whole NAR has been fed, and raises ListingError
    if it was malformed or truncated."""

    MAX_TOKEN = 1 << 16

    def __init__(self) -> None:
        self.offset = 0  # bytes consumed
        self._buf = bytearray()
        self._skip = 0  # contents (and padding) still to skip
        self._gen = self._parse()
        self._want: int = next(self._gen)  # bytes the parser needs next; -1 once the NAR is complete
        self._root: Node | None = None
        self.error: str | None = None  # why the NAR could not be read; further bytes are ignored

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the NAR; raises ListingError (once, then ignores the rest) on a bad NAR."""
        if self.error is not None:
            return
        try:
            self._feed(data)
        except ListingError as e:
            self.error = str(e)
            raise

    def _feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                self.offset += n
                view = view[n:]
                if self._skip == 0:
                    self._step(b"")
                continue
            if self._want < 0:
                raise ListingError(f"trailing bytes after the NAR at byte {self.offset}")
            n = min(self._want - len(self._buf), len(view))
            self._buf += view[:n]
            self.offset += n
            view = view[n:]
            if len(self._buf) == self._want:
                data_, self._buf = bytes(self._buf), bytearray()
                self._step(data_)

    def _step(self, data: bytes) -> None:
        try:
            want = self._gen.send(data)
            while want == 0:  # an empty token's padding: nothing to wait for
                want = self._gen.send(b"")
        except StopIteration:
            want = -1
        if want > 0 and want & _SKIP:  # a request to skip, not to read
            self._skip, self._want = want & ~_SKIP, 0
        else:
            self._want = want

    def finish(self) -> dict[str, Any]:
        if self.error is not None:
            raise ListingError(self.error)
        if self._root is None or self._skip or self._buf or self._want >= 0:
            raise ListingError(f"NAR truncated at byte {self.offset}")
        return {"version": VERSION, "root": self._root}

    # The parser is a generator: it yields how many bytes it wants next (or _SKIP | n to skip n bytes)
    # and receives them.

    def _parse(self) -> Any:
        if (yield from self._string()) != b"nix-archive-1":
            raise ListingError("not a NAR (no nix-archive-1 magic)")
        self._root = yield from self._node()

    def _string(self, limit: int = MAX_TOKEN) -> Any:
        (n,) = _U64.unpack((yield 8))
        if n > limit:
            raise ListingError(f"NAR token of {n} bytes at byte {self.offset} is too long")
        data = yield n + (-n % 8)
        if any(data[n:]):
            raise ListingError(f"non-zero NAR padding at byte {self.offset}")
        return data[:n]

    def _expect(self, *words: bytes) -> Any:
        for word in words:
            got = yield from self._string()
            if got != word:
                raise ListingError(f"expected {word!r} at byte {self.offset}, got {got[:40]!r}")

    def _node(self) -> Any:
        yield from self._expect(b"(", b"type")
        kind = yield from self._string()
        if kind == b"regular":
            tag = yield from self._string()
            executable = tag == b"executable"
            if executable:
                yield from self._expect(b"")
                tag = yield from self._string()
            if tag != b"contents":
                raise ListingError(f"expected 'contents' at byte {self.offset}, got {tag[:40]!r}")
            (size,) = _U64.unpack((yield 8))
            node: Node = {"type": "regular", "size": size}
            if executable:
                node["executable"] = True
            node["narOffset"] = self.offset
            total = size + (-size % 8)
            if total:
                yield _SKIP | total
            yield from self._expect(b")")
            return node
        if kind == b"symlink":
            yield from self._expect(b"target")
            target = yield from self._string(4096)
            yield from self._expect(b")")
            return {"type": "symlink", "target": _name(target)}
        if kind != b"directory":
            raise ListingError(f"unknown NAR node type {kind[:40]!r}")
        entries: dict[str, Node] = {}
        previous: bytes | None = None
        while True:
            tag = yield from self._string()
            if tag == b")":
                return {"type": "directory", "entries": entries}
            if tag != b"entry":
                raise ListingError(f"expected 'entry' or ')' at byte {self.offset}, got {tag[:40]!r}")
            yield from self._expect(b"(", b"name")
            name = yield from self._string(255)
            if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
                raise ListingError(f"invalid NAR entry name {name!r}")
            if previous is not None and name <= previous:
                raise ListingError(f"NAR entries out of order: {name!r} after {previous!r}")
            previous = name
            yield from self._expect(b"node")
            entries[_name(name)] = yield from self._node()
            yield from self._expect(b")")


def from_nar(data: bytes) -> dict[str, Any]:
    """The listing of a whole NAR in memory (tests, small archives)."""
    builder = ListingBuilder()
    builder.feed(data)
    return builder.finish()


# --- rendering and reading --------------------------------------------------------------------------


def render(listing: dict[str, Any]) -> bytes:
    """Compact JSON with sorted keys: byte for byte what Nix 2.19+ writes (nlohmann's object is a sorted
    map); Nix 2.8 writes the same values in another key order."""
    return json.dumps(listing, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse(data: bytes) -> dict[str, Any]:
    """A listing read from a cache (as stored, or decoded), checked for the shape clients rely on; raises
    ListingError."""
    try:
        listing = json.loads(encoding.decode(data))
    except (ValueError, UnicodeDecodeError) as e:  # EncodingError is a ValueError
        raise ListingError(f"not JSON: {e}") from None
    if not isinstance(listing, dict) or listing.get("version") != VERSION or "root" not in listing:
        raise ListingError('not a NAR listing ({"version": 1, "root": …})')
    _check(listing["root"], "/")
    return listing


def _check(node: Any, where: str) -> None:
    if not isinstance(node, dict):
        raise ListingError(f"{where}: not an object")
    kind = node.get("type")
    if kind == "regular":
        size, offset = node.get("size"), node.get("narOffset")
        if not isinstance(size, int) or size < 0 or not isinstance(offset, int) or offset <= 0:
            raise ListingError(f"{where}: a regular file needs a size and a narOffset")
        if node.get("executable", False) not in (True, False):
            raise ListingError(f"{where}: executable must be true or false")
    elif kind == "symlink":
        if not isinstance(node.get("target"), str):
            raise ListingError(f"{where}: a symlink needs a target")
    elif kind == "directory":
        entries = node.get("entries")
        if not isinstance(entries, dict):
            raise ListingError(f"{where}: a directory needs entries")
        for name, child in entries.items():
            if not name or "/" in name or name in (".", ".."):
                raise ListingError(f"{where}: invalid entry name {name!r}")
            _check(child, f"{where.rstrip('/')}/{name}")
    else:
        raise ListingError(f"{where}: unknown type {kind!r}")


def nar_size(listing: dict[str, Any]) -> int:
    """The length of the NAR the listing describes (what the narinfo's NarSize must say)."""
    return _size(listing["root"], _MAGIC)


def _size(node: Node, offset: int) -> int:
    kind = node["type"]
    if kind == "regular":
        return _regular(offset, int(node["size"]), bool(node.get("executable")))[1]
    if kind == "symlink":
        return _symlink(offset, str(node["target"]).encode())[1]
    offset += _OPEN + _DIR_TYPE
    for name in sorted(node["entries"], key=str.encode):
        offset = _size(node["entries"][name], offset + _ENTRY + _tok(len(name.encode())) + _NODE) + _OPEN
    return offset + _OPEN
