"""A binary cache in a local directory (`file:///dir`), as Nix's own file:// store reads it.

Every write is atomic: a temp file in the destination directory, fsync, then rename (or, for NARs,
link, which refuses to replace an existing file). The directory is fsynced so that a NAR is durable
before the narinfo that points at it is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from .base import Backend, BackendError, Blob, ObjectStat, PermanentBackendError, T

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

    def _write_tmp(self, dest: Path, blob: Blob) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, blob.open() as src:
                shutil.copyfileobj(src, out, CHUNK)
                out.flush()
                if self.fsync:
                    os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
        except BaseException:
            os.unlink(tmp)
            raise
        return Path(tmp)

    def _sync_dir(self, directory: Path) -> None:
        if self.fsync:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    async def put(self, key: str, data: bytes, content_type: str, *, content_encoding: str | None = None) -> None:
        if content_encoding is not None:
            # A directory keeps no headers: Nix's file:// store and a web server in front would hand the
            # encoded bytes to clients as they are, which cannot read them.
            raise PermanentBackendError(f"file cache: {key}: a directory cannot store a Content-Encoding")
        dest = self._path(key)

        def write() -> None:
            try:
                tmp = self._write_tmp(dest, Blob(len(data), data=data))
                os.replace(tmp, dest)
                self._sync_dir(dest.parent)
            except OSError as e:
                raise _wrap(key, e) from None

        await asyncio.to_thread(write)

    async def touch(self, key: str, content_type: str) -> bool:
        def utime() -> bool:
            try:
                os.utime(self._path(key))
            except FileNotFoundError:
                return False
            return True

        return await asyncio.to_thread(utime)

    def staging_dir(self) -> Path:
        return self.root / "nar"

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

    async def put_stream(self, key: str, blob: Blob, content_type: str) -> bool:
        dest = self._path(key)

        def write() -> bool:
            try:
                if dest.exists():
                    return False
                if blob.path is not None and blob.path.parent == dest.parent:
                    return self._commit_staged(blob.path, dest)
                tmp = self._write_tmp(dest, blob)
                try:
                    os.link(tmp, dest)
                    written = True
                except FileExistsError:
                    written = False
                finally:
                    os.unlink(tmp)
                self._sync_dir(dest.parent)
                return written
            except OSError as e:
                raise _wrap(key, e) from None

        return await asyncio.to_thread(write)

    def _commit_staged(self, staged: Path, dest: Path) -> bool:
        """Give a NAR staged in the destination directory its name: fsync, then link (never replace)."""
        fd = os.open(staged, os.O_RDONLY)
        try:
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(staged, 0o644)
        try:
            os.link(staged, dest)
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
