"""End to end with real Nix: an unprivileged user builds through a nix-daemon whose post-build-hook is
hookd-hook; a hookd daemon uploads to a file:// cache; a fresh store substitutes with signatures required.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from hookd import narinfo, signing
from hookd.config import EVENT_LOOPS
from hookd.selftest import CHAIN_NIX, NixEnv, wait_for_narinfos

from .conftest import FAST_BOUNDS, HookdFactory
from .test_dedup import wait_idle

ALL_OUTPUTS = ["top", "multi.out", "multi.dev", "multi.doc"]


def salt() -> str:
    return str(time.time_ns())


def check_cache(nixenv: NixEnv, cache: Path, outs: list[str], public_key: str, fresh: Path) -> None:
    closure = nixenv.closure(outs)
    wait_for_narinfos(cache, closure)
    nixenv.substitute_fresh(outs, f"file://{cache}", public_key, fresh)  # checks the fresh store has them
    nixenv.verify_cache(outs, f"file://{cache}", public_key)


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_builds_are_uploaded_and_substitute(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path, event_loop: str
) -> None:
    """On either event loop the daemon can run on (the other tests run it on the default, uvloop)."""
    hookd = hookd_factory(env={"HOOKD_EVENT_LOOP": event_loop})
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    outs = nixenv.build(expr, ALL_OUTPUTS, user=build_user, args={"salt": salt()})
    assert len(outs) == 4
    names = [Path(p).name[33:] for p in nixenv.closure(outs[:1])]
    assert sorted(names) == ["chain-a", "chain-b", "chain-c", "chain-top"]  # a chain four deep
    cache = tmp_path / "cache"
    check_cache(nixenv, cache, outs, hookd.public_key, tmp_path / "fresh")

    assert (cache / "nix-cache-info").read_text() == f"StoreDir: {nixenv.store_dir}\nWantMassQuery: 1\nPriority: 50\n"
    key = signing.PublicKey.parse(hookd.public_key)
    for p in nixenv.closure(outs):
        info = narinfo.parse((cache / narinfo.narinfo_key(p)).read_text())
        assert info.compression == "zstd" and info.url.endswith(".nar.zst")
        assert info.deriver and info.deriver.endswith(".drv")
        assert len(info.sigs) == 1 and key.verify(info.fingerprint(), info.sigs[0])
        assert narinfo.parse(info.render()) == info
    assert f"event loop {event_loop}" in hookd.log()


def test_daemon_down_during_builds_spools_then_uploads(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path
) -> None:
    hookd = hookd_factory()
    hookd.stop()
    assert not hookd.socket.exists()
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    outs = nixenv.build(expr, ALL_OUTPUTS, user=build_user, args={"salt": salt()})  # builds succeed
    spooled = list((hookd.state_dir / "spool").glob("*.req"))
    assert len(spooled) == 5  # one per derivation built: a, b, c, top, multi
    cache = tmp_path / "cache"
    assert not list(cache.glob("*.narinfo"))
    hookd.start()
    check_cache(nixenv, cache, outs, hookd.public_key, tmp_path / "fresh")
    assert not list((hookd.state_dir / "spool").glob("*.req"))
    assert "queued 5 spooled requests" in hookd.log()


def test_path_modified_on_disk_is_refused(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path
) -> None:
    hookd = hookd_factory(start=False)
    hookd.start()
    hookd.stop()  # spool dir exists; the hook will spool
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    outs = nixenv.build(expr, ["multi.out", "multi.doc"], user=build_user, args={"salt": salt()})
    victim = Path(outs[1])  # multi-doc: a regular file
    victim.chmod(0o644)
    victim.write_text("tampered\n")
    hookd.start()
    cache = tmp_path / "cache"
    # Until every request is planned and every path done or failed, not until some narinfos appear: Nix
    # 2.26+ passes all of multi's outputs to the hook, and an upload still running has its NAR in nar/
    # before its narinfo (done and failed are committed only after the narinfo, or the refusal, is final).
    wait_idle(hookd)
    log = hookd.log()
    assert f"refused {victim}: the contents on disk do not match" in log
    assert "nix-store --verify-path" in log
    assert not (cache / narinfo.narinfo_key(str(victim))).exists()
    good = [narinfo.parse(p.read_text()) for p in cache.glob("*.narinfo")]
    assert {i.store_path for i in good} >= set(nixenv.closure(outs[:1]))
    assert {f"nar/{n.name}" for n in (cache / "nar").iterdir()} == {i.url for i in good}  # nothing else was written
    db = sqlite3.connect(hookd.state_dir / "queue.sqlite")
    state, error = db.execute("SELECT state, last_error FROM paths WHERE path = ?", (str(victim),)).fetchone()
    assert state == "failed" and "do not match" in error


WIDE_NIX = r"""
{ salt, n ? 200 }:
let
  mk = i: derivation {
    name = "wide-${toString i}";
    inherit salt;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    deps = if i < 2 then [] else [ (mk (i / 2)) (mk (i / 3)) ];
    args = [ "-c"
      "/bin/mkdir $out; /usr/bin/head -c 131072 /dev/urandom > $out/data; echo $deps > $out/deps" ];
  };
  all = builtins.genList (i: mk (i + 1)) n;
in derivation {
  name = "wide-top";
  inherit salt all;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo $all > $out" ];
}
"""


class InvariantWatcher(threading.Thread):
    """Scans the cache over and over: every visible narinfo must have its NAR and its references."""

    def __init__(self, cache: Path) -> None:
        super().__init__(daemon=True)
        self.cache = cache
        self.stop = threading.Event()
        self.violations: list[str] = []
        self.scans = 0

    def run(self) -> None:
        while not self.stop.is_set():
            for f in list(self.cache.glob("*.narinfo")):
                info = narinfo.parse(f.read_text())
                if not (self.cache / info.url).exists():
                    self.violations.append(f"{f.name} visible before its NAR {info.url}")
                for ref in info.references:
                    if not (self.cache / f"{ref[:32]}.narinfo").exists():
                        self.violations.append(f"{f.name} visible before its reference {ref}")
            self.scans += 1


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_stop_mid_upload_loses_and_corrupts_nothing(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path, sig: int
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    # The protocol's bounds of seconds: a path whose NAR the killed daemon wrote without recording it is
    # relied on as anybody's, touched and waited for (the settle time: 44 s with the default bounds).
    hookd = hookd_factory(args=("--compression", "xz", "--max-parallel", "2"), env=FAST_BOUNDS, start=False)
    hookd.start()
    hookd.stop()
    expr = nixenv.write_expr("wide.nix", WIDE_NIX)
    [top] = nixenv.build(expr, [], user=build_user, args={"salt": salt()})
    closure = nixenv.closure([top])
    assert len(closure) >= 201  # the 200 paths (plus wide-0, a reference of wide-2) and the top
    watcher = InvariantWatcher(cache)
    watcher.start()
    try:
        hookd.start()
        deadline = time.monotonic() + 120
        while len(list(cache.glob("*.narinfo"))) < 20:
            assert time.monotonic() < deadline, hookd.log()
            time.sleep(0.01)
        status = hookd.stop(sig=sig)
        uploaded = len(list(cache.glob("*.narinfo")))
        assert uploaded < 150, f"the upload finished ({uploaded}) before the kill; make paths bigger"
        if sig == signal.SIGTERM:  # in-flight uploads finish, the rest stays queued, clean exit
            assert status == 0, hookd.log()
            assert "hookd stopped" in hookd.log()
            db = sqlite3.connect(hookd.state_dir / "queue.sqlite")
            [(pending,)] = db.execute("SELECT COUNT(*) FROM paths WHERE state = 'pending'").fetchall()
            assert pending == len(closure) - uploaded
        hookd.start()
        wait_for_narinfos(cache, closure, timeout=300)
    finally:
        watcher.stop.set()
        watcher.join()
    assert watcher.scans > 10
    assert watcher.violations == []
    nixenv.verify_cache([top], f"file://{cache}", hookd.public_key)


TEXT_NIX = r"""
{ salt ? "0" }:
import ./chain.nix { inherit salt; } // {
  text = derivation {
    name = "chain-text";
    inherit salt;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "i=0; while [ $i -lt 3000 ]; do echo \"line $i of $salt: text that compresses\"; i=$((i+1)); done > $out" ];
  };
}
"""


@pytest.mark.parametrize("compression", ["xz", "zstd", "none"])
def test_other_compressions_substitute(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path, compression: str
) -> None:
    """The chain's NARs are a few hundred bytes, which neither xz nor zstd shrinks by 3 %: those are stored
    as themselves (Compression: none). A text output is stored with the setting's compression."""
    hookd = hookd_factory(args=("--compression", compression))
    nixenv.write_expr("chain.nix", CHAIN_NIX)
    expr = nixenv.write_expr("chain-text.nix", TEXT_NIX)
    outs = nixenv.build(expr, ["top", "text"], user=build_user, args={"salt": salt()})
    check_cache(nixenv, tmp_path / "cache", outs, hookd.public_key, tmp_path / "fresh")
    infos = {i.store_path: i for i in map(narinfo.parse, map(Path.read_text, (tmp_path / "cache").glob("*.narinfo")))}
    assert infos[outs[1]].compression == compression
    assert {i.compression for i in infos.values()} <= {compression, "none"}


def test_keygen_key_is_accepted_by_nix(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path
) -> None:
    """A key from `hookd keygen` (not the generated default) signs narinfos that Nix trusts."""
    from click.testing import CliRunner

    from hookd.cli import main

    sk, pk = tmp_path / "k.sec", tmp_path / "k.pub"
    assert (
        CliRunner()
        .invoke(main, ["keygen", "keygen-test-1", "--secret-key-file", str(sk), "--public-key-file", str(pk)])
        .exit_code
        == 0
    )
    hookd_factory(args=("--secret-key-file", str(sk)))
    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    outs = nixenv.build(expr, ["multi.dev"], user=build_user, args={"salt": salt()})
    check_cache(nixenv, tmp_path / "cache", outs, pk.read_text().strip(), tmp_path / "fresh")
    assert os.stat(sk).st_mode & 0o077 == 0


def test_nar_writer_matches_nix_store_dump_on_real_paths(nixenv: NixEnv, build_user: str, tmp_path: Path) -> None:
    from hookd import nar

    expr = nixenv.write_expr("chain.nix", CHAIN_NIX)
    outs = nixenv.build(expr, ALL_OUTPUTS, user=build_user, args={"salt": salt()})
    closure = nixenv.closure(outs)
    assert len(closure) >= 7
    for p in closure:
        expected = subprocess.run(["nix-store", "--dump", p], env=nixenv.env, capture_output=True, check=True)
        assert b"".join(nar.dump(p)) == expected.stdout, p


BIG_NIX = r"""
{ salt }:
let
  blob = i: derivation {
    name = "blob-${toString i}";
    inherit salt;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "/usr/bin/head -c 3000000 /dev/urandom > $out" ];
  };
in derivation {
  name = "blobs";
  inherit salt;
  parts = map blob [ 1 2 3 ];
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo $parts > $out" ];
}
"""


def test_full_disk_is_retried_until_there_is_room(
    nixenv: NixEnv, hookd_factory: HookdFactory, build_user: str, tmp_path: Path
) -> None:
    """The cache lives on a 2 MiB file system: 3 MB NARs fail with ENOSPC, back off, and land once it
    grows."""
    cache = tmp_path / "cache"
    cache.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(cache)], capture_output=True)
    assert mounted.returncode == 0, f"cannot mount a tmpfs for the full-disk test: {mounted.stderr!r}"
    hookd = hookd_factory(
        env={"HOOKD_RETRY_BASE": "0.2", "HOOKD_RETRY_MAX": "1", "HOOKD_COMPRESSION": "none"}, start=False
    )
    try:
        hookd.start()
        expr = nixenv.write_expr("big.nix", BIG_NIX)
        [top] = nixenv.build(expr, [], user=build_user, args={"salt": salt()})
        deadline = time.monotonic() + 60
        while hookd.log().count("No space left on device") < 6:
            assert time.monotonic() < deadline, hookd.log()
            time.sleep(0.1)
        assert hookd.proc is not None and hookd.proc.poll() is None
        assert not (cache / narinfo.narinfo_key(top)).exists()  # its references are not there yet
        for f in cache.glob("*.narinfo"):  # whatever is visible is whole
            assert (cache / narinfo.parse(f.read_text()).url).exists()
        db = sqlite3.connect(hookd.state_dir / "queue.sqlite")
        rows = db.execute("SELECT state, attempts, last_error FROM paths WHERE attempts > 0").fetchall()
        # never failed for good: each is waiting for its next try, or in it (its last error kept meanwhile)
        assert rows and all(r[0] in ("pending", "uploading") and "No space left" in r[2] for r in rows)
        subprocess.run(["mount", "-o", "remount,size=64m", str(cache)], check=True)
        check_cache(nixenv, cache, [top], hookd.public_key, tmp_path / "fresh")
    finally:
        hookd.stop()  # before the unmount
        subprocess.run(["umount", "-l", str(cache)], check=False)
