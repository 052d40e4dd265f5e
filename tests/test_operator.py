"""The operator CLI against a running and a stopped daemon with real uploads; systemd notifications;
the metrics endpoint; build logs through the cache."""

from __future__ import annotations

import json
import os
import pty
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from click.testing import CliRunner

from hookd.cli import main
from hookd.selftest import CHAIN_NIX, HookdProcess, NixEnv, wait_for_narinfos

from .conftest import HookdFactory
from .servers import free_port
from .test_dedup import wait_idle

LOG_NIX = r"""
{ salt }:
derivation {
  name = "noisy";
  inherit salt;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo hello from the build log of $salt; echo done > $out" ];
}
"""


def cli(hookd: HookdProcess, *args: str) -> tuple[int, str]:
    env = {
        "HOOKD_STATE_DIR": str(hookd.state_dir),
        "HOOKD_CACHE": hookd.cache_url,
        "HOOKD_CONFIG": "/dev/null",
        "HOOKD_STORE_DIR": hookd.nix.store_dir,
    }
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.output


def tamper(path: str) -> None:
    os.chmod(path, 0o644)
    Path(path).write_text("tampered\n")


def test_operator_commands_with_the_daemon_up_and_down(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path
) -> None:
    hookd = hookd_factory(env={"HOOKD_RETRY_BASE": "0.1"})
    hookd.stop()
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    top, doc = nixenv.build(expr, ["top", "multi.doc"], user=build_user, args={"salt": str(time.time_ns())})
    tamper(doc)  # this one will be refused
    hookd.start()
    wait_for_narinfos(tmp_path / "cache", nixenv.closure([top]))
    wait_idle(hookd)

    code, text = cli(hookd, "status", "--json")
    assert code == 0, text
    st = json.loads(text)
    assert st["daemon"]["up"] and st["cache"]["answers"]
    assert st["counts"]["done"] >= 5 and st["counts"]["failed"] == 1
    assert st["uploaded_total"]["paths"] >= 5 and st["uploaded"]["5m"]["paths"] >= 5
    assert any(doc == e["path"] for e in st["last_errors"])
    code, text = cli(hookd, "status")
    assert code == 0 and "daemon     up" in text and "answers" in text and "1 failed" in text

    code, text = cli(hookd, "queue", "--json")
    rows = {r["path"]: r for r in json.loads(text)}
    assert rows[top]["state"] == "done" and rows[doc]["state"] == "failed"
    code, text = cli(hookd, "queue", "--state", "failed")
    assert doc in text and top not in text and "do not match" in text
    code, text = cli(hookd, "queue", "show", top)
    assert code == 0 and "state       done" in text and "queued" in text and "uploaded" in text
    code, text = cli(hookd, "queue", "show", doc, "--json")
    detail = json.loads(text)
    assert detail["state"] == "failed" and [e["event"] for e in detail["history"]] == ["queued", "failed"]

    code, text = cli(hookd, "queue", "retry", "--failed")
    assert code == 0 and "1 paths queued" in text
    deadline = time.monotonic() + 20
    while json.loads(cli(hookd, "queue", "show", doc, "--json")[1])["history"][-1]["event"] != "failed" or \
            len(json.loads(cli(hookd, "queue", "show", doc, "--json")[1])["history"]) < 4:  # fmt: skip
        assert time.monotonic() < deadline
        time.sleep(0.1)
    code, text = cli(hookd, "queue", "drop", doc)
    assert code == 0 and f"dropped {doc}" in text

    # and with the daemon stopped: everything reads the state directly
    hookd.stop()
    code, text = cli(hookd, "status", "--json")
    st = json.loads(text)
    assert code == 0 and st["daemon"] == {"up": False} and st["counts"]["dropped"] == 1
    assert "NOT RUNNING" in cli(hookd, "status")[1]
    assert cli(hookd, "queue", "retry", doc)[1].startswith("1 paths queued")
    code, text = cli(hookd, "queue", "--state", "pending")
    assert doc in text
    assert cli(hookd, "queue", "drop", doc)[1].startswith(f"dropped {doc}")
    assert top in cli(hookd, "queue", "--state", "done")[1]


def test_operator_commands_refuse_others_clearly(nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str) -> None:
    import pwd

    hookd = hookd_factory()
    os.chmod(hookd.state_dir, 0o700)
    pw = pwd.getpwnam(build_user)
    env = {"HOOKD_STATE_DIR": str(hookd.state_dir), "HOOKD_CONFIG": "/dev/null", "PATH": os.environ["PATH"]}
    hookd_bin = os.path.join(os.path.dirname(sys.executable), "hookd")
    # the build user cannot run our venv's python from /root: use the interpreter through a copy-free route
    proc = subprocess.run([sys.executable, "-c", f"import os; os.setgid({pw.pw_gid}); os.setuid({pw.pw_uid}); "
                           f"os.execv({sys.executable!r}, [{sys.executable!r}, {hookd_bin!r}, 'status'])"],
                          env=env, capture_output=True, text=True)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "run as root or as a member" in out or "Permission denied" in out, out


OPERATOR_GROUP = "hookd-optest"
OPERATOR_USER = "hookd-operator"


def operator_member() -> tuple[int, int, int]:
    """(uid, primary gid, operator gid) of an unprivileged user who is a member of the daemon's group."""
    import grp
    import pwd

    subprocess.run(["groupadd", "--system", "-f", OPERATOR_GROUP], check=True, capture_output=True)
    try:
        pw = pwd.getpwnam(OPERATOR_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OPERATOR_USER],
                       check=True)  # fmt: skip
        pw = pwd.getpwnam(OPERATOR_USER)
    subprocess.run(["gpasswd", "-a", OPERATOR_USER, OPERATOR_GROUP], check=True, capture_output=True)
    return pw.pw_uid, pw.pw_gid, grp.getgrnam(OPERATOR_GROUP).gr_gid


def test_group_members_read_the_queue_with_the_daemon_up_and_down(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str
) -> None:
    """As the unit runs it: state directory 0750 in the daemon's group, files 0640 (UMask=0027). A member of the
    group, a real unprivileged process, runs `hookd status` and `hookd queue` with the daemon up, and with it
    stopped cleanly (no -wal, no -shm: a plain read-only open must create the -shm and cannot)."""
    uid, gid, op_gid = operator_member()
    hookd = hookd_factory(env={"HOOKD_SOCKET_GROUP": OPERATOR_GROUP}, start=False)
    state = hookd.state_dir
    state.mkdir()
    os.chown(state, 0, op_gid)
    state.chmod(0o2750)  # setgid: what the daemon creates belongs to its group, as under User=/Group=hookd
    old = os.umask(0o027)
    try:
        hookd.start()
    finally:
        os.umask(old)
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    [top] = nixenv.build(expr, ["top"], user=build_user, args={"salt": str(time.time_ns())})
    wait_for_narinfos(Path(hookd.cache_url.removeprefix("file://")), nixenv.closure([top]))
    wait_idle(hookd)
    env = {"PATH": os.environ["PATH"], "HOOKD_STATE_DIR": str(state), "HOOKD_CONFIG": "/dev/null",
           "HOOKD_STORE_DIR": nixenv.store_dir, "HOOKD_CACHE": hookd.cache_url}  # fmt: skip
    hookd_bin = os.path.join(os.path.dirname(sys.executable), "hookd")

    def as_member(*args: str) -> str:
        proc = subprocess.run([hookd_bin, *args], user=uid, group=gid, extra_groups=[op_gid], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def done(listing: str) -> set[str]:
        return {r["path"] for r in json.loads(listing) if r["state"] == "done"}

    closure = set(nixenv.closure([top]))
    assert json.loads(as_member("status", "--json"))["daemon"]["up"] is True
    assert done(as_member("queue", "--json")) >= closure
    assert hookd.stop() == 0
    assert not list(state.glob("queue.sqlite-*")), list(state.iterdir())  # stopped cleanly: no -wal, no -shm
    st = json.loads(as_member("status", "--json"))
    assert st["daemon"] == {"up": False} and st["counts"]["done"] >= len(closure)
    assert done(as_member("queue", "--json")) >= closure
    assert top in as_member("queue", "show", top)
    assert not list(state.glob("queue.sqlite-*"))  # the reader left nothing behind


def test_a_lock_free_read_notices_a_writer(tmp_path: Path) -> None:
    """The immutable read of a stopped daemon's queue (see Queue.open_readonly) must notice when the daemon
    starts and writes meanwhile: here a real writer commits and closes (checkpointing into the main file and
    removing its -wal, so only the file's identity tells) while a group member holds the queue open."""
    import asyncio
    import tempfile

    from hookd.queue import Queue

    uid, gid, op_gid = operator_member()
    state = Path(tempfile.mkdtemp(prefix="hk-ro-", dir="/tmp"))
    try:
        os.chown(state, 0, op_gid)
        state.chmod(0o2750)
        db = state / "queue.sqlite"

        async def write(n: int) -> None:
            q = await Queue.open(db, "/nix/store")
            for _ in range(n):
                await q.add_request(None, ["/nix/store/" + "a" * 32 + "-x"], "cli")
            await q.close()

        old = os.umask(0o027)
        try:
            asyncio.run(write(1))
        finally:
            os.umask(old)
        assert not list(state.glob("queue.sqlite-*"))
        code = (
            "import asyncio, sys\n"
            "from pathlib import Path\n"
            "from hookd.queue import Queue\n"
            "async def main():\n"
            f"    q = await Queue.open_readonly(Path({str(db)!r}), '/nix/store')\n"
            "    print((await q.counts())['requests'], q.unchanged(), flush=True)\n"
            "    sys.stdin.readline()\n"
            "    print(q.unchanged(), flush=True)\n"
            "    await q.close()\n"
            "asyncio.run(main())\n"
        )
        child = subprocess.Popen([sys.executable, "-c", code], user=uid, group=gid, extra_groups=[op_gid],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().split() == ["1", "True"], child.stderr.read() if child.stderr else ""
        asyncio.run(write(3))
        assert not list(state.glob("queue.sqlite-*"))  # the writer is gone again: only the file changed
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().split() == ["False"]
        assert child.wait(30) == 0
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_push_wait_on_a_terminal(nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path) -> None:
    hookd = hookd_factory()
    hookd.stop()
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    salt = str(time.time_ns())
    top, doc = nixenv.build(expr, ["top", "multi.doc"], user=build_user, args={"salt": salt})
    for f in (hookd.state_dir / "spool").glob("*.req"):  # as if these had been substituted, not built
        f.unlink()
    hookd.start()
    env, hookd_bin = push_env(hookd, nixenv)

    def on_pty(*args: str) -> tuple[int, str]:
        return run_on_pty([hookd_bin, "push", "--wait", *args], env)

    code, out = on_pty(top)
    assert code == 0, out
    assert "\r" in out and "[##############################]" in out and "4/4 paths" in out
    tamper(doc)
    code, out = on_pty(doc)
    assert code == 1 and "failed" in out and doc in out
    # not a terminal: one plain line per path
    proc = subprocess.run([hookd_bin, "push", "--wait", top], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "\r" not in proc.stdout
    assert sum(line.startswith("uploaded /") for line in proc.stdout.splitlines()) == 4


def test_push_a_drv_uploads_its_outputs(nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str) -> None:
    """`nix path-info X.drv` answers for the outputs on Nix 2.8 but for the .drv itself on 2.26+: `push X.drv`
    resolves the outputs itself, so it uploads them (and not the .drv) on every Nix."""
    hookd = hookd_factory()
    hookd.stop()
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    salt = str(time.time_ns())
    nixenv.build(expr, ["multi"], user=build_user, args={"salt": salt})
    drv = nixenv.nix("nix-instantiate", str(expr), "-A", "multi", "--argstr", "salt", salt).stdout.strip()
    outs = [o for o in nixenv.nix("nix-store", "--query", "--outputs", drv).stdout.split() if os.path.lexists(o)]
    assert drv.endswith(".drv") and len(outs) == 3
    for f in (hookd.state_dir / "spool").glob("*.req"):  # as if they had been substituted, not built
        f.unlink()
    hookd.start()
    env, hookd_bin = push_env(hookd, nixenv)
    proc = subprocess.run([hookd_bin, "push", "--wait", drv], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    uploaded = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("uploaded /")}
    assert uploaded == set(nixenv.closure(outs)) and drv not in uploaded
    cache = Path(hookd.cache_url.removeprefix("file://"))
    assert not (cache / f"{Path(drv).name[:32]}.narinfo").exists()
    proc = subprocess.run([hookd_bin, "push", drv.replace("-multi.drv", "-nothing.drv")], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode != 0


def test_push_wait_follows_its_own_request(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path
) -> None:
    """`push --wait` waits for this request's plan, not for old states (issue 12, defects 3 and 4): after
    the cache was emptied behind hookd's back it returns only once the closure is there again; when a
    reference fails it ends non-zero, naming that reference, instead of waiting forever."""
    hookd = hookd_factory(env={"HOOKD_RETRY_BASE": "0.1"})
    cache = Path(hookd.cache_url.removeprefix("file://"))
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    [top] = nixenv.build(expr, ["top"], user=build_user, args={"salt": str(time.time_ns())})
    closure = nixenv.closure([top])
    wait_for_narinfos(cache, closure)
    wait_idle(hookd)
    env, hookd_bin = push_env(hookd, nixenv)
    for child in cache.iterdir():  # emptied behind hookd's back
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    for tty in (False, True):
        if tty:
            for child in cache.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            code, text = run_on_pty([hookd_bin, "push", "--wait", top], env)
        else:
            done = subprocess.run([hookd_bin, "push", "--wait", top], env=env, capture_output=True, text=True,
                                  timeout=60)  # fmt: skip
            code, text = done.returncode, done.stdout + done.stderr
        assert code == 0, text
        missing = [p for p in closure if not (cache / f"{p.rsplit('/', 1)[-1][:32]}.narinfo").exists()]
        assert not missing, f"push --wait returned before {missing} was uploaded again:\n{text}"
    # a reference that cannot be uploaded: the request ends, naming it
    [top2] = nixenv.build(expr, ["top"], user=build_user, args={"salt": str(time.time_ns())})
    wait_idle(hookd)
    deps = [p for p in nixenv.closure([top2]) if p != top2]
    victim = next(p for p in deps if p.endswith("-chain-a"))
    for child in cache.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    tamper(victim)
    done = subprocess.run([hookd_bin, "push", "--wait", top2], env=env, capture_output=True, text=True, timeout=60)
    text = done.stdout + done.stderr
    assert done.returncode == 1, text
    assert f"FAILED {victim}" in text and f"BLOCKED {top2}" in text and f"blocked by {victim}" in text, text
    assert "root cause" in text and "do not match" in text, text
    code, listing = cli(hookd, "queue", "--state", "blocked")
    assert top2 in listing, listing


def push_env(hookd: HookdProcess, nixenv: NixEnv) -> tuple[dict[str, str], str]:
    """The environment and the hookd binary for running the CLI as an operator would, beside `hookd`."""
    env = dict(os.environ, HOOKD_STATE_DIR=str(hookd.state_dir), HOOKD_CACHE=hookd.cache_url,
               HOOKD_CONFIG="/dev/null", HOOKD_STORE_DIR=nixenv.store_dir, **nixenv.env)  # fmt: skip
    return env, os.path.join(os.path.dirname(sys.executable), "hookd")


def run_on_pty(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run a command on a pseudo-terminal (as a person at a terminal would); its exit status and output."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO once the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(60), out.decode(errors="replace")


def test_systemd_notifications(nixenv: NixEnv, hookd_factory: HookdFactory, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(15)
    hookd = hookd_factory(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
    messages: list[str] = []
    deadline = time.monotonic() + 15
    while not (any("WATCHDOG=1" in m for m in messages) and any(m.startswith("READY=1") for m in messages)):
        assert time.monotonic() < deadline, messages
        messages.append(sock.recv(4096).decode())
    assert any("STATUS=queue: 0 pending" in m for m in messages)
    hookd.stop()
    while not any("STOPPING=1" in m for m in messages):
        messages.append(sock.recv(4096).decode())
    sock.close()


def test_metrics_match_what_was_uploaded(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    hookd = hookd_factory(env={"HOOKD_METRICS_LISTEN": f"127.0.0.1:{port}"})
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    outs = nixenv.build(expr, ["top"], user=build_user, args={"salt": str(time.time_ns())})
    closure = nixenv.closure(outs)
    wait_for_narinfos(tmp_path / "cache", closure)
    wait_idle(hookd)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("hookd_uploads_total", ())] == len(closure)
    nar_bytes = sum(int(i["narSize"]) for i in nixenv.path_info(closure))  # type: ignore[call-overload]
    assert samples[("hookd_nar_bytes_total", ())] == nar_bytes
    assert samples[("hookd_upload_seconds_count", ())] == len(closure)
    assert samples[("hookd_queue_paths", (("state", "done"),))] == len(closure)
    assert samples[("hookd_requests_total", ())] == 4  # one per derivation built


def test_build_logs_reach_nix_through_the_cache(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path
) -> None:
    hookd = hookd_factory(env={"HOOKD_UPLOAD_BUILD_LOGS": "true"})
    salt = str(time.time_ns())
    expr = nixenv.write_expr("noisy.nix", LOG_NIX)
    [out] = nixenv.build(expr, [], user=build_user, args={"salt": salt})
    drv = nixenv.nix("nix-store", "--query", "--deriver", out).stdout.strip()
    cache = tmp_path / "cache"
    deadline = time.monotonic() + 30
    while not (cache / "log" / Path(drv).name).exists():
        assert time.monotonic() < deadline, hookd.log()
        time.sleep(0.1)
    wait_for_narinfos(cache, [out])
    fresh = tmp_path / "fresh"
    conf = fresh / "etc"
    conf.mkdir(parents=True)
    (conf / "nix.conf").write_text(f"experimental-features = nix-command\nsubstituters = file://{cache}\n"
                                   f"trusted-public-keys = {hookd.public_key}\n")  # fmt: skip
    env = dict(nixenv.env, NIX_CONF_DIR=str(conf), NIX_REMOTE="")
    proc = subprocess.run(["nix", "log", "--store", str(fresh / "root"), out], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"hello from the build log of {salt}" in proc.stdout
