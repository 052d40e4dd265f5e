"""hookd's own S3 writes (hookd/backends/sigv4.py, s3wire.py): signatures checked against botocore's signer,
and where the wire refuses to go. The requests themselves, against moto and radosgw, are in test_backends.py."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from botocore import auth as botocore_auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from hookd.backends.http11 import Response
from hookd.backends.s3wire import Wire, error_code, headers_of
from hookd.backends.sigv4 import Credentials, canonical_path, sign

NOW = datetime(2026, 11, 22, 13, 5, 9, tzinfo=UTC)


async def _no_credentials() -> Credentials:
    raise AssertionError("not asked")


@pytest.mark.parametrize("token", [None, "session-token/with+odd=chars"])
@pytest.mark.parametrize(
    ("key", "params", "headers", "body"),
    [
        ("cache/0c3x.narinfo", {}, {"Content-Type": "text/x-nix-narinfo"}, b"StorePath: /nix/store/x\n"),
        ("nar/1abc.nar.zst", {"uploadId": "2~Ab.c_d-e/f+g==", "partNumber": "7"}, {}, b"\x00" * 4099),
        ("realisations/sha256:0f!out.doi", {}, {"If-None-Match": "*", "Content-Type": "application/json"}, b"{}"),
        ("log/x y%z~.drv", {}, {"Content-Encoding": "zstd", "x-amz-storage-class": "STANDARD_IA"}, b""),
    ],
)
def test_signatures_match_botocore(
    monkeypatch: pytest.MonkeyPatch, key: str, params: dict[str, str], headers: dict[str, str], body: bytes, token: str | None
) -> None:
    """The same request signed by hookd and by botocore's S3 signer (which hashes the payload itself) carries
    the same Authorization: keys with reserved characters, a query, temporary credentials, conditions."""
    host, path = "127.0.0.1:9000", "/bucket/" + canonical_path(key)
    payload = hashlib.sha256(body).hexdigest()
    ours = sign("PUT", host, path, params, headers, payload, Credentials("AKID", "secret/key+", token), "eu-west-3", NOW)

    monkeypatch.setattr(botocore_auth, "get_current_datetime", lambda: NOW.replace(tzinfo=None))
    query = "&".join(f"{k}={v}" for k, v in params.items())
    request = AWSRequest("PUT", f"http://{host}{path}", headers=dict(headers), data=body, params=params)
    request.url = f"http://{host}{path}" + (f"?{query}" if query else "")
    request.params = params
    botocore_auth.S3SigV4Auth(BotoCredentials("AKID", "secret/key+", token), "s3", "eu-west-3").add_auth(request)

    assert ours["Authorization"] == request.headers["Authorization"]
    assert ours["X-Amz-Content-SHA256"] == request.headers["X-Amz-Content-SHA256"] == payload
    assert ours.get("X-Amz-Security-Token") == token
    assert "secret" not in repr(Credentials("AKID", "secret/key+", token))


def test_a_wire_is_learned_from_the_url_botocore_sent() -> None:
    wire = Wire.learned(
        "http://127.0.0.1:9000/bucket/pre/.hookd-probe-wire", "pre/.hookd-probe-wire", "us-east-1", _no_credentials,
        limit=4, connect_timeout=1, read_timeout=1, user_agent="hookd/test",
    )  # fmt: skip
    assert wire is not None and wire.base == "/bucket/" and wire.origin.host_header == "127.0.0.1:9000"
    virtual = Wire.learned(
        "https://bucket.s3.eu-west-3.amazonaws.com/.hookd-probe-wire", ".hookd-probe-wire", "eu-west-3",
        _no_credentials, limit=4, connect_timeout=1, read_timeout=1, user_agent="hookd/test",
    )  # fmt: skip
    assert virtual is not None and virtual.base == "/" and virtual.origin.host_header == "bucket.s3.eu-west-3.amazonaws.com"
    assert virtual.origin.tls is not None


def test_no_wire_where_botocore_would_go_another_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy botocore would use, or a URL that does not end with the key: writes stay with botocore."""
    args = dict(limit=4, connect_timeout=1.0, read_timeout=1.0, user_agent="hookd/test")
    assert Wire.learned("http://127.0.0.1:9000/bucket/other", "key", "us-east-1", _no_credentials, **args) is None  # type: ignore[arg-type]
    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "")
    assert Wire.learned("http://s3.example/bucket/key", "key", "us-east-1", _no_credentials, **args) is None  # type: ignore[arg-type]
    monkeypatch.setenv("no_proxy", "s3.example")
    assert Wire.learned("http://s3.example/bucket/key", "key", "us-east-1", _no_credentials, **args) is not None  # type: ignore[arg-type]


def test_error_codes_and_headers() -> None:
    body = b"<?xml version='1.0'?><Error><Code>XAmzContentSHA256Mismatch</Code><Message>m</Message></Error>"
    assert error_code(Response(400, {}, body)) == "XAmzContentSHA256Mismatch"
    assert error_code(Response(503, {}, b"")) == "503"
    assert headers_of({"ContentType": "a", "IfNoneMatch": "*", "StorageClass": "GLACIER"}) == {
        "Content-Type": "a",
        "If-None-Match": "*",
        "x-amz-storage-class": "GLACIER",
    }
