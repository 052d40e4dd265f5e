"""Store path syntax: what a well-formed path under a store directory looks like.

Everything that arrives from outside (the socket, the spool, a narinfo) is checked here before it is
used as a file name or handed to Nix.
"""

from __future__ import annotations

import re

DEFAULT_STORE_DIR = "/nix/store"
HASH_LEN = 32
MAX_NAME_LEN = 211
_BASENAME = re.compile(r"[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+\-._?=]{1,211}")


class StorePathError(ValueError):
    """A string is not a well-formed store path (the message says which and why)."""


def check_basename(name: str) -> str:
    if not _BASENAME.fullmatch(name):
        raise StorePathError(
            f"{name!r} is not a store path base name (32 Nix base-32 characters, '-', then a name "
            "of letters, digits and +-._?=)"
        )
    if name[HASH_LEN + 1 :] in (".", "..") or name[HASH_LEN + 1 :].startswith("."):
        raise StorePathError(f"{name!r}: a store path name must not start with '.'")
    return name


def check(path: str, store_dir: str = DEFAULT_STORE_DIR) -> str:
    """Return `path` if it is a well-formed top-level store path under `store_dir`; raise otherwise."""
    if "\0" in path:
        raise StorePathError(f"{path!r} contains a NUL byte")
    prefix = store_dir.rstrip("/") + "/"
    if not path.startswith(prefix):
        raise StorePathError(f"{path!r} is not under the store directory {store_dir}")
    rest = path[len(prefix) :]
    if "/" in rest:
        raise StorePathError(f"{path!r} is not a top-level store path (it has a '/' after the store path)")
    check_basename(rest)
    return path


def basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def hash_part(path: str) -> str:
    """The 32-character hash that names the narinfo: `<hash_part>.narinfo`."""
    return basename(path)[:HASH_LEN]


def name_part(path: str) -> str:
    return basename(path)[HASH_LEN + 1 :]
