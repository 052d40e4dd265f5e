"""The HTTP/1.1 client (hookd/backends/http11.py) against scripted servers on 127.0.0.1: framing (length,
chunked, to the end), keep-alive and its limits, a reused connection the server closed, a streamed
body cut on error, and bounded waits. The backend's behaviour against nginx is in test_backends.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from hookd.backends.http11 import SLICE, Connection, Origin, ProtocolError, parse_head, request_head

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Server:
    """Accepts connections and runs `handler(reader, writer, connection number)` on each."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []

    async def __aenter__(self) -> Server:
        async def on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer, self.connections)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(on, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    def origin(self, limit: int = 4, read_timeout: float = 5.0) -> Origin:
        return Origin("127.0.0.1", self.port, None, limit, 5.0, read_timeout, {"Authorization": "Bearer t"})

    async def read_request(self, reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
        """A request's head and its body (Content-Length or chunked)."""
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if "content-length" in headers:
            return head, await reader.readexactly(int(headers["content-length"]))
        body = b""
        if headers.get("transfer-encoding") == "chunked":
            while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                body += await reader.readexactly(size)
                await reader.readexactly(2)
            await reader.readexactly(2)
        return head, body


def test_request_head_and_parse_head() -> None:
    head = request_head("PUT", "/c/nar/x.nar", "h:8080", {"Content-Type": "a/b"}, 3)
    assert head == b"PUT /c/nar/x.nar HTTP/1.1\r\nHost: h:8080\r\nContent-Type: a/b\r\nContent-Length: 3\r\n\r\n"
    assert b"Content-Length" not in request_head("GET", "/", "h", {}, 0)
    assert b"Transfer-Encoding: chunked\r\n" in request_head("PUT", "/", "h", {}, None)
    assert parse_head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nX-A: b: c") == (
        "HTTP/1.1",
        404,
        {"content-length": "0", "x-a": "b: c"},
    )
    for bad in (b"SSH-2.0-OpenSSH", b"HTTP/1.1 abc", b"HTTP/2 200", b"HTTP/1.1 200 OK\r\nno colon"):
        with pytest.raises(ProtocolError):
            parse_head(bad)


async def test_keep_alive_framings_and_connection_close() -> None:
    """One connection carries answers framed by length and by chunks; `Connection: close` and a body that
    ends with the connection are read whole and the connection is not used again."""
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nT: v\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    ]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n == 2:  # the second connection: an HTTP/1.0 answer whose body ends with the connection
            await srv.read_request(reader)
            writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
            return
        for answer in answers:
            await srv.read_request(reader)
            writer.write(answer)
            await writer.drain()

    async with Server(handler) as srv:
        o = srv.origin()
        assert (await o.request("GET", "/a", read_body=True)).body == b"hello"
        assert (await o.request("GET", "/b", read_body=True)).body == b"abcde"
        assert (await o.request("PUT", "/c", body=b"xyz")).status == 201
        assert (await o.request("GET", "/d", read_body=True)).body == b"ok"
        assert srv.connections == 1
        assert (await o.request("GET", "/e", read_body=True)).body == b"until the end"
        assert srv.connections == 2 and not o._idle
        assert all(b"Authorization: Bearer t\r\n" in r and b"Host: 127.0.0.1:" in r for r in srv.requests)
        await o.close()


async def test_a_large_body_given_whole_goes_out_a_slice_at_a_time() -> None:
    """A part of an S3 upload (bytes, 16 MiB) reaches a slow server intact, and the transport never holds
    more than a slice of it: what the socket does not take is not copied whole into the transport's buffer."""
    body = bytes(range(256)) * ((9 << 20) // 256) + b"tail"
    received = bytearray()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        while len(received) < length:
            received.extend(await reader.read(256 << 10))
            await asyncio.sleep(0.002)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with Server(handler) as srv:
        o = srv.origin()
        conns: list[Connection] = []
        connect = o._connect

        async def spied() -> Connection:
            conns.append(await connect())
            return conns[-1]

        o._connect = spied  # type: ignore[method-assign]
        buffered = [0]

        async def sample() -> None:
            while True:
                if conns:
                    buffered[0] = max(buffered[0], conns[0].writer.transport.get_write_buffer_size())
                await asyncio.sleep(0.001)

        sampler = asyncio.create_task(sample())
        assert (await o.request("PUT", "/part", body=body)).status == 200
        sampler.cancel()
        await o.close()
    assert bytes(received) == body
    assert 0 < buffered[0] <= SLICE + (64 << 10), buffered


async def test_a_request_running_when_the_origin_closes_does_not_leave_its_connection_open() -> None:
    """An S3 wire turned off (a region error) is closed while other requests still run on it: their
    connections close when their answers are read, instead of idling in a pool nothing uses again."""
    received, answered = asyncio.Event(), asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await srv.read_request(reader)
        received.set()
        await answered.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()  # until the client closes

    async with Server(handler) as srv:
        o = srv.origin()
        running = asyncio.create_task(o.request("GET", "/slow", read_body=True))
        await asyncio.wait_for(received.wait(), 5)  # the request is on its connection, unanswered
        await o.close()
        answered.set()
        assert (await running).body == b"ok"
        assert not o._idle


async def test_a_reused_connection_closed_by_the_server_is_retried_once_on_a_new_one() -> None:
    """The server answers one request per connection and closes it without saying so: a replayable
    request on the closed connection goes again on a new one; a streamed body is never replayed."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        _, body = await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        await srv.read_request(reader)  # the next request: read, never answered

    async with Server(handler) as srv:
        o = srv.origin()
        for i in range(3):
            assert (await o.request("PUT", "/k", body=b"v%d" % i, read_body=True)).body == b"v%d" % i
        # each request after the first: sent on the stale connection, then again on a new one
        assert srv.connections == 3 and len(srv.requests) == 5

        async def streamed() -> AsyncIterator[bytes]:
            yield b"abc"

        with pytest.raises(asyncio.IncompleteReadError):
            await o.request("PUT", "/s", body=streamed(), read_body=True)
        assert srv.connections == 3 and len(srv.requests) == 6  # sent once, not again
        assert not o._idle
        await o.close()


async def test_a_streamed_body_that_raises_is_cut_before_its_end() -> None:
    got: list[bytes] = []
    ended = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        try:
            await srv.read_request(reader)
        except asyncio.IncompleteReadError as e:
            got.append(e.partial)
        ended.set()

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        raise ValueError("NarHash differs")

    async with Server(handler) as srv:
        o = srv.origin()
        with pytest.raises(ValueError, match="NarHash differs"):
            await o.request("PUT", "/nar", body=body())
        await asyncio.wait_for(ended.wait(), 5)
        assert got and b"0\r\n\r\n" not in got[0]  # the last chunk never went out
        assert not o._idle


async def test_every_wait_is_bounded_and_the_limit_holds() -> None:
    """A server that never answers: the read times out. Requests beyond the connection limit wait for
    a free connection, not for a new one."""
    in_flight = 0
    most = 0
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        nonlocal in_flight, most
        while True:
            head, _ = await srv.read_request(reader)
            if b"/silent" in head:
                await asyncio.sleep(30)
            in_flight += 1
            most = max(most, in_flight)
            await release.wait()
            in_flight -= 1
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()

    async with Server(handler) as srv:
        o = srv.origin(limit=2, read_timeout=0.3)
        with pytest.raises(TimeoutError):
            await o.request("GET", "/silent")
        o.read_timeout = 5.0
        tasks = [asyncio.create_task(o.request("DELETE", f"/{i}")) for i in range(6)]
        await asyncio.sleep(0.2)
        release.set()
        assert [r.status for r in await asyncio.gather(*tasks)] == [204] * 6
        assert most == 2
        await o.close()


async def test_a_read_past_its_bound_is_a_timeout_not_a_short_answer_and_is_not_sent_again() -> None:
    """A read's bound cuts the connection: the request fails with TimeoutError, never with an answer cut
    short (a body that runs to the connection's end, then stalls), and is not sent again on a new
    connection the way a reused connection's close is (the server may still be working on it)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            head, _ = await srv.read_request(reader)
            if b"/ok" in head:
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
                continue
            if b"/to-the-end" in head:
                writer.write(b"HTTP/1.1 200 OK\r\n\r\npartial")
                await writer.drain()
            await asyncio.sleep(30)

    async with Server(handler) as srv:
        o = srv.origin(read_timeout=0.3)
        assert (await o.request("GET", "/ok")).status == 204
        with pytest.raises(TimeoutError, match=r"within 0\.3s"):
            await o.request("GET", "/silent")  # on the reused connection
        assert srv.connections == 1 and len(srv.requests) == 2
        with pytest.raises(TimeoutError):
            await o.request("GET", "/to-the-end", read_body=True)
        async with o.stream("GET", "/to-the-end") as (resp, chunks):
            assert resp.status == 200
            with pytest.raises(TimeoutError):
                async for _ in chunks:
                    pass
        assert srv.connections == 3 and not o._idle
        await o.close()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\nok", "Content-Length"),
    ],
)
async def test_a_garbled_answer_is_a_protocol_error(answer: bytes, error: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await srv.read_request(reader)
        writer.write(answer)
        await writer.drain()

    async with Server(handler) as srv:
        o = srv.origin()
        with pytest.raises(ProtocolError, match=error):
            await o.request("GET", "/x", read_body=True)
        with pytest.raises(ProtocolError, match=error):
            async with o.stream("GET", "/x") as (_, chunks):
                async for _ in chunks:
                    pass
        assert not o._idle
