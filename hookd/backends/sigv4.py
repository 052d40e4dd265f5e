"""AWS Signature Version 4 for S3 requests, as pure functions: the headers that sign one request.

Why hookd signs its own S3 writes: botocore's S3 signer hashes a request's payload itself, on the event
loop, and overwrites a payload hash given to it; turning that off (UNSIGNED-PAYLOAD) leaves the bytes'
integrity to a Content-MD5, which costs more than twice a SHA-256 here. Signing here takes the
payload's SHA-256 as computed beside the data, in a worker thread, and the server checks it
(XAmzContentSHA256Mismatch otherwise). The result is checked against botocore's signer in the tests.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNRESERVED = "-_.~"


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None

    def __repr__(self) -> str:  # never the secret, nor the token, in a log line or a traceback
        return f"Credentials(access_key={self.access_key!r})"


def canonical_path(path: str) -> str:
    """A key's path as sent and as signed: every byte percent-encoded but unreserved ones and "/" (S3's
    canonical URI is the path as sent, not encoded twice)."""
    return quote(path, safe="/~")


def canonical_query(params: dict[str, str]) -> str:
    return "&".join(f"{quote(k, safe=UNRESERVED)}={quote(v, safe=UNRESERVED)}" for k, v in sorted(params.items()))


@lru_cache(maxsize=8)
def signing_key(secret: str, day: str, region: str, service: str) -> bytes:
    """The day's key for a region and service (the same for every request that day: kept)."""
    key = ("AWS4" + secret).encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def sign(
    method: str,
    host: str,
    path: str,
    params: dict[str, str],
    headers: dict[str, str],
    payload_sha256: str,
    credentials: Credentials,
    region: str,
    now: datetime,
    service: str = "s3",
) -> dict[str, str]:
    """`headers` with the signing ones added: X-Amz-Date, X-Amz-Content-SHA256, X-Amz-Security-Token (for
    temporary credentials) and Authorization. Every header given is signed, and Host; `path` is already
    canonical (canonical_path), `now` is UTC."""
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    out = dict(headers)
    out["X-Amz-Date"] = stamp
    out["X-Amz-Content-SHA256"] = payload_sha256
    if credentials.token:
        out["X-Amz-Security-Token"] = credentials.token
    signed = {k.lower(): " ".join(str(v).split()) for k, v in out.items()}
    signed["host"] = host
    names = sorted(signed)
    canonical = "\n".join(
        [
            method,
            path,
            canonical_query(params),
            "".join(f"{n}:{signed[n]}\n" for n in names),
            ";".join(names),
            payload_sha256,
        ]
    )
    scope = f"{stamp[:8]}/{region}/{service}/aws4_request"
    to_sign = f"{ALGORITHM}\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = signing_key(credentials.secret_key, stamp[:8], region, service)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (
        f"{ALGORITHM} Credential={credentials.access_key}/{scope}, SignedHeaders={';'.join(names)}, "
        f"Signature={signature}"
    )
    return out
