"""The S3 requests hookd sends itself: object PUTs, multipart parts and HEADs, signed here (sigv4.py) and
sent over the HTTP/1.1 client of the HTTP backend (http11.py).

Why: through aiobotocore, each request cost 1.5-2.5 ms of CPU on the event loop (a thousand small
paths are three thousand PUTs), and NAR bytes were either hashed on the loop for the signature or
checksummed with MD5 (1.4 s of CPU per GiB, against 0.6 for SHA-256). Here a payload's SHA-256 is
computed where its bytes are joined, in a worker thread, and signed; the server checks the bytes
against it.

Where to send and how to sign is learned from botocore, not worked out again: the URL and signing
region of one HEAD it sends (endpoint rules, addressing style, region redirects all applied), and the
credentials from its chain. Everything else (listings, GETs, copies, deletes, multipart bookkeeping)
stays with botocore.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

from .http11 import Origin, Response
from .sigv4 import Credentials, canonical_path, canonical_query, sign

HEADERS = {
    "ContentType": "Content-Type",
    "ContentEncoding": "Content-Encoding",
    "StorageClass": "x-amz-storage-class",
    "IfNoneMatch": "If-None-Match",
}
"""botocore's names of the request parameters hookd sends, and their headers."""
REGION_CODES = {
    "AuthorizationHeaderMalformed",
    "PermanentRedirect",
    "TemporaryRedirect",
    "IllegalLocationConstraintException",
}
"""Answers that say the request went to the wrong region or endpoint: botocore follows those, this does not."""
_CODE = re.compile(rb"<Code>([^<]{1,128})</Code>")


class Wire:
    """Signed requests to one bucket's endpoint: `base` is the URL path before a key."""

    def __init__(
        self, origin: Origin, base: str, region: str, credentials: Callable[[], Awaitable[Credentials]]
    ) -> None:
        self.origin, self.base, self.region, self.credentials = origin, base, region, credentials

    @classmethod
    def learned(
        cls,
        url: str,
        key: str,
        region: str,
        credentials: Callable[[], Awaitable[Credentials]],
        *,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        user_agent: str,
        ca_file: str | None = None,
    ) -> Wire | None:
        """The wire for requests like one botocore sent to `url` for object `key`; None where this client
        cannot send them as botocore would (a proxy on the way, a URL it does not recognise)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        if getproxies().get(parts.scheme) and not proxy_bypass(parts.hostname):
            return None  # botocore goes through the proxy; this client does not speak to proxies
        quoted = canonical_path(key)
        if not parts.path.endswith("/" + quoted):
            return None
        tls = ssl.create_default_context(cafile=ca_file) if parts.scheme == "https" else None
        port = parts.port or (443 if tls else 80)
        origin = Origin(
            parts.hostname, port, tls, limit, connect_timeout, read_timeout, {"User-Agent": user_agent}
        )  # fmt: skip
        return cls(origin, parts.path[: -len(quoted)], region, credentials)

    async def close(self) -> None:
        await self.origin.close()

    async def request(
        self,
        method: str,
        key: str,
        *,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        sha256: str,
    ) -> Response:
        """One signed request for `key` (the bucket's full key) with a body whose SHA-256 (hex) is given;
        the answer's body is read (an error's code is in it)."""
        path = self.base + canonical_path(key)
        params = params or {}
        signed = sign(
            method, self.origin.host_header, path, params, headers or {}, sha256,
            await self.credentials(), self.region, datetime.now(UTC),
        )  # fmt: skip
        target = path + ("?" + canonical_query(params) if params else "")
        return await self.origin.request(method, target, signed, body, read_body=True)


def headers_of(params: dict[str, str]) -> dict[str, str]:
    """The request headers for botocore's parameters (ContentType…)."""
    return {HEADERS[k]: v for k, v in params.items()}


def error_code(resp: Response) -> str:
    """S3's error code from an answer's XML body, or its status when the body has none."""
    found = _CODE.search(resp.body[:4096])
    return found.group(1).decode("latin-1") if found else str(resp.status)
