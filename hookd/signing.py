"""Ed25519 keys in Nix's key-file format, and narinfo signatures.

Secret key file: `name:base64(64 bytes)` (the 32-byte seed followed by the public key); public key file:
`name:base64(32 bytes)`. Signatures are `name:base64(64 bytes)` over the narinfo fingerprint.
"""

from __future__ import annotations

import base64
import binascii
import functools
from dataclasses import dataclass

import nacl.exceptions
import nacl.signing


class KeyFileError(ValueError):
    """A key file or signature is malformed."""


def _split(text: str, what: str, size: int) -> tuple[str, bytes]:
    text = text.strip()
    name, sep, b64 = text.partition(":")
    if not sep or not name:
        raise KeyFileError(f"{what} is not of the form NAME:BASE64")
    try:
        raw = base64.b64decode(b64, validate=True)
    except binascii.Error:
        raise KeyFileError(f"{what} {name!r}: the part after ':' is not valid base64") from None
    if len(raw) != size:
        raise KeyFileError(f"{what} {name!r}: expected {size} bytes after base64 decoding, got {len(raw)}")
    return name, raw


@dataclass(frozen=True)
class PublicKey:
    name: str
    key: bytes

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        name, raw = _split(text, "public key", 32)
        return cls(name, raw)

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode()}"

    def verify(self, fingerprint: str, sig: str) -> bool:
        """True if `sig` (a `Sig:` value) is this key's valid signature of `fingerprint`."""
        name, _, b64 = sig.partition(":")
        if name != self.name:
            return False
        try:
            raw = base64.b64decode(b64, validate=True)
            nacl.signing.VerifyKey(self.key).verify(fingerprint.encode(), raw)
        except (binascii.Error, ValueError, nacl.exceptions.BadSignatureError):
            return False
        return True


@dataclass(frozen=True)
class SecretKey:
    name: str
    key: bytes  # 64 bytes: seed + public key, as Nix stores it

    @classmethod
    def parse(cls, text: str) -> SecretKey:
        name, raw = _split(text, "secret key", 64)
        derived = bytes(nacl.signing.SigningKey(raw[:32]).verify_key)
        if derived != raw[32:]:
            raise KeyFileError(f"secret key {name!r}: its public half does not match its seed")
        return cls(name, raw)

    @classmethod
    def generate(cls, name: str) -> SecretKey:
        if not name or ":" in name:
            raise KeyFileError(f"key name {name!r} must be non-empty and contain no ':'")
        sk = nacl.signing.SigningKey.generate()
        return cls(name, bytes(sk) + bytes(sk.verify_key))

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode()}"

    @property
    def public(self) -> PublicKey:
        return PublicKey(self.name, self.key[32:])

    @functools.cached_property
    def _signing_key(self) -> nacl.signing.SigningKey:
        """Made once: deriving it from the seed costs more than a signature."""
        return nacl.signing.SigningKey(self.key[:32])

    def sign(self, fingerprint: str) -> str:
        """The `Sig:` value for `fingerprint`. Ed25519 is deterministic, so this reproduces Nix exactly."""
        signed = self._signing_key.sign(fingerprint.encode())
        return f"{self.name}:{base64.b64encode(signed.signature).decode()}"
