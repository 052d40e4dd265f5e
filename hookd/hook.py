"""hookd-hook: the post-build-hook that nix-daemon runs after every build.

It hands `OUT_PATHS` and `DRV_PATH` to the daemon's socket and waits (at most about 2 s) for the answer
that the request is committed to the queue. If the daemon refuses, is slow or is not there, the request
goes to an atomic spool file that the daemon drains when it (re)starts. It always exits 0: a non-zero
exit would stop every further build of the invocation, and an upload problem must never do that.

Standard library only, and nothing slow to import: nix-daemon blocks its build loop while this runs.
Configuration comes from the environment nix-daemon passes on:
HOOKD_SOCKET, HOOKD_SPOOL_DIR, or HOOKD_STATE_DIR for both (default /var/lib/hookd).
"""

from __future__ import annotations

import _socket
import os
import sys
import time

from hookd import protocol

DEFAULT_STATE_DIR = "/var/lib/hookd"
TIMEOUT = 2.0


def socket_path(env: os._Environ[str] | dict[str, str]) -> str:
    state = env.get("HOOKD_STATE_DIR") or DEFAULT_STATE_DIR
    return env.get("HOOKD_SOCKET") or os.path.join(state, "hookd.sock")


def spool_dir(env: os._Environ[str] | dict[str, str]) -> str:
    state = env.get("HOOKD_STATE_DIR") or DEFAULT_STATE_DIR
    return env.get("HOOKD_SPOOL_DIR") or os.path.join(state, "spool")


def send(path: str, request: bytes, timeout: float = TIMEOUT) -> tuple[bool, str]:
    """Send one request: (True, detail) once the daemon says it is committed, (False, why) when it
    refuses it. OSError (TimeoutError, ConnectionError…) when there is no answer at all."""
    deadline = time.monotonic() + timeout
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(request)
        answer = b""
        while not answer.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer from {path} within {timeout:g} s")
            sock.settimeout(left)
            data = sock.recv(4096)
            if not data:
                raise ConnectionResetError(f"{path} closed the connection without an answer")
            answer += data
            if len(answer) > 65536:
                raise ConnectionResetError(f"{path} answered with an overlong line")
        return protocol.parse_response(answer)
    finally:
        sock.close()


def spool(directory: str, request: bytes) -> str:
    """Write the request atomically (temp file, fsync, rename, fsync dir); return the file's path."""
    name = f"{time.time_ns()}-{os.getpid()}.req"
    tmp = os.path.join(directory, f".{name}.tmp")
    final = os.path.join(directory, name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, request)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return final


def run(env: os._Environ[str] | dict[str, str]) -> str | None:
    """Deliver this build's paths; return a line to print, or None when all went well."""
    req = protocol.enqueue_from_env(env.get("OUT_PATHS", ""), env.get("DRV_PATH", ""))
    if req.drv is None and not req.outs:
        return "hookd-hook: OUT_PATHS and DRV_PATH are both empty; nothing to queue"
    request = req.encode()
    try:
        ok, detail = send(socket_path(env), request)
    except TimeoutError:
        ok, detail = False, f"no answer from {socket_path(env)} within {TIMEOUT:g} s"
    except OSError as e:
        ok, detail = False, f"cannot reach {socket_path(env)}: {e.strerror or e}"
    if ok:
        return None
    where = spool_dir(env)
    try:
        spooled = spool(where, request)
    except OSError as e:
        return (
            f"hookd-hook: LOST {req.drv or ' '.join(req.outs)}: daemon: {detail}; spool {where}: "
            f"{e.strerror or e} (these paths were not queued: start hookd or fix its spool directory)"
        )
    return f"hookd-hook: daemon: {detail}; spooled to {spooled}"


def main() -> None:
    try:
        message = run(os.environ)
    except BaseException as e:
        message = f"hookd-hook: internal error {type(e).__name__}: {e}"
    if message:
        try:  # noqa: SIM105 - contextlib is one import too many here
            print(message, file=sys.stderr, flush=True)
        except OSError:
            pass
    os._exit(0)


if __name__ == "__main__":
    main()
