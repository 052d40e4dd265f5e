"""The daemon's socket under bad input: every bad request gets an error answer, is logged once, and the
daemon keeps serving good ones."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import time
from pathlib import Path

import pytest

from hookd import protocol
from hookd.selftest import CHAIN_NIX, HookdProcess, NixEnv, wait_for_narinfos

from .conftest import HookdFactory


def ask(path: Path, payload: bytes, timeout: float = 15) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    # the daemon may stop reading an oversized request; its answer is still there to read
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.sendall(payload)
    answer = b""
    while not answer.endswith(b"\n"):
        data = s.recv(4096)
        if not data:
            break
        answer += data
    s.close()
    return answer.decode()


def ask_as(user: str, path: Path, payload: bytes) -> str:
    """Send a request from a child process running as `user` (to exercise SO_PEERCRED)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            pw = pwd.getpwnam(user)
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            os.write(w, ask(path, payload).encode())
        except BaseException as e:
            os.write(w, f"child error: {e!r}".encode())
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return out.decode()


@pytest.fixture
def daemon(nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str) -> HookdProcess:
    group = grp.getgrgid(pwd.getpwnam(build_user).pw_gid).gr_name
    return hookd_factory(env={"HOOKD_SOCKET_GROUP": group, "HOOKD_ALLOWED_GROUP_MEMBERS": "false"})


def bad_requests(store: str) -> list[tuple[bytes, str]]:
    fake = f"{store}/6q5cdpsrvdpmkzh5sy8wdc7vz7p51z1c-not-there"
    return [
        (b"\x00\xff\xfegarbage\n", "UTF-8"),
        (b"hello world\n", "unknown request"),
        (b"ENQUEUE - " + b"a" * (protocol.MAX_LINE + 16) + b"\n", "longer than"),
        (b"ENQUEUE - /etc/passwd\n", "not under the store directory"),
        (f"ENQUEUE - {store}/../../../etc/passwd\n".encode(), "not a top-level store path"),
        (f"ENQUEUE - {store}/6q5cdpsrvdpmkzh5sy8wdc7vz7p51z1c-..\n".encode(), "store path"),
        (f"ENQUEUE - {fake}\n".encode(), "does not exist in the store"),
        (f"ENQUEUE {fake} {fake}\n".encode(), "does not end in .drv"),
        (b"ENQUEUE\n", "needs a .drv path"),
        (b"PING extra\n", "unknown request"),
        (b"ENQUEUE - /nix/store/x", "no complete request line"),  # no newline, then silence
    ]


def test_bad_requests_get_errors_and_the_daemon_keeps_serving(
    daemon: HookdProcess, nixenv: NixEnv, build_user: str, tmp_path: Path
) -> None:
    cases = bad_requests(nixenv.store_dir)
    for payload, expected in cases:
        # a peer that sends half a line and stalls is answered after the read timeout
        answer = ask(daemon.socket, payload, timeout=15 if payload.endswith(b"\n") else 20)
        assert answer.startswith("ERR ") and expected in answer, (payload[:60], answer)
    answer = ask_as(build_user, daemon.socket, b"PING\n")
    assert answer.startswith("ERR ") and "not allowed" in answer, answer
    assert daemon.proc is not None and daemon.proc.poll() is None
    log = daemon.log()
    assert log.count("rejected a request") == len(cases)
    assert log.count("refused a connection from uid") == 1
    assert "Traceback" not in log

    # still serving: a ping, then a real build whose paths arrive in the cache
    assert ask(daemon.socket, b"PING\n") == "OK pong\n"
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    outs = nixenv.build(expr, ["top"], user=build_user, args={"salt": str(time.time_ns())})
    wait_for_narinfos(tmp_path / "cache", nixenv.closure(outs))


def test_socket_is_not_world_accessible(daemon: HookdProcess) -> None:
    st = daemon.socket.stat()
    assert st.st_mode & 0o777 == 0o660


def test_spooled_garbage_is_set_aside(nixenv: NixEnv, hookd_factory: HookdFactory) -> None:
    hookd = hookd_factory()
    hookd.stop()
    spool = hookd.state_dir / "spool"
    (spool / "1-1.req").write_bytes(b"ENQUEUE - /etc/passwd\n")
    (spool / "2-1.req").write_bytes(b"\xff" * 100)
    hookd.start()
    deadline = time.monotonic() + 10
    while len(list((spool / "rejected").glob("*.req"))) < 2:
        assert time.monotonic() < deadline, hookd.log()
        time.sleep(0.05)
    assert not list(spool.glob("*.req"))
    assert hookd.log().count("spool file") == 2
    assert hookd.proc is not None and hookd.proc.poll() is None


def test_second_daemon_on_same_state_is_refused(nixenv: NixEnv, hookd_factory: HookdFactory) -> None:
    hookd_factory()
    second = hookd_factory(start=False)
    second.start(wait=False)
    assert second.proc is not None
    assert second.proc.wait(20) != 0
    assert "another hookd daemon is running" in second.log()


def test_members_of_the_socket_group_may_use_it(nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str) -> None:
    group = grp.getgrgid(pwd.getpwnam(build_user).pw_gid).gr_name
    hookd = hookd_factory(env={"HOOKD_SOCKET_GROUP": group})
    assert ask_as(build_user, hookd.socket, b"PING\n") == "OK pong\n"
    assert ask_as("nobody", hookd.socket, b"PING\n").startswith("child error")  # not in the group: no access at all
