"""Prometheus metrics, served (opt-in) on `metrics_listen` as the text exposition format."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger("hookd")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hookd_requests", "Requests accepted from the hook, the spool and the CLI.", registry=r)
        self.uploads = Counter("hookd_uploads", "Paths uploaded.", registry=r)
        self.failures = Counter("hookd_upload_failures", "Failed upload attempts.", ["kind"], registry=r)
        self.nar_bytes = Counter("hookd_nar_bytes", "NAR bytes uploaded, before compression.", registry=r)
        self.compressed_bytes = Counter("hookd_compressed_bytes", "NAR bytes uploaded, after compression.", registry=r)
        self.retries = Counter("hookd_request_retries", "Backend requests repeated after an error.", registry=r)
        self.dedup_hits = Counter(
            "hookd_dedup_hits", "Paths not uploaded: already in the cache.", ["source"], registry=r
        )
        self.upstream_skips = Counter("hookd_upstream_skips", "Paths left to an upstream cache.", registry=r)
        self.queue = Gauge("hookd_queue_paths", "Paths in the queue by state.", ["state"], registry=r)
        self.upload_seconds = Histogram(
            "hookd_upload_seconds", "Time to upload one path (dump, compress, put, publish).",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300), registry=r,
        )  # fmt: skip

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


async def serve(metrics: Metrics, listen: str, refresh: Callable[[], Awaitable[None]]) -> web.AppRunner:
    """Start the endpoint on HOST:PORT; `refresh` updates the gauges before each scrape."""

    async def handler(request: web.Request) -> web.Response:
        await refresh()
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    host, _, port = listen.rpartition(":")
    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host.strip("[]") or "127.0.0.1", int(port)).start()
    log.info("metrics on http://%s/metrics", listen)
    return runner
