"""The NAR pipeline without a cache: the key scheme's premise (encoding is deterministic for a tag), the
NarHash check that comes before the last byte, bounded read-ahead, and stopping early."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterable
from pathlib import Path
from unittest import mock

import pytest
import pyzstd
from hypothesis import given, settings
from hypothesis import strategies as st

from hookd import nar, narstream, nixbase32
from hookd.narstream import Encoding, NarMismatchError, NarStream
from hookd.pathinfo import PathInfo


def make_path(root: Path, files: dict[str, bytes]) -> PathInfo:
    top = root / "6q5cdpsrvdpmkzh5sy8wdc7vz7p51z1c-x"
    top.mkdir(parents=True)
    for name, data in files.items():
        (top / name).write_bytes(data)
    dumped = b"".join(nar.dump(top))
    return PathInfo(str(top), hashlib.sha256(dumped).digest(), len(dumped), ())


def compressible(n: int) -> bytes:
    words = [os.urandom(8).hex().encode() for _ in range(64)]
    out, i = bytearray(), 0
    while len(out) < n:
        out += words[(i * 7919) % 64] + b" "
        i += 1
    return bytes(out[:n])


def test_key_names_the_nar_and_the_encoding() -> None:
    h = hashlib.sha256(b"x").digest()
    st_key = Encoding("zstd", 3).key(h)
    mt_key = Encoding("zstd", 3, threaded=True).key(h)
    assert st_key == f"nar/{nixbase32.encode(h)}-zstd3-{pyzstd.zstd_version}.nar.zst"
    assert mt_key != st_key and f"zstd3-mt{narstream.JOB_MIB}m-" in mt_key
    assert Encoding("zstd", 19).key(h) != st_key
    assert Encoding("none", 0).key(h) == f"nar/{nixbase32.encode(h)}.nar"
    assert Encoding("xz", 6).key(h).endswith(".nar.xz")
    assert narstream.encoding("zstd", 3, narstream.THREADED_FROM).threaded
    assert not narstream.encoding("zstd", 3, narstream.THREADED_FROM - 1).threaded


def _encode(data: bytes, enc: Encoding, splits: list[int]) -> bytes:
    comp, out, at = enc.compressor(), [], 0
    for n in [*splits, len(data)]:
        out.append(comp.compress(data[at : at + n]))
        at += n
    return b"".join(out) + comp.flush()


@settings(max_examples=25, deadline=None)
@given(
    size=st.integers(0, 3 << 20),
    splits=st.lists(st.integers(1, 1 << 20), max_size=6),
    enc=st.sampled_from([Encoding("zstd", 3), Encoding("zstd", 3, True), Encoding("xz", 1), Encoding("none", 0)]),
    workers=st.integers(1, 4),
)
def test_encoding_is_deterministic_for_its_tag(size: int, splits: list[int], enc: Encoding, workers: int) -> None:
    """The key scheme's premise: whoever encodes a NAR with a tag gets the same bytes, however the input
    arrives and (zstd threaded) whatever the number of workers."""
    data = compressible(size // 2) + os.urandom(size - size // 2)
    reference = _encode(data, enc, [])
    with mock.patch("os.cpu_count", return_value=workers):
        assert _encode(data, enc, splits) == reference


def test_threaded_zstd_differs_from_single_threaded_hence_its_own_tag() -> None:
    data = compressible(4 << 20)
    assert _encode(data, Encoding("zstd", 3), []) != _encode(data, Encoding("zstd", 3, True), [])


def test_encode_small_checks_the_nar_hash(tmp_path: Path) -> None:
    info = make_path(tmp_path, {"a": b"hello", "b": compressible(10000)})
    enc, data, encoded = narstream.encode_small(info, Encoding("zstd", 3))
    assert enc == Encoding("zstd", 3) and pyzstd.decompress(data) == b"".join(nar.dump(info.path))
    assert encoded.file_hash == hashlib.sha256(data).digest() and encoded.file_size == len(data)
    (Path(info.path) / "a").write_bytes(b"hellO")
    with pytest.raises(NarMismatchError, match="do not match"):
        narstream.encode_small(info, Encoding("zstd", 3))


def test_a_nar_that_does_not_compress_is_stored_as_itself(tmp_path: Path) -> None:
    """Small NARs by their compressed size, large ones by a sample of their start; either way a function
    of the NAR alone (the choice is in the key), and NarHash is still checked."""
    noise = make_path(tmp_path / "noise", {"r": os.urandom(100_000)})
    enc, data, encoded = narstream.encode_small(noise, Encoding("zstd", 3))
    assert enc == narstream.RAW and data == b"".join(nar.dump(noise.path))
    assert encoded == narstream.Encoded(noise.nar_hash, noise.nar_size)
    assert enc.key(noise.nar_hash).endswith(f"{nixbase32.encode(noise.nar_hash)}.nar")
    text = make_path(tmp_path / "text", {"t": compressible(100_000)})
    assert narstream.encode_small(text, Encoding("zstd", 3))[0] == Encoding("zstd", 3)

    big_noise = make_path(tmp_path / "big-noise", {"a": os.urandom(2 << 20), "b": compressible(1 << 20)})
    big_text = make_path(tmp_path / "big-text", {"a": compressible(2 << 20), "b": os.urandom(1 << 20)})
    threaded = Encoding("zstd", 3, threaded=True)
    assert narstream.sampled_encoding(big_noise, threaded) == narstream.RAW
    assert narstream.sampled_encoding(big_text, threaded) == threaded
    (Path(noise.path) / "r").write_bytes(os.urandom(100_000))
    with pytest.raises(NarMismatchError):
        narstream.encode_small(noise, Encoding("zstd", 3))


def test_a_reused_compressor_gives_the_same_bytes(tmp_path: Path) -> None:
    """Each thread keeps its zstd compressor between NARs (making one is costly); bytes do not change,
    also after a NAR whose check failed midway left its compressor mid-frame."""
    a = make_path(tmp_path / "a", {"x": compressible(300_000)})
    b = make_path(tmp_path / "b", {"y": compressible(200_000) + os.urandom(1000)})
    enc = Encoding("zstd", 3)
    fresh = {p.path: _encode(b"".join(nar.dump(p.path)), enc, []) for p in (a, b)}
    for p in (a, b, a, b):
        assert narstream.encode_small(p, enc)[1] == fresh[p.path]
    bad = PathInfo(a.path, b.nar_hash, a.nar_size, ())
    with pytest.raises(NarMismatchError):
        narstream.encode_small(bad, enc)
    assert narstream.encode_small(b, enc)[1] == fresh[b.path]


def test_a_path_grown_on_disk_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    """A small path (encoded on the event loop) whose file became huge: the dump stops as soon as it
    passes the recorded size."""
    info = make_path(tmp_path, {"f": b"x" * 100})
    os.truncate(Path(info.path) / "f", 8 << 30)  # sparse: 8 GiB to read, if it were read
    for enc in (Encoding("zstd", 3), narstream.RAW):
        with pytest.raises(NarMismatchError, match=r"NarSize over \d+, stopped there"):
            narstream.encode_small(info, enc)


async def test_stream_yields_the_encoding_and_raises_before_its_end_on_a_mismatch(tmp_path: Path) -> None:
    info = make_path(tmp_path, {"big": os.urandom(6 << 20), "text": compressible(3 << 20)})
    single = [p async for p in NarStream(info, Encoding("zstd", 3))]
    assert len(single) > 3 and max(map(len, single)) < 2 * narstream.EMIT  # handed on as produced
    enc = Encoding("zstd", 3, threaded=True)
    stream = NarStream(info, enc)
    data = b"".join([p async for p in stream])
    assert data == _encode(b"".join(nar.dump(info.path)), enc, [])
    assert stream.encoded is not None and stream.encoded.file_hash == hashlib.sha256(data).digest()

    (Path(info.path) / "text").write_bytes(compressible(3 << 20)[::-1])  # same size, other bytes
    bad = NarStream(info, enc)
    got = []
    with pytest.raises(NarMismatchError):
        async for piece in bad:
            got.append(piece)
    assert bad.encoded is None
    # the compressor's final bytes never went out: what the consumer saw is not a whole NAR (and a
    # backend commits only on a normal end anyway)
    with pytest.raises(pyzstd.ZstdError):
        pyzstd.decompress(b"".join(got))


async def test_stream_runs_a_bounded_distance_ahead_and_stops_when_closed(tmp_path: Path) -> None:
    info = make_path(tmp_path, {"big": os.urandom(24 << 20)})
    stream = NarStream(info, Encoding("none", 0), ahead=2)
    it = aiter(stream)
    first = await anext(it)
    assert first
    await asyncio.sleep(0.3)  # the worker fills what room it has, then waits
    assert stream._queue.qsize() <= 2
    await it.aclose()  # type: ignore[attr-defined]
    assert stream._thread is not None
    await asyncio.to_thread(stream._thread.join, 5)
    assert not stream._thread.is_alive()
    assert not [t for t in threading.enumerate() if t.name.startswith("nar ")]


@pytest.mark.parametrize("size", [3000, narstream.SMALL_NAR + 1])
async def test_paths_with_one_nar_uploading_together_write_it_once_and_wait_for_nothing(
    tmp_path: Path, size: int
) -> None:
    """Identical NARs (same size: side by side in the queue's order) upload together: the first writes
    the NAR, the others rely on that write. Without that, each other one finds the NAR there, not
    created by itself, and must touch it and wait out the protocol's settle time (44 s by default).
    The listings answer later than the NAR: the first upload is still waiting for its own when the
    next one takes its turn to write, so the NAR's write must count from the moment it lands."""
    from hookd.backends.file import FileBackend
    from hookd.freshness import Freshness
    from hookd.publish import Extras
    from hookd.safety import Bounds
    from hookd.signing import SecretKey
    from hookd.upload import upload_path

    content = compressible(size)
    infos = []
    for i in range(4):
        info = make_path(tmp_path / f"s{i}", {"f": content})
        top = Path(info.path).rename(tmp_path / f"s{i}" / f"{'abcdfghi'[i] * 32}-same")
        infos.append(PathInfo(str(top), info.nar_hash, info.nar_size, ()))
    writes: list[str] = []

    class Slow(FileBackend):  # a write is answered a while after it lands, as a remote cache does
        async def put_new(self, key: str, data: bytes, content_type: str) -> bool:
            writes.append(key)
            created = await super().put_new(key, data, content_type)
            await asyncio.sleep(0.3 if created else 0)
            return created

        async def put_nar(self, key: str, chunks: AsyncIterable[bytes], content_type: str, size_hint: int) -> None:
            writes.append(key)
            await super().put_nar(key, chunks, content_type, size_hint)
            await asyncio.sleep(0.3)

        async def put(self, key: str, data: bytes, content_type: str, *, content_encoding: str | None = None) -> None:
            await super().put(key, data, content_type, content_encoding=content_encoding)
            await asyncio.sleep(1.0 if key.endswith(".ls") else 0)

    backend = Slow(tmp_path / "cache", fsync=False)
    (tmp_path / "cache").mkdir()
    bounds = Bounds()
    assert bounds.settle > 30
    freshness = Freshness(backend, bounds)
    key = SecretKey.generate("test")
    async with asyncio.timeout(20):
        done = await asyncio.gather(
            *(
                upload_path(i, backend, key, "zstd", narstream.Levels(3), freshness, extras=Extras(backend))
                for i in infos
            )
        )
    assert len(done) == 4 and freshness.touches == 0 and len(writes) == 1
    assert len(list((tmp_path / "cache" / "nar").iterdir())) == 1
    assert len(list((tmp_path / "cache").glob("*.narinfo"))) == 4


def test_levels_follow_what_holds_uploads_back() -> None:
    """zstd with no level set: level 1 at first and after a NAR whose backend waited for compressed bytes,
    the normal level after one whose compressor waited for the backend; a level set is never changed."""
    auto = narstream.Levels(3, adaptive=True)
    assert auto.current() == narstream.FAST_LEVEL == 1  # until a NAR shows otherwise
    auto.observe(starved=0.2, blocked=3.0)
    assert auto.current() == 3
    auto.observe(starved=0.01, blocked=0.0)  # too short to tell
    assert auto.current() == 3
    auto.observe(starved=2.0, blocked=0.1)
    assert auto.current() == 1
    fixed = narstream.Levels(3)
    fixed.observe(starved=2.0, blocked=0.0)
    assert fixed.current() == 3


async def test_a_stream_measures_who_waited(tmp_path: Path) -> None:
    """A consumer slower than the compressor: the worker waits (blocked); a fast one: it waits (starved)."""
    info = make_path(tmp_path, {"a": os.urandom(12 << 20)})
    slow = NarStream(info, Encoding("zstd", 1))
    async for _ in slow:
        await asyncio.sleep(0.05)
    assert slow.blocked > slow.starved
    info = make_path(tmp_path / "text", {"a": compressible(24 << 20)})
    fast = NarStream(info, Encoding("zstd", 19))
    async for _ in fast:
        pass
    assert fast.starved > fast.blocked


async def test_a_narinfo_put_over_one_already_there_is_only_a_touch(tmp_path: Path) -> None:
    """safety.py, step 5: re-putting a narinfo that is already there (another uploader's, maybe old and
    being deleted by a GC) does not make it this daemon's write; a referrer published next touches and
    checks it first. Seen in CI: a retried upload re-put an old narinfo just before a GC's delete of
    it landed, relied on it as fresh, and published its referrer without it."""
    from hookd import narinfo
    from hookd.backends.file import FileBackend
    from hookd.freshness import Freshness
    from hookd.safety import Bounds
    from hookd.signing import SecretKey
    from hookd.upload import upload_path

    ref = make_path(tmp_path / "r", {"f": b"reference"})
    top = make_path(tmp_path / "t", {"g": b"referrer"})
    ref = PathInfo(str(Path(ref.path).rename(tmp_path / "r" / f"{'r' * 32}-ref")), ref.nar_hash, ref.nar_size, ())
    top_path = str(Path(top.path).rename(tmp_path / "t" / f"{'t' * 32}-top"))
    top = PathInfo(top_path, top.nar_hash, top.nar_size, (ref.path,))
    (tmp_path / "cache").mkdir()
    backend = FileBackend(tmp_path / "cache", fsync=False)
    freshness = Freshness(backend, Bounds(grace=10, check_to_delete=0.1, request_timeout=0.5, max_skew=1))
    key = SecretKey.generate("test")
    ref_key = narinfo.narinfo_key(ref.path)
    await backend.put(ref_key, b"an older narinfo of the same path", narinfo.CONTENT_TYPE)

    await upload_path(ref, backend, key, "zstd", narstream.Levels(3), freshness)
    assert not freshness.fresh(ref_key) and freshness.touches == 0
    await upload_path(top, backend, key, "zstd", narstream.Levels(3), freshness)
    assert freshness.touches == 1 and freshness.fresh(ref_key)  # touched and checked, then relied on

    # without one there before, the narinfo is this daemon's write: relied on without a touch
    (tmp_path / "empty").mkdir()
    backend = FileBackend(tmp_path / "empty", fsync=False)
    fresh = Freshness(backend, freshness.bounds)
    await upload_path(ref, backend, key, "zstd", narstream.Levels(3), fresh)
    assert fresh.fresh(ref_key)
    await upload_path(top, backend, key, "zstd", narstream.Levels(3), fresh)
    assert fresh.touches == 0


async def test_a_narinfo_the_planner_found_absent_is_not_asked_for_again(tmp_path: Path) -> None:
    """safety.py, step 5, with the planner's question: a narinfo found absent lately is put without
    a second question and counts as this daemon's write, if its PUT goes out within `fresh_for` of
    the question; a PUT later than that (a slow upload) is only a touch, and an answer older than
    half of `fresh_for` is asked again beside the NAR's upload."""
    import time

    from hookd import narinfo
    from hookd.backends.file import FileBackend
    from hookd.freshness import Freshness
    from hookd.safety import Bounds
    from hookd.signing import SecretKey
    from hookd.upload import upload_path

    class Counting(FileBackend):
        asked: list[str] = []
        nar_delay = 0.0

        async def stat(self, key: str):  # type: ignore[no-untyped-def]
            self.asked.append(key)
            return await super().stat(key)

        async def put_new(self, key: str, data: bytes, content_type: str) -> bool:
            await asyncio.sleep(self.nar_delay)
            return await super().put_new(key, data, content_type)

    ref = make_path(tmp_path / "r", {"f": b"reference"})
    ref = PathInfo(str(Path(ref.path).rename(tmp_path / "r" / f"{'r' * 32}-ref")), ref.nar_hash, ref.nar_size, ())
    top = make_path(tmp_path / "t", {"g": b"referrer"})
    top = PathInfo(str(Path(top.path).rename(tmp_path / "t" / f"{'t' * 32}-top")), top.nar_hash, top.nar_size,
                   (ref.path,))  # fmt: skip
    ref_key, key = narinfo.narinfo_key(ref.path), SecretKey.generate("test")
    bounds = Bounds(grace=2, check_to_delete=0.01, request_timeout=0.05, max_skew=0)  # fresh_for 1 s

    def cache(name: str) -> tuple[Counting, Freshness]:
        (tmp_path / name).mkdir()
        backend = Counting(tmp_path / name, fsync=False)
        backend.asked = []
        return backend, Freshness(backend, bounds)

    backend, fresh = cache("answered")
    fresh.found_absent([ref_key], time.monotonic())
    await upload_path(ref, backend, key, "zstd", narstream.Levels(3), fresh)
    assert ref_key not in backend.asked and fresh.fresh(ref_key)
    await upload_path(top, backend, key, "zstd", narstream.Levels(3), fresh)
    assert fresh.touches == 0  # relied on as this daemon's write

    backend, fresh = cache("old answer")  # too old to start from: asked again
    fresh.found_absent([ref_key], time.monotonic() - 0.6)
    await upload_path(ref, backend, key, "zstd", narstream.Levels(3), fresh)
    assert ref_key in backend.asked and fresh.fresh(ref_key)

    backend, fresh = cache("slow")  # the PUT goes out more than fresh_for after the question: a touch
    fresh.found_absent([ref_key], time.monotonic() - 0.4)
    backend.nar_delay = 0.7
    await upload_path(ref, backend, key, "zstd", narstream.Levels(3), fresh)
    assert ref_key not in backend.asked and not fresh.fresh(ref_key)
    backend.nar_delay = 0.0
    await upload_path(top, backend, key, "zstd", narstream.Levels(3), fresh)
    assert fresh.touches == 1 and fresh.fresh(ref_key)  # touched and checked before it was relied on


async def test_a_wait_for_the_settle_time_says_so_once_per_batch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Relying on objects this daemon did not write lately costs a touch and the settle time (44 s with the
    default bounds): the log says so, once for the touches a call starts, not again for a call that joins
    them, and not at all once they are fresh."""
    import logging

    from hookd.backends.file import FileBackend
    from hookd.freshness import Freshness
    from hookd.safety import Bounds

    backend = FileBackend(tmp_path, fsync=False)
    freshness = Freshness(backend, Bounds(grace=10, check_to_delete=0.1, request_timeout=0.5, max_skew=1))
    types = {"a.narinfo": "text/x-nix-narinfo", "b.narinfo": "text/x-nix-narinfo"}
    for key, content_type in types.items():
        await backend.put(key, b"written by another uploader", content_type)
    with caplog.at_level(logging.INFO, logger="hookd"):
        missing = await asyncio.gather(freshness.ensure(list(types), types), freshness.ensure(["a.narinfo"], types))
        assert missing == [set(), set()] and freshness.touches == 2
        await freshness.ensure(list(types), types)  # fresh now: no touch, nothing said
    said = [r.getMessage() for r in caplog.records if "settle time" in r.getMessage()]
    assert said == [
        "touching 2 cache objects this daemon has not written lately (a.narinfo, …) and waiting 0.66s, "
        "the upload/GC protocol's settle time, before relying on them"
    ]
    assert freshness.touches == 2
