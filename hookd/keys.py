"""Key files on disk: writing new ones safely, and reading the secret key only if nobody else can."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from .signing import KeyFileError, PublicKey, SecretKey


class KeyPermissionError(PermissionError):
    """The secret key file is readable by users other than its owner."""


def _write_new(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, mode)


def write_keypair(name: str, secret_file: Path, public_file: Path) -> SecretKey:
    """Generate a key pair; refuses to overwrite either file (FileExistsError names it)."""
    for p in (secret_file, public_file):
        if os.path.lexists(p):
            raise FileExistsError(f"{p} already exists; refusing to overwrite a key file")
    key = SecretKey.generate(name)
    _write_new(secret_file, str(key), 0o600)
    _write_new(public_file, str(key.public), 0o644)
    return key


def default_key_name() -> str:
    return f"{socket.gethostname().split('.')[0]}-hookd-1"


def load_secret_key(path: Path) -> SecretKey:
    """Read a secret key file, refusing one that group or others may read (or one that is not a file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"secret key file {path} does not exist (create one with `hookd keygen NAME "
            f"--secret-key-file {path} --public-key-file {path}.pub`)"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"secret key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyPermissionError(
            f"secret key file {path} has mode {stat.S_IMODE(st.st_mode):04o}, so users other than its "
            f"owner can read it; refusing to use it. Run `chmod 600 {path}` (owned by hookd's user)."
        )
    try:
        return SecretKey.parse(path.read_text())
    except KeyFileError as e:
        raise KeyFileError(f"secret key file {path}: {e}") from None


def read_public_key(path: Path) -> PublicKey:
    return PublicKey.parse(path.read_text())
