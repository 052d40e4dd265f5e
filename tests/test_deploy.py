"""Deployment: the systemd units and the NixOS module, socket activation, and the key's permissions."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hookd import protocol
from hookd.selftest import NixEnv

from .conftest import HookdFactory

ROOT = Path(__file__).resolve().parents[1]
UNITS = sorted(p for p in (ROOT / "systemd").iterdir() if p.suffix in (".service", ".socket", ".timer"))
HOOKD = os.path.join(os.path.dirname(sys.executable), "hookd")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (run .ci/setup)", pytrace=False)
    return path


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The unit files, with ExecStart pointing at this checkout's hookd (verify checks that it exists)."""
    for unit in UNITS:
        (tmp_path / unit.name).write_text(unit.read_text().replace("/usr/local/bin/hookd", HOOKD))
    return tmp_path


def test_systemd_analyze_verify_accepts_every_unit(units: Path) -> None:
    """On every systemd (252, 257, 262): verify also runs `man` for each Documentation=man:… line, so man-db
    and nix-bin's nix.conf(5) must be there (.ci/setup installs both)."""
    assert {u.name for u in UNITS} == {"hookd.service", "hookd.socket", "hookd-gc.service", "hookd-gc.timer"}
    need("man")
    proc = subprocess.run([need("systemd-analyze"), "verify", *sorted(str(p) for p in units.iterdir())],
                          capture_output=True, text=True, cwd=units)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # Units of other packages that verify loads may warn on a newer systemd (xfsprogs' CPUAccounting= on 262,
    # where Ceph is installed); ours must not.
    others = ("/usr/lib/systemd/", "/lib/systemd/", "/etc/systemd/")
    assert [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(others)] == [], (
        proc.stderr
    )


def test_service_exposure_is_at_most_2(units: Path) -> None:
    proc = subprocess.run([need("systemd-analyze"), "security", "--offline=true", str(units / "hookd.service")],
                          capture_output=True, text=True)  # fmt: skip
    m = re.search(r"Overall exposure level for hookd\.service: (\d+\.\d+)", proc.stdout + proc.stderr)
    assert m, proc.stdout + proc.stderr
    # The bound, not a figure: systemd's scoring changes between versions (1.4 on 252, 1.2 on 257 and 262;
    # the README records each and promises at most 2.0).
    assert float(m.group(1)) <= 2.0, proc.stdout


def test_every_nix_file_parses() -> None:
    files = sorted((ROOT / "nixos-module").glob("*.nix"))
    assert {f.name for f in files} == {"default.nix", "package.nix"}
    for f in files:
        proc = subprocess.run([need("nix-instantiate"), "--parse", str(f)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{f.name}: {proc.stderr}"


def test_socket_activation_serves_the_hook(nixenv: NixEnv, hookd_factory: HookdFactory, tmp_path: Path) -> None:
    """The daemon takes the listening socket systemd passes (LISTEN_FDS/LISTEN_PID) and serves the hook."""
    hookd = hookd_factory(start=False)
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    fd = listener.fileno()
    env = {**nixenv.env, "HOOKD_CONFIG": "/dev/null", "LISTEN_FDS": "1"}
    argv = [HOOKD, "daemon", "--cache", f"file://{tmp_path / 'cache'}", "--state-dir", str(hookd.state_dir),
            "--store-dir", nixenv.store_dir]  # fmt: skip

    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115
    # like systemd: the socket is fd 3 and LISTEN_PID names the process that runs hookd (exec keeps the pid)
    launcher = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
                "os.execv(sys.argv[2], sys.argv[2:])")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", launcher, str(fd), *argv], env=env, pass_fds=(fd,),
                            stdout=log, stderr=log)  # fmt: skip
    try:
        src = tmp_path / "x"
        src.write_text("activated\n")
        out = nixenv.nix("nix-store", "--add", str(src)).stdout.strip()
        deadline = time.monotonic() + 20
        while True:
            try:
                c = socket.socket(socket.AF_UNIX)
                c.settimeout(5)
                c.connect(str(path))
                c.sendall(protocol.Enqueue(None, (out,)).encode())
                answer = c.recv(200)
                c.close()
                if answer:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
            time.sleep(0.1)
        assert answer.startswith(b"OK queued"), answer
        # and the hook itself, pointed at that socket
        hook = subprocess.run([os.path.join(os.path.dirname(sys.executable), "hookd-hook")],
                              env={"HOOKD_SOCKET": str(path), "HOOKD_SPOOL_DIR": str(tmp_path), "OUT_PATHS": out},
                              capture_output=True, text=True, timeout=10)  # fmt: skip
        assert hook.returncode == 0 and hook.stderr == ""
        deadline = time.monotonic() + 30
        while not (tmp_path / "cache" / f"{Path(out).name[:32]}.narinfo").exists():
            assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
            time.sleep(0.1)
        assert not (hookd.state_dir / "hookd.sock").exists()  # it bound nothing of its own
    finally:
        proc.terminate()
        proc.wait(30)
        listener.close()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_daemon_refuses_a_key_others_can_read(build_user: str, tmp_path: Path, mode: int) -> None:
    from click.testing import CliRunner

    from hookd.cli import main

    key = tmp_path / "secret-key"
    assert CliRunner().invoke(main, ["keygen", "k-1", "--secret-key-file", str(key),
                                     "--public-key-file", str(tmp_path / "pub")]).exit_code == 0  # fmt: skip
    os.chown(key, -1, pwd.getpwnam(build_user).pw_gid)  # a group with a member other than hookd's user
    key.chmod(mode)
    proc = subprocess.run([HOOKD, "daemon", "--cache", f"file://{tmp_path / 'cache'}", "--state-dir",
                           str(tmp_path / "state"), "--secret-key-file", str(key)],
                          env={"HOOKD_CONFIG": "/dev/null", "PATH": os.environ["PATH"]}, capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    assert proc.returncode != 0
    who = f"the members of group {build_user}" if mode & 0o040 else "every user"
    assert f"{key} can be read by {who}" in proc.stderr, proc.stderr
    assert f"chmod 0400 {key}" in proc.stderr
    assert not (tmp_path / "state" / "hookd.sock").exists()


def test_the_build_user_cannot_read_the_key_in_the_documented_setup(build_user: str, tmp_path: Path) -> None:
    """Documented: /etc/hookd/secret-key, root:root 0600 in a root-owned 0755 directory (systemd's
    LoadCredential hands the daemon a private copy). An unprivileged build user can list the directory,
    but not read the key."""
    import tempfile

    from click.testing import CliRunner

    from hookd.cli import main

    etc = Path(tempfile.mkdtemp(prefix="etc-hookd-", dir="/tmp"))  # /tmp/pytest-of-root is root's only
    etc.chmod(0o755)
    key = etc / "secret-key"
    assert CliRunner().invoke(main, ["keygen", "k-1", "--secret-key-file", str(key),
                                     "--public-key-file", str(etc / "public-key")]).exit_code == 0  # fmt: skip
    pw = pwd.getpwnam(build_user)
    code = (
        f"import os, sys\nos.setgid({pw.pw_gid}); os.setuid({pw.pw_uid})\n"
        "try:\n open(sys.argv[1]).read(); print('READ')\nexcept PermissionError: print('DENIED')\n"
        "print(open(sys.argv[2]).read().strip())"
    )
    proc = subprocess.run(["/usr/bin/python3", "-c", code, str(key), str(etc / "public-key")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "DENIED"
    assert proc.stdout.splitlines()[1].startswith("k-1:")  # the public half is for everyone
    shutil.rmtree(etc)
