"""Nix's base-32 encoding of hashes.

Nix reads the digest as one little-endian integer and writes it most significant digit first, with an
alphabet that omits e, o, u and t. This is not RFC 4648 base32; mixing the two up is a classic bug.
"""

from __future__ import annotations

import base64
import functools

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


def encoded_length(nbytes: int) -> int:
    """Characters needed for a digest of `nbytes` bytes (52 for sha256, 32 for a store path hash)."""
    return (nbytes * 8 - 1) // 5 + 1


_PAIRS = [a + b for a in ALPHABET for b in ALPHABET]  # ten bits as two digits, most significant first


@functools.lru_cache(maxsize=4096)
def encode(digest: bytes) -> str:
    """The digest's integer, five bits a digit, most significant first, ten bits at a time from the
    least significant end. Cached: an upload writes its NarHash three times (key, narinfo, fingerprint)."""
    n = encoded_length(len(digest))
    value = int.from_bytes(digest, "little")
    pairs = []
    for _ in range(n // 2):
        pairs.append(_PAIRS[value & 1023])
        value >>= 10
    if n % 2:
        pairs.append(ALPHABET[value & 31])
    return "".join(reversed(pairs))


def decode(text: str) -> bytes:
    """Decode Nix base-32; raises ValueError on a bad character or on bits beyond the digest's size."""
    nbytes = len(text) * 5 // 8
    if encoded_length(nbytes) != len(text):
        raise ValueError(f"invalid Nix base-32 length {len(text)}")
    value = 0
    for c in text:
        try:
            value = (value << 5) | _INDEX[c]
        except KeyError:
            raise ValueError(f"invalid Nix base-32 character {c!r}") from None
    if value >> (nbytes * 8):
        raise ValueError("Nix base-32 string has excess bits")
    return value.to_bytes(nbytes, "little")


def parse_hash(text: str, algo: str = "sha256") -> bytes:
    """Parse a hash as Nix writes it anywhere: `algo:nix32`, `algo:hex`, `algo:base64` or SRI `algo-base64`.

    Returns the raw digest. Raises ValueError naming what is wrong.
    """
    sizes = {"sha256": 32, "sha1": 20, "sha512": 64, "md5": 16}
    if text.startswith(algo + ":"):
        body = text[len(algo) + 1 :]
    elif text.startswith(algo + "-"):
        body = text[len(algo) + 1 :]
        digest = base64.b64decode(body, validate=True)
        if len(digest) != sizes[algo]:
            raise ValueError(f"SRI hash {text!r} has the wrong length for {algo}")
        return digest
    else:
        raise ValueError(f"hash {text!r} is not a {algo} hash")
    size = sizes[algo]
    if len(body) == encoded_length(size):
        return decode(body)
    if len(body) == 2 * size:
        return bytes.fromhex(body)
    digest = base64.b64decode(body, validate=True)
    if len(digest) != size:
        raise ValueError(f"hash {text!r} has the wrong length for {algo}")
    return digest


def format_hash(digest: bytes, algo: str = "sha256") -> str:
    """The form narinfos and fingerprints use: `sha256:<nix32>`."""
    return f"{algo}:{encode(digest)}"
