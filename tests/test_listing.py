"""NAR listings: hookd's `.ls` for every uploaded path is the one Nix writes for it (`nix copy --to
'file://…?write-nar-listing=true'`, with the Nix of this block), its offsets point at the files' bytes, and
what `nix store ls` does with listings on this Nix (every Nix of the matrix fetches the NAR)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import pytest

from hookd import listing, nar
from hookd.selftest import CommandFailed, NixEnv, wait_for_narinfos
from hookd.store import nix_version

from .conftest import HookdFactory

TREE_NIX = r"""
{ salt }:
let
  mk = name: script: derivation {
    inherit name salt;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  };
in {
  tree = mk "tree" ''
    /bin/mkdir -p $out/bin $out/share/deep/er/still $out/emptydir
    printf '#!/bin/sh\necho hi\n' > $out/bin/tool
    /bin/chmod +x $out/bin/tool
    : > $out/empty
    : > $out/bin/empty-exe
    /bin/chmod +x $out/bin/empty-exe
    echo x > "$out/share/with space"
    echo u > "$out/share/ünïcödé"
    printf 1234567 > $out/share/seven
    printf 12345678 > $out/share/eight
    printf 123456789 > $out/share/nine
    /bin/ln -s ../bin/tool $out/share/rel-link
    /bin/ln -s /nonexistent/target $out/share/dangling
    /bin/ln -s $out/bin $out/abs-dir-link
    /usr/bin/head -c 5000001 /dev/urandom > $out/share/deep/er/still/large
    for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo $salt-$i > $out/share/deep/f$i; done
  '';
  file = mk "single-file" "echo $salt > $out";
  exe = mk "single-exe" "printf '#!/bin/sh\\n' > $out; /bin/chmod +x $out";
  empty = mk "empty-file" ": > $out";
  link = mk "single-link" "/bin/ln -s /bin/sh $out";
  emptydir = mk "empty-dir" "/bin/mkdir $out";
}
"""
ATTRS = ["tree", "file", "exe", "empty", "link", "emptydir"]

# Nix versions whose `nix store ls`/`cat` on a binary cache read its listings instead of the NAR. None of
# the matrix does (read in their source, and measured below): RemoteFSAccessor reads listings only from its
# local NAR cache (2.8, 2.26, 2.34), and fetches the whole NAR from the cache. Lix reads them (its CL 3225).
BROWSES_FROM_LISTINGS: set[tuple[int, int]] = set()


# --- units -----------------------------------------------------------------------------------------


def make_tree(root: Path) -> Path:
    t = root / "t"
    (t / "sub" / "deep").mkdir(parents=True)
    (t / "emptydir").mkdir()
    (t / "empty").write_bytes(b"")
    (t / "x").write_bytes(b"hello")
    (t / "sub" / "exe").write_bytes(b"#!/bin/sh\n")
    (t / "sub" / "exe").chmod(0o755)
    (t / "sub" / "link").symlink_to("../x")
    (t / "sub" / "deep" / "big").write_bytes(os.urandom(3_000_001))
    (t / "ünï cödé").write_bytes(b"u")
    return t


def test_walk_and_stream_agree_and_offsets_point_at_contents(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    data = b"".join(nar.dump(tree))
    walked = listing.from_path(tree)
    assert listing.from_nar(data) == walked
    assert listing.nar_size(walked) == len(data)

    def check(node: dict[str, object], path: Path) -> None:
        if node["type"] == "regular":
            off, size = int(node["narOffset"]), int(node["size"])  # type: ignore[call-overload]
            assert data[off : off + size] == path.read_bytes()
            assert node.get("executable", False) == os.access(path, os.X_OK)
        elif node["type"] == "symlink":
            assert node["target"] == os.readlink(path)
        else:
            entries = node["entries"]
            assert isinstance(entries, dict)
            assert sorted(entries) == sorted(p.name for p in path.iterdir())
            for name, child in entries.items():
                check(child, path / name)

    check(walked["root"], tree)
    for single in ("x", "empty", "sub/link", "sub/exe", "emptydir"):
        one = b"".join(nar.dump(tree / single))
        assert listing.from_path(tree / single) == listing.from_nar(one)
        assert listing.nar_size(listing.from_path(tree / single)) == len(one)


def test_builder_takes_any_chunking(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    data = b"".join(nar.dump(tree))
    want = listing.from_path(tree)
    rng = random.Random(7)
    for _ in range(30):
        builder = listing.ListingBuilder()
        i = 0
        while i < len(data):
            n = rng.choice([1, 3, 7, 8, 9, 100, 4096, 1 << 20])
            builder.feed(data[i : i + n])
            i += n
        assert builder.finish() == want


def test_builder_refuses_bad_nars(tmp_path: Path) -> None:
    data = b"".join(nar.dump(make_tree(tmp_path)))
    for bad in (data[:-1], data[: len(data) // 2], b"x" * 64):
        with pytest.raises(listing.ListingError):
            listing.from_nar(bad)
    with pytest.raises(listing.ListingError, match="trailing"):
        listing.from_nar(data + b"\0" * 8)


def test_render_and_parse(tmp_path: Path) -> None:
    doc = listing.from_path(make_tree(tmp_path))
    text = listing.render(doc)
    assert listing.parse(text) == doc
    assert b" " not in text.replace("ünï cödé".encode(), b"")  # compact, UTF-8 names as they are
    for bad in (b"[]", b'{"version": 2, "root": {}}', b'{"version": 1, "root": {"type": "regular"}}', b"{"):
        with pytest.raises(listing.ListingError):
            listing.parse(bad)


def test_a_name_json_cannot_hold_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "ok").write_bytes(b"")
    os.close(os.open(os.fsencode(d) + b"/\xff", os.O_CREAT | os.O_WRONLY))
    with pytest.raises(listing.ListingError, match="not UTF-8"):
        listing.from_path(d)


# --- with real Nix --------------------------------------------------------------------------------


@pytest.mark.nix
def test_listings_equal_nix_own(nixenv: NixEnv, build_user: str, hookd_factory: HookdFactory, tmp_path: Path) -> None:
    """Every path hookd uploads gets a listing JSON-equal to the one this Nix writes for it."""
    cache = tmp_path / "cache"
    hookd_factory(cache)
    expr = nixenv.write_expr("tree.nix", TREE_NIX)
    outs = nixenv.build(expr, ATTRS, user=build_user, args={"salt": str(time.time_ns())})
    closure = nixenv.closure(outs)
    wait_for_narinfos(cache, closure)

    theirs = tmp_path / "nix-cache"
    nixenv.nix("nix", "copy", "--to", f"file://{theirs}?write-nar-listing=true&compression=none", *closure)
    for path in closure:
        name = Path(path).name[:32] + ".ls"
        ours = json.loads((cache / name).read_bytes())
        assert ours == json.loads((theirs / name).read_bytes()), path
        # the offsets address the uncompressed NAR that Nix wrote
        nar_file = theirs / re.search(r"^URL: (\S+)$", (theirs / f"{name[:32]}.narinfo").read_text(), re.M)[1]  # type: ignore[index]
        assert listing.from_nar(nar_file.read_bytes()) == ours
    # the variety asked for is there
    tree = json.loads((cache / (Path(outs[0]).name[:32] + ".ls")).read_bytes())["root"]["entries"]
    assert tree["bin"]["entries"]["tool"]["executable"] is True
    assert tree["empty"] == {"type": "regular", "size": 0, "narOffset": tree["empty"]["narOffset"]}
    assert tree["share"]["entries"]["deep"]["entries"]["er"]["entries"]["still"]["entries"]["large"]["size"] == 5000001
    assert tree["share"]["entries"]["dangling"] == {"type": "symlink", "target": "/nonexistent/target"}
    assert "ünïcödé" in tree["share"]["entries"] and tree["emptydir"] == {"type": "directory", "entries": {}}


@pytest.mark.nix
def test_what_nix_store_ls_reads(nixenv: NixEnv, build_user: str, hookd_factory: HookdFactory, tmp_path: Path) -> None:
    """`nix store ls` on hookd's cache: it lists what the listing says; with the NAR objects gone it still
    can where this Nix reads listings, and cannot where it fetches the NAR (every Nix of the matrix)."""
    cache = tmp_path / "cache"
    hookd_factory(cache)
    expr = nixenv.write_expr("tree.nix", TREE_NIX)
    [out] = nixenv.build(expr, ["tree"], user=build_user, args={"salt": str(time.time_ns())})
    wait_for_narinfos(cache, [out])
    env_args = ["--store", f"file://{cache}"]

    def ls() -> list[str]:
        shutil.rmtree(Path(nixenv.env["XDG_CACHE_HOME"]) / "nix", ignore_errors=True)  # no local NAR cache
        proc = nixenv.nix("nix", "store", "ls", *env_args, "-R", out, check=False)
        if proc.returncode != 0:
            raise CommandFailed(["nix", "store", "ls"], proc)
        return sorted(line.removeprefix(".") for line in proc.stdout.splitlines() if line)

    def flatten(node: dict[str, object], prefix: str = "") -> list[str]:
        rows = [prefix] if prefix else []  # `nix store ls -R` prints what is below the root
        if node["type"] == "directory":
            for name, child in node["entries"].items():  # type: ignore[attr-defined]
                rows += flatten(child, f"{prefix}/{name}")
        return rows

    doc = json.loads((cache / (Path(out).name[:32] + ".ls")).read_bytes())
    assert ls() == sorted(flatten(doc["root"]))

    (cache / "nar").rename(cache / "nar.away")  # the NAR objects, unreadable; the listings stay
    version = nix_version(nixenv.nix("nix", "--version").stdout)
    if version in BROWSES_FROM_LISTINGS:
        assert ls() == sorted(flatten(doc["root"]))
    else:
        with pytest.raises(CommandFailed, match="does not exist"):
            ls()  # this Nix fetches the NAR: if it browses from listings now, add it to BROWSES_FROM_LISTINGS
