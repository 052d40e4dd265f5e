"""Unit tests of the pieces that need no Nix: protocol, path-info parsing, config, keys, hook, queue."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from hookd import config, keys, nixbase32, protocol, signing
from hookd.backends.file import FileBackend
from hookd.cli import main
from hookd.pathinfo import PathInfo
from hookd.queue import DONE, FAILED, PENDING, Outcome, Queue
from hookd.store import InvalidPathError, parse_path_info

SD = "/nix/store"
A = f"{SD}/6q5cdpsrvdpmkzh5sy8wdc7vz7p51z1c-dep-x1"
B = f"{SD}/p75gma6gwipzdg2n983bhyyizfvax58k-top-x1"
H = "sha256:03j6f4i6af42pq866h479bc2cmnkjk4v7dlbm18dhijdb79khvfq"


# --- protocol ---------------------------------------------------------------------------------------


def test_protocol_round_trip() -> None:
    req = protocol.enqueue_from_env(f" {A}  {B} ", "")
    assert protocol.parse_request(req.encode()) == req
    drv_only = protocol.enqueue_from_env("", f"{SD}/qidzm2w0l8xvz1qpyfgpy3si2dywg77k-dep-x1.drv")
    assert drv_only.outs == () and protocol.parse_request(drv_only.encode()) == drv_only
    assert protocol.parse_response(protocol.ok("queued 3")) == (True, "queued 3")
    assert protocol.parse_response(protocol.error("bad\nthing")) == (False, "bad thing")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"\xff\xfe\n", "UTF-8"),
        (b"ENQUEUE -\n", "neither"),
        (b"ENQUEUE  /nix/store/x\n", "single spaces"),
        (b"DELETE everything\n", "unknown request"),
        (b"ENQUEUE - /a\0b\n", "control"),
        (b"ENQUEUE - /nix/store/x", "newline"),
        (b"ENQUEUE - " + b" ".join([b"/x"] * (protocol.MAX_PATHS + 1)) + b"\n", "at most"),
    ],
)
def test_protocol_rejects(line: bytes, message: str) -> None:
    with pytest.raises(protocol.ProtocolError, match=message):
        protocol.parse_request(line)


# --- path info ---------------------------------------------------------------------------------------


def test_path_info_old_shape() -> None:
    data = [
        {
            "path": B,
            "narHash": H,
            "narSize": 168,
            "references": [A],
            "deriver": A + ".drv",
            "signatures": ["k:sig"],
            "valid": True,
        }
    ]
    info = parse_path_info(data, SD)[B]
    assert info.nar_hash == nixbase32.parse_hash(H) and info.nar_size == 168
    assert info.references == (A,) and info.deriver == A + ".drv" and info.sigs == ("k:sig",)


def test_path_info_sri_dict_shape() -> None:
    import base64

    sri = "sha256-" + base64.b64encode(nixbase32.parse_hash(H)).decode()
    data = {B: {"narHash": sri, "narSize": 168, "references": [A], "deriver": None, "ca": None}}
    assert parse_path_info(data, SD)[B].nar_hash == nixbase32.parse_hash(H)


def test_path_info_structured_shape() -> None:
    import base64

    digest = nixbase32.parse_hash(H)
    data = {
        B.rsplit("/", 1)[1]: {
            "narHash": {"algorithm": "sha256", "format": "base64", "hash": base64.b64encode(digest).decode()},
            "narSize": 168,
            "references": [A.rsplit("/", 1)[1]],
            "ca": {
                "method": "nar",
                "hash": {
                    "algorithm": "sha256",
                    "format": "base64",
                    "hash": base64.b64encode(digest).decode(),
                },
            },
        }
    }
    info = parse_path_info(data, SD)[B]
    assert info.references == (A,) and info.ca == "fixed:r:" + H


def test_path_info_invalid_path() -> None:
    with pytest.raises(InvalidPathError, match="not a valid path"):
        parse_path_info({B: None}, SD)


# --- config and keys --------------------------------------------------------------------------------


def test_config_precedence(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('cache = "file:///a"\ncompression = "xz"\nmax-parallel = 3\nallowed_uids = [0, 1000]\n')
    cfg = config.load(f, env={"HOOKD_COMPRESSION": "none"}, overrides={"max_parallel": 5}).validate()
    assert (cfg.cache, cfg.compression, cfg.max_parallel, cfg.allowed_uids) == (
        "file:///a",
        "none",
        5,
        [0, 1000],
    )
    assert cfg.socket_path == config.DEFAULT_STATE_DIR / "hookd.sock"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('cache = "file:///a"\nbogus = 1\n', "unknown setting 'bogus'"),
        ('cache = "file:///a"\ncompression = "lz4"\n', "compression 'lz4'"),
        ('cache = "file:///a"\nevent_loop = "trio"\n', "event_loop 'trio': expected one of uvloop, asyncio"),
        ('cache = "file:///a"\nmax_parallel = "many"\n', "max_parallel"),
        ("compression = \n", "config file"),
    ],
)
def test_config_errors(tmp_path: Path, toml: str, message: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(toml)
    with pytest.raises(config.ConfigError, match=message):
        config.load(f, env={}).validate()


def test_keygen_cli(tmp_path: Path) -> None:
    sk, pk = tmp_path / "sk", tmp_path / "pk"
    result = CliRunner().invoke(main, ["keygen", "cache-1", "--secret-key-file", str(sk), "--public-key-file", str(pk)])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(sk.stat().st_mode) == 0o600
    secret = keys.load_secret_key(sk)
    assert secret.name == "cache-1" and str(secret.public) == pk.read_text()
    again = CliRunner().invoke(
        main, ["keygen", "x", "--secret-key-file", str(sk), "--public-key-file", str(tmp_path / "o")]
    )
    assert again.exit_code != 0 and "refusing to overwrite" in again.output
    assert keys.load_secret_key(sk) == secret


# --- the hook ----------------------------------------------------------------------------------------


def test_hook_imports_only_the_standard_library() -> None:
    code = "import sys; before = set(sys.modules); import hookd.hook; print(sorted(set(sys.modules) - before))"
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() in (
        "['hookd', 'hookd.hook', 'hookd.protocol']",
        "['_socket', 'hookd', 'hookd.hook', 'hookd.protocol']",
    )


def run_hook(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {"PATH": os.environ["PATH"], **env}
    return subprocess.run([sys.executable, "-m", "hookd.hook"], env=full, capture_output=True, text=True, timeout=10)


def test_hook_spools_without_daemon(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    proc = run_hook({"HOOKD_STATE_DIR": str(tmp_path), "OUT_PATHS": f"{A} {B}", "DRV_PATH": ""})
    assert proc.returncode == 0
    assert "spooled" in proc.stderr
    files = list((tmp_path / "spool").iterdir())
    assert len(files) == 1 and files[0].suffix == ".req"
    assert protocol.parse_request(files[0].read_bytes()) == protocol.Enqueue(None, (A, B))


def test_hook_exits_zero_when_even_the_spool_fails(tmp_path: Path) -> None:
    proc = run_hook({"HOOKD_STATE_DIR": str(tmp_path / "missing"), "OUT_PATHS": A})
    assert proc.returncode == 0
    assert proc.stderr.count("\n") == 1 and "LOST" in proc.stderr and A in proc.stderr


def test_hook_with_nothing_to_do(tmp_path: Path) -> None:
    proc = run_hook({"HOOKD_STATE_DIR": str(tmp_path), "OUT_PATHS": "", "DRV_PATH": ""})
    assert proc.returncode == 0 and "nothing to queue" in proc.stderr


def test_hook_spools_on_refusal_and_timeout(tmp_path: Path) -> None:
    """A server that refuses, and one that never answers: both end in the spool within the bound."""
    import socket
    import threading

    (tmp_path / "spool").mkdir()
    sock_path = tmp_path / "hookd.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sock_path))
    srv.listen(4)
    mode = {"answer": b"ERR go away\n"}

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.recv(65536)
            if mode["answer"]:
                conn.sendall(mode["answer"])
                conn.close()
            else:
                time.sleep(3)
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    env = {"HOOKD_STATE_DIR": str(tmp_path), "OUT_PATHS": A}
    proc = run_hook(env)
    assert proc.returncode == 0 and "go away" in proc.stderr
    mode["answer"] = b""
    start = time.monotonic()
    proc = run_hook(env)
    assert proc.returncode == 0 and "no answer" in proc.stderr
    assert time.monotonic() - start < 3
    assert len(list((tmp_path / "spool").glob("*.req"))) == 2
    srv.close()


# --- upload pieces -----------------------------------------------------------------------------------


async def test_file_backend_never_replaces_a_nar(tmp_path: Path) -> None:
    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        yield data

    be = FileBackend(tmp_path)
    await be.put_nar("nar/x.nar", chunks(b"abc"), "application/x-nix-nar", 3)
    await be.put_nar("nar/x.nar", chunks(b"xyz"), "application/x-nix-nar", 3)
    assert (tmp_path / "nar/x.nar").read_bytes() == b"abc"
    assert stat.S_IMODE((tmp_path / "nar/x.nar").stat().st_mode) == 0o644
    await be.put("a.narinfo", b"1", "text/x-nix-narinfo")
    await be.put("a.narinfo", b"2", "text/x-nix-narinfo")
    assert await be.get("a.narinfo") == b"2"
    assert [o.key async for o in be.list()] == ["a.narinfo", "nar/x.nar"]
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".hookd-tmp")]


# --- the queue -----------------------------------------------------------------------------------------


def info(path: str, *refs: str) -> PathInfo:
    return PathInfo(path, b"\0" * 32, 1, tuple(sorted(refs)))


async def test_queue_orders_references_first(tmp_path: Path) -> None:
    q = await Queue.open(tmp_path / "q.sqlite", SD)
    rid = await q.add_request(None, [B], "socket")
    assert [r.id for r in await q.due_requests()] == [rid]
    added = await q.plan([rid], {B: info(B, A, B), A: info(A)})
    assert added == 2
    assert [i.path for i in await q.ready(10)] == [A]  # B waits for its reference (self-reference ignored)
    await q.record([Outcome(A, PENDING, "boom", time.time() + 60)])
    assert await q.ready(10) == []  # A is backing off, B still blocked
    await q.record([Outcome(A, DONE)])
    assert [i.path for i in await q.ready(10)] == [B]
    assert [i.path for i in await q.ready(10, exclude={B})] == []
    await q.record([Outcome(B, FAILED, "mismatch")])
    counts = await q.counts()
    assert (counts[DONE], counts[FAILED], counts["requests"]) == (1, 1, 0)
    # asked for again: a failed path gets a fresh start; one the cache holds stays done
    rid2 = await q.add_request(None, [B], "socket")
    assert await q.known_uploaded([A, B], 60) == {A}
    await q.plan([rid2], {B: info(B, A), A: info(A)}, present={A})
    row = await q.path_row(B)
    assert row is not None and row["state"] == PENDING and row["attempts"] == 0
    assert (await q.path_row(A) or {})["state"] == DONE
    # a new cache identity forgets what the old cache held; planned again, A is queued again
    await q.set_cache_identity("other")
    assert await q.known_uploaded([A, B], 60) == set()
    await q.plan([rid2], {B: info(B, A), A: info(A)})
    assert (await q.path_row(A) or {})["state"] == PENDING
    # a reference left to an upstream cache does not hold its referrer back
    await q.plan([rid2], {B: info(B, A), A: info(A)}, upstream={A})
    assert [i.path for i in await q.ready(10)] == [B]
    await q.close()


async def test_queue_refresh_bookkeeping(tmp_path: Path) -> None:
    q = await Queue.open(tmp_path / "q.sqlite", SD)
    rid = await q.add_request(None, [A], "socket")
    await q.plan([rid], {A: info(A)}, present={A})
    assert await q.due_refresh([A], 3600) == {A}  # never refreshed
    await q.mark_refreshed([A])
    assert await q.due_refresh([A], 3600) == set()
    assert await q.due_refresh([A], 0) == {A}
    await q.record_upstream({A: True, B: False})
    assert await q.upstream_answers([A, B], 60, 60) == {A: True, B: False}
    assert await q.upstream_answers([A, B], 60, 0) == {A: True}  # the negative answer expired
    await q.close()


def test_path_info_json_round_trip() -> None:
    i = PathInfo(B, nixbase32.parse_hash(H), 168, (A,), A + ".drv", None, ("k:s",))
    assert parse_path_info([json.loads(json.dumps(i.to_json()))], SD)[B] == i


def test_signing_key_file_tolerates_newline(vectors: Path) -> None:
    text = (vectors / "test-key.secret").read_text()
    assert signing.SecretKey.parse(text + "\n") == signing.SecretKey.parse(text)


async def test_queue_operations_interleave_safely(tmp_path: Path) -> None:
    """Requests arriving while a plan's transaction is open must neither fail nor join that transaction."""
    import asyncio

    q = await Queue.open(tmp_path / "q.sqlite", SD)
    infos = {f"{SD}/{'a' * 31}{i:x}-p": info(f"{SD}/{'a' * 31}{i:x}-p") for i in range(16)}
    rid = await q.add_request(None, [A], "socket")

    async def plans() -> None:
        for _ in range(20):
            await q.plan([rid], infos)

    async def requests() -> list[int]:
        return [await q.add_request(None, [B], "socket") for _ in range(50)]

    async def records() -> None:
        for p in list(infos)[:10]:
            await q.record([Outcome(p, DONE)])

    _, ids, _ = await asyncio.gather(plans(), requests(), records())
    assert len(set(ids)) == 50
    assert (await q.counts())["requests"] == 50
    await q.close()
