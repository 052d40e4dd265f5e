"""The backend interface every cache store implements."""

from __future__ import annotations

import abc
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple, TypeVar

T = TypeVar("T")


class BackendError(RuntimeError):
    """A cache operation failed in a way that may succeed later (network, 5xx, disk full)."""


class PermanentBackendError(BackendError):
    """A cache operation can never succeed as asked (bad URL, permission denied): no retry helps."""


class ObjectStat(NamedTuple):
    """One listed object (a tuple: a listing can hold hundreds of thousands)."""

    key: str
    size: int
    mtime: float
    etag: str | None = None


@dataclass(frozen=True)
class Blob:
    """Bytes to upload, staged in memory or in a local file, with a known size; re-readable for retries."""

    size: int
    data: bytes | None = None
    path: Path | None = None

    def open(self) -> BinaryIO:
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        return open(self.path, "rb")


class Backend(abc.ABC):
    """A binary cache: a flat key space of objects (`nix-cache-info`, `<hash>.narinfo`, `nar/…`)."""

    url: str

    @abc.abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

    async def read(self, key: str, consume: Callable[[AsyncIterator[bytes]], Awaitable[T]]) -> T | None:
        """Stream an object's bytes into `consume`, in chunks; None when it does not exist.

        Memory stays bounded whatever the object's size. A transient failure mid-stream starts
        `consume` again on a fresh stream, so it must keep its state local and not raise on bad
        content (it reports that in its result). This default reads the whole object at once.
        """
        data = await self.get(key)
        if data is None:
            return None

        async def whole() -> AsyncIterator[bytes]:
            yield data

        return await consume(whole())

    @abc.abstractmethod
    async def put(self, key: str, data: bytes, content_type: str, *, content_encoding: str | None = None) -> None:
        """Write a small object atomically, replacing any previous one.

        `content_encoding` (gzip, zstd: `data` is already encoded) is stored with the object and sent as
        the `Content-Encoding` header when it is read; a backend that cannot keep it refuses it."""

    @abc.abstractmethod
    async def put_stream(self, key: str, blob: Blob, content_type: str) -> bool:
        """Write a large object atomically unless the key exists; True if written, False if it existed.

        NAR keys are content hashes, so an existing key already holds these bytes: it is never replaced.
        """

    @abc.abstractmethod
    def list(self, prefix: str = "") -> AsyncIterator[ObjectStat]: ...

    @abc.abstractmethod
    async def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    async def stat(self, key: str) -> ObjectStat | None: ...

    async def touch(self, key: str, content_type: str) -> bool:
        """Reset an object's age (its last-modified time) without changing it; False if it is gone.

        GC retention counts from the last-modified time, so a path needed again stays. This default
        re-puts the same bytes; backends with a cheaper way override it.
        """
        data = await self.get(key)
        if data is None:
            return False
        await self.put(key, data, content_type)
        return True

    def staging_dir(self) -> Path | None:
        """A directory on the same file system as the cache's NARs, when the backend is local.

        A NAR staged there is committed with a link instead of a second copy (file:// only).
        """
        return None

    async def cleanup(self) -> None:
        """Remove what a killed uploader may have left behind (old temp files)."""
        return None

    async def close(self) -> None:
        return None
