"""A fault-injecting, latency-adding HTTP reverse proxy for the tests and benchmarks.

    python -m tests.faultproxy --port 8001 --upstream http://127.0.0.1:8000 --fault-rate 0.2 --log f.jsonl

A `--fault-rate` share of requests fail: 500, 503, 429 (as S3 `SlowDown` with Retry-After when
`--s3`), or a connection reset in the middle of the request body (PUT) or of the response body (GET).
A `--corrupt-rate` share of PUT bodies reach the upstream with one byte changed (fault `corrupt`).
`--wrong-region-for AGENT` answers every request of that User-Agent (its product name) as S3 answers a
request signed for another region than the bucket's (fault `region`).
`--delay-ms` adds latency to every request. Every request is logged as a JSON line with its start and
end times, decision and status, so tests can check what was injected and in what order objects became
visible.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import TextIO

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "content-length",
    "expect",
}
AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")
S3_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
S3_WRONG_REGION = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AuthorizationHeaderMalformed</Code>'
    b"<Message>The authorization header is malformed; the region 'us-east-1' is wrong; expecting "
    b"'eu-west-3'</Message><Region>eu-west-3</Region></Error>"
)


class Proxy:
    def __init__(
        self,
        upstream: str,
        rate: float,
        delay: float,
        s3: bool,
        log: TextIO,
        seed: int,
        corrupt: float = 0.0,
        wrong_region_for: str | None = None,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.wrong_region_for = wrong_region_for
        self.rate = rate
        self.corrupt = corrupt
        self.corrupt_rng = random.Random(seed + 1)  # its own: the other faults' sequence stays as it was
        self.delay = delay
        self.s3 = s3
        self.log = log
        self.rng = random.Random(seed)
        self.session: ClientSession | None = None

    def record(self, **fields: object) -> None:
        self.log.write(json.dumps(fields) + "\n")
        self.log.flush()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.session is None:
            self.session = ClientSession(
                connector=TCPConnector(limit=256), timeout=ClientTimeout(total=600), auto_decompress=False
            )
        start = time.time()
        fault = self.rng.choice(["500", "503", "429", "reset"]) if self.rng.random() < self.rate else None
        if fault is None and request.method == "PUT" and request.content_length and self.corrupt:
            fault = "corrupt" if self.corrupt_rng.random() < self.corrupt else None
        client = request.headers.get("User-Agent", "").split("/", 1)[0]
        if client and client == self.wrong_region_for:
            fault = "region"
        payload = request.headers.get("x-amz-content-sha256")
        base = {
            "method": request.method,
            "path": request.path_qs,
            "start": start,
            "fault": fault,
            "auth": "Authorization" in request.headers,  # whether, never what
            "client": client,
            # what the signature says of the body: its SHA-256 ("signed"), UNSIGNED-PAYLOAD, or nothing
            "payload": "signed" if payload and len(payload) == 64 else payload,
        }
        if self.delay:
            await asyncio.sleep(self.delay)
        if fault == "reset" and request.method in ("PUT", "POST") and request.content_length:
            await request.content.read(max(1, request.content_length // 2))
            assert request.transport is not None
            request.transport.abort()
            self.record(**base, status="reset", end=time.time())
            raise asyncio.CancelledError
        if fault == "region":
            await request.read()
            self.record(**base, status=400, end=time.time())
            return web.Response(status=400, body=S3_WRONG_REGION, content_type="application/xml")
        if fault in ("500", "503", "429"):
            await request.read()
            status = int(fault)
            headers = {}
            payload = b"injected fault"
            if status in (429, 503):
                headers["Retry-After"] = "0"
            if self.s3 and status in (429, 503):
                payload, headers["Content-Type"] = S3_SLOWDOWN, "application/xml"
            self.record(**base, status=status, end=time.time())
            return web.Response(status=status, body=payload, headers=headers)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        data: object = request.content if request.can_read_body else None
        if fault == "corrupt":
            body = bytearray(await request.read())
            body[len(body) // 2] ^= 0x01
            data = bytes(body)
        async with self.session.request(
            request.method,
            self.upstream + request.path_qs,
            data=data,
            headers=headers,
            allow_redirects=False,
            # Forward the client's headers only: Ceph 20's radosgw refuses a request whose Content-Type was
            # not signed, and aiohttp would add one to a body sent without.
            skip_auto_headers=AUTO_HEADERS,
        ) as up:
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
            resp = web.StreamResponse(status=up.status, headers=out_headers)
            if "Content-Length" in up.headers:
                resp.content_length = int(up.headers["Content-Length"])
            await resp.prepare(request)
            if request.method != "HEAD":
                sent = 0
                cut = (resp.content_length or 0) // 2 if fault == "reset" else None
                async for chunk in up.content.iter_chunked(1 << 20):
                    if cut is not None and sent + len(chunk) > cut:  # a response cut off mid-body
                        await resp.write(chunk[: max(0, cut - sent)])
                        assert request.transport is not None
                        request.transport.abort()
                        self.record(**base, status="reset", end=time.time())
                        return resp
                    await resp.write(chunk)
                    sent += len(chunk)
            await resp.write_eof()
            self.record(**base, status=up.status, end=time.time())
            return resp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--fault-rate", type=float, default=0.0)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--s3", action="store_true")
    ap.add_argument("--log", default="/dev/null")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--corrupt-rate", type=float, default=0.0)
    ap.add_argument("--wrong-region-for", default=None, metavar="AGENT")
    args = ap.parse_args()
    log = open(args.log, "a")  # noqa: SIM115 - open for the life of the process
    proxy = Proxy(
        args.upstream, args.fault_rate, args.delay_ms / 1000, args.s3, log, args.seed, args.corrupt_rate,
        args.wrong_region_for,
    )  # fmt: skip
    # bodies pass through as they are: a Content-Encoding (hookd's narinfos) is the endpoints' business
    app = web.Application(client_max_size=1 << 40, handler_args={"auto_decompress": False})
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
