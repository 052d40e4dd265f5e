"""Key files on disk: writing new ones safely, and reading the secret key only if nobody else can."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from . import access
from .signing import KeyFileError, PublicKey, SecretKey


class KeyPermissionError(PermissionError):
    """The secret key file is readable by users other than hookd's and root."""


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


def others_who_can_read(path: Path, allowed: set[int]) -> tuple[list[str], bool]:
    """Who, besides the users in `allowed`, can read `path` (described for an error message), and whether
    the file carries named ACL entries."""
    _, who, named = access.who_can_read(path)
    others = [access.user_name(u) for u in sorted(who.users - allowed)]
    for g in sorted(who.groups):
        members = access.group_members(g) - allowed
        if members:
            others.append(
                f"the members of {access.group_name(g)}: {', '.join(access.user_name(u) for u in sorted(members))}"
            )
    if who.everyone:
        others.append("every user (the file's mode or ACL lets others read it)")
    return others, named


def _in_credentials_directory(path: Path) -> bool:
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    return creds is not None and os.path.realpath(path).startswith(os.path.realpath(creds) + os.sep)


def load_secret_key(path: Path) -> SecretKey:
    """Read a secret key file, refusing one that anyone but this process's user and root can read.

    Who can read is decided from the owner, the ACL entries (through the mask) and the members of the groups
    allowed to read, not from mode bits: systemd's `LoadCredential=` copy in `$CREDENTIALS_DIRECTORY` is
    root-owned 0400 plus an ACL entry for the service's user, which `stat` shows as 0440, and is accepted
    for what it is, a copy only the service can read.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"secret key file {path} does not exist (create one with `hookd keygen NAME "
            f"--secret-key-file {path} --public-key-file {path}.pub`)"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"secret key file {path} is not a regular file")
    me = os.geteuid()
    others, named = others_who_can_read(path, {me, 0})
    if others:
        if _in_credentials_directory(path):
            advice = (
                "It is systemd's credential copy in $CREDENTIALS_DIRECTORY, which systemd makes readable by the "
                "service alone: something changed it since; restart the service for a fresh copy."
            )
        else:
            fix = f"chown {access.login(me)} {path} && chmod 0400 {path}"
            advice = (
                f"Let only hookd's user read it: `{fix}{f' && setfacl -b {path}' if named else ''}`; or keep it "
                f"root-owned 0400 and hand it to the service with systemd's LoadCredential= (as "
                f"systemd/hookd.service and the NixOS module do)."
            )
        raise KeyPermissionError(
            f"secret key file {path} can be read by {'; '.join(others)}, not only by hookd's user "
            f"{access.user_name(me)} and root; refusing to use it. {advice}"
        )
    try:
        return SecretKey.parse(path.read_text())
    except KeyFileError as e:
        raise KeyFileError(f"secret key file {path}: {e}") from None


def read_public_key(path: Path) -> PublicKey:
    return PublicKey.parse(path.read_text())
