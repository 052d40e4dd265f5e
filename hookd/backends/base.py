"""The backend interface every cache store implements."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Collection
from typing import NamedTuple, Self, TypeVar

T = TypeVar("T")


class BackendError(RuntimeError):
    """A cache operation failed in a way that may succeed later (network, 5xx, disk full)."""


class PermanentBackendError(BackendError):
    """A cache operation can never succeed as asked (bad URL, permission denied): no retry helps."""


class PreconditionFailed(PermanentBackendError):
    """A conditional write found the key there already (HTTP 412)."""


class ObjectStat(NamedTuple):
    """One listed object (a tuple: a listing can hold hundreds of thousands)."""

    key: str
    size: int
    mtime: float
    etag: str | None = None


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

    async def put_new(self, key: str, data: bytes, content_type: str) -> bool:
        """Write a small object unless the key exists; True only if this call created it.

        Creation is what lets an uploader rely on a NAR without touching it (safety.py): a GC delete
        decided on an earlier object of the same key has landed before the key could be absent. A
        False (the key was there, or was replaced) means "rely on it as on a reference". This default
        asks first; backends with conditional writes override it with one request.
        """
        if await self.exists(key):
            return False
        await self.put(key, data, content_type)
        return True

    async def put_nar(self, key: str, chunks: AsyncIterable[bytes], content_type: str, size_hint: int) -> None:
        """Write a NAR from a stream of pieces, committing it only once the stream has ended normally.

        The stream raises instead of ending when its bytes must not be published (NarMismatchError):
        then nothing is committed and no partial object is ever visible. `size_hint` (the NAR's size)
        bounds the compressed size. NAR keys name their bytes (narstream.py), so replacing an existing
        object writes the same bytes again. This default collects the stream in memory first.
        """
        data = b"".join([chunk async for chunk in chunks])
        await self.put(key, data, content_type)

    def nar_memory(self, size_hint: int) -> int:
        """What put_nar (or put_new, for a small NAR) holds at most for a NAR of `size_hint` bytes, beyond
        the piece it is handed: the scheduler's byte budget counts it. This default collects the whole
        compressed NAR (at most about its size)."""
        return size_hint

    @abc.abstractmethod
    def list(self, prefix: str = "") -> AsyncIterator[ObjectStat]: ...

    @abc.abstractmethod
    async def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    async def stat(self, key: str) -> ObjectStat | None: ...

    async def stat_top(self, keys: Collection[str], budget: int) -> dict[str, ObjectStat] | None:
        """The objects among `keys` (top-level keys, like narinfos) found by listing the cache's top
        level in at most `budget` requests; None when that listing would take more (ask per key then).

        Where a listing page answers for a thousand keys, a large closure is checked with a few
        requests instead of one per path. This default has no cheap listing.
        """
        return None

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

    def congested(self) -> bool:
        """Whether more requests at once would not go faster (throttled, or answering much slower than
        its best): the scheduler then uploads fewer paths at once."""
        return False

    async def cleanup(self) -> None:
        """Remove what a killed uploader may have left behind (old temp files)."""
        return None

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """`async with open_backend(...) as backend:` closes it however the body ends."""
        await self.close()
