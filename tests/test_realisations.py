"""Realisations of content-addressed derivations: their formats (against what Nix writes and signs), and
end to end: a CA derivation built through the hook is substituted by derivation into a fresh store, with
signatures required and builds forbidden, on the Nix of this block (every Nix of the matrix, 2.8.0 to
2.34.8, builds CA derivations with `ca-derivations` enabled)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from hookd import derivation, listing, narinfo, realisation
from hookd.cli import main
from hookd.selftest import HookdProcess, NixEnv, _run, install_launcher, wait_for_narinfos
from hookd.signing import PublicKey, SecretKey
from hookd.store import nix_version, outputs_installable

from .conftest import FAST_BOUNDS

# Written by Nix 2.8.0's `nix copy` (realisations/sha256:eae2…!dev.doi), and printed by Nix 2.26.3's
# `nix realisation info --json` for an unresolved derivation with a CA input.
NIX_DOI = (
    b'{"dependentRealisations":{},"id":"sha256:eae2df1d130dc738e20422ff01b841c6e1a2d7e3a8aa1c50eac4385197530155!dev",'
    b'"outPath":"frsd6yqlcc32xdqgcvkx9038qpzq41d1-ca-b-dev","signatures":[]}'
)
NIX_INFO = [
    {
        "dependentRealisations": {},
        "id": "sha256:21fe623b66fb8bca02313933273d8ab70b1e551c31a655c51bea89024c9975bb!dev",
        "outPath": "wxayifj1vsignh048wgkyq08g1qqkwbp-ca-b-dev",
        "signatures": [],
    },
    {
        "dependentRealisations": {
            "sha256:cdfc6a096cace7dac1afa70d42cb822593cccdb51b2b4d3177a0fb04bc998abb!out": "0wv3ic2w5yck22vx1w01ncn6k67dlk6j-ca-a"
        },
        "id": "sha256:21fe623b66fb8bca02313933273d8ab70b1e551c31a655c51bea89024c9975bb!out",
        "outPath": "y0gghxf9k947jsibjafcp6zcj8kypswd-ca-b",
        "signatures": [],
    },
    {"opaquePath": "/nix/store/j18cyicyyz809jznmv4bmd1vl3h32niw-ca-b.drv"},
]
# Nix 2.35's shape, from its documentation (no 2.35 runs here)
TRACE_INFO = {
    "key": {"drvPath": "/nix/store/fgxdxcfa6rkgaj0ch9k9dy1y1f3vaci6-ca-b.drv", "outputName": "out"},
    "value": {"outPath": "y0gghxf9k947jsibjafcp6zcj8kypswd-ca-b", "signatures": [{"keyName": "k", "sig": "AA=="}]},
}

CA_NIX = r"""
{ salt }:
let
  ca = name: outputs: script: derivation {
    inherit name salt outputs;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    __contentAddressed = true;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
  };
  a = ca "ca-a" [ "out" ] "echo a-$salt > $out";
  b = ca "ca-b" [ "out" "dev" ] "/bin/mkdir $out; echo ${a} > $out/a; echo dev-$salt > $dev";
in { inherit a b; }
"""


# --- formats ---------------------------------------------------------------------------------------


def test_old_layout_is_byte_for_byte_nix() -> None:
    [r] = realisation.parse_store([json.loads(NIX_DOI)], "/nix/store")
    assert r.render() == NIX_DOI
    assert r.key == "realisations/sha256:eae2df1d130dc738e20422ff01b841c6e1a2d7e3a8aa1c50eac4385197530155!dev.doi"
    assert r.output == "dev"
    assert realisation.parse_cached(r.key, NIX_DOI) == r
    assert r.fingerprint() == NIX_DOI.decode().replace(',"signatures":[]', "")


def test_store_answer_with_dependencies_and_opaque_paths() -> None:
    rs = realisation.parse_store(NIX_INFO, "/nix/store")
    assert [r.output for r in rs] == ["dev", "out"]
    assert rs[1].dependent == {
        "sha256:cdfc6a096cace7dac1afa70d42cb822593cccdb51b2b4d3177a0fb04bc998abb!out": "0wv3ic2w5yck22vx1w01ncn6k67dlk6j-ca-a"
    }
    # the fingerprint keeps the dependencies, in sorted-key compact JSON (what Nix signs)
    assert rs[1].fingerprint().startswith('{"dependentRealisations":{"sha256:cdfc')


def test_signatures_and_both_layouts() -> None:
    key = SecretKey.generate("test-1")
    [_, r] = realisation.parse_store(NIX_INFO[:2], "/nix/store")
    signed = r.signed(key)
    assert signed.verify(key.public) and not r.verify(key.public)
    assert realisation.parse_cached(signed.key, signed.render()).verify(key.public)
    other = SecretKey.generate("test-1")
    assert not signed.verify(other.public)
    # the 2.35 entry of a derivation that is its own resolution
    trace = r.as_trace("/nix/store/fgxdxcfa6rkgaj0ch9k9dy1y1f3vaci6-ca-b.drv").signed(key)
    assert trace.key == "build-trace-v2/fgxdxcfa6rkgaj0ch9k9dy1y1f3vaci6-ca-b.drv/out.doi"
    assert trace.fingerprint() == (
        '{"key":{"drvPath":"fgxdxcfa6rkgaj0ch9k9dy1y1f3vaci6-ca-b.drv","outputName":"out"},'
        '"value":{"outPath":"y0gghxf9k947jsibjafcp6zcj8kypswd-ca-b"}}'
    )
    body = json.loads(trace.render())
    assert body["outPath"] == "y0gghxf9k947jsibjafcp6zcj8kypswd-ca-b"
    assert [s["keyName"] for s in body["signatures"]] == ["test-1"]
    assert realisation.parse_cached(trace.key, trace.render()).verify(key.public)


def test_store_answer_of_nix_2_35() -> None:
    [r] = realisation.parse_store([TRACE_INFO], "/nix/store")
    assert r.key == "build-trace-v2/fgxdxcfa6rkgaj0ch9k9dy1y1f3vaci6-ca-b.drv/out.doi"
    assert r.signatures == ("k:AA==",) and r.id is None


def test_malformed_realisations_are_refused() -> None:
    for bad in (b"[]", b"{", b'{"id": "nope", "outPath": "x"}'):
        with pytest.raises(realisation.RealisationError):
            realisation.parse_cached("realisations/x.doi", bad)
    with pytest.raises(realisation.RealisationError, match="another key"):
        realisation.parse_cached("realisations/sha256:00!out.doi", NIX_DOI)
    with pytest.raises(realisation.RealisationError):
        realisation.parse_store([{"id": "sha256:ab!out", "outPath": "../etc"}], "/nix/store")


def test_derivations_with_deferred_outputs() -> None:
    floating = b'Derive([("dev","","r:sha256",""),("out","","r:sha256","")],[("/nix/store/w94chr79px4k2yhlijspr4szn4xb6p21-ca-a.drv",["out"])],[],"x86_64-linux","/bin/sh",["-c","echo \\"a\\\\b\\" > $out"],[("out","/1rz4")])'
    d = derivation.parse(floating)
    assert d.has_deferred_outputs and not d.resolved and [o.name for o in d.outputs] == ["dev", "out"]
    fixed = b'Derive([("out","/nix/store/8jb93plddpakbkv0rgzhz3dih63dn248-x","","")],[],[],"x","/bin/sh",[],[])'
    d = derivation.parse(fixed)
    assert not d.has_deferred_outputs and d.resolved
    for bad in (b"Drv()", b'Derive([("out"', b"\xff"):
        with pytest.raises(derivation.DerivationError):
            derivation.parse(bad)


def test_outputs_installable_by_version() -> None:
    assert outputs_installable("/s/x.drv", (2, 8)) == "/s/x.drv"
    assert outputs_installable("/s/x.drv", (2, 26)) == "/s/x.drv^*"
    assert outputs_installable("/s/x.drv", (2, 34), "dev") == "/s/x.drv^dev"
    assert nix_version("nix (Nix) 2.34.8\n") == (2, 34)


# --- end to end -------------------------------------------------------------------------------------


class CaNix:
    """A private nix-daemon with ca-derivations, signing with hookd's key, hooked to a hookd daemon."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "hookd"
        self.cache = root / "cache"
        self.key_file = root / "secret-key"
        self.public_file = root / "public-key"
        hookd_bin = shutil.which("hookd", path=str(Path(sys.executable).parent)) or "hookd"
        subprocess.run(
            [hookd_bin, "keygen", "ca-test-1", "--secret-key-file", str(self.key_file),
             "--public-key-file", str(self.public_file)],
            check=True, capture_output=True,
        )  # fmt: skip
        self.nix = NixEnv(
            root,
            install_launcher(root / "hookd-hook"),
            {"HOOKD_STATE_DIR": str(self.state)},
            ["extra-experimental-features = ca-derivations", f"secret-key-files = {self.key_file}"],
        )
        self.hookd = HookdProcess(
            self.nix, self.state, f"file://{self.cache}", ["--secret-key-file", str(self.key_file)]
        )

    @property
    def public_key(self) -> str:
        return self.public_file.read_text().strip()

    def realisations(self, layout: str = "") -> dict[str, realisation.Realisation]:
        """The cache's realisations (of one layout: realisations/ or build-trace-v2/), by key."""
        found = {}
        for f in [*self.cache.glob("realisations/*.doi"), *self.cache.glob("build-trace-v2/*/*.doi")]:
            key = str(f.relative_to(self.cache))
            if key.startswith(layout):
                found[key] = realisation.parse_cached(key, f.read_bytes())
        return found

    def substitute_by_derivation(self, cache: Path, expr: Path, attr: str, salt: str, fresh: Path) -> list[str]:
        """Build `attr` of `expr` in a fresh store from `cache` alone: signatures required, no builds."""
        conf = fresh / "etc"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "nix.conf").write_text("experimental-features = nix-command ca-derivations\n")
        argv = [
            "nix-build", str(expr), "-A", attr, "--argstr", "salt", salt, "--no-out-link",
            "--store", str(fresh / "root"),
            "--option", "substituters", f"file://{cache}",
            "--option", "trusted-public-keys", self.public_key,
            "--option", "require-sigs", "true",
            "--max-jobs", "0",
        ]  # fmt: skip
        proc = _run(argv, dict(self.nix.env, NIX_CONF_DIR=str(conf), NIX_REMOTE=""))
        if proc.returncode != 0:
            raise RuntimeError(f"substitution failed:\n{proc.stderr[-3000:]}")
        return proc.stdout.split()


@pytest.fixture
def canix(build_user: str) -> Iterator[CaNix]:
    root = Path(tempfile.mkdtemp(prefix="hk-ca-", dir="/tmp"))
    env = CaNix(root)
    try:
        env.nix.start()
        env.hookd.start()
        yield env
    finally:
        env.hookd.stop()
        env.nix.stop()
        print(env.hookd.log()[-6000:])  # shown when the test fails
        shutil.rmtree(root, ignore_errors=True)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout:g} s")
        time.sleep(0.2)


@pytest.mark.nix
def test_ca_derivation_is_substituted_by_derivation(canix: CaNix, build_user: str, tmp_path: Path) -> None:
    nix = canix.nix
    version = nix_version(nix.nix("nix", "--version").stdout)
    expr = nix.write_expr("ca.nix", CA_NIX)
    salt = str(time.time_ns())
    outs = nix.build(expr, ["b"], user=build_user, args={"salt": salt})
    closure = nix.closure(outs)
    wait_for_narinfos(canix.cache, closure)

    # the store's own realisations of every output built (Nix answers for a .drv whose outputs are all built)
    drvs = [str(p) for p in Path(nix.store_dir).glob("*.drv")]
    theirs: dict[str, realisation.Realisation] = {}
    for drv in drvs:
        proc = nix.nix(
            "nix", "--extra-experimental-features", "nix-command ca-derivations", "realisation", "info", "--json",
            outputs_installable(drv, version), check=False,
        )  # fmt: skip
        if proc.returncode == 0:
            for r in realisation.parse_store(json.loads(proc.stdout), nix.store_dir):
                theirs[r.key] = r
    assert {r.out_path for r in theirs.values()} >= {Path(p).name for p in closure}
    wait_for("realisations in the cache", lambda: set(canix.realisations("realisations/")) >= set(theirs))

    public = PublicKey.parse(canix.public_key)
    secret = SecretKey.parse(canix.key_file.read_text())
    ours = canix.realisations()
    for key, r in theirs.items():
        mine = ours[key]
        assert (mine.out_path, mine.dependent) == (r.out_path, r.dependent)
        assert mine.verify(public), key
        # Nix signed its own with the same key (secret-key-files): hookd's fingerprint gives the same signature
        assert r.signatures, f"Nix did not sign {key}"
        assert replace(r, signatures=()).signed(secret).signatures == r.signatures
    for r in ours.values():  # every realisation hookd wrote names a path whose narinfo is in the cache
        assert (canix.cache / f"{r.out_path[:32]}.narinfo").exists()

    # a fresh store finds b's outputs by derivation, from the cache alone
    got = canix.substitute_by_derivation(canix.cache, expr, "b", salt, tmp_path / "fresh")
    assert got == outs
    # and without the realisations it cannot (it would have to build, which --max-jobs 0 forbids)
    bare = tmp_path / "bare-cache"
    shutil.copytree(canix.cache, bare)
    shutil.rmtree(bare / "realisations")
    with pytest.raises(RuntimeError, match="substitution failed"):
        canix.substitute_by_derivation(bare, expr, "b", salt, tmp_path / "fresh2")


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=FAST_BOUNDS)
    return result.exit_code, result.output


@pytest.mark.nix
def test_verify_and_gc_know_listings_and_realisations(canix: CaNix, build_user: str) -> None:
    nix, cache = canix.nix, canix.cache
    expr = nix.write_expr("ca.nix", CA_NIX)
    out, dev = nix.build(expr, ["b.out", "b.dev"], user=build_user, args={"salt": str(time.time_ns())})
    closure = nix.closure([out, dev])
    wait_for_narinfos(cache, closure)
    wait_for("realisations of both outputs", lambda: {r.out_path for r in canix.realisations().values()} >= {
        Path(out).name, Path(dev).name})  # fmt: skip
    canix.hookd.stop()
    url, key, state = f"file://{cache}", str(canix.public_file), ["--config", "/dev/null"]
    code, text = invoke("verify", "--cache", url, "--public-key", key, "--deep", "--json", *state)
    report = json.loads(text)
    assert code == 0 and report["whole"], text
    assert report["listings"] == len(closure) and report["realisations"] >= 2

    # a listing that lies about a size (verify), one whose offsets are wrong (only --deep), a forged realisation
    ls_out = cache / listing.key(Path(out).name[:32])
    ls_dev = cache / listing.key(Path(dev).name[:32])
    doc = json.loads(ls_out.read_bytes())
    doc["root"]["entries"]["a"]["size"] += 8  # (within the padding, only --deep would see it)
    ls_out.write_bytes(json.dumps(doc).encode())
    doc = json.loads(ls_dev.read_bytes())
    doc["root"]["narOffset"] += 8
    ls_dev.write_bytes(json.dumps(doc).encode())
    forged_key, forged = next((k, r) for k, r in canix.realisations().items() if r.out_path == Path(out).name)
    (cache / forged_key).write_bytes(replace(forged, signatures=()).signed(SecretKey.generate("ca-test-1")).render())
    code, text = invoke("verify", "--cache", url, "--public-key", key, "--json", *state)
    report = json.loads(text)
    assert code == 1 and not report["broken"]  # the narinfos are fine
    assert set(report["bad"]) == {ls_out.name, forged_key}, report["bad"]
    assert "NarSize" in report["bad"][ls_out.name] and "signature" in report["bad"][forged_key]
    code, text = invoke("verify", "--cache", url, "--public-key", key, "--deep", "--json", *state)
    assert "does not match its NAR" in json.loads(text)["bad"][ls_dev.name]
    code, text = invoke("verify", "--cache", url, "--public-key", key, "--deep", "--repair", *state)
    assert code == 0 and not ls_out.exists() and not ls_dev.exists() and not (cache / forged_key).exists()
    assert invoke("verify", "--cache", url, "--public-key", key, "--deep", *state)[0] == 0

    had_listing = [p for p in nix.closure([out]) if (cache / listing.key(Path(p).name[:32])).exists()]
    assert had_listing  # a's (repair took b's)
    # GC: everything old; b's output pinned. Its closure stays with its listings and realisations; b.dev
    # goes, and its listing and realisations with it
    for f in cache.rglob("*"):
        if f.is_file():
            t = time.time() - 3 * 86400
            os.utime(f, (t, t))
    gc = ["gc", "--cache", url, "--older-than", "1d", "--grace", "1h", *state]
    assert invoke("pin", "b", out, "--cache", url, *state)[0] == 0
    code, text = invoke(*gc)
    assert code == 0, text
    left = canix.realisations()
    kept = {Path(p).name for p in nix.closure([out])}  # b's output and a's
    assert {r.out_path for r in left.values()} == kept, left
    assert any(k.startswith("build-trace-v2/") for k in left)  # both layouts are collected
    for r in left.values():  # what stays names what stays
        assert (cache / f"{r.out_path[:32]}.narinfo").exists()
    assert not (cache / narinfo.narinfo_key(dev)).exists() and not (cache / listing.key(Path(dev).name[:32])).exists()
    for p in nix.closure([out]):
        assert (cache / narinfo.narinfo_key(p)).exists()
    for p in had_listing:
        assert (cache / listing.key(Path(p).name[:32])).exists()
    assert invoke("verify", "--cache", url, "--public-key", key, "--deep", *state)[0] == 0
