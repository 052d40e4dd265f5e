"""The daemon socket's wire format: one request line, one response line.

Requests are `VERB ARG...\\n` with space-separated arguments. Store paths never contain spaces, so the
hook needs no JSON encoder and no import heavier than the standard library's core: it runs inside
nix-daemon's build loop, where every millisecond of start-up counts.

    ENQUEUE <drv-path or -> [<out-path> ...]   queue outputs (or, with none, the outputs of the .drv)
    PING                                       liveness check
    STATUS | RETRY <path>...|--failed | DROP <path>...   operator commands (answer: OK <json>)
    PUSH <path>...                             `hookd push`: like ENQUEUE, checked against the cache
    REQUEST <id>                               a request's state and its paths' (answer: OK <json>)

Responses: `OK [detail]\\n` once the request is committed to the queue, or `ERR <message>\\n`.
This module is imported by the hook: standard library only, and no `typing`, `re` or `dataclasses`.
"""

from __future__ import annotations

MAX_LINE = 1 << 20
MAX_PATHS = 10_000
MAX_PATH_LEN = 4096


class ProtocolError(ValueError):
    """A request or response line is malformed; the message is safe to send back to the peer."""


class Enqueue:
    __slots__ = ("drv", "outs")

    def __init__(self, drv: str | None, outs: tuple[str, ...]) -> None:
        self.drv = drv
        self.outs = outs

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Enqueue) and (self.drv, self.outs) == (other.drv, other.outs)

    def __repr__(self) -> str:
        return f"Enqueue(drv={self.drv!r}, outs={self.outs!r})"

    def encode(self) -> bytes:
        return " ".join(["ENQUEUE", self.drv or "-", *self.outs]).encode() + b"\n"


class Command:
    """An operator request: STATUS, RETRY <path>...|--failed, DROP <path>..., PUSH <path>..., REQUEST <id>"""

    __slots__ = ("args", "verb")
    VERBS = ("STATUS", "RETRY", "DROP", "PUSH", "REQUEST")

    def __init__(self, verb: str, args: tuple[str, ...] = ()) -> None:
        self.verb = verb
        self.args = args

    def encode(self) -> bytes:
        return " ".join([self.verb, *self.args]).encode() + b"\n"


class Ping:
    __slots__ = ()

    def encode(self) -> bytes:
        return b"PING\n"


def enqueue_from_env(out_paths: str, drv_path: str) -> Enqueue:
    """The request for a post-build-hook invocation (`OUT_PATHS` may be empty: Nix 2.8.0 leaves it so)."""
    return Enqueue(drv_path.strip() or None, tuple(out_paths.split()))


def parse_request(line: bytes) -> Enqueue | Ping | Command:
    """Parse one request line (syntax only; the daemon checks the paths against its store)."""
    words = _words(line)
    verb = words[0]
    if verb == "PING" and len(words) == 1:
        return Ping()
    if verb in Command.VERBS:
        return _command(verb, tuple(words[1:]))
    if verb != "ENQUEUE":
        raise ProtocolError(f"unknown request {verb[:20]!r} (expected ENQUEUE, PING, {', '.join(Command.VERBS)})")
    return _enqueue(words[1:])


def _words(line: bytes) -> list[str]:
    """The space-separated words of one whole line of UTF-8 text."""
    if len(line) > MAX_LINE:
        raise ProtocolError(f"request line longer than {MAX_LINE} bytes")
    if not line.endswith(b"\n"):
        raise ProtocolError("request line does not end in a newline")
    try:
        text = line[:-1].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("request is not UTF-8 text") from None
    if "\0" in text or "\r" in text or "\n" in text:
        raise ProtocolError("request contains a control character")
    return text.split(" ")


def _command(verb: str, args: tuple[str, ...]) -> Command:
    if any(not a for a in args) or len(args) > MAX_PATHS:
        raise ProtocolError(f"{verb} takes paths separated by single spaces")
    if verb == "STATUS" and args:
        raise ProtocolError("STATUS takes no arguments")
    if verb in ("RETRY", "DROP", "PUSH") and not args:
        raise ProtocolError(f"{verb} needs paths (or --failed for RETRY)")
    if verb == "REQUEST" and (len(args) != 1 or not args[0].isdigit() or len(args[0]) > 18):
        raise ProtocolError("REQUEST takes one request number")
    if verb == "PUSH":
        _check_lengths(args)
    return Command(verb, args)


def _enqueue(args: list[str]) -> Enqueue:
    if not args or any(not w for w in args):
        raise ProtocolError("ENQUEUE needs a .drv path or '-', then paths separated by single spaces")
    drv = None if args[0] == "-" else args[0]
    outs = tuple(args[1:])
    if drv is None and not outs:
        raise ProtocolError("ENQUEUE with neither a .drv path nor output paths")
    if len(outs) > MAX_PATHS:
        raise ProtocolError(f"ENQUEUE with {len(outs)} paths; at most {MAX_PATHS} per request")
    _check_lengths(args)
    return Enqueue(drv, outs)


def _check_lengths(paths: list[str] | tuple[str, ...]) -> None:
    if any(len(p) > MAX_PATH_LEN for p in paths):
        raise ProtocolError(f"path longer than {MAX_PATH_LEN} characters")


def ok(detail: str = "") -> bytes:
    return (f"OK {detail}" if detail else "OK").encode() + b"\n"


def queued(request_id: int) -> bytes:
    """The answer to ENQUEUE and PUSH once the request is committed to the queue."""
    return ok(f"queued {request_id}")


def queued_id(detail: str) -> int | None:
    """The request number in the detail of a `queued` answer."""
    verb, _, number = detail.partition(" ")
    return int(number) if verb == "queued" and number.isdigit() else None


def error(message: str) -> bytes:
    return f"ERR {' '.join(message.split())}".encode() + b"\n"


def parse_response(line: bytes) -> tuple[bool, str]:
    """(True, detail) for OK, (False, message) for ERR; anything else is an error too."""
    text = line.decode("utf-8", "replace").rstrip("\n")
    if text == "OK" or text.startswith("OK "):
        return True, text[3:]
    if text.startswith("ERR "):
        return False, text[4:]
    return False, f"unexpected response {text[:80]!r}"
