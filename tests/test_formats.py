"""The binary-cache formats against vectors made by real Nix, plus property tests."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hookd import nar, narinfo, nixbase32, signing, storepath


def test_nixbase32_vectors() -> None:
    assert nixbase32.encode(hashlib.sha256(b"").digest()) == "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
    assert nixbase32.encoded_length(20) == 32
    assert nixbase32.parse_hash("sha256-i1apTc+w8QCr6MGGn0RLjpmispX8oml7bHQCZOxaENE=") == nixbase32.decode(
        "1l8hbbn680kldixnk8pwjnra56cf9d29z1n1x2mh1wdhrx6sjmlb"
    )


@given(st.binary(min_size=1, max_size=64))
def test_nixbase32_round_trip(data: bytes) -> None:
    assert nixbase32.decode(nixbase32.encode(data)) == data


@pytest.mark.parametrize("bad", ["e" * 52, "0" * 51, "z" * 52])
def test_nixbase32_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        nixbase32.decode(bad)


@given(st.binary(min_size=32, max_size=32))
def test_parse_hash_all_forms(digest: bytes) -> None:
    import base64

    for text in (
        "sha256:" + nixbase32.encode(digest),
        "sha256:" + digest.hex(),
        "sha256-" + base64.b64encode(digest).decode(),
    ):
        assert nixbase32.parse_hash(text) == digest


def extract_tree(vectors: Path, dest: Path) -> Path:
    with tarfile.open(vectors / "tree.tar") as tar:
        # filter= exists from Python 3.11.4 (Debian bookworm's 3.11.2 lacks it); the archive is our own
        tar.extractall(dest, **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))
    return dest / "tree"


def test_nar_dump_matches_nix(vectors: Path, tmp_path: Path) -> None:
    tree = extract_tree(vectors, tmp_path)
    dumped = b"".join(nar.dump(tree))
    assert dumped == (vectors / "tree.nar").read_bytes()
    assert nixbase32.encode(hashlib.sha256(dumped).digest()) == "1l8hbbn680kldixnk8pwjnra56cf9d29z1n1x2mh1wdhrx6sjmlb"
    assert b"".join(nar.dump(tree / "hello.txt")) == (vectors / "hello.nar").read_bytes()
    # the same bytes when each chunk is taken before the next read reuses the buffer
    assert b"".join(bytes(c) for c in nar.dump_borrowed(tree, chunk_size=64)) == dumped


def test_nar_dump_is_chunked(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 << 20) + b"x")
    chunks = list(nar.dump(big, chunk_size=1 << 20))
    assert max(len(c) for c in chunks) <= 1 << 20
    node = nar.parse(io.BytesIO(b"".join(chunks)))
    assert isinstance(node, nar.Regular) and node.contents == big.read_bytes()
    assert b"".join(bytes(c) for c in nar.dump_borrowed(big, chunk_size=1 << 20)) == b"".join(chunks)


def test_nar_parse_and_restore(vectors: Path, tmp_path: Path) -> None:
    data = (vectors / "tree.nar").read_bytes()
    node = nar.parse(io.BytesIO(data))
    assert nar.serialise(node) == data
    nar.restore(node, tmp_path / "copy")
    assert b"".join(nar.dump(tmp_path / "copy")) == data


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[:-8],  # truncated
        lambda d: d[:8] + b"nix-archive-2" + d[21:],  # wrong magic
        lambda d: d + b"\0" * 8,  # trailing bytes
    ],
)
def test_nar_parse_rejects(vectors: Path, mutate: object) -> None:
    data = (vectors / "tree.nar").read_bytes()
    with pytest.raises(nar.NarError):
        nar.parse(io.BytesIO(mutate(data)))  # type: ignore[operator]


names = st.binary(min_size=1, max_size=12).filter(lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b".."))
trees = st.recursive(
    st.one_of(
        st.builds(nar.Regular, st.binary(max_size=300), st.booleans()),
        st.builds(nar.Symlink, st.binary(min_size=1, max_size=40).filter(lambda t: b"\0" not in t)),
    ),
    lambda children: st.builds(nar.Directory, st.dictionaries(names, children, max_size=5)),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(trees)
def test_nar_round_trip_through_disk(tmp_path_factory: pytest.TempPathFactory, tree: nar.Node) -> None:
    """serialise → parse is the identity, and dumping the tree written to disk gives the same bytes."""
    data = nar.serialise(tree)
    assert nar.parse(io.BytesIO(data)) == tree
    where = tmp_path_factory.mktemp("nar") / "root"
    nar.restore(tree, where)
    assert b"".join(nar.dump(where)) == data


def test_narinfo_reproduces_nix_byte_for_byte(vectors: Path) -> None:
    key = signing.SecretKey.parse((vectors / "test-key.secret").read_text())
    assert str(key.public) == (vectors / "test-key.public").read_text().strip()
    files = sorted((vectors / "xz-cache").glob("*.narinfo"))
    assert len(files) == 2
    for f in files:
        text = f.read_text()
        info = narinfo.parse(text)
        expected_sig = info.sigs
        info.sigs = [key.sign(info.fingerprint())]
        assert info.sigs == expected_sig
        assert info.render() == text
        assert key.public.verify(info.fingerprint(), expected_sig[0])
        assert (vectors / "xz-cache" / info.url).exists()
        compressed = (vectors / "xz-cache" / info.url).read_bytes()
        assert hashlib.sha256(compressed).digest() == info.file_hash
        assert narinfo.nar_key(info.file_hash, "xz") == info.url


def test_fingerprint_vector(vectors: Path) -> None:
    info = narinfo.parse((vectors / "xz-cache" / "p75gma6gwipzdg2n983bhyyizfvax58k.narinfo").read_text())
    assert info.fingerprint() == (
        "1;/nix/store/p75gma6gwipzdg2n983bhyyizfvax58k-top-x1;"
        "sha256:03j6f4i6af42pq866h479bc2cmnkjk4v7dlbm18dhijdb79khvfq;168;"
        "/nix/store/6q5cdpsrvdpmkzh5sy8wdc7vz7p51z1c-dep-x1"
    )


def test_narinfo_reads_real_world_forms() -> None:
    text = (
        "StorePath: /nix/store/6q5cdpsrvdpmkzh5sy8wdc7vz7p51z1c-dep-x1\r\n"
        "URL: nar/abc.nar.bz2\r\n"
        "NarHash: sha256-i1apTc+w8QCr6MGGn0RLjpmispX8oml7bHQCZOxaENE=\r\n"
        "NarSize: 120\r\n"
        "References: /nix/store/6q5cdpsrvdpmkzh5sy8wdc7vz7p51z1c-dep-x1\r\n"
        "Deriver: unknown-deriver\r\n"
        "System: x86_64-linux\r\n"
    )
    info = narinfo.parse(text)
    assert info.compression == "bzip2"  # a missing Compression means bzip2
    assert info.references == ["6q5cdpsrvdpmkzh5sy8wdc7vz7p51z1c-dep-x1"]
    assert info.deriver is None
    assert info.extra == {"System": "x86_64-linux"}
    assert "System" not in info.render()


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("URL: x\nNarHash: sha256:00\nNarSize: 1\n", "StorePath"),
        ("StorePath: /nix/store/6q5cdpsrvdpmkzh5sy8wdc7vz7p51z1c-a\nNarHash: sha256:00\nNarSize: 1\n", "URL"),
        ("StorePath: /nix/store/../../etc\nURL: x\nNarHash: sha256:00\nNarSize: 1\n", "StorePath"),
        ("garbage\x00\n", "line 1"),
    ],
)
def test_narinfo_rejects(text: str, field: str) -> None:
    with pytest.raises(narinfo.NarInfoError, match=field):
        narinfo.parse(text)


store_names = st.from_regex(r"[A-Za-z0-9+\-_?=][A-Za-z0-9+\-._?=]{0,30}", fullmatch=True)
base_names = st.builds(lambda h, n: f"{nixbase32.encode(h)}-{n}", st.binary(min_size=20, max_size=20), store_names)


@settings(max_examples=100)
@given(
    base_names,
    st.binary(min_size=32, max_size=32),
    st.integers(0, 2**40),
    st.lists(base_names, max_size=5, unique=True),
    st.sampled_from(["zstd", "xz", "none"]),
    st.one_of(st.none(), base_names),
)
def test_narinfo_round_trip(
    name: str, digest: bytes, size: int, refs: list[str], comp: str, deriver: str | None
) -> None:
    info = narinfo.NarInfo(
        store_path=f"/nix/store/{name}",
        url=narinfo.nar_key(digest, comp),
        nar_hash=digest,
        nar_size=size,
        compression=comp,
        file_hash=digest,
        file_size=size,
        references=sorted(refs),
        deriver=deriver,
        sigs=["k:" + "A" * 86 + "=="],
    )
    text = info.render()
    assert text.endswith("\n") and "\r" not in text and "References: " in text
    assert narinfo.parse(text) == info
    assert narinfo.parse(text).render() == text


def test_signing_rejects_forgery(vectors: Path) -> None:
    key = signing.SecretKey.parse((vectors / "test-key.secret").read_text() + "\n")
    sig = key.sign("1;/nix/store/x;sha256:0;1;")
    assert key.public.verify("1;/nix/store/x;sha256:0;1;", sig)
    assert not key.public.verify("1;/nix/store/y;sha256:0;1;", sig)
    other = signing.SecretKey.generate("test-1")
    assert not other.public.verify("1;/nix/store/x;sha256:0;1;", sig)


@pytest.mark.parametrize("text", ["nocolon", "name:!!!", "name:" + "QUJD", ":AAAA"])
def test_key_parse_errors(text: str) -> None:
    with pytest.raises(signing.KeyFileError):
        signing.SecretKey.parse(text)


@pytest.mark.parametrize(
    "path",
    [
        "/nix/store/../etc/passwd",
        "/nix/store/6q5cdpsrvdpmkzh5sy8wdc7vz7p51z1c-dep/../../x",
        "/nix/store/6q5cdpsrvdpmkzh5sy8wdc7vz7p51z1c-..",
        "/nix/store/6q5cdpsrvdpmkzh5sy8wdc7vz7p51z1c-a b",
        "/nix/store/6q5cdpsrvdpmkzh5sy8wdc7vz7p51z1c-a\0",
        "/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-a",
        "/etc/6q5cdpsrvdpmkzh5sy8wdc7vz7p51z1c-a",
        "/nix/store/6q5cdpsrvdpmkzh5sy8wdc7vz7p51z1c-" + "a" * 212,
    ],
)
def test_store_path_rejects(path: str) -> None:
    with pytest.raises(storepath.StorePathError):
        storepath.check(path)


def test_store_path_accepts() -> None:
    p = "/nix/store/6q5cdpsrvdpmkzh5sy8wdc7vz7p51z1c-dep-x1.drv"
    assert storepath.check(p) == p
    assert storepath.hash_part(p) == "6q5cdpsrvdpmkzh5sy8wdc7vz7p51z1c"
