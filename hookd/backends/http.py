"""A binary cache on any HTTP server that accepts PUT (nginx WebDAV, Attic-less setups, Artifactory…):
HEAD, GET, PUT, DELETE and PROPFIND through one pool of keep-alive connections (http11.py), with bounded
timeouts and retries.

Credentials (a bearer token file, a netrc file, or user:password in the URL) go into headers only and
never into a log line or an error message: those name the method, the key and the status.
"""

from __future__ import annotations

import base64
import netrc
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from .. import __version__
from .base import Backend, BackendError, ObjectStat, PermanentBackendError, T
from .http11 import TRANSIENT, Body, Origin
from .retry import Remote, RetryableError, parse_retry_after, unanswered, with_retries

SAFE_IN_PATH = "/:@!$&'()*+,;=-._~"
LISTING_BYTES = 32 << 10
"""What one request is worth in a PROPFIND answer (about fifty entries)."""
RETRYABLE_STATUS = {408, 500, 502, 504}
THROTTLE_STATUS = {429, 503}


def redact(url: str) -> str:
    """The URL without user info, query or fragment (safe to log)."""
    p = urlsplit(url)
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return urlunsplit((p.scheme, host, p.path, "", ""))


def _check_status(what: str, status: int, hdrs: dict[str, str]) -> None:
    """Raise for a status that is not an answer: retryable (throttled, 5xx) or permanent (denied, 4xx)."""
    if status in THROTTLE_STATUS:
        raise RetryableError(f"{what}: HTTP {status}", True, parse_retry_after(hdrs.get("retry-after")))
    if status in RETRYABLE_STATUS:
        raise RetryableError(f"{what}: HTTP {status}", False, parse_retry_after(hdrs.get("retry-after")))
    if status in (401, 403):
        raise PermanentBackendError(f"{what}: HTTP {status} (check the cache's credentials)")
    if status >= 400 and status not in (404, 412):
        raise PermanentBackendError(f"{what}: HTTP {status}")


class HttpBackend(Backend):
    def __init__(
        self,
        url: str,
        *,
        token_file: Path | None = None,
        netrc_file: Path | None = None,
        tls_verify: bool = True,
        ca_file: Path | None = None,
        remote: Remote | None = None,
    ) -> None:
        remote = remote or Remote()
        parts = urlsplit(url)
        self.base = redact(url).rstrip("/")
        self.url = self.base
        self.headers: dict[str, str] = {"User-Agent": f"hookd/{__version__}"}
        if parts.username:
            self.headers["Authorization"] = _basic(parts.username, parts.password or "")
        if netrc_file is not None:
            try:
                entry = netrc.netrc(str(netrc_file)).authenticators(parts.hostname or "")
            except (OSError, netrc.NetrcParseError) as e:
                raise PermanentBackendError(f"netrc file {netrc_file}: {type(e).__name__}") from None
            if entry is None:
                raise PermanentBackendError(f"netrc file {netrc_file} has no entry for {parts.hostname}")
            self.headers["Authorization"] = _basic(entry[0] or "", entry[2] or "")
        if token_file is not None:
            try:
                token = token_file.read_text().strip()
            except OSError as e:
                raise PermanentBackendError(f"token file {token_file}: {e.strerror}") from None
            self.headers["Authorization"] = f"Bearer {token}"
        tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            tls = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
            if not tls_verify:
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE
        self.origin = Origin(
            parts.hostname or "",
            parts.port or (443 if parts.scheme == "https" else 80),
            tls,
            remote.max_connections,
            remote.connect_timeout,
            remote.read_timeout,
            self.headers,
        )
        self.path = quote(urlsplit(self.base).path.rstrip("/"), safe=SAFE_IN_PATH)
        self.policy, self.rate = remote.policy, remote.rate
        self._listable = True  # until a PROPFIND is refused

    def _target(self, key: str) -> str:
        return f"{self.path}/{quote(key, safe=SAFE_IN_PATH)}"

    def congested(self) -> bool:
        return self.rate.congested

    async def close(self) -> None:
        await self.origin.close()

    async def _once(
        self, method: str, key: str, data: Body = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, dict[str, str]]:
        what = f"{method} {self.base}/{key}"
        wanted = {"GET": 200, "PROPFIND": 207}.get(method)
        try:
            resp = await self.origin.request(method, self._target(key), headers, data, read_body=True)
        except TRANSIENT as e:
            raise unanswered(what, e) from None
        _check_status(what, resp.status, resp.headers)
        return resp.status, resp.body if resp.status == wanted else b"", resp.headers

    async def _request(
        self, method: str, key: str, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, dict[str, str]]:
        async def op() -> tuple[int, bytes, dict[str, str]]:
            return await self._once(method, key, data, headers)

        return await with_retries(f"{method} {key}", op, self.policy, self.rate)

    async def read(self, key: str, consume: Callable[[AsyncIterator[bytes]], Awaitable[T]]) -> T | None:
        what = f"GET {self.base}/{key}"

        async def op() -> tuple[T] | None:
            try:
                async with self.origin.stream("GET", self._target(key)) as (resp, chunks):
                    _check_status(what, resp.status, resp.headers)
                    if resp.status != 200:
                        async for _ in chunks:
                            pass
                        return None
                    return (await consume(chunks),)
            except TRANSIENT as e:
                raise unanswered(what, e) from None

        found = await with_retries(what, op, self.policy, self.rate)
        return found[0] if found else None

    async def exists(self, key: str) -> bool:
        status, _, _ = await self._request("HEAD", key)
        return status < 300

    async def get(self, key: str) -> bytes | None:
        status, body, _ = await self._request("GET", key)
        return body if status == 200 else None

    async def put(self, key: str, data: bytes, content_type: str, *, content_encoding: str | None = None) -> None:
        headers = {"Content-Type": content_type}
        if content_encoding is not None:
            headers["Content-Encoding"] = content_encoding
        _put_answered(f"PUT {self.base}/{key}", (await self._request("PUT", key, data, headers))[0])

    async def put_new(self, key: str, data: bytes, content_type: str) -> bool:
        """One PUT with If-None-Match: *; created only when the server says 201 Created (RFC 9110), as
        nginx does. A 412 (the key exists) or a 200/204 (a server that ignores the condition replaced
        the object, with the same bytes: narstream.py) is not a creation."""
        status, _, _ = await self._request("PUT", key, data, {"Content-Type": content_type, "If-None-Match": "*"})
        _put_answered(f"PUT {self.base}/{key}", status)
        return status == 201

    def nar_memory(self, size_hint: int) -> int:
        return 0  # streamed piece by piece as the body

    async def put_nar(self, key: str, chunks: AsyncIterable[bytes], content_type: str, size_hint: int) -> None:
        """One streamed PUT (chunked transfer encoding): the server commits the object only when the
        body's last chunk arrives, and that is sent only after the stream ended normally. If the stream
        raises (a NarHash mismatch), the connection is cut before the end and nothing is committed. A
        streamed body cannot be sent twice: a failure is an error of this attempt (the path is retried)."""
        failure: list[BaseException] = []

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield chunk
            except BaseException as e:
                failure.append(e)
                raise

        try:
            status, _, _ = await self._once("PUT", key, body(), {"Content-Type": content_type})
        except BackendError:
            if failure:  # the stream's own error (a NarHash mismatch, a read error), not the server's
                raise failure[0] from None
            raise
        _put_answered(f"PUT {self.base}/{key}", status)

    async def delete(self, key: str) -> None:
        await self._request("DELETE", key)

    async def stat(self, key: str) -> ObjectStat | None:
        status, _, hdrs = await self._request("HEAD", key)
        if status >= 300:
            return None
        from email.utils import parsedate_to_datetime

        try:
            mtime = parsedate_to_datetime(hdrs.get("last-modified", "")).timestamp()
        except (TypeError, ValueError):
            mtime = 0.0
        return ObjectStat(key, int(hdrs.get("content-length", 0)), mtime, hdrs.get("etag"))

    async def stat_top(self, keys: Collection[str], budget: int) -> dict[str, ObjectStat] | None:
        """One WebDAV PROPFIND (Depth: 1) of the cache's top level, read while it stays under `budget`
        requests' worth of answer (LISTING_BYTES each) and cut off otherwise; None then, or when the
        server cannot list (it is not asked again)."""
        if not self._listable:
            return None
        limit = budget * LISTING_BYTES
        what = f"PROPFIND {self.base}/"
        try:
            async with self.origin.stream("PROPFIND", self._target(""), {"Depth": "1"}, b"") as (resp, chunks):
                if resp.status != 207:
                    self._listable = False
                    async for _ in chunks:
                        pass
                    return None
                body = bytearray()
                async for chunk in chunks:
                    body += chunk
                    if len(body) > limit:
                        return None  # a large cache: asking per key is cheaper than the rest
        except TRANSIENT as e:
            raise unanswered(what, e) from None
        base_path = urlsplit(self.base).path.rstrip("/") + "/"
        wanted = set(keys)
        found = {}
        for href, is_dir, size, mtime, etag in _parse_multistatus(bytes(body)):
            key = unquote(urlsplit(href).path)[len(base_path) :]
            if not is_dir and key in wanted:
                found[key] = ObjectStat(key, size, mtime, etag)
        return found

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectStat]:
        """Walk the cache with WebDAV PROPFIND (Depth: 1, directory by directory)."""
        base_path = urlsplit(self.base).path.rstrip("/") + "/"
        todo = [prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""]
        while todo:
            directory = todo.pop()
            try:
                status, body, _ = await self._request("PROPFIND", directory, b"", {"Depth": "1"})
            except PermanentBackendError as e:
                raise PermanentBackendError(
                    f"{self.base} cannot be listed ({e}): GC and verify need a server that answers WebDAV "
                    "PROPFIND (nginx: the dav_ext module), or an S3 or file:// cache"
                ) from None
            if status == 404 and directory:
                continue
            if status != 207:
                raise PermanentBackendError(f"{self.base} cannot be listed: PROPFIND answered HTTP {status}")
            for href, is_dir, size, mtime, etag in _parse_multistatus(body):
                path = unquote(urlsplit(href).path)
                if not path.startswith(base_path):
                    continue
                key = path[len(base_path) :]
                if not key or key == directory:
                    continue
                if is_dir:
                    if prefix.startswith(key) or key.startswith(prefix):
                        todo.append(key.rstrip("/") + "/")
                elif key.startswith(prefix):
                    yield ObjectStat(key, size, mtime, etag)


def _parse_multistatus(body: bytes) -> list[tuple[str, bool, int, float, str | None]]:
    """(href, is a directory, size, mtime, etag) of each response in a WebDAV multistatus."""
    import xml.etree.ElementTree as ET
    from email.utils import parsedate_to_datetime

    try:
        root = ET.fromstring(body)
    except ET.ParseError as e:
        raise PermanentBackendError(f"unreadable PROPFIND answer: {e}") from None
    out = []
    for resp in root.iter("{DAV:}response"):
        href = resp.findtext("{DAV:}href") or ""
        prop = resp.find(".//{DAV:}prop")
        if prop is None:
            continue
        is_dir = prop.find("{DAV:}resourcetype/{DAV:}collection") is not None
        size = int(prop.findtext("{DAV:}getcontentlength") or 0)
        try:
            mtime = parsedate_to_datetime(prop.findtext("{DAV:}getlastmodified") or "").timestamp()
        except (TypeError, ValueError):
            mtime = 0.0
        out.append((href, is_dir, size, mtime, prop.findtext("{DAV:}getetag")))
    return out


def _put_answered(what: str, status: int) -> None:
    """A PUT answered 404 went to a server that does not take PUT there (a plain static server)."""
    if status == 404:
        raise PermanentBackendError(f"{what}: HTTP 404 (does the server accept PUT?)")


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


__all__ = ["BackendError", "HttpBackend", "redact"]
