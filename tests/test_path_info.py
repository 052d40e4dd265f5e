"""`nix path-info --json` in every shape, against real output of Nix 2.8.0, 2.26.3 and 2.34.8 (recorded by
tests/fixtures/path-info/record.sh) and Lix's and format 3's documented shapes (see that directory's README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hookd import narinfo, signing
from hookd.pathinfo import PathInfo
from hookd.store import InvalidPathError, StoreError, json_format_args, parse_path_info

FIXTURES = Path(__file__).parent / "fixtures" / "path-info"
RECORDED = ["nix-2.8.0", "nix-2.26.3", "nix-2.34.8"]
CLOSURES = [f"{d}/closure.json" for d in [*RECORDED, "lix"]] + [
    "nix-2.34.8/closure.v2.json",
    "nix-format-3/closure.v3.json",
]
INVALID = [f"{d}/invalid.json" for d in [*RECORDED, "lix"]] + [
    "nix-2.34.8/invalid.v2.json",
    "nix-format-3/invalid.v3.json",
]


def load(name: str) -> object:
    return json.loads((FIXTURES / name).read_text())


def paths(name: str) -> dict[str, str]:
    return json.loads((FIXTURES / name.split("/")[0] / "paths.json").read_text())  # type: ignore[no-any-return]


def parse(name: str) -> dict[str, PathInfo]:
    return parse_path_info(load(name), paths(name)["storeDir"])


@pytest.mark.parametrize("name", CLOSURES)
def test_every_shape_gives_the_same_closure(name: str) -> None:
    """The same store paths asked of each Nix: every shape must parse to exactly what Nix 2.8 said."""
    assert parse(name) == parse("nix-2.8.0/closure.json")


def test_the_closure_is_what_nix_built() -> None:
    p = paths("nix-2.8.0/closure.json")
    infos = parse("nix-2.8.0/closure.json")
    text = next(x for x in infos if x.endswith("-fixture-text"))
    assert set(infos) == {p["top"], p["dep"], p["ca"], text}
    top = infos[p["top"]]
    assert top.references == (p["dep"], text) and top.deriver == p["drv"] and top.ca is None
    assert infos[p["dep"]].references == () and infos[p["dep"]].deriver.endswith("-fixture-dep.drv")  # type: ignore[union-attr]
    assert infos[p["ca"]].ca == "fixed:r:sha256:1gs3jmbwbxh2p2xzcrdagklc2d1r2kpqdd7vil6ylb6panxmda6j"
    assert infos[text].ca == "text:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"
    assert infos[p["ca"]].deriver is None and infos[p["ca"]].sigs == ()


@pytest.mark.parametrize("name", CLOSURES)
def test_signatures_nix_made_verify(name: str) -> None:
    """Nix signed top and dep with the test key: the signature covers the NAR hash, size and references,
    so it verifies only if all three were read right (and format 3's {keyName, sig} put back together)."""
    key = signing.PublicKey.parse((Path(__file__).parent / "vectors" / "test-key.public").read_text())
    p = paths(name)
    infos = parse(name)
    for path in (p["top"], p["dep"]):
        info = infos[path]
        (sig,) = info.sigs
        assert sig.startswith("test-1:")
        assert key.verify(narinfo.fingerprint(info.path, info.nar_hash, info.nar_size, info.references), sig)


@pytest.mark.parametrize("name", INVALID)
def test_invalid_paths_are_reported(name: str) -> None:
    """2.8 and Lix say `"valid": false`, 2.23+ say null (also inside format 2's and 3's "info")."""
    with pytest.raises(InvalidPathError) as e:
        parse(name)
    assert e.value.path == paths(name)["invalid"]


@pytest.mark.parametrize(("name", "answers_for"), [
    ("nix-2.8.0/drv.json", "top"),
    ("nix-2.26.3/drv.json", "drv"),
    ("nix-2.34.8/drv.json", "drv"),
    ("nix-2.34.8/drv.v2.json", "drv"),
])  # fmt: skip
def test_path_info_of_a_drv_differs_between_versions(name: str, answers_for: str) -> None:
    """Why hookd resolves a .drv's outputs itself (Store.resolve) and never asks `nix path-info X.drv`."""
    p = paths(name)
    infos = parse(name)
    assert list(infos) == [p[answers_for]]
    if answers_for == "drv":
        assert infos[p["drv"]].ca == "text:sha256:1dqb0qvnikjrsz382sndkxy00vsa5sm22pnj3jra87s11h6fs9za"
        assert infos[p["drv"]].references == tuple(sorted(infos[p["drv"]].references))


@pytest.mark.parametrize(("version", "args"), [
    ("nix (Nix) 2.3.17", ("--json",)),
    ("nix (Nix) 2.32.4", ("--json",)),
    ("nix (Nix) 2.33.0", ("--json", "--json-format", "2")),
    ("nix (Nix) 2.35.1\n", ("--json", "--json-format", "2")),
    ("nix (Determinate Nix 3.15.1) 2.33.1", ("--json", "--json-format", "2")),
    ("nix (Lix, like Nix) 2.93.3\nSystem type: x86_64-linux\n", ("--json",)),
    ("something else", ("--json",)),
])  # fmt: skip
def test_json_format_flag_by_version(version: str, args: tuple[str, ...]) -> None:
    assert json_format_args(version) == args


@pytest.mark.parametrize(
    ("recorded", "takes_format_2"), [("nix-2.8.0", False), ("nix-2.26.3", False), ("nix-2.34.8", True)]
)
def test_json_format_flag_for_the_recorded_versions(recorded: str, takes_format_2: bool) -> None:
    """record.sh asked each Nix's --help whether it takes --json-format; the version rule must agree."""
    assert ("--json-format" in json_format_args((FIXTURES / recorded / "nix-version").read_text())) == takes_format_2
    assert (FIXTURES / recorded / "closure.v2.json").exists() == takes_format_2


def test_a_store_directory_other_than_hookds_is_refused() -> None:
    with pytest.raises(StoreError, match="store directory /tmp/hookd-fixture/nix/store"):
        parse_path_info(load("nix-2.34.8/closure.v2.json"), "/nix/store")


@pytest.mark.parametrize("entry", [
    {"narHash": "md5:00000000000000000000000000", "narSize": 1, "references": []},
    {"narHash": "sha256-AAAA", "narSize": 1, "references": []},
    {"narHash": "sha256-0qhWu1XXLOoNjfu0hu8UOTTB6HyqZfa7uAL2xVeVQ78=", "narSize": 1, "ca": {"method": "new", "hash": "sha256-0qhWu1XXLOoNjfu0hu8UOTTB6HyqZfa7uAL2xVeVQ78="}},
    {"narHash": "sha256-0qhWu1XXLOoNjfu0hu8UOTTB6HyqZfa7uAL2xVeVQ78=", "narSize": 1, "signatures": [{"key": "k"}]},
])  # fmt: skip
def test_malformed_entries_are_errors_not_guesses(entry: dict[str, object]) -> None:
    with pytest.raises(StoreError, match="cannot parse path info"):
        parse_path_info({"/nix/store/h9caiaxw2kbzyqa333vgg1vx9vzby98p-ca": entry}, "/nix/store")


def test_structured_hashes_of_other_algorithms_render_like_nix() -> None:
    """A flat sha1 fixed output (fetchurl with sha1) keeps its CA: `fixed:sha1:<nix32>`, as Nix writes it."""
    entry = {
        "narHash": "sha256-0qhWu1XXLOoNjfu0hu8UOTTB6HyqZfa7uAL2xVeVQ78=",
        "narSize": 504,
        "references": [],
        "ca": {"method": "flat", "hash": {"algorithm": "sha1", "format": "base16", "hash": "00" * 20}},
    }
    (info,) = parse_path_info(
        {"version": 2, "storeDir": "/nix/store", "info": {"h9caiaxw2kbzyqa333vgg1vx9vzby98p-ca": entry}}, "/nix/store"
    ).values()
    assert info.ca == "fixed:sha1:" + "0" * 32
