"""One typed configuration, merged from defaults, a TOML file, HOOKD_* environment variables and flags
(later sources win).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .safety import Bounds, BoundsError

DEFAULT_CONFIG_FILE = Path("/etc/hookd/config.toml")
DEFAULT_STATE_DIR = Path("/var/lib/hookd")
COMPRESSIONS = ("zstd", "xz", "none")
CONTENT_ENCODINGS = ("none", "gzip", "zstd")
EVENT_LOOPS = ("uvloop", "asyncio")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the setting and where it came from."""


@dataclass
class Config:
    cache: str = ""
    """Where to upload: file:///dir, s3://bucket[/prefix]?…, or http(s)://host/path."""
    state_dir: Path = DEFAULT_STATE_DIR
    """Holds the queue database, and by default the socket, the spool and a generated signing key."""
    socket: Path | None = None
    """The hook's Unix socket (default: <state_dir>/hookd.sock)."""
    spool_dir: Path | None = None
    """Where the hook leaves requests when the daemon is unreachable (default: <state_dir>/spool)."""
    secret_key_file: Path | None = None
    """Signing key in Nix's format. Default: <state_dir>/secret-key, generated on first start."""
    compression: str = "zstd"
    compression_level: int | None = None
    """zstd 1-19 (default 3), xz 0-9 (default 6)."""
    store_dir: str = "/nix/store"
    nix_store: str | None = None
    """Passed to Nix as --store when querying path info (for example 'daemon'); default: Nix's own."""
    max_parallel: int = 64
    """At most this many paths upload at once. The scheduler starts at 8 (or this, if lower) and adapts:
    more while the backend answers as fast as it can, back towards 8 when it throttles or slows down."""
    worker_nice: int = 10
    """Added niceness of the threads that hash and compress NARs (builds and the hook come first)."""
    priority: int = 50
    """The Priority written to nix-cache-info."""
    allowed_uids: list[int] = field(default_factory=lambda: [0])
    """Peers (by SO_PEERCRED uid) allowed on the socket, besides the daemon's own user."""
    socket_group: str | None = None
    """Group that owns the socket (mode 0660)."""
    max_bytes_in_flight: int = 128 << 20
    """Memory that uploads in flight may hold, counted as hookd/footprint.py says: a small NAR about
    three times its size, a streamed one its compressor (threaded zstd: ~20 MiB) and what the backend
    buffers (S3: part_size times part_concurrency + 2; HTTP: nothing); nothing is staged on disk. An
    upload larger than this goes alone. The default keeps a whole closure's peak RSS near a single
    large path's without slowing a closure of many paths (measured, 487 /usr paths: 64 MiB was ~40 %
    slower to nginx; 128 MiB as fast as 512 MiB, at 115-135 MiB peak RSS instead of 216-518)."""
    event_loop: str = "uvloop"
    """The daemon's event loop: uvloop (libuv's; about a tenth less CPU per small path here) or asyncio
    (Python's own selector loop: a way out should uvloop misbehave)."""
    request_attempts: int = 6
    """Tries per remote request (backoff with full jitter) before the path goes back to the queue."""
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_connections: int = 64
    """Connection pool size of a remote backend."""
    multipart_threshold: int = 8 << 20
    part_size: int = 8 << 20
    part_concurrency: int = 2
    """S3: compressed NARs from this size go up as multipart uploads of part_size, this many parts at a
    time, each sent as soon as the stream has filled it."""
    s3_credentials_file: Path | None = None
    """S3: an AWS shared-credentials file (default: botocore's chain: environment, profile, role)."""
    http_token_file: Path | None = None
    """HTTP: a file holding a bearer token."""
    netrc_file: Path | None = None
    """HTTP: basic-auth credentials for the cache's host."""
    tls_verify: bool = True
    tls_ca_file: Path | None = None
    recheck_interval: float = 86400.0
    """A path recorded as uploaded is trusted without asking the cache for this long (seconds)."""
    refresh_interval: float = 86400.0
    """A path asked for again has its narinfo's age reset at most this often (seconds), so GC
    retention counts from when it was last needed."""
    gc_grace: float = 3600.0
    """The grace period `hookd gc` runs with (seconds). Before publishing a path, references found
    in the cache that were not touched within half of it are touched, so a GC running at the same
    time cannot take them."""
    gc_check_to_delete: float = 20.0
    """GC gives up a delete whose age check is older than this (seconds); uploaders wait longer than
    this plus gc_request_timeout between touching what they reuse and publishing (hookd/safety.py)."""
    gc_request_timeout: float = 20.0
    """A GC delete or an uploader's publish not answered within this many seconds is abandoned."""
    max_clock_skew: float = 30.0
    """GC refuses to run when the bucket's clock and this host's differ by more (seconds)."""
    existence_concurrency: int = 32
    """Existence checks (narinfo HEADs) in flight at once while planning."""
    upstream_caches: list[str] = field(default_factory=list)
    """Caches whose paths are not uploaded again (for example https://cache.nixos.org)."""
    upstream_keys: list[str] = field(default_factory=list)
    """Their key names (`cache.nixos.org-1`) or public keys (`name:base64`). A path signed by one in
    the local store, or present in an upstream cache with such a signature, is skipped."""
    skip_upstream: bool = True
    """Turn off to upload everything, upstream paths included (a self-contained cache)."""
    upstream_positive_ttl: float = 86400.0
    upstream_negative_ttl: float = 3600.0
    metrics_listen: str | None = None
    """HOST:PORT for the Prometheus endpoint (/metrics); off unless set, for example 127.0.0.1:9464."""
    upload_build_logs: bool = False
    """Upload the build log of each built .drv to log/<drv> so `nix log` finds it through the cache."""
    listings: bool = True
    """Write each uploaded path's NAR listing (<hash>.ls), before its narinfo, for clients and tools that
    browse a cache without downloading NARs."""
    realisations: bool = True
    """Publish the realisations of content-addressed derivations built through the hook (signed), so that
    clients find their outputs by derivation."""
    content_encoding: str = "none"
    """Store narinfos, listings and build logs compressed with this HTTP Content-Encoding (gzip or zstd),
    as Nix's narinfo-/ls-/log-compression do; never NARs. Needs a cache that keeps the header (S3; not
    file://, not nginx's WebDAV)."""
    allowed_group_members: bool = True
    """Also let members of socket_group use the socket (for the operator CLI)."""
    shutdown_timeout: float = 20.0
    """On SIGTERM, how long in-flight uploads may take to finish."""
    retry_base: float = 2.0
    retry_max: float = 600.0
    """Exponential backoff with full jitter between these bounds (seconds) for transient failures."""

    @property
    def socket_path(self) -> Path:
        return self.socket or self.state_dir / "hookd.sock"

    @property
    def spool_path(self) -> Path:
        return self.spool_dir or self.state_dir / "spool"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "queue.sqlite"

    @property
    def key_path(self) -> Path:
        return self.secret_key_file or self.state_dir / "secret-key"

    @property
    def bounds(self) -> Bounds:
        """The upload/GC protocol's timing bounds (the same on every uploader and GC of a cache)."""
        return Bounds(self.gc_grace, self.gc_check_to_delete, self.gc_request_timeout, self.max_clock_skew)

    @property
    def adaptive_level(self) -> bool:
        """zstd with no level set adapts it to what holds uploads back (narstream.Levels)."""
        return self.compression == "zstd" and self.compression_level is None

    @property
    def level(self) -> int:
        if self.compression_level is not None:
            return self.compression_level
        return {"zstd": 3, "xz": 6}.get(self.compression, 0)

    def validate(self) -> Config:
        if not self.cache:
            raise ConfigError("no cache given: pass --cache URL, set HOOKD_CACHE or `cache` in the config file")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"compression {self.compression!r}: expected one of {', '.join(COMPRESSIONS)}")
        lo, hi = {"zstd": (1, 22), "xz": (0, 9), "none": (0, 0)}[self.compression]
        if self.compression_level is not None and not lo <= self.compression_level <= hi:
            raise ConfigError(f"compression_level {self.compression_level} is outside {lo}..{hi}")
        if self.content_encoding not in CONTENT_ENCODINGS:
            raise ConfigError(
                f"content_encoding {self.content_encoding!r}: expected one of {', '.join(CONTENT_ENCODINGS)}"
            )
        if self.content_encoding != "none" and self.cache.startswith("file:"):
            raise ConfigError(
                f"content_encoding {self.content_encoding!r} needs a cache that stores the Content-Encoding header "
                "(S3, or an HTTP server that keeps it); a file:// cache cannot, and Nix would read the encoded "
                "bytes as they are"
            )
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(f"event_loop {self.event_loop!r}: expected one of {', '.join(EVENT_LOOPS)}")
        if self.max_parallel < 1:
            raise ConfigError("max_parallel must be at least 1")
        if not self.store_dir.startswith("/") or self.store_dir != self.store_dir.rstrip("/"):
            raise ConfigError(f"store_dir {self.store_dir!r} must be absolute, without a trailing '/'")
        try:
            self.bounds.check()
        except BoundsError as e:
            raise ConfigError(str(e)) from None
        if len(os.fsencode(self.socket_path)) > 107:
            raise ConfigError(f"socket path {self.socket_path} is longer than a Unix socket allows (107 bytes)")
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = typing.get_type_hints(Config)  # the annotations as types (they are strings in the source)


def _coerce(name: str, value: Any, source: str) -> Any:
    """A setting's value (from TOML, an environment variable or a flag) as its field's type."""
    kind = _TYPES[name]
    if value is None:
        return None
    try:
        return _convert(kind, value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name} = {value!r} is not a valid {_type_name(kind)}") from None


def _convert(kind: Any, value: Any) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):  # `X | None`: an optional setting given a value
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value)
    if origin is list:  # a TOML array, or a string of items separated by commas or spaces
        items = value.replace(",", " ").split() if isinstance(value, str) else value
        return [_convert(args[0], v) for v in items]
    if kind is bool:
        return _boolean(value)
    if kind in (str, int, float, Path):
        return kind(value)
    raise TypeError(f"no conversion to {kind}")


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _type_name(kind: Any) -> str:
    return kind.__name__ if isinstance(kind, type) else str(kind).replace("pathlib.", "")


def load(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config: defaults, then the TOML file, then HOOKD_<NAME> variables, then `overrides`.

    `config_file` defaults to /etc/hookd/config.toml when that file exists (HOOKD_CONFIG names another).
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_file or (Path(env["HOOKD_CONFIG"]) if env.get("HOOKD_CONFIG") else None)
    if path is None and DEFAULT_CONFIG_FILE.exists():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in _FIELDS:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")
            values[name] = _coerce(name, value, str(path))
    for name in _FIELDS:
        var = "HOOKD_" + name.upper()
        if env.get(var):
            values[name] = _coerce(name, env[var], var)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, f"--{name.replace('_', '-')}")
    return Config(**values)
