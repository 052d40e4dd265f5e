"""The signing key's file: readable by hookd's user and root only, judged by who can really read it (owner,
POSIX ACL entries through the mask, group members), with real ACLs set by setfacl and real users."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hookd import access, keys

DAEMON_USER = "hookd-keytest"  # stands in for hookd's user
OTHER_USER = "hookd-keyother"
GROUP = "hookd-keytest-g"

# `getfacl` of a root-owned 0400 file after `setfacl -m u:65534:r` (systemd's LoadCredential= copy has this shape)
SYSTEMD_LIKE_ACL = bytes.fromhex(
    "0200000001000400ffffffff02000400feff000004000000ffffffff10000400ffffffff20000000ffffffff"
)


def ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
        return pwd.getpwnam(name)


@pytest.fixture
def users() -> tuple[pwd.struct_passwd, pwd.struct_passwd]:
    if os.geteuid() != 0 or not shutil.which("setfacl"):
        pytest.fail("these tests need root and setfacl (run .ci/run, which installs acl)", pytrace=False)
    return ensure_user(DAEMON_USER), ensure_user(OTHER_USER)


@pytest.fixture
def key_dir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="hk-keys-", dir="/tmp"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_key(d: Path, owner: int = 0, group: int = 0, mode: int = 0o400) -> Path:
    sk = d / "secret-key"
    keys.write_keypair("test-1", sk, d / "public-key")
    os.chown(sk, owner, group)
    sk.chmod(mode)
    return sk


LOAD = (
    "import sys; from pathlib import Path; from hookd import keys; print(keys.load_secret_key(Path(sys.argv[1])).name)"
)


def load_as(
    user: pwd.struct_passwd, path: Path, env: dict[str, str] | None = None, groups: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """load_secret_key in a process of `user` (with `groups` as its supplementary groups), as hookd's daemon
    running as that user would."""
    return subprocess.run([sys.executable, "-c", LOAD, str(path)], user=user.pw_uid, group=user.pw_gid,
                          extra_groups=list(groups), env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=30)  # fmt: skip


def stat_mode(path: Path) -> str:
    return subprocess.run(["stat", "-c", "%a", str(path)], capture_output=True, text=True, check=True).stdout.strip()


def test_systemd_credential_copy_with_an_acl_is_accepted(users: tuple[pwd.struct_passwd, ...], key_dir: Path) -> None:
    """LoadCredential='s copy: 0400, root's, plus an ACL entry letting the service's user read: `stat` says 0440."""
    daemon, _ = users
    sk = make_key(key_dir)
    subprocess.run(["setfacl", "-m", f"u:{daemon.pw_uid}:r", str(sk)], check=True)
    assert stat_mode(sk) == "440"
    for env in ({}, {"CREDENTIALS_DIRECTORY": str(key_dir)}):
        proc = load_as(daemon, sk, env)
        assert proc.returncode == 0 and proc.stdout.strip() == "test-1", proc.stderr


def test_a_key_another_user_can_read_through_an_acl_is_refused(
    users: tuple[pwd.struct_passwd, ...], key_dir: Path
) -> None:
    daemon, other = users
    sk = make_key(key_dir, owner=daemon.pw_uid)
    subprocess.run(["setfacl", "-m", f"u:{other.pw_uid}:r", str(sk)], check=True)
    proc = load_as(daemon, sk)
    assert proc.returncode != 0
    assert f"{sk} can be read by {OTHER_USER} (uid {other.pw_uid})" in proc.stderr, proc.stderr
    assert f"setfacl -b {sk}" in proc.stderr and f"chown {DAEMON_USER} {sk} && chmod 0400 {sk}" in proc.stderr
    # The mask is what counts: with the mask at nothing the entry grants nothing (`stat` shows 0400 again).
    subprocess.run(["setfacl", "-m", "m::-", str(sk)], check=True)
    proc = load_as(daemon, sk)
    assert proc.returncode == 0, proc.stderr


def test_a_key_others_can_read_is_refused(users: tuple[pwd.struct_passwd, ...], key_dir: Path) -> None:
    daemon, _ = users
    sk = make_key(key_dir, owner=daemon.pw_uid, mode=0o404)
    proc = load_as(daemon, sk)
    assert proc.returncode != 0 and "can be read by every user" in proc.stderr and str(sk) in proc.stderr, proc.stderr
    with pytest.raises(keys.KeyPermissionError, match="every user"):  # and by root, the same verdict
        keys.load_secret_key(sk)


def test_a_group_readable_key_depends_on_who_is_in_the_group(
    users: tuple[pwd.struct_passwd, ...], key_dir: Path
) -> None:
    daemon, other = users
    subprocess.run(["groupadd", "--system", "-f", GROUP], check=True, capture_output=True)  # -f: may exist
    subprocess.run(["gpasswd", "-M", DAEMON_USER, GROUP], check=True, capture_output=True)
    gid = access.grp.getgrnam(GROUP).gr_gid
    sk = make_key(key_dir, owner=0, group=gid, mode=0o440)
    proc = load_as(daemon, sk, groups=(gid,))
    assert proc.returncode == 0 and proc.stdout.strip() == "test-1", proc.stderr  # the group holds hookd's user alone
    subprocess.run(["gpasswd", "-a", OTHER_USER, GROUP], check=True, capture_output=True)
    try:
        with pytest.raises(
            keys.KeyPermissionError, match=f"the members of group {GROUP} .*{OTHER_USER} \\(uid {other.pw_uid}\\)"
        ):
            keys.load_secret_key(sk)
    finally:
        subprocess.run(["gpasswd", "-d", OTHER_USER, GROUP], check=True, capture_output=True)


def test_keygen_output_is_accepted_and_a_group_with_others_in_it_refused(
    users: tuple[pwd.struct_passwd, ...], tmp_path: Path
) -> None:
    _, other = users
    sk = make_key(tmp_path, owner=os.geteuid(), mode=0o600)
    assert keys.load_secret_key(sk).name == "test-1"
    os.chown(sk, os.geteuid(), other.pw_gid)  # a group whose member is another user
    sk.chmod(0o640)
    with pytest.raises(keys.KeyPermissionError, match=f"can be read by the members of .*{OTHER_USER}.*chmod 0400 {sk}"):
        keys.load_secret_key(sk)


def test_parse_acl_reads_the_kernel_format() -> None:
    entries = access.parse_acl(SYSTEMD_LIKE_ACL)
    assert [(e.tag, e.perm, e.id) for e in entries] == [
        (access.USER_OBJ, 4, None), (access.USER, 4, 65534), (access.GROUP_OBJ, 0, None),
        (access.MASK, 4, None), (access.OTHER, 0, None),
    ]  # fmt: skip
    who = access.readers(0o100440, 0, 0, entries)  # stat's mode shows the mask as the group bits
    assert who == access.Readers(frozenset({0, 65534}), frozenset(), False)
    assert access.readers(0o100440, 0, 0, None) == access.Readers(frozenset({0}), frozenset({0}), False)
    for bad in (
        b"",
        SYSTEMD_LIKE_ACL[:-1],
        b"\x01\x00\x00\x00",
        SYSTEMD_LIKE_ACL[:4] + b"\x40\x00\x04\x00\xff\xff\xff\xff",
    ):
        with pytest.raises(access.AclError):
            access.parse_acl(bad)
