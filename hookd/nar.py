"""The Nix archive (NAR) format: a streaming writer over a path on disk, and a reader.

Every token is a byte string framed as a u64 little-endian length, the bytes, and zero padding to a
multiple of 8. Only the owner-execute bit is recorded; directory entries come in bytewise name order.
The writer reads files in chunks, so memory stays bounded whatever the size of the path.
"""

from __future__ import annotations

import os
import stat
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, cast

MAGIC = b"nix-archive-1"
CHUNK = 1 << 20
_FLUSH = 1 << 16
_U64 = struct.Struct("<Q")


class NarError(ValueError):
    """The bytes are not a well-formed NAR, or a path on disk cannot be archived."""


def token(data: bytes) -> bytes:
    """Nix's serialised string: its length, its bytes, zeros up to a multiple of 8 (NARs and the
    daemon's protocol, nixdaemon.py)."""
    pad = -len(data) % 8
    return _U64.pack(len(data)) + data + b"\0" * pad


def dump(path: str | os.PathLike[str], chunk_size: int = CHUNK) -> Iterator[bytes]:
    """Yield the NAR serialisation of `path` (a file, symlink or directory) in chunks.

    Small tokens are batched into one chunk of at most about 64 KiB; file contents are read and yielded
    `chunk_size` bytes at a time.
    """
    return cast(Iterator[bytes], _batched(_dump_node(os.fsencode(path), chunk_size, None, top=True)))


def dump_borrowed(path: str | os.PathLike[str], chunk_size: int = CHUNK) -> Iterator[memoryview]:
    """`dump`, with the contents of large files read into a buffer that is used again for the next read:
    a chunk is valid only until the next one is asked for. For consumers that hash and compress each
    chunk at once; no buffer is allocated per chunk (in the daemon, where glibc maps each buffer of
    1 MiB and more on its own, every fresh 1 MiB chunk was mapped, faulted in page by page and
    unmapped). The buffer is this thread's, made once (a small NAR does not pay for clearing 1 MiB)."""
    buffer = _Buffer(chunk_size)
    try:
        for c in _batched(_dump_node(os.fsencode(path), chunk_size, buffer, top=True)):
            yield memoryview(c)
    finally:
        buffer.release()


class _Buffer:
    """A thread's read buffer, borrowed by one dump at a time (another dump on the same thread while
    one holds it gets a fresh one)."""

    _free = threading.local()

    def __init__(self, size: int) -> None:
        self.size = size
        self._view: memoryview | None = None

    def view(self) -> memoryview:
        if self._view is None:
            kept: memoryview | None = getattr(self._free, "view", None)
            self._free.view = None
            self._view = kept if kept is not None and len(kept) == self.size else memoryview(bytearray(self.size))
        return self._view

    def release(self) -> None:
        if self._view is not None:
            self._free.view, self._view = self._view, None


def _batched(pieces: Iterator[bytes | memoryview | None]) -> Iterator[bytes | memoryview]:
    buf = bytearray()
    for piece in pieces:
        if piece is None or (len(piece) >= _FLUSH and not buf):
            if buf:
                yield bytes(buf)
                buf.clear()
            if piece:
                yield piece
            continue
        buf += piece
        if len(buf) >= _FLUSH:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)


def _dump_node(
    path: bytes, chunk_size: int, into: _Buffer | None, top: bool = False
) -> Iterator[bytes | memoryview | None]:
    """Yield tokens; a None asks the caller to flush what it has batched (before a large file body)."""
    if top:
        yield token(MAGIC)
    st = os.lstat(path)
    yield token(b"(")
    if stat.S_ISREG(st.st_mode):
        yield token(b"type") + token(b"regular")
        if st.st_mode & stat.S_IXUSR:
            yield token(b"executable") + token(b"")
        yield token(b"contents")
        yield from _dump_contents(path, st.st_size, chunk_size, into)
    elif stat.S_ISLNK(st.st_mode):
        yield token(b"type") + token(b"symlink") + token(b"target") + token(os.readlink(path))
    elif stat.S_ISDIR(st.st_mode):
        yield token(b"type") + token(b"directory")
        for name in sorted(os.listdir(path)):
            yield token(b"entry") + token(b"(") + token(b"name") + token(name) + token(b"node")
            yield from _dump_node(path + b"/" + name, chunk_size, into)
            yield token(b")")
    else:
        raise NarError(f"{os.fsdecode(path)}: cannot archive a file of type {stat.S_IFMT(st.st_mode):o}")
    yield token(b")")


def _dump_contents(
    path: bytes, size: int, chunk_size: int, into: _Buffer | None
) -> Iterator[bytes | memoryview | None]:
    yield _U64.pack(size)
    if size > _FLUSH:
        yield None
    remaining = size
    view = into.view() if into is not None and size > _FLUSH else None  # small files: a read is cheaper
    with open(path, "rb", buffering=0) as f:
        while remaining:
            want = min(chunk_size, remaining)
            if view is None:
                data: bytes | memoryview = f.read(want)
                n = len(data)
            else:
                n = f.readinto(view[:want])
                data = view[:n]
            if not n:
                raise NarError(f"{os.fsdecode(path)}: file shrank while it was being archived")
            remaining -= n
            yield data
        if f.read(1):
            raise NarError(f"{os.fsdecode(path)}: file grew while it was being archived")
    yield b"\0" * (-size % 8)


# --- reading ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Regular:
    contents: bytes
    executable: bool = False


@dataclass(frozen=True)
class Symlink:
    target: bytes


@dataclass(frozen=True)
class Directory:
    entries: dict[bytes, Node] = field(default_factory=dict)


Node = Regular | Symlink | Directory


class _Reader:
    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.offset = 0

    def exact(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) != n:
            raise NarError(f"NAR truncated at byte {self.offset + len(data)}")
        self.offset += n
        return data

    def token(self, limit: int = 1 << 16) -> bytes:
        (n,) = _U64.unpack(self.exact(8))
        if n > limit:
            raise NarError(f"NAR token of {n} bytes at byte {self.offset} is too long")
        data = self.exact(n)
        self.padding(n)
        return data

    def padding(self, n: int) -> None:
        if any(self.exact(-n % 8)):
            raise NarError(f"non-zero NAR padding at byte {self.offset}")

    def expect(self, *words: bytes) -> None:
        for word in words:
            got = self.token()
            if got != word:
                raise NarError(f"expected {word!r} at byte {self.offset}, got {got[:40]!r}")


def parse(stream: BinaryIO, max_file: int = 1 << 30) -> Node:
    """Read a whole NAR into memory as a tree (for tests and small archives)."""
    r = _Reader(stream)
    r.expect(MAGIC)
    node = _parse_node(r, max_file)
    if stream.read(1):
        raise NarError(f"trailing bytes after the NAR at byte {r.offset}")
    return node


def _parse_node(r: _Reader, max_file: int) -> Node:
    r.expect(b"(", b"type")
    kind = r.token()
    if kind == b"regular":
        executable = False
        tag = r.token()
        if tag == b"executable":
            r.expect(b"")
            executable = True
            tag = r.token()
        if tag != b"contents":
            raise NarError(f"expected 'contents' at byte {r.offset}, got {tag[:40]!r}")
        contents = r.token(limit=max_file)
        r.expect(b")")
        return Regular(contents, executable)
    if kind == b"symlink":
        r.expect(b"target")
        target = r.token(limit=4096)
        r.expect(b")")
        return Symlink(target)
    if kind == b"directory":
        entries: dict[bytes, Node] = {}
        previous: bytes | None = None
        while True:
            tag = r.token()
            if tag == b")":
                return Directory(entries)
            if tag != b"entry":
                raise NarError(f"expected 'entry' or ')' at byte {r.offset}, got {tag[:40]!r}")
            r.expect(b"(", b"name")
            name = r.token(limit=255)
            if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
                raise NarError(f"invalid NAR entry name {name!r}")
            if previous is not None and name <= previous:
                raise NarError(f"NAR entries out of order: {name!r} after {previous!r}")
            previous = name
            r.expect(b"node")
            entries[name] = _parse_node(r, max_file)
            r.expect(b")")
    raise NarError(f"unknown NAR node type {kind[:40]!r}")


def serialise(node: Node) -> bytes:
    """The NAR of an in-memory tree (the inverse of `parse`)."""
    out = [token(MAGIC)]
    _serialise(node, out)
    return b"".join(out)


def _serialise(node: Node, out: list[bytes]) -> None:
    out.append(token(b"("))
    if isinstance(node, Regular):
        out.append(token(b"type") + token(b"regular"))
        if node.executable:
            out.append(token(b"executable") + token(b""))
        out.append(token(b"contents") + token(node.contents))
    elif isinstance(node, Symlink):
        out.append(token(b"type") + token(b"symlink") + token(b"target") + token(node.target))
    else:
        out.append(token(b"type") + token(b"directory"))
        for name in sorted(node.entries):
            out.append(token(b"entry") + token(b"(") + token(b"name") + token(name) + token(b"node"))
            _serialise(node.entries[name], out)
            out.append(token(b")"))
    out.append(token(b")"))


def restore(node: Node, path: str | bytes | os.PathLike[str]) -> None:
    """Write an in-memory tree to disk at `path` (which must not exist)."""
    p = os.fsencode(path)
    if isinstance(node, Regular):
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755 if node.executable else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(node.contents)
    elif isinstance(node, Symlink):
        os.symlink(node.target, p)
    else:
        os.mkdir(p, 0o755)
        for name, child in node.entries.items():
            restore(child, p + b"/" + name)
