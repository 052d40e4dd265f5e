"""Content-Encoding for the small objects of a cache: narinfos, listings and build logs, never NARs.

Nix's S3 store writes them compressed with `narinfo-compression`, `ls-compression` and `log-compression` and
the header `Content-Encoding`; its HTTP store can too from Nix 2.32. Reading needs nothing new: every Nix
decodes a body by its `Content-Encoding` (2.8's file transfer already does, through libarchive or brotli),
and so does any HTTP client that honours the header. A NAR is never encoded: its `Compression` is in the
narinfo, and an HTTP layer that decoded it would break the FileHash.

Only servers that keep the header can serve encoded objects: S3 (and what imitates it) does; a directory
(file://) cannot, and nginx's WebDAV does not keep it. Decoding here sniffs the bytes (gzip and zstd have
magic numbers; a narinfo, listing or log starts with text), so a reader copes whether or not its transport
already decoded the body.

Pure: no I/O.
"""

from __future__ import annotations

import gzip
import zlib

import pyzstd

METHODS = ("none", "gzip", "zstd")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_DECODED = 64 << 20  # a narinfo, listing or log larger than this is not one


class EncodingError(ValueError):
    """An encoded body does not decode."""


def encodable(key: str) -> bool:
    """Whether Nix would encode this object: narinfos, listings and build logs."""
    return (key.endswith((".narinfo", ".ls")) and "/" not in key) or key.startswith("log/")


def encode(key: str, data: bytes, method: str) -> tuple[bytes, str | None]:
    """The bytes to store for `key` and its Content-Encoding (None: stored as is)."""
    if method == "none" or not encodable(key):
        return data, None
    if method == "gzip":
        return gzip.compress(data, compresslevel=9, mtime=0), "gzip"
    if method == "zstd":
        return pyzstd.compress(data, 19), "zstd"
    raise ValueError(f"unknown content encoding {method!r}")


def decode(data: bytes) -> bytes:
    """The object's text, whether it is still encoded (gzip, zstd) or not."""
    try:
        if data.startswith(_GZIP_MAGIC):
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = d.decompress(data, MAX_DECODED)
            if d.unconsumed_tail or not d.eof:
                raise EncodingError("gzip body too large or truncated")
            return out
        if data.startswith(_ZSTD_MAGIC):
            z = pyzstd.EndlessZstdDecompressor()
            out = z.decompress(data, MAX_DECODED + 1)
            if len(out) > MAX_DECODED or not z.at_frame_edge:
                raise EncodingError("zstd body too large or truncated")
            return bytes(out)
    except (zlib.error, pyzstd.ZstdError) as e:
        raise EncodingError(f"cannot decode: {e}") from None
    return data
