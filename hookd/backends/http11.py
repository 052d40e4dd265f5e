"""A small HTTP/1.1 client for one origin: what the HTTP backend needs and no more.

Keep-alive connections (at most `limit` at once, the idle ones reused last-in first-out), a request body
given whole or streamed with chunked transfer encoding, a response read whole or as a stream, and a
bound on every wait: connecting, and each read or write that makes no progress. A read's bound is a
timer that cuts the connection; the request then fails with a TimeoutError that names the origin and
the bound, never with an answer cut short (`_read`).

Why not aiohttp: it costs 110-150 µs of CPU per small request here against ~30 µs for this, and its
upload path stops near 230 MiB/s on loopback; a cache upload of a thousand small paths is three thousand
requests, and a large NAR sent as itself is bounded by the sending side only.

Safety of reuse: a server may close an idle connection at any moment. A request whose body can be sent
again is retried once on a fresh connection when a reused one fails before any byte of the answer came
back (the server saw, at most, a request it did not answer). A streamed body cannot be sent twice, so it
goes on a fresh connection or one that was idle only briefly and has not been closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable
from dataclasses import dataclass, field

MAX_HEAD = 64 << 10
"""The longest status line and headers accepted (a server's answer head is a few hundred bytes)."""
STREAM_IDLE = 2.0
"""A connection idle longer than this is not used for a body that cannot be sent again."""
IDLE_MAX = 4.0
"""Idle connections older than this are closed, not reused: below the shortest keep-alive timeout in
common use (Apache's 5 s), so the server rarely closes one under a request."""
NO_BODY_STATUS = frozenset({204, 304})
READ = 1 << 20
ONE_WRITE = 64 << 10
"""A request body up to this size goes out in one write with the request's head."""
SLICE = 1 << 20
"""A larger body given whole goes out a slice at a time, each written once the last one left: the
transport copies what the socket does not take at once, and a part of 16 MiB would otherwise be
copied whole on the loop (and held twice)."""

Body = bytes | AsyncIterable[bytes] | None


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 as this client reads it."""


TRANSIENT = (OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError)
"""What a request can fail with short of an answer: the connection, a timeout, a garbled answer. Their
texts name at most the host and port, never a credential (those are only in request headers)."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # names in lower case; a repeated header keeps its last value
    body: bytes = b""


def request_head(method: str, target: str, host: str, headers: dict[str, str], length: int | None) -> bytes:
    """The request line and headers; `length` None means a chunked body."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if length is None:
        lines.append("Transfer-Encoding: chunked")
    elif length or method in ("PUT", "POST", "PROPFIND"):
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_head(head: bytes) -> tuple[str, int, dict[str, str]]:
    """(version, status, headers) of an answer's head (ending with an empty line)."""
    try:
        text = head.decode("latin-1")
        status_line, *header_lines = text.split("\r\n")
        version, code = status_line.split(" ", 2)[:2]
        status = int(code)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(f"not an HTTP status line: {head[:80]!r}") from None
    if not version.startswith("HTTP/1.") or not 100 <= status <= 999:
        raise ProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    headers = {}
    for line in header_lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"malformed header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return version, status, headers


def framing(method: str, status: int, headers: dict[str, str]) -> str:
    """How an answer's body is delimited: "none", "chunked", "length", or "to the end" (of the connection)."""
    if method == "HEAD" or status in NO_BODY_STATUS:
        return "none"
    if headers.get("transfer-encoding", "").lower().endswith("chunked"):
        return "chunked"
    return "length" if "content-length" in headers else "to the end"


def content_length(headers: dict[str, str]) -> int:
    value = headers["content-length"]
    if not value.isdigit():
        raise ProtocolError(f"bad Content-Length: {value[:40]!r}")
    return int(value)


@dataclass(eq=False)
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = field(default_factory=time.monotonic)
    expired: bool = False  # a read outlived its bound: the connection was cut (Origin._read)

    def usable(self, max_idle: float) -> bool:
        return (
            not self.reader.at_eof()
            and not self.writer.is_closing()
            and time.monotonic() - self.idle_since < max_idle
        )

    def abort(self) -> None:
        """Cut the connection at once (a streamed body is left unfinished: the server commits nothing)."""
        self.writer.transport.abort()

    def expire(self) -> None:
        self.expired = True
        self.abort()


class Origin:
    """Connections to scheme://host:port and requests over them."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.host, self.port, self.tls = host, port, tls
        name = f"[{host}]" if ":" in host else host
        self.host_header = name if port == (443 if tls else 80) else f"{name}:{port}"
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.headers = dict(headers or {})
        self._slots = asyncio.Semaphore(max(1, limit))
        self._idle: list[Connection] = []
        self._closed = False

    async def close(self) -> None:
        """Close the idle connections; those of requests still running close when their answer is read."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abort()

    async def request(
        self,
        method: str,
        target: str,
        headers: dict[str, str] | None = None,
        body: Body = None,
        read_body: bool = False,
    ) -> Response:
        """Send a request and read its answer; its body only if `read_body` (else it is read and dropped).
        The common answer (no body, or a short one with a length) is read in one step, not through
        `stream`'s iterators: most of a small upload's requests are answered so."""
        if isinstance(body, AsyncIterable):
            async with self.stream(method, target, headers, body) as (resp, chunks):
                parts = [c async for c in chunks]
                if read_body:
                    resp.body = b"".join(parts)
                return resp
        async with self._slots:
            conn, resp, keep = await self._send(method, target, headers, body)
            try:
                how = framing(method, resp.status, resp.headers)
                length = content_length(resp.headers) if how == "length" else None
                if how == "none" or length == 0:
                    data = b""
                elif length is not None and length <= READ:
                    data = await self._read(conn, conn.reader.readexactly(length))
                else:  # chunked, long, or to the end of the connection
                    data = b"".join([c async for c in self._body(conn, method, resp)])
            except BaseException:
                conn.abort()
                raise
            if read_body:
                resp.body = data
            self._release(conn, keep)
            return resp

    @contextlib.asynccontextmanager
    async def stream(
        self, method: str, target: str, headers: dict[str, str] | None = None, body: Body = None
    ) -> AsyncIterator[tuple[Response, AsyncIterator[bytes]]]:
        """The answer's head and an iterator over its body. The connection goes back to the pool only if
        the body was read to its end; leaving early closes it. A streamed body that raises cuts the
        connection before the body's end, and its error propagates."""
        async with self._slots:
            conn, resp, keep = await self._send(method, target, headers, body)
            done = False

            async def chunks() -> AsyncIterator[bytes]:
                nonlocal done
                async for chunk in self._body(conn, method, resp):
                    yield chunk
                done = True

            try:
                yield resp, chunks()
            except BaseException:
                conn.abort()
                raise
            if not done:
                conn.abort()
            else:
                self._release(conn, keep)

    async def _send(
        self, method: str, target: str, headers: dict[str, str] | None, body: Body
    ) -> tuple[Connection, Response, bool]:
        """Send the request on a pooled or new connection and read the answer's head (once more on a new
        connection if a reused one was closed under a request that can be sent again)."""
        replayable = not isinstance(body, AsyncIterable)
        conn = self._take(IDLE_MAX if replayable else STREAM_IDLE)
        reused = conn is not None
        try:
            if conn is None:
                conn = await self._connect()
            resp, keep = await self._exchange(conn, method, target, headers, body)
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            if conn is not None:
                conn.abort()
            if not (replayable and reused and not getattr(e, "partial", b"")):
                raise
            conn = await self._connect()  # closed by the server while idle: once more, on a new one
            try:
                resp, keep = await self._exchange(conn, method, target, headers, body)
            except BaseException:
                conn.abort()
                raise
        except BaseException:
            if conn is not None:
                conn.abort()
            raise
        return conn, resp, keep

    def _release(self, conn: Connection, keep: bool) -> None:
        """An answer read to its end: the connection back to the pool, or closed."""
        if keep and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.writer.close()

    def _take(self, max_idle: float) -> Connection | None:
        """The most recently idle connection fit for reuse; None if there is none."""
        while self._idle:
            conn = self._idle.pop()
            if conn.usable(max_idle):
                return conn
            conn.abort()
        return None

    async def _connect(self) -> Connection:
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.tls, server_hostname=self.host if self.tls else None,
                limit=MAX_HEAD,
            )  # fmt: skip
        return Connection(reader, writer)

    async def _exchange(
        self, conn: Connection, method: str, target: str, headers: dict[str, str] | None, body: Body
    ) -> tuple[Response, bool]:
        """Send the request on `conn` and read the answer's head; (the answer, whether the connection may
        be kept once its body is read)."""
        hdrs = {**self.headers, **(headers or {})}
        if isinstance(body, AsyncIterable):
            conn.writer.write(request_head(method, target, self.host_header, hdrs, None))
            await self._send_chunked(conn, body)
        else:
            data = body or b""
            head = request_head(method, target, self.host_header, hdrs, len(data))
            if len(data) <= ONE_WRITE:  # one send, one segment for the server to wake up to
                conn.writer.write(head + data)
            else:
                conn.writer.write(head)
                view = memoryview(data)
                for at in range(0, len(view), SLICE):
                    conn.writer.write(view[at : at + SLICE])
                    await self._drain(conn)
            await self._drain(conn)
        while True:
            try:
                head = await self._read(conn, conn.reader.readuntil(b"\r\n\r\n"))
            except asyncio.LimitOverrunError:
                raise ProtocolError(f"the answer's head is longer than {MAX_HEAD} bytes") from None
            version, status, resp_headers = parse_head(head[:-4])
            if status >= 200:
                break  # 1xx: informational (100 Continue); the answer follows
        connection = resp_headers.get("connection", "").lower()
        keep = (
            "close" not in connection
            and (version != "HTTP/1.0" or "keep-alive" in connection)
            and framing(method, status, resp_headers) != "to the end"  # the body ends with the connection
        )
        return Response(status, resp_headers), keep

    async def _send_chunked(self, conn: Connection, body: AsyncIterable[bytes]) -> None:
        try:
            async for piece in body:
                if piece:
                    conn.writer.write(b"%x\r\n" % len(piece))
                    conn.writer.write(piece)
                    conn.writer.write(b"\r\n")
                    await self._drain(conn)
        except BaseException:
            conn.abort()  # before the last chunk: the server discards what it got
            raise
        conn.writer.write(b"0\r\n\r\n")
        await self._drain(conn)

    async def _drain(self, conn: Connection) -> None:
        if not conn.writer.transport.get_write_buffer_size() and not conn.writer.is_closing():
            return  # all of it went out at once: nothing to wait for (nor a timer to set)
        async with asyncio.timeout(self.read_timeout):
            await conn.writer.drain()

    async def _body(self, conn: Connection, method: str, resp: Response) -> AsyncIterator[bytes]:
        """The answer's body, as its framing says (none, chunked, a length, or up to the connection's end)."""
        reader = conn.reader
        how = framing(method, resp.status, resp.headers)
        if how == "none":
            return
        if how == "chunked":
            while True:
                line = await self._read(conn, reader.readuntil(b"\r\n"))
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size line: {line[:40]!r}") from None
                if size == 0:
                    while (await self._read(conn, reader.readuntil(b"\r\n"))) != b"\r\n":
                        pass  # trailers
                    return
                async for chunk in self._exactly(conn, size):
                    yield chunk
                if await self._read(conn, reader.readexactly(2)) != b"\r\n":
                    raise ProtocolError("a chunk does not end with CRLF")
        elif how == "length":
            async for chunk in self._exactly(conn, content_length(resp.headers)):
                yield chunk
        else:  # to the end: the body ends when the server closes the connection (not kept: _exchange)
            while chunk := await self._read(conn, reader.read(READ)):
                yield chunk

    async def _exactly(self, conn: Connection, n: int) -> AsyncIterator[bytes]:
        while n > 0:
            chunk = await self._read(conn, conn.reader.read(min(n, READ)))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", n)
            n -= len(chunk)
            yield chunk

    async def _read(self, conn: Connection, op: Awaitable[bytes]) -> bytes:
        """`op`, a read on `conn`, bounded by read_timeout: past it the connection is cut (the read ends
        at once, short) and this raises TimeoutError, which is never sent again on a new connection."""
        timer = asyncio.get_running_loop().call_later(self.read_timeout, conn.expire)
        try:
            data = await op
        except (ConnectionError, asyncio.IncompleteReadError):
            if not conn.expired:
                raise
            data = b""
        finally:
            timer.cancel()
        if conn.expired:  # the cut ends a read with an error, or with b"" for a read to the connection's end
            raise TimeoutError(f"no answer from {self.host}:{self.port} within {self.read_timeout:g}s")
        return data
