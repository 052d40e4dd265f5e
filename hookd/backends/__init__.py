"""Cache backends: one interface, one implementation per URL scheme."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from .base import Backend, BackendError, ObjectStat, PermanentBackendError
from .retry import Remote, RetryPolicy

if TYPE_CHECKING:
    from ..config import Config

S3_PARAMS = {"region", "endpoint", "profile", "addressing", "storage-class", "credentials-file"}


def open_backend(url: str, cfg: Config | None = None) -> Backend:
    """The backend for a cache URL: `file:///dir`, `s3://bucket[/prefix]?…` or `http(s)://host/path`."""
    from ..config import Config

    cfg = cfg or Config(cache=url)
    parts = urlsplit(url)
    remote = Remote(cfg.connect_timeout, cfg.read_timeout, cfg.max_connections, RetryPolicy(cfg.request_attempts))
    if parts.scheme == "file":
        from .file import FileBackend

        if parts.netloc not in ("", "localhost"):
            raise PermanentBackendError(f"cache URL {url!r}: a file:// URL has no host (use file:///dir)")
        if not parts.path.startswith("/"):
            raise PermanentBackendError(f"cache URL {url!r}: the directory must be absolute")
        return FileBackend(parts.path)
    if parts.scheme == "s3":
        from .s3 import S3Backend

        if not parts.netloc:
            raise PermanentBackendError(f"cache URL {url!r}: no bucket (use s3://bucket[/prefix])")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - S3_PARAMS
        if unknown:
            raise PermanentBackendError(
                f"cache URL {parts.scheme}://{parts.netloc}{parts.path}: unknown parameter(s) "
                f"{', '.join(sorted(unknown))} (known: {', '.join(sorted(S3_PARAMS))})"
            )
        creds = query.get("credentials-file") or cfg.s3_credentials_file
        return S3Backend(
            parts.netloc,
            parts.path,
            region=query.get("region"),
            endpoint=query.get("endpoint"),
            profile=query.get("profile"),
            addressing=query.get("addressing", "auto"),
            storage_class=query.get("storage-class"),
            credentials_file=Path(creds) if creds else None,
            multipart_threshold=cfg.multipart_threshold,
            part_size=cfg.part_size,
            part_concurrency=cfg.part_concurrency,
            remote=remote,
        )
    if parts.scheme in ("http", "https"):
        from .http import HttpBackend

        return HttpBackend(
            url,
            token_file=cfg.http_token_file,
            netrc_file=cfg.netrc_file,
            tls_verify=cfg.tls_verify,
            ca_file=cfg.tls_ca_file,
            remote=remote,
        )
    raise PermanentBackendError(
        f"cache URL scheme {parts.scheme!r} is not supported (use file:///dir, s3://bucket or https://host/path)"
    )


__all__ = ["Backend", "BackendError", "ObjectStat", "PermanentBackendError", "open_backend"]
