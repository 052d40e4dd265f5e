"""Cache backends: one interface, one implementation per URL scheme."""

from __future__ import annotations

from urllib.parse import urlsplit

from .base import Backend, BackendError, Blob, ObjectStat, PermanentBackendError


def open_backend(url: str) -> Backend:
    """The backend for a cache URL (`file:///dir`; S3 and HTTP caches come with their own issue)."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        from .file import FileBackend

        if parts.netloc not in ("", "localhost"):
            raise PermanentBackendError(f"cache URL {url!r}: a file:// URL has no host (use file:///dir)")
        if not parts.path.startswith("/"):
            raise PermanentBackendError(f"cache URL {url!r}: the directory must be absolute")
        return FileBackend(parts.path)
    raise PermanentBackendError(
        f"cache URL {url!r}: unsupported scheme {parts.scheme!r} (supported: file://)"
    )


__all__ = ["Backend", "BackendError", "Blob", "ObjectStat", "PermanentBackendError", "open_backend"]
