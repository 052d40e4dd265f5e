"""A client of nix-daemon's worker protocol for the question hookd asks most: the info of a closure.

`nix path-info --recursive` answers a closure of 1000 small paths in about 90 ms here: a process
start, then one round trip to the daemon per path. Asked over the daemon's socket directly, all the
queries of one level of the closure go out in one write and the whole closure takes about 15 ms.
Only the handshake and QueryPathInfo are spoken; everything else stays with Nix's commands
(store.py), which also answer whenever the store is not a daemon's or the daemon is too old.

The wire format (little-endian 64-bit integers; byte strings as a length, the bytes and zeros up to
a multiple of 8) is read by pure functions over a buffer (`Wire`), apart from the socket
(`DaemonConnection`).
"""

from __future__ import annotations

import asyncio
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

from .nar import token
from .pathinfo import PathInfo

T = TypeVar("T")

MAGIC_1 = 0x6E697863  # "nixc": client hello
MAGIC_2 = 0x6478696F  # "dxio": server hello
STDERR_NEXT = 0x6F6C6D67
STDERR_ERROR = 0x63787470
STDERR_LAST = 0x616C7473
STDERR_START_ACTIVITY = 0x53545254
STDERR_STOP_ACTIVITY = 0x53544F50
STDERR_RESULT = 0x52534C54
OP_QUERY_PATH_INFO = 26

CLIENT_VERSION = 1 << 8 | 34  # 1.34 (Nix 2.8): newer daemons speak it too, without the extras of 1.35+
OLDEST_MINOR = 26  # errors as structured messages (Nix 2.4+); an older daemon is asked through `nix`
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Nix colours the paths in its messages
PIPELINE = 512  # queries in one write (sent by the transport while their answers are read)


class Incomplete(Exception):
    """The buffer ends inside a message: read more, then parse it again from its start."""


class DaemonError(Exception):
    """The daemon reported an error, or could not be reached or understood."""


class Closed(DaemonError):
    """The daemon closed the connection (it was restarted, or gave up on this client)."""


class ProtocolError(DaemonError):
    """The daemon said something this client does not understand."""


class Unsupported(DaemonError):
    """The daemon speaks a protocol older than this client needs: ask through `nix` instead."""


def u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def query_path_info(path: str) -> bytes:
    return u64(OP_QUERY_PATH_INFO) + token(path.encode())


class Wire:
    """Reads the wire format from a growing buffer; `Incomplete` when it ends too soon."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0

    def feed(self, data: bytes) -> None:
        if self.pos > 1 << 16:  # drop what has been read, now and then
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data

    def u64(self) -> int:
        if len(self.buf) - self.pos < 8:
            raise Incomplete
        (n,) = struct.unpack_from("<Q", self.buf, self.pos)
        self.pos += 8
        return int(n)

    def blob(self) -> bytes:
        n = self.u64()
        end = self.pos + n + (-n % 8)
        if n > 1 << 26:  # no answer of this protocol holds a string of 64 MiB
            raise ProtocolError(f"nix-daemon sent a string of {n} bytes")
        if len(self.buf) < end:
            raise Incomplete
        data = bytes(self.buf[self.pos : self.pos + n])
        self.pos = end
        return data

    def text(self) -> str:
        return self.blob().decode(errors="replace")

    def texts(self) -> list[str]:
        return [self.text() for _ in range(self.u64())]


def read_logs(w: Wire) -> None:
    """Skip the daemon's log messages up to the end of an answer's logs; raise the error it reports."""
    while True:
        kind = w.u64()
        if kind == STDERR_LAST:
            return
        if kind == STDERR_NEXT:
            w.blob()
        elif kind == STDERR_START_ACTIVITY:
            w.u64(), w.u64(), w.u64(), w.blob()  # id, level, type, text
            _fields(w)
            w.u64()  # parent
        elif kind == STDERR_STOP_ACTIVITY:
            w.u64()
        elif kind == STDERR_RESULT:
            w.u64(), w.u64()  # activity, type
            _fields(w)
        elif kind == STDERR_ERROR:
            w.blob(), w.u64(), w.blob()  # "Error", level, name
            message = w.text()
            w.u64()  # no position
            for _ in range(w.u64()):  # traces: position, text
                w.u64(), w.blob()
            raise DaemonError(ANSI.sub("", message).strip())
        else:
            raise ProtocolError(f"nix-daemon sent an unknown message {kind:#x}")


def _fields(w: Wire) -> None:
    for _ in range(w.u64()):
        if w.u64() == 0:
            w.u64()
        else:
            w.blob()


def read_path_info(w: Wire, path: str) -> PathInfo | None:
    """The answer to QueryPathInfo of `path` (None: not valid in the store)."""
    read_logs(w)
    if not w.u64():
        return None
    deriver, nar_hash, references = w.text(), w.text(), w.texts()
    w.u64()  # registration time
    nar_size, _ultimate, sigs, ca = w.u64(), w.u64(), w.texts(), w.text()
    try:
        digest = bytes.fromhex(nar_hash)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ProtocolError(f"nix-daemon gave {path} the NAR hash {nar_hash!r}, not a SHA-256 in hex")
    return PathInfo(path, digest, nar_size, tuple(sorted(references)), deriver or None, ca or None, tuple(sigs))


def socket_for(store_uri: str | None, env: Mapping[str, str]) -> str | None:
    """The daemon socket a `nix` command would use for `store_uri` (else the environment's NIX_REMOTE),
    or None when it would use another kind of store. Nix's own rule for "auto": the local store if its
    state directory is writable, else the daemon if its socket exists."""
    uri = store_uri or env.get("NIX_REMOTE") or "auto"
    state = env.get("NIX_STATE_DIR") or "/nix/var/nix"
    default = env.get("NIX_DAEMON_SOCKET_PATH") or f"{state}/daemon-socket/socket"
    if uri == "daemon":
        return default
    if uri.startswith("unix://") and "?" not in uri:
        return uri.removeprefix("unix://") or default
    if uri == "auto" and not os.access(state, os.R_OK | os.W_OK) and os.path.exists(default):
        return default
    return None


class DaemonConnection:
    """One connection to nix-daemon (a daemon process of its own on the other side)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.wire = Wire()
        self.version = ""

    @classmethod
    async def open(cls, socket_path: str) -> DaemonConnection:
        try:
            reader, writer = await asyncio.open_unix_connection(socket_path)
        except OSError as e:
            raise DaemonError(f"cannot reach nix-daemon at {socket_path}: {e.strerror or e}") from None
        conn = cls(reader, writer)
        try:
            await conn._handshake()
        except BaseException:
            conn.close()
            raise
        return conn

    async def _handshake(self) -> None:
        self.writer.write(u64(MAGIC_1))
        if await self._read(Wire.u64) != MAGIC_2:
            raise ProtocolError("nix-daemon did not answer its protocol's greeting")
        server = await self._read(Wire.u64)
        minor = min(server, CLIENT_VERSION) & 0xFF
        if server >> 8 != 1 or minor < OLDEST_MINOR:
            raise Unsupported(f"nix-daemon speaks protocol {server >> 8}.{server & 0xFF}")
        self.writer.write(u64(CLIENT_VERSION) + u64(0) + u64(0))  # no CPU affinity, no reserved space
        if minor >= 33:
            self.version = await self._read(Wire.text)
        await self._read(read_logs)

    async def _read(self, parse: Callable[[Wire], T]) -> T:
        while True:
            start = self.wire.pos
            try:
                return parse(self.wire)
            except Incomplete:
                self.wire.pos = start
            data = await self.reader.read(1 << 18)
            if not data:
                raise Closed("nix-daemon closed the connection")
            self.wire.feed(data)

    async def path_infos(self, paths: Sequence[str]) -> dict[str, PathInfo | None]:
        """QueryPathInfo of every path, pipelined."""
        out: dict[str, PathInfo | None] = {}
        for at in range(0, len(paths), PIPELINE):
            chunk = paths[at : at + PIPELINE]
            self.writer.write(b"".join(query_path_info(p) for p in chunk))  # sent while the answers are read
            for path in chunk:
                out[path] = await self._read(lambda w, p=path: read_path_info(w, p))  # type: ignore[misc]
        return out

    async def closure(self, roots: Iterable[str]) -> dict[str, PathInfo | None]:
        """The info of `roots` and everything they refer to, a level of the closure per pipeline."""
        out: dict[str, PathInfo | None] = {}
        level = list(dict.fromkeys(roots))
        while level:
            infos = await self.path_infos(level)
            out.update(infos)
            refs = {r for i in infos.values() if i is not None for r in i.references}
            level = sorted(refs.difference(out))
        return out

    def close(self) -> None:
        self.writer.close()
