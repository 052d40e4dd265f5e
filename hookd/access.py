"""Who can read a file: its owner, POSIX ACL entries (through the mask), the members of the groups that
may read it, and everyone when others may. Mode bits alone mislead: with an ACL, the group bits `stat`
shows are the ACL's mask (systemd's `LoadCredential=` copy is 0400 root-owned plus `user:<service>:r`,
which `stat` shows as 0440), and a group's read bit means nothing when the group has no other members.
"""

from __future__ import annotations

import grp
import os
import pwd
import struct
from dataclasses import dataclass

ACL_XATTR = "system.posix_acl_access"
# linux/posix_acl_xattr.h: a little-endian u32 version (2), then {u16 tag, u16 perm, u32 id} per entry.
ACL_VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
READ = 4


class AclError(ValueError):
    """The ACL extended attribute is not in the format Linux writes."""


@dataclass(frozen=True)
class AclEntry:
    tag: int
    perm: int
    id: int | None  # a uid or gid for USER and GROUP entries, None for the others


def parse_acl(data: bytes) -> list[AclEntry]:
    """Parse the `system.posix_acl_access` extended attribute."""
    if len(data) < 4 or (len(data) - 4) % 8:
        raise AclError(f"ACL of {len(data)} bytes")
    (version,) = struct.unpack_from("<I", data)
    if version != ACL_VERSION:
        raise AclError(f"ACL version {version}, expected {ACL_VERSION}")
    entries = []
    for offset in range(4, len(data), 8):
        tag, perm, ident = struct.unpack_from("<HHI", data, offset)
        if tag not in (USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER):
            raise AclError(f"unknown ACL entry tag {tag:#x}")
        entries.append(AclEntry(tag, perm, ident if tag in (USER, GROUP) else None))
    return entries


@dataclass(frozen=True)
class Readers:
    """Who may read a file: these users, the members of these groups, and everyone if `everyone`."""

    users: frozenset[int]
    groups: frozenset[int]
    everyone: bool


def readers(mode: int, uid: int, gid: int, acl: list[AclEntry] | None) -> Readers:
    """Readers from a file's mode, owner and group and its access ACL (None or empty: no ACL).

    The owner always counts (it may change the mode at will). With an ACL that has a mask, named users,
    named groups and the owning group read only if their entry AND the mask allow it; others follow the
    `other` entry. A user who matches a named entry without read but belongs to a group that may read is
    counted as a reader: the check errs towards refusing.
    """
    if not acl:
        return Readers(frozenset({uid}), frozenset({gid} if mode & 0o040 else ()), bool(mode & 0o004))
    mask = next((e.perm for e in acl if e.tag == MASK), 7)
    users = {uid} | {e.id for e in acl if e.tag == USER and e.id is not None and e.perm & mask & READ}
    groups = {gid for e in acl if e.tag == GROUP_OBJ and e.perm & mask & READ}
    groups |= {e.id for e in acl if e.tag == GROUP and e.id is not None and e.perm & mask & READ}
    everyone = any(e.tag == OTHER and e.perm & READ for e in acl)
    return Readers(frozenset(users), frozenset(groups), everyone)


def who_can_read(path: str | os.PathLike[str]) -> tuple[os.stat_result, Readers, bool]:
    """stat, readers, and whether the file has an ACL beyond its mode bits."""
    st = os.stat(path)
    try:
        acl = parse_acl(os.getxattr(path, ACL_XATTR))
    except OSError:  # ENODATA: no ACL; EOPNOTSUPP: a file system without ACLs
        acl = []
    return st, readers(st.st_mode, st.st_uid, st.st_gid, acl), any(e.tag in (USER, GROUP) for e in acl)


def group_members(gid: int) -> set[int]:
    """Users whose primary group is `gid` or who are listed in it (as far as NSS enumerates them)."""
    members = {p.pw_uid for p in pwd.getpwall() if p.pw_gid == gid}
    try:
        names = grp.getgrgid(gid).gr_mem
    except KeyError:
        return members
    for name in names:
        try:
            members.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            continue
    return members


def login(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def group_name(gid: int) -> str:
    try:
        return f"group {grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"
