"""A binary cache in a local directory (`file:///dir`), as Nix's own file:// store reads it.

Every write is atomic: a temp file in the destination directory, fsync, then rename (or, for NARs,
streamed into the temp file, link, which refuses to replace an existing file). The directory is
fsynced so that a NAR is durable before the narinfo that points at it is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

from .base import Backend, BackendError, ObjectStat, PermanentBackendError, T

TMP_PREFIX = ".hookd-tmp-"
CHUNK = 1 << 20
STALE_TMP = 3600.0  # seconds after which a temp file is surely a killed uploader's


def _wrap(key: str, e: OSError) -> BackendError:
    kind = PermanentBackendError if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else BackendError
    return kind(f"file cache: {key}: {e.strerror or e}")


class FileBackend(Backend):
    def __init__(self, root: str | Path, fsync: bool = True) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root}"
        self.fsync = fsync

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/") or "\0" in key:
            raise PermanentBackendError(f"file cache: refusing key {key!r}")
        return self.root / key

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(os.path.exists, self._path(key))

    async def get(self, key: str) -> bytes | None:
        def read() -> bytes | None:
            try:
                return self._path(key).read_bytes()
            except FileNotFoundError:
                return None
            except OSError as e:
                raise _wrap(key, e) from None

        return await asyncio.to_thread(read)

    async def read(self, key: str, consume: Callable[[AsyncIterator[bytes]], Awaitable[T]]) -> T | None:
        path = self._path(key)
        try:
            f = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise _wrap(key, e) from None

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while chunk := await asyncio.to_thread(f.read, CHUNK):
                    yield chunk
            except OSError as e:
                raise _wrap(key, e) from None

        try:
            return await consume(chunks())
        finally:
            f.close()

    def _tmp(self, dest: Path) -> tuple[BinaryIO, Path]:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=dest.parent)
        os.fchmod(fd, 0o644)
        return os.fdopen(fd, "wb"), Path(tmp)

    def _finish(self, f: BinaryIO) -> None:
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())
        f.close()

    def _sync_dir(self, directory: Path) -> None:
        if self.fsync:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _write(self, key: str, data: bytes, replace: bool) -> bool:
        """A temp file, fsynced, renamed over `key` (replace) or linked to it (never replaces: False if
        the key was there)."""
        dest = self._path(key)
        try:
            f, tmp = self._tmp(dest)
            try:
                f.write(data)
                self._finish(f)
                if not replace:
                    return self._commit(tmp, dest)
                os.replace(tmp, dest)
                self._sync_dir(dest.parent)
                return True
            finally:
                f.close()
                tmp.unlink(missing_ok=True)
        except OSError as e:
            raise _wrap(key, e) from None

    async def put(self, key: str, data: bytes, content_type: str, *, content_encoding: str | None = None) -> None:
        if content_encoding is not None:
            # A directory keeps no headers: Nix's file:// store and a web server in front would hand the
            # encoded bytes to clients as they are, which cannot read them.
            raise PermanentBackendError(f"file cache: {key}: a directory cannot store a Content-Encoding")
        await asyncio.to_thread(self._write, key, data, True)

    async def touch(self, key: str, content_type: str) -> bool:
        def utime() -> bool:
            try:
                os.utime(self._path(key))
            except FileNotFoundError:
                return False
            return True

        return await asyncio.to_thread(utime)

    async def cleanup(self) -> None:
        def remove_stale() -> None:
            cutoff = time.time() - STALE_TMP
            for d in (self.root, self.root / "nar"):
                with contextlib.suppress(FileNotFoundError):
                    for entry in os.scandir(d):
                        if entry.name.startswith(TMP_PREFIX) and entry.stat().st_mtime < cutoff:
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(entry.path)

        await asyncio.to_thread(remove_stale)

    async def put_new(self, key: str, data: bytes, content_type: str) -> bool:
        """A temp file linked into place: link(2) never replaces, so it says whether this created it."""
        return await asyncio.to_thread(self._write, key, data, False)

    def nar_memory(self, size_hint: int) -> int:
        return 0  # written piece by piece to a temp file

    async def put_nar(self, key: str, chunks: AsyncIterable[bytes], content_type: str, size_hint: int) -> None:
        """Stream into a temp file beside the NAR's name; after a normal end, fsync and link it into place
        (link never replaces: an existing NAR of this key holds the same bytes)."""
        dest = self._path(key)
        try:
            f, tmp = await asyncio.to_thread(self._tmp, dest)
        except OSError as e:
            raise _wrap(key, e) from None
        try:
            try:
                async for chunk in chunks:
                    await asyncio.to_thread(f.write, chunk)
                await asyncio.to_thread(self._finish, f)
                await asyncio.to_thread(self._commit, tmp, dest)
            except OSError as e:
                raise _wrap(key, e) from None
        finally:
            f.close()
            tmp.unlink(missing_ok=True)

    def _commit(self, tmp: Path, dest: Path) -> bool:
        try:
            os.link(tmp, dest)
        except FileExistsError:
            return False
        self._sync_dir(dest.parent)
        return True

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectStat]:
        def scan() -> list[ObjectStat]:
            out = []
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel = os.path.relpath(dirpath, self.root)
                for name in filenames:
                    if name.startswith(TMP_PREFIX):
                        continue
                    key = name if rel == "." else f"{rel}/{name}"
                    if not key.startswith(prefix):
                        continue
                    try:
                        st = os.stat(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        continue
                    out.append(ObjectStat(key, st.st_size, st.st_mtime))
            return sorted(out, key=lambda o: o.key)

        for item in await asyncio.to_thread(scan):
            yield item

    async def delete(self, key: str) -> None:
        def remove() -> None:
            try:
                self._path(key).unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                raise _wrap(key, e) from None

        await asyncio.to_thread(remove)

    async def stat(self, key: str) -> ObjectStat | None:
        def do_stat() -> ObjectStat | None:
            try:
                st = self._path(key).stat()
            except FileNotFoundError:
                return None
            return ObjectStat(key, st.st_size, st.st_mtime)

        return await asyncio.to_thread(do_stat)
