"""Path info over nix-daemon's socket (hookd/nixdaemon.py): the same answers as `nix path-info` from the
test's real daemon (every Nix of the matrix), the wire format split anywhere, and a kept connection
that the daemon closed."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest

from hookd import nixdaemon
from hookd.keys import write_keypair
from hookd.nixdaemon import Incomplete, Wire, u64
from hookd.pathinfo import PathInfo
from hookd.selftest import CHAIN_NIX, NixEnv
from hookd.store import InvalidPathError, Store, StoreError


def string(s: bytes) -> bytes:  # written out here, not with nixdaemon.string, so a shared mistake shows
    return struct.pack("<Q", len(s)) + s + bytes((8 - len(s) % 8) % 8)


@pytest.fixture
def nix_client(nixenv: NixEnv, monkeypatch: pytest.MonkeyPatch) -> NixEnv:
    """This process as a client of the test's nix-daemon (what Store reads from the environment)."""
    for k, v in nixenv.env.items():
        monkeypatch.setenv(k, v)
    return nixenv


def cli_store(store_dir: str) -> Store:
    store = Store(store_dir)
    store._socket = None  # `nix path-info`, as without a daemon
    return store


async def test_answers_are_those_of_nix_path_info(nix_client: NixEnv, build_user: str, tmp_path: Path) -> None:
    """Outputs with a deriver and a signature, and a path added by hash (fixed:r:sha256): the daemon's
    answers, read by hookd, equal what `nix path-info` prints; a .drv (text:sha256) reads too."""
    nixenv = nix_client
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    top, dev = nixenv.build(expr, ["top", "multi.dev"], user=build_user, args={"salt": str(os.getpid())})
    key = write_keypair("daemon-test-1", tmp_path / "k.sec", tmp_path / "k.pub")
    nixenv.nix("nix", "store", "sign", "--key-file", str(tmp_path / "k.sec"), top)
    (tmp_path / "added").mkdir()
    (tmp_path / "added" / "f").write_text(f"added {os.getpid()}\n")
    added = nixenv.nix("nix-store", "--add", str(tmp_path / "added")).stdout.strip()
    drv = next(i["deriver"] for i in nixenv.path_info([top]))

    store = Store(nixenv.store_dir)
    assert store._socket == str(nixenv.socket)  # NIX_REMOTE=daemon: asked over the socket
    try:
        ours = await store.closure([top, dev, added])
        assert store._daemon is not None and store._socket is not None  # the protocol answered, not `nix`
        assert ours == await cli_store(nixenv.store_dir).closure([top, dev, added])
        assert len(ours) > 5 and ours[added].ca is not None and ours[added].ca.startswith("fixed:r:sha256:")
        assert ours[top].deriver == drv and any(s.startswith(f"{key.name}:") for s in ours[top].sigs)
        # a .drv is itself here (`nix path-info` of 2.8 answers for its outputs): text content-addressed
        text = (await store.path_info([drv]))[drv]  # on the same, kept connection
        assert text.ca is not None and text.ca.startswith("text:sha256:") and text.references
    finally:
        await store.close()


async def test_an_invalid_path_and_a_path_outside_the_store(nix_client: NixEnv) -> None:
    nixenv = nix_client
    store = Store(nixenv.store_dir)
    gone = f"{nixenv.store_dir}/{'0' * 32}-never-built"
    try:
        with pytest.raises(InvalidPathError, match="never-built"):
            await store.path_info([gone])
        with pytest.raises(StoreError, match=r"path ['\"]/tmp/elsewhere['\"] is not in the Nix store") as err:
            await store.path_info(["/tmp/elsewhere"])
        assert "\x1b" not in str(err.value)  # Nix's colours taken out
    finally:
        await store.close()


def reply(*fields: bytes) -> bytes:
    return b"".join(fields)


def test_the_wire_format_is_read_split_anywhere() -> None:
    """Log messages of every kind before the answer, then the answer; fed a byte at a time, the parser
    asks for more (Incomplete) until the whole answer is there, and reads the same."""
    h = bytes(range(32))
    data = reply(
        u64(nixdaemon.STDERR_NEXT), string(b"querying"),
        u64(nixdaemon.STDERR_START_ACTIVITY), u64(7), u64(3), u64(109), string(b"query"),
        u64(2), u64(0), u64(42), u64(1), string(b"field"), u64(0),
        u64(nixdaemon.STDERR_RESULT), u64(7), u64(105), u64(1), u64(0), u64(5),
        u64(nixdaemon.STDERR_STOP_ACTIVITY), u64(7),
        u64(nixdaemon.STDERR_LAST),
        u64(1), string(b"/s/d-x.drv"), string(h.hex().encode()), u64(2), string(b"/s/b-ref"), string(b"/s/a-ref"),
        u64(1700000000), u64(1234), u64(0), u64(1), string(b"k-1:sig"), string(b""),
    )  # fmt: skip
    w, answer = Wire(), None
    for i in range(len(data)):
        w.feed(data[i : i + 1])
        start = w.pos
        try:
            answer = nixdaemon.read_path_info(w, "/s/p-x")
            break
        except Incomplete:
            w.pos = start
    assert answer is not None and w.pos == len(data)
    assert answer == PathInfo("/s/p-x", h, 1234, ("/s/a-ref", "/s/b-ref"), "/s/d-x.drv", None, ("k-1:sig",))

    w = Wire()
    w.feed(reply(u64(nixdaemon.STDERR_LAST), u64(0)))
    assert nixdaemon.read_path_info(w, "/s/p-x") is None  # not valid


def test_an_error_is_raised_with_its_message() -> None:
    w = Wire()
    w.feed(reply(u64(nixdaemon.STDERR_ERROR), string(b"Error"), u64(0), string(b"Error"),
                 string(b"path '\x1b[35;1m/x\x1b[0m' is not in the Nix store"), u64(0), u64(1), u64(0), string(b"at")))  # fmt: skip
    with pytest.raises(nixdaemon.DaemonError, match=r"^path '/x' is not in the Nix store$"):
        nixdaemon.read_path_info(w, "/x")


@pytest.mark.parametrize("kind", [0x1234, nixdaemon.STDERR_LAST])
def test_nonsense_is_a_protocol_error(kind: int) -> None:
    w = Wire()
    w.feed(reply(u64(kind), u64(1), string(b""), string(b"not hex"), u64(0), u64(0), u64(0), u64(0), u64(0),
                 string(b"")))  # fmt: skip
    with pytest.raises(nixdaemon.ProtocolError):
        nixdaemon.read_path_info(w, "/x")


def test_which_store_is_a_daemon(tmp_path: Path) -> None:
    """Nix's rule: NIX_REMOTE (or --store) daemon or unix://PATH; "auto" is the daemon only when the
    state directory is not writable and the socket exists; any other store is not asked here."""
    sock = tmp_path / "state" / "daemon-socket" / "socket"
    env = {"NIX_STATE_DIR": str(tmp_path / "state")}
    assert nixdaemon.socket_for("daemon", {}) == "/nix/var/nix/daemon-socket/socket"
    assert nixdaemon.socket_for(None, {**env, "NIX_REMOTE": "daemon"}) == str(sock)
    assert nixdaemon.socket_for(None, {"NIX_REMOTE": "daemon", "NIX_DAEMON_SOCKET_PATH": "/s"}) == "/s"
    assert nixdaemon.socket_for("unix:///run/x.sock", {"NIX_REMOTE": "local"}) == "/run/x.sock"
    assert nixdaemon.socket_for("local", {"NIX_REMOTE": "daemon"}) is None
    assert nixdaemon.socket_for("ssh-ng://builder", {}) is None
    assert nixdaemon.socket_for(None, {**env, "NIX_REMOTE": "local?root=/r"}) is None
    assert nixdaemon.socket_for(None, env) is None  # auto, no socket
    sock.parent.mkdir(parents=True)
    sock.touch()
    if os.geteuid() == 0:  # root may write anywhere: auto is the local store
        assert nixdaemon.socket_for(None, env) is None
    else:
        (tmp_path / "state").chmod(0o555)
        assert nixdaemon.socket_for(None, env) == str(sock)


class FakeDaemon:
    """Speaks the handshake, then answers QueryPathInfo with "not valid"; each connection closes after
    `answers` answers. `version` is the protocol it says it speaks."""

    def __init__(self, path: Path, answers: int, version: int = nixdaemon.CLIENT_VERSION) -> None:
        self.path, self.answers, self.version = path, answers, version
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await reader.readexactly(8)
            writer.write(u64(nixdaemon.MAGIC_2) + u64(self.version))
            await reader.readexactly(24)
            writer.write(string(b"fake 1.0") + u64(nixdaemon.STDERR_LAST))
            for _ in range(self.answers):
                (op,) = struct.unpack("<Q", await reader.readexactly(8))
                (n,) = struct.unpack("<Q", await reader.readexactly(8))
                await reader.readexactly(n + (8 - n % 8) % 8)
                assert op == nixdaemon.OP_QUERY_PATH_INFO
                writer.write(u64(nixdaemon.STDERR_LAST) + u64(0))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_a_kept_connection_the_daemon_closed_is_opened_again(tmp_path: Path) -> None:
    fake = FakeDaemon(tmp_path / "sock", answers=1)
    server = await asyncio.start_unix_server(fake.serve, str(fake.path))
    store = Store("/s", f"unix://{fake.path}")
    try:
        for _ in range(3):
            with pytest.raises(InvalidPathError):
                await store.path_info(["/s/aaaa-x"])
        assert fake.connections == 3  # each kept connection was found closed, and opened again once
    finally:
        await store.close()
        server.close()


async def test_a_daemon_too_old_is_asked_through_nix(tmp_path: Path) -> None:
    fake = FakeDaemon(tmp_path / "sock", answers=1, version=1 << 8 | 21)
    server = await asyncio.start_unix_server(fake.serve, str(fake.path))
    store = Store("/s", f"unix://{fake.path}")
    try:
        assert await store._ask_daemon(str(fake.path), ["/s/aaaa-x"], recursive=False) is None
        assert store._socket is None  # from now on, `nix path-info`
    finally:
        server.close()


async def test_a_daemon_that_is_not_there_is_a_store_error(tmp_path: Path) -> None:
    store = Store("/s", f"unix://{tmp_path / 'nothing'}")
    with pytest.raises(StoreError, match="cannot reach nix-daemon"):
        await store.path_info(["/s/aaaa-x"])



async def test_a_daemon_that_never_answers_is_given_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing waits forever: a daemon that accepts the connection and says nothing (not even its
    greeting) is a StoreError after the store's timeout, and the planner tries again later."""
    from hookd import store as store_module

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    monkeypatch.setattr(store_module, "TIMEOUT", 0.3)
    server = await asyncio.start_unix_server(silent, str(tmp_path / "sock"))
    store = Store("/s", f"unix://{tmp_path / 'sock'}")
    try:
        with pytest.raises(StoreError, match=r"no answer within 0\.3 s"):
            await store.path_info(["/s/aaaa-x"])
    finally:
        server.close()
