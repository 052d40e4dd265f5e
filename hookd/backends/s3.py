"""A binary cache in an S3 bucket (AWS, MinIO, Garage, Ceph, R2…), through aiobotocore and, for writes
and HEADs, through requests hookd signs itself (s3wire.py).

A small NAR goes up in one PUT (request budgets matter); a larger one as a multipart upload whose
parts are sent as the stream fills them, `part_concurrency` at a time, so memory holds at most that
many parts plus the one filling, and nothing is staged on disk.

NAR bytes never touch the event loop beyond being handed on: a part's pieces are joined and their
SHA-256 computed in a worker thread, and that hash is what the request's signature covers. The server
checks the bytes against it (XAmzContentSHA256Mismatch otherwise, retried). Where hookd cannot send
as botocore would (a proxy, a bucket in another region than configured), writes and HEADs go through botocore
instead: NAR bytes then through a client that does not hash payloads on the loop, with their
Content-MD5, which the signature covers and the server checks (BadDigest otherwise, retried).

The upload is completed only after the stream ended normally, and aborted otherwise (a NarHash
mismatch, a failed part). Credentials come from botocore's standard chain (environment, shared profile,
instance role) or an explicit credentials file, and never appear in logs or errors: those carry the
operation, the key and S3's error code.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import __version__
from .base import Backend, BackendError, ObjectStat, PermanentBackendError, PreconditionFailed, T
from .http11 import TRANSIENT, Response
from .retry import Remote, RetryableError, RetryPolicy, parse_retry_after, unanswered, with_retries
from .s3wire import REGION_CODES, Wire, error_code, headers_of
from .sigv4 import EMPTY_SHA256, Credentials, canonical_path

log = logging.getLogger("hookd.backend")

MIN_PART = 5 << 20
READ_CHUNK = 1 << 20
MAX_PARTS = 10_000
THROTTLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "TooManyRequestsException",
    "RequestThrottled",
    "ServiceUnavailable",
}
RETRY_CODES = {
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "IncompleteBody",
    "500",
    "502",
    "503",
    "504",
    "BadDigest",
    "XAmzContentSHA256Mismatch",
    "ConditionalRequestConflict",
}
NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
ON_THE_LOOP = 256 << 10
"""A body up to this size (a narinfo, a listing) is hashed on the event loop; a larger one in a thread."""


class S3Backend(Backend):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        region: str | None = None,
        endpoint: str | None = None,
        profile: str | None = None,
        addressing: str = "auto",
        storage_class: str | None = None,
        credentials_file: Path | None = None,
        multipart_threshold: int = 8 << 20,
        part_size: int = 16 << 20,
        part_concurrency: int = 2,
        remote: Remote | None = None,
    ) -> None:
        remote = remote or Remote()
        if addressing not in ("auto", "path", "virtual"):
            raise PermanentBackendError(f"S3 addressing {addressing!r}: expected path or virtual")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.region = region
        self.endpoint = endpoint
        self.profile = profile
        self.addressing = addressing
        self.storage_class = storage_class
        self.credentials_file = credentials_file
        self.multipart_threshold = max(multipart_threshold, MIN_PART)
        self.part_size = max(part_size, MIN_PART)
        self.part_concurrency = max(1, part_concurrency)
        self.connect_timeout, self.read_timeout = remote.connect_timeout, remote.read_timeout
        self.max_connections = remote.max_connections
        self.policy, self.rate = remote.policy, remote.rate
        self._session: Any = None
        self._ctxs: list[Any] = []
        self._client: Any = None
        self._bulk: Any = None  # NAR bytes: payload not hashed for the signature, Content-MD5 sent
        self._sealer: ThreadPoolExecutor | None = None
        self._wire: Wire | None = None  # writes signed and sent by hookd; None: through botocore
        self._wire_decided = False
        self._wire_lock = asyncio.Lock()
        self._lock = asyncio.Lock()
        self._conditional: bool | None = None
        self._probe_lock = asyncio.Lock()
        self.list_page = 1000  # keys per listing page (S3's maximum)

    async def _c(self, bulk: bool = False) -> Any:
        """The client (made on first use: a GC or a verify never needs the bulk one)."""
        async with self._lock:
            if self._session is None:
                from aiobotocore.session import AioSession

                self._session = AioSession(profile=self.profile)
                if self.credentials_file is not None:
                    self._session.set_config_variable("credentials_file", str(self.credentials_file))
            if bulk:
                if self._bulk is None:
                    self._bulk = await self._open(self._session, {"payload_signing_enabled": False})
                return self._bulk
            if self._client is None:
                self._client = await self._open(self._session, {})
            return self._client

    async def _w(self) -> Wire | None:
        """The wire for writes, learned once from a HEAD that botocore sends (None: botocore writes)."""
        if not self._wire_decided:
            async with self._wire_lock:
                if not self._wire_decided:
                    self._wire = await self._learn_wire()
                    self._wire_decided = True
        return self._wire

    async def _learn_wire(self) -> Wire | None:
        client = await self._c()
        creds = await self._session.get_credentials()
        if creds is None:
            return None  # botocore's requests say what is missing
        probe = self._key(".hookd-probe-wire")
        seen: list[tuple[str, str]] = []

        def learn(request: Any, signature_version: str, region_name: str, **_: Any) -> None:
            if signature_version == "s3v4" and request.url.split("?", 1)[0].endswith("/" + canonical_path(probe)):
                seen.append((request.url, request.context.get("signing", {}).get("region") or region_name))

        client.meta.events.register("before-sign.s3.HeadObject", learn, unique_id="hookd-wire")
        try:
            await self._call("head_object", probe, Key=probe)
        except BackendError:
            if not seen:  # not even signed: decided on a later write
                raise
            # signed (and sent): what is learned is where and how botocore sends, whatever the answer
        finally:
            client.meta.events.unregister("before-sign.s3.HeadObject", unique_id="hookd-wire")

        async def current() -> Credentials:
            frozen = await creds.get_frozen_credentials()
            return Credentials(frozen.access_key, frozen.secret_key, frozen.token)

        wire = None
        if seen:  # the last one: after botocore followed any redirect to the bucket's region
            url, region = seen[-1]
            wire = Wire.learned(
                url, probe, region, current, limit=self.max_connections, connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout, user_agent=f"hookd/{__version__}",
                ca_file=self._session.get_config_variable("ca_bundle"),
            )  # fmt: skip
        if wire is None:
            log.info("%s: writes and HEADs go through botocore (a proxy, or an endpoint it cannot sign for)", self.url)
        return wire

    async def _open(self, session: Any, s3: dict[str, Any]) -> Any:
        from aiobotocore.config import AioConfig

        config = AioConfig(
            s3={"addressing_style": self.addressing, **s3},
            retries={"total_max_attempts": 1},  # ours, with jitter and an adaptive rate
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_pool_connections=self.max_connections,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        ctx = session.create_client("s3", region_name=self.region, endpoint_url=self.endpoint, config=config)
        client = await ctx.__aenter__()
        self._ctxs.append(ctx)
        return client

    def congested(self) -> bool:
        return self.rate.congested

    async def close(self) -> None:
        if self._sealer is not None:
            self._sealer.shutdown(wait=False)
            self._sealer = None
        wire, self._wire, self._wire_decided = self._wire, None, False
        if wire is not None:
            await wire.close()
        ctxs, self._ctxs = self._ctxs, []
        self._client = self._bulk = None
        for ctx in ctxs:
            await ctx.__aexit__(None, None, None)

    def _key(self, key: str) -> str:
        return self.prefix + key

    async def _call(self, op: str, key: str, *, bulk: bool = False, **kwargs: Any) -> Any:
        """One S3 call with retries; returns None when the object does not exist (HEAD/GET). `bulk`: a
        body with its ContentMD5, sent by the client that does not hash payloads on the loop."""
        what = f"S3 {op} {self.bucket}/{self._key(key)}"

        async def once() -> Any:
            return await self._boto(what, op, bulk, kwargs)

        return await with_retries(what, once, self.policy, self.rate)

    async def _boto(self, what: str, op: str, bulk: bool, kwargs: dict[str, Any]) -> Any:
        """One attempt of an S3 call through botocore: its result, or None when the object does not exist."""
        client = await self._c(bulk)
        if isinstance(kwargs.get("Body"), io.BytesIO):
            kwargs["Body"].seek(0)  # sent again from its start after a failure
        try:
            result = await getattr(client, op)(Bucket=self.bucket, **kwargs)
            if op == "get_object":
                async with result["Body"] as body:
                    return await body.read()
            return result
        except Exception as e:  # classified below; nothing here is a bug of ours
            return _classify(what, e)

    async def _put(
        self,
        key: str,
        body: bytes | io.BytesIO,
        extra: dict[str, Any],
        *,
        sha256: str | None = None,
        md5: str | None = None,
        part: tuple[str, int] | None = None,
    ) -> str | None:
        """PUT an object, or part `part` (upload id, number) of a multipart upload, with retries; its
        ETag. Signed by hookd with the body's SHA-256 where the wire is on; otherwise through botocore:
        with `md5`, by the client that does not hash payloads, else by the one that does."""
        op = "upload_part" if part else "put_object"
        what = f"S3 {op} {self.bucket}/{self._key(key)}"
        boto: dict[str, Any] = {"Key": self._key(key), "Body": body, **extra}
        if part is not None:
            boto.update(UploadId=part[0], PartNumber=part[1])

        async def once() -> str | None:
            wire = self._wire
            if wire is not None and sha256 is not None and isinstance(body, bytes):
                return await self._put_wire(wire, what, key, body, sha256, extra, part)
            result = await self._boto(what, op, md5 is not None, {**boto, **({"ContentMD5": md5} if md5 else {})})
            if result is None:
                raise PermanentBackendError(f"{what}: 404")  # no bucket, no upload: not an answer here
            etag: str | None = result.get("ETag")
            return etag

        return await with_retries(what, once, self.policy, self.rate)

    async def _put_wire(
        self,
        wire: Wire,
        what: str,
        key: str,
        body: bytes,
        sha256: str,
        extra: dict[str, Any],
        part: tuple[str, int] | None,
    ) -> str | None:
        params = {"partNumber": str(part[1]), "uploadId": part[0]} if part else None
        resp = await self._on_wire(wire, what, "PUT", key, params, headers_of(extra), body, sha256)
        if resp is None:
            raise PermanentBackendError(f"{what}: 404")  # no bucket, no upload: not an answer here
        return resp.headers.get("etag")

    async def _on_wire(
        self,
        wire: Wire,
        what: str,
        method: str,
        key: str,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        sha256: str = EMPTY_SHA256,
    ) -> Response | None:
        """One request of hookd's own: its answer, None for a 404, or the error (_raise_for). An answer
        that says the bucket is in another region turns the wire off (botocore follows redirects) and is
        retried through botocore."""
        try:
            resp = await wire.request(method, self._key(key), params=params, headers=headers, body=body, sha256=sha256)
        except TRANSIENT as e:
            raise unanswered(what, e) from None
        if resp.status < 300:
            return resp
        code = error_code(resp)
        # a HEAD's only word of it: 400, no body, the bucket's region in a header
        elsewhere = resp.status == 400 and resp.headers.get("x-amz-bucket-region", wire.region) != wire.region
        if code in REGION_CODES or resp.status in (301, 307) or elsewhere:
            if self._wire is wire:  # the first of the requests in flight to hear it
                self._wire = None
                await wire.close()
                log.info("%s: %s to hookd's own request; it goes through botocore from now on", self.url, code)
            raise RetryableError(f"{what}: {code}")
        _raise_for(what, resp.status, code, resp.headers)
        return None

    async def exists(self, key: str) -> bool:
        return await self.stat(key) is not None

    async def get(self, key: str) -> bytes | None:
        result = await self._call("get_object", key, Key=self._key(key))
        return result if isinstance(result, bytes) else None

    async def read(self, key: str, consume: Callable[[AsyncIterator[bytes]], Awaitable[T]]) -> T | None:
        what = f"S3 get_object {self.bucket}/{self._key(key)}"

        async def once() -> tuple[T] | None:
            client = await self._c()
            try:
                result = await client.get_object(Bucket=self.bucket, Key=self._key(key))
                async with result["Body"] as body:
                    return (await consume(body.iter_chunks(READ_CHUNK)),)
            except Exception as e:  # classified (consume reports bad content, it does not raise)
                _classify(what, e)
                return None

        found = await with_retries(what, once, self.policy, self.rate)
        return found[0] if found else None

    def _extra(self, content_type: str) -> dict[str, Any]:
        extra: dict[str, Any] = {"ContentType": content_type}
        if self.storage_class:
            extra["StorageClass"] = self.storage_class
        return extra

    async def put(self, key: str, data: bytes, content_type: str, *, content_encoding: str | None = None) -> None:
        extra = self._extra(content_type)
        if content_encoding is not None:
            extra["ContentEncoding"] = content_encoding
        if await self._w() is None:
            await self._put(key, data, extra)
        elif len(data) <= ON_THE_LOOP:
            await self._put(key, data, extra, sha256=_sha256(data))
        else:
            await self._put(key, data, extra, sha256=await self._run(_sha256, data))

    async def put_new(self, key: str, data: bytes, content_type: str) -> bool:
        """One conditional PUT (If-None-Match: *) where the server enforces it (probed once per
        backend: AWS, moto and radosgw do); asking first otherwise."""
        async with self._probe_lock:  # the first uploads arrive together: one probe for all of them
            if self._conditional is None:
                self._conditional = await self._probe_conditional()
        if not self._conditional:
            return await super().put_new(key, data, content_type)
        try:
            await self._put_bulk(key, [data], {"IfNoneMatch": "*", **self._extra(content_type)})
        except PreconditionFailed:
            return False
        return True

    async def _probe_conditional(self) -> bool:
        """Whether a second conditional PUT of one key is refused (an old server ignores the header)."""
        probe = f"nar/.hookd-probe-{uuid.uuid4().hex}"
        try:
            for _ in range(2):
                await self._put(probe, b"", {"IfNoneMatch": "*"}, sha256=EMPTY_SHA256)
        except PreconditionFailed:
            return True
        finally:
            await self.delete(probe)
        log.info("%s ignores If-None-Match on PUT: NARs are asked for before they are written", self.url)
        return False

    async def put_nar(self, key: str, chunks: AsyncIterable[bytes], content_type: str, size_hint: int) -> None:
        """One PUT when the NAR is smaller than multipart_threshold; otherwise a multipart upload whose
        parts are sent as they fill, `part_concurrency` at a time, completed after a normal end only.
        The stream's pieces are collected as they come (no copy on the loop); a part is at least
        part_size (its last piece may take it over)."""
        part_size = self.nar_part_size(size_hint)
        pieces: list[bytes] = []
        filled = 0
        upload: _Multipart | None = None
        try:
            async for chunk in chunks:
                pieces.append(chunk)
                filled += len(chunk)
                if filled < part_size or (upload is None and filled < self.multipart_threshold):
                    continue
                if upload is None:
                    upload = await self._create(key, content_type)
                await upload.send(pieces)
                pieces, filled = [], 0
            if upload is None:
                await self._put_bulk(key, pieces, self._extra(content_type))
                return
            if pieces:
                await upload.send(pieces)
            parts = await upload.parts()
            try:
                await self._call(
                    "complete_multipart_upload", key, Key=self._key(key), UploadId=upload.upload_id,
                    MultipartUpload={"Parts": parts},
                )  # fmt: skip
            except Exception:
                # A completion whose answer was lost is retried into NoSuchUpload: the object is there.
                if await self.stat(key) is None:
                    raise
        except BaseException:
            if upload is not None:
                await asyncio.shield(upload.abandon())
            raise

    def nar_part_size(self, size_hint: int) -> int:
        """The part size for a NAR of `size_hint` bytes: part_size, or more when MAX_PARTS would not
        hold it (the compressed size is bounded by the NAR's size plus zstd's worst-case overhead)."""
        return max(self.part_size, -(-(size_hint + (size_hint >> 7) + (1 << 20)) // MAX_PARTS))

    def nar_memory(self, size_hint: int) -> int:
        """The parts in flight, the one filling and the one being joined (each up to a piece over
        part_size); below that, the NAR's pieces and their join."""
        part = self.nar_part_size(size_hint) + (1 << 20)
        return min(2 * (size_hint + (size_hint >> 7) + (64 << 10)), part * (self.part_concurrency + 2))

    async def _seal(self, pieces: list[bytes]) -> tuple[bytes | io.BytesIO, str | None, str | None]:
        """NAR bytes joined and hashed (SHA-256 for the wire, else MD5) by a thread of the backend's own
        pool: (data, sha256, md5)."""
        if await self._w() is not None:
            data, sha256 = await self._run(_join_sha256, pieces)
            return data, sha256, None
        buffer, md5 = await self._run(_seal, pieces)
        return buffer, None, md5

    async def _run(self, fn: Callable[[Any], T], arg: Any) -> T:
        """`fn(arg)` in a thread of the backend's own pool (joins and hashes of NAR bytes). Not niced like the
        threads that compress: this is sending, which the loop used to do at its priority; niced, it
        competed with the compressor for the same share and slowed 512 MiB of /usr/lib to radosgw
        from 177-193 to 124-129 MiB/s (and 131-145 to 88-102), in turn in the same minutes."""
        if self._sealer is None:
            self._sealer = ThreadPoolExecutor(self.part_concurrency + 1, "s3-seal")
        return await asyncio.get_running_loop().run_in_executor(self._sealer, fn, arg)

    async def _put_bulk(self, key: str, pieces: list[bytes], extra: dict[str, Any]) -> None:
        """One PUT of NAR bytes, joined and hashed off the loop."""
        data, sha256, md5 = await self._seal(pieces)
        await self._put(key, data, extra, sha256=sha256, md5=md5)

    async def _create(self, key: str, content_type: str) -> _Multipart:
        created = await self._call("create_multipart_upload", key, Key=self._key(key), **self._extra(content_type))
        return _Multipart(self, key, created["UploadId"])

    async def _abort(self, key: str, upload_id: str) -> None:
        """Abort a failed multipart upload, so its parts do not linger (and cost) in the bucket."""
        what = f"S3 abort_multipart_upload {self.bucket}/{self._key(key)}"

        async def once() -> Any:
            client = await self._c()
            try:
                return await client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(key), UploadId=upload_id)
            except Exception as e:
                return _classify(what, e)

        try:
            await with_retries(what, once, RetryPolicy(attempts=max(5, self.policy.attempts)), self.rate)
        except Exception as e:
            log.warning("%s failed (%s); a bucket lifecycle rule for incomplete uploads will clean it up", what, e)

    async def touch(self, key: str, content_type: str) -> bool:
        """Copy the object onto itself with replaced metadata: a new last-modified, no bytes sent.
        A missing source answers NoSuchKey (not found): one request for a NAR. Replacing the metadata
        drops a Content-Encoding, so an object that may carry one (narinfo, listing, log: another
        uploader may encode them) is looked at first and its encoding kept; the copy is made only if the
        object is still the one looked at (an object rewritten meanwhile is young anyway)."""
        extra: dict[str, Any] = dict(self._extra(content_type))
        if not key.startswith("nar/"):
            head = await self._call("head_object", key, Key=self._key(key))
            if head is None:
                return False
            if head.get("ContentEncoding"):
                extra["ContentEncoding"] = head["ContentEncoding"]
            if head.get("ETag"):
                extra["CopySourceIfMatch"] = head["ETag"]
        try:
            result = await self._call(
                "copy_object", key, Key=self._key(key), CopySource={"Bucket": self.bucket, "Key": self._key(key)},
                MetadataDirective="REPLACE", **extra,
            )  # fmt: skip
        except PreconditionFailed:
            return True
        return result is not None

    async def delete(self, key: str) -> None:
        await self._call("delete_object", key, Key=self._key(key))

    async def stat(self, key: str) -> ObjectStat | None:
        """A HEAD: hookd's own where the wire is on (the planner asks for many keys at once), else botocore's."""
        await self._w()
        what = f"S3 head_object {self.bucket}/{self._key(key)}"

        async def once() -> ObjectStat | None:
            wire = self._wire
            if wire is not None:
                resp = await self._on_wire(wire, what, "HEAD", key)
                return None if resp is None else _stat_of(what, key, resp.headers)
            res = await self._boto(what, "head_object", False, {"Key": self._key(key)})
            if res is None:
                return None
            return ObjectStat(key, int(res["ContentLength"]), res["LastModified"].timestamp(), res.get("ETag"))

        return await with_retries(what, once, self.policy, self.rate)

    async def stat_top(self, keys: Collection[str], budget: int) -> dict[str, ObjectStat] | None:
        """ListObjectsV2 of the top level (Delimiter "/": nar/, log/… count as one entry each), a
        thousand keys a page, given up after `budget` pages."""
        wanted = set(keys)
        found: dict[str, ObjectStat] = {}
        token: str | None = None
        for _ in range(budget):
            kwargs: dict[str, Any] = {"Prefix": self.prefix, "Delimiter": "/", "MaxKeys": self.list_page}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._call("list_objects_v2", "", **kwargs)
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self.prefix) :]
                if key in wanted:
                    found[key] = ObjectStat(key, int(obj["Size"]), obj["LastModified"].timestamp(), obj.get("ETag"))
            if not page.get("IsTruncated"):
                return found
            token = page.get("NextContinuationToken")
        return None

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectStat]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": self._key(prefix)}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._call("list_objects_v2", prefix, **kwargs)
            for obj in page.get("Contents", []):
                yield ObjectStat(
                    obj["Key"][len(self.prefix) :],
                    int(obj["Size"]),
                    obj["LastModified"].timestamp(),
                    obj.get("ETag"),
                )
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")


class _Multipart:
    """A multipart upload in progress: parts in flight (at most part_concurrency), their ETags."""

    def __init__(self, backend: S3Backend, key: str, upload_id: str) -> None:
        self.backend, self.key, self.upload_id = backend, key, upload_id
        self.tasks: list[asyncio.Task[dict[str, Any]]] = []
        self.gate = asyncio.Semaphore(backend.part_concurrency)

    async def send(self, pieces: list[bytes]) -> None:
        """Start sending the next part once fewer than part_concurrency are in flight (back pressure
        on the stream: memory holds at most part_concurrency parts plus the one filling)."""
        await self.gate.acquire()
        for t in self.tasks:
            if t.done() and t.exception() is not None:  # fail early: the stream stops being read
                self.gate.release()
                await t
        self.tasks.append(asyncio.create_task(self._part(len(self.tasks) + 1, pieces)))

    async def _part(self, number: int, pieces: list[bytes]) -> dict[str, Any]:
        b = self.backend
        try:
            data, sha256, md5 = await b._seal(pieces)
            pieces.clear()  # the joined copy is what is sent (and sent again after a failure)
            etag = await b._put(self.key, data, {}, sha256=sha256, md5=md5, part=(self.upload_id, number))
            if not etag:
                raise PermanentBackendError(f"S3 upload_part {b.bucket}/{b._key(self.key)}: answered without an ETag")
            return {"PartNumber": number, "ETag": etag}
        finally:
            self.gate.release()

    async def parts(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*self.tasks))

    async def abandon(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.backend._abort(self.key, self.upload_id)


def _stat_of(what: str, key: str, headers: dict[str, str]) -> ObjectStat:
    """An object's size, last-modified time and ETag from a HEAD's answer (as botocore reads them)."""
    from email.utils import parsedate_to_datetime

    try:
        return ObjectStat(
            key, int(headers["content-length"]), parsedate_to_datetime(headers["last-modified"]).timestamp(),
            headers.get("etag"),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError):
        raise RetryableError(f"{what}: an answer without a size or a last-modified time") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _join_sha256(pieces: list[bytes]) -> tuple[bytes, str]:
    """NAR bytes in one buffer, and their SHA-256 (hex) for the signature (blocking: run it in a thread)."""
    data = b"".join(pieces)
    return data, _sha256(data)


def _seal(pieces: list[bytes]) -> tuple[io.BytesIO, str]:
    """NAR bytes in one buffer, and their Content-MD5 (blocking, reads every byte: run it in a thread).

    A BytesIO that owns its buffer: aiohttp sends it 64 KiB at a time without copying it first (bytes
    become a BytesIO sharing them, which aiohttp copies on the loop; a bytearray goes to the socket in
    one write whose unsent rest the transport copies into its buffer, on the loop, a part's size more
    memory per part in flight)."""
    data = io.BytesIO()
    for piece in pieces:
        data.write(piece)
    with data.getbuffer() as view:
        md5 = hashlib.md5(view, usedforsecurity=False).digest()
    return data, base64.b64encode(md5).decode()


def _raise_for(what: str, status: int, code: str, headers: dict[str, str]) -> None:
    """Raise for an S3 error answer: retryable (throttled, 5xx, a checksum mismatch), a failed
    precondition, or permanent (denied, 4xx); return for a 404, whose meaning depends on the request."""
    retry_after = parse_retry_after(headers.get("retry-after"))
    if code in THROTTLE_CODES or status in (429, 503):
        raise RetryableError(f"{what}: {code or status}", True, retry_after)
    if code in RETRY_CODES or status >= 500:
        raise RetryableError(f"{what}: {code or status}", False, retry_after)
    if code == "PreconditionFailed" or status == 412:
        raise PreconditionFailed(f"{what}: {code or status}")
    if status == 404:
        return
    hint = " (check the credentials and the bucket policy)" if status in (401, 403) else ""
    raise PermanentBackendError(f"{what}: {code or status}{hint}")


def _classify(what: str, e: Exception) -> None:
    """Turn a botocore/aiohttp exception into None (not found), RetryableError or PermanentBackendError."""
    import aiohttp
    import botocore.exceptions as bex

    if isinstance(e, bex.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in NOT_FOUND or (status == 404 and code != "NoSuchBucket"):
            return None
        _raise_for(what, status, code, e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}))
        raise PermanentBackendError(f"{what}: {code or status}")
    if isinstance(e, bex.NoCredentialsError | bex.PartialCredentialsError | bex.ProfileNotFound):
        raise PermanentBackendError(f"{what}: {type(e).__name__} (configure S3 credentials)")
    if isinstance(
        e,
        bex.ConnectionError
        | bex.HTTPClientError
        | bex.ResponseStreamingError
        | aiohttp.ClientError
        | asyncio.TimeoutError
        | ConnectionError,
    ):
        raise RetryableError(f"{what}: {type(e).__name__}")
    raise PermanentBackendError(f"{what}: {type(e).__name__}")
