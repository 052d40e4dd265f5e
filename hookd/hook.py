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


SENT, REFUSED, SPOOLED, LOST = "sent", "refused", "spooled", "lost"


class Delivery:
    """What became of a request: `sent` (the daemon committed it), `refused` (the daemon answered ERR),
    `spooled` (to `spooled`, for the daemon's next start) or `lost` (the spool failed too: `error`).
    `detail` is the daemon's answer, or why there was none."""

    __slots__ = ("detail", "error", "outcome", "spooled")

    def __init__(self, outcome: str, detail: str, spooled: str = "", error: str = "") -> None:
        self.outcome = outcome
        self.detail = detail
        self.spooled = spooled
        self.error = error


def deliver(
    sock: str, spool_to: str, request: bytes, timeout: float = TIMEOUT, spool_request: bytes = b"",
    spool_refused: bool = True,
) -> Delivery:  # fmt: skip
    """Send a request to the daemon; spool it (or `spool_request`) when no daemon answers, and also when
    the daemon refuses it if `spool_refused` (the hook: a daemon shutting down refuses, and must not lose it)."""
    answered = False
    try:
        ok, detail = send(sock, request, timeout)
        answered = True
    except TimeoutError:
        ok, detail = False, f"no answer from {sock} within {timeout:g} s"
    except OSError as e:
        ok, detail = False, f"cannot reach {sock}: {e.strerror or e}"
    if ok:
        return Delivery(SENT, detail)
    if answered and not spool_refused:
        return Delivery(REFUSED, detail)
    try:
        return Delivery(SPOOLED, detail, spooled=spool(spool_to, spool_request or request))
    except OSError as e:
        return Delivery(LOST, detail, error=e.strerror or str(e))


def run(env: os._Environ[str] | dict[str, str]) -> str | None:
    """Deliver this build's paths; return a line to print, or None when all went well."""
    req = protocol.enqueue_from_env(env.get("OUT_PATHS", ""), env.get("DRV_PATH", ""))
    if req.drv is None and not req.outs:
        return "hookd-hook: OUT_PATHS and DRV_PATH are both empty; nothing to queue"
    where = spool_dir(env)
    done = deliver(socket_path(env), where, req.encode())
    if done.outcome == SENT:
        return None
    if done.outcome == LOST:
        return (
            f"hookd-hook: LOST {req.drv or ' '.join(req.outs)}: daemon: {done.detail}; spool {where}: "
            f"{done.error} (these paths were not queued: start hookd or fix its spool directory)"
        )
    return f"hookd-hook: daemon: {done.detail}; spooled to {done.spooled}"


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
