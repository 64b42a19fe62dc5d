"""Streaming AEAD: round trips, Tink interoperability, tamper detection and ranged reads.

Tink (the reference implementation of the format) is used only as an independent oracle.
"""

from __future__ import annotations

import gc
import hashlib
import random
import threading
import time
from collections.abc import Iterable, Iterator

import pytest
import tink
from tink import streaming_aead

from registry.crypto import stream
from registry.crypto.stream import (
    FIRST_SEGMENT_PLAINTEXT,
    HEADER_SIZE,
    SEGMENT_PLAINTEXT,
    SEGMENT_SIZE,
    TAG_SIZE,
    StreamEncryptor,
    StreamIntegrityError,
    ciphertext_range,
    ciphertext_size,
    decrypt_iter,
    decrypt_range,
    segment_count,
)
from tests.support.tinkutil import tink_decrypt as _tink_decrypt
from tests.support.tinkutil import tink_encrypt as _tink_encrypt
from tests.support.tinkutil import tink_streaming_aead

MiB = 1 << 20
FIRST = FIRST_SEGMENT_PLAINTEXT
SEG = SEGMENT_PLAINTEXT
DEK = random.Random("dek").randbytes(32)
AD = b"artifact:7f3c/model.safetensors"

BOUNDARY_SIZES = [
    0,
    1,
    FIRST - 1,
    FIRST,
    FIRST + 1,
    FIRST + SEG - 1,
    FIRST + SEG,
    FIRST + SEG + 1,
]
# Four segments, the last one short: enough to tamper with a middle segment.
MULTI = FIRST + 2 * SEG + 12_345


def plaintext(size: int, seed: int = 0) -> bytes:
    return random.Random(f"pt-{seed}-{size}").randbytes(size)


def rechunk(data: bytes, rng: random.Random, max_chunk: int) -> Iterator[bytes]:
    pos = 0
    while pos < len(data):
        # Mix tiny chunks in so every code path (buffer top-up, exact fills) gets exercised.
        size = rng.randint(1, 64) if rng.random() < 0.2 else rng.randint(1, max_chunk)
        yield data[pos : pos + size]
        pos += size


def encrypt(data: bytes, ad: bytes = AD, dek: bytes = DEK, chunks: Iterable[bytes] | None = None):
    encryptor = StreamEncryptor(dek, ad)
    out: list[bytes] = []
    for chunk in [data] if chunks is None else chunks:
        out += encryptor.update(chunk)
    out += encryptor.finalize()
    return b"".join(out), encryptor


def segment_start(index: int) -> int:
    """Plaintext offset at which segment ``index`` begins."""
    return 0 if index == 0 else FIRST + (index - 1) * SEG


def decrypt_until_error(pieces: Iterable[bytes]) -> tuple[bytes, StreamIntegrityError]:
    got: list[bytes] = []
    with pytest.raises(StreamIntegrityError) as excinfo:
        for piece in pieces:
            got.append(piece)
    return b"".join(got), excinfo.value


@pytest.fixture(scope="module")
def multi() -> tuple[bytes, bytes]:
    data = plaintext(MULTI)
    return data, encrypt(data)[0]


# ---------------------------------------------------------------------------------------------
# Geometry


def test_sizes_match_tink_geometry():
    # Observed from tink 1.16.1 with AES256_GCM_HKDF_1MB parameters.
    assert (HEADER_SIZE, TAG_SIZE, SEGMENT_SIZE) == (40, 16, 1 << 20)
    assert (FIRST, SEG) == (1_048_520, 1_048_560)
    expected = {0: 56, 1: 57, FIRST: MiB, FIRST + 1: MiB + 17, FIRST + SEG: 2 * MiB}
    for size, ct_size in expected.items():
        assert ciphertext_size(size) == ct_size
    assert [segment_count(n) for n in BOUNDARY_SIZES] == [1, 1, 1, 1, 2, 2, 2, 3]


def test_ciphertext_range_geometry():
    n = MULTI
    end_of_object = ciphertext_size(n)
    assert ciphertext_range(n, 0, 1) == (0, 0, HEADER_SIZE, SEGMENT_SIZE)
    assert ciphertext_range(n, FIRST - 1, FIRST + 1) == (0, 1, HEADER_SIZE, 2 * SEGMENT_SIZE)
    assert ciphertext_range(n, FIRST, FIRST + SEG) == (1, 1, SEGMENT_SIZE, 2 * SEGMENT_SIZE)
    assert ciphertext_range(n, n - 1, n) == (3, 3, 3 * SEGMENT_SIZE, end_of_object)
    assert ciphertext_range(n, 0, n) == (0, 3, HEADER_SIZE, end_of_object)
    assert ciphertext_range(10, 3, 4) == (0, 0, HEADER_SIZE, ciphertext_size(10))


@pytest.mark.parametrize(("start", "end"), [(0, 0), (5, 5), (6, 5), (-1, 3), (0, MULTI + 1)])
def test_ciphertext_range_rejects_bad_ranges(start, end):
    with pytest.raises(ValueError):
        ciphertext_range(MULTI, start, end)


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
def test_round_trip_boundaries(size):
    data = plaintext(size)
    ct, encryptor = encrypt(data)
    assert len(ct) == ciphertext_size(size)
    assert ct[0] == HEADER_SIZE
    assert encryptor.plaintext_size == size
    assert encryptor.sha256 == hashlib.sha256(data).hexdigest()
    pieces = list(decrypt_iter(DEK, AD, [ct]))
    assert b"".join(pieces) == data
    # One piece per segment; the final segment is non-empty unless the plaintext is empty.
    expected = [
        min(SEG if i else FIRST, size - segment_start(i)) for i in range(segment_count(size))
    ]
    assert [len(p) for p in pieces] == (expected if size else [])


def test_round_trip_random_chunking():
    rng = random.Random(1234)
    for size in (5 * MiB + 321, 2 * MiB, 300_001):
        data = plaintext(size)
        ct, encryptor = encrypt(data, chunks=rechunk(data, rng, 3 * MiB))
        assert len(ct) == ciphertext_size(size)
        assert encryptor.plaintext_size == size
        assert encryptor.sha256 == hashlib.sha256(data).hexdigest()
        assert b"".join(decrypt_iter(DEK, AD, rechunk(ct, rng, 2 * MiB))) == data


def test_ciphertext_independent_of_input_chunking(monkeypatch):
    # With salt and nonce prefix pinned, segmentation must depend only on the plaintext.
    monkeypatch.setattr(stream.os, "urandom", lambda n: bytes(range(n)))
    data = plaintext(3 * MiB + 5)
    rng = random.Random(99)
    reference = encrypt(data)[0]
    for _ in range(3):
        assert encrypt(data, chunks=rechunk(data, rng, MiB + 7))[0] == reference
    assert encrypt(data, chunks=[data[i : i + 1000] for i in range(0, len(data), 1000)])[0] == (
        reference
    )


def test_caller_may_reuse_its_buffer_after_update():
    # Hashing runs on a helper thread; it must never read memory the caller got back.
    rng = random.Random(5)
    buffer = bytearray(700_000)
    encryptor = StreamEncryptor(DEK, AD)
    fed, out = hashlib.sha256(), []
    for _ in range(12):
        buffer[:] = rng.randbytes(len(buffer))
        fed.update(buffer)
        out += encryptor.update(buffer)
        out += encryptor.update(memoryview(buffer)[:1234])
        fed.update(buffer[:1234])
    out += encryptor.finalize()
    assert encryptor.sha256 == fed.hexdigest()
    assert hashlib.sha256(b"".join(decrypt_iter(DEK, AD, out))).hexdigest() == fed.hexdigest()


def test_header_comes_first_and_outputs_are_bounded():
    encryptor = StreamEncryptor(DEK, AD)
    assert encryptor.update(b"x" * 1000) == []
    assert encryptor.update(b"") == []
    out = encryptor.update(b"y" * (2 * MiB))
    assert len(out[0]) == HEADER_SIZE and out[0][0] == HEADER_SIZE
    assert [len(c) for c in out[1:]] == [SEGMENT_SIZE - HEADER_SIZE, SEGMENT_SIZE]
    tail = encryptor.finalize()
    assert len(tail) == 1
    with pytest.raises(RuntimeError):
        encryptor.update(b"more")
    with pytest.raises(RuntimeError):
        encryptor.finalize()


def test_encryptor_output_matches_size_and_decrypts():
    data = plaintext(FIRST + 10)
    ct = encrypt(data, chunks=[data[:7], data[7:]])[0]
    assert len(ct) == ciphertext_size(len(data))
    assert b"".join(decrypt_iter(DEK, AD, [ct])) == data


def test_rejects_bad_keys():
    with pytest.raises(ValueError):
        StreamEncryptor(b"short", AD)
    with pytest.raises(ValueError):
        decrypt_iter(DEK.hex().encode(), AD, [])
    with pytest.raises(TypeError):
        StreamEncryptor(DEK, "text")  # type: ignore[arg-type]


def test_abandoned_encryptor_releases_its_hash_thread():
    def helper_threads() -> int:
        return sum(t.name == "stream-sha256" for t in threading.enumerate())

    before = helper_threads()
    encryptor = StreamEncryptor(DEK, AD)
    encryptor.update(plaintext(3 * MiB))
    del encryptor
    gc.collect()
    deadline = time.monotonic() + 5
    while helper_threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert helper_threads() == before


# ---------------------------------------------------------------------------------------------
# Tink interoperability


@pytest.fixture(scope="module")
def tink_aead() -> streaming_aead.StreamingAead:
    return tink_streaming_aead(DEK)


def tink_encrypt(primitive: streaming_aead.StreamingAead, data: bytes, ad: bytes = AD) -> bytes:
    return _tink_encrypt(primitive, data, ad)


def tink_decrypt(primitive: streaming_aead.StreamingAead, ct: bytes, ad: bytes = AD) -> bytes:
    return _tink_decrypt(primitive, ct, ad)


INTEROP_SIZES = [*BOUNDARY_SIZES, 3 * MiB + 777]


@pytest.mark.parametrize("size", INTEROP_SIZES)
def test_tink_decrypts_ours(tink_aead, size):
    data = plaintext(size, seed=2)
    ct = encrypt(data, chunks=rechunk(data, random.Random(size), MiB))[0]
    assert tink_decrypt(tink_aead, ct) == data


@pytest.mark.parametrize("size", INTEROP_SIZES)
def test_we_decrypt_tinks(tink_aead, size):
    data = plaintext(size, seed=3)
    ct = tink_encrypt(tink_aead, data)
    assert len(ct) == ciphertext_size(size)
    assert b"".join(decrypt_iter(DEK, AD, rechunk(ct, random.Random(size), MiB))) == data
    if size == 0:
        return
    reader = Reader(ct)
    ranges = {(0, size), (0, 1), (size - 1, size), (size // 2, size // 2 + 1)}
    if size > FIRST:
        ranges.add((FIRST - 1, FIRST + 1))
    for start, end in sorted(ranges):
        got = b"".join(decrypt_range(DEK, AD, size, start, end, reader))
        assert got == data[start:end], (start, end)


def test_tink_rejects_our_ciphertext_under_other_associated_data(tink_aead):
    ct = encrypt(plaintext(100))[0]
    with pytest.raises(tink.TinkError):
        tink_decrypt(tink_aead, ct, ad=b"another artifact")


# ---------------------------------------------------------------------------------------------
# Tampering


def flip(data: bytes, offset: int) -> bytes:
    mutable = bytearray(data)
    mutable[offset] ^= 0x01
    return bytes(mutable)


def ct_segment(index: int) -> int:
    """Object offset at which ciphertext segment ``index`` begins (after the header for 0)."""
    return HEADER_SIZE if index == 0 else index * SEGMENT_SIZE


@pytest.mark.parametrize(
    ("offset", "bad_segment"),
    [
        (5, 0),  # salt: derives another file key
        (35, 0),  # nonce prefix
        (HEADER_SIZE + 100, 0),
        (2 * SEGMENT_SIZE + 500, 2),  # a middle segment
        (3 * SEGMENT_SIZE - 1, 2),  # a middle segment's tag
        (-1, 3),  # the final segment's tag
    ],
)
def test_flipped_byte_is_detected(multi, offset, bad_segment):
    data, ct = multi
    got, error = decrypt_until_error(
        decrypt_iter(DEK, AD, rechunk(flip(ct, offset % len(ct)), random.Random(offset), MiB))
    )
    assert got == data[: segment_start(bad_segment)]
    assert f"segment {bad_segment}" in str(error)


def test_bad_header_length_byte(multi):
    _, ct = multi
    got, error = decrypt_until_error(decrypt_iter(DEK, AD, [bytes([41]) + ct[1:]]))
    assert got == b"" and "header" in str(error)


@pytest.mark.parametrize("cut", [0, 1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + TAG_SIZE - 1])
def test_truncated_header_or_first_tag(multi, cut):
    _, ct = multi
    got, _ = decrypt_until_error(decrypt_iter(DEK, AD, [ct[:cut]]))
    assert got == b""


@pytest.mark.parametrize("boundary", [1, 2, 3])
def test_truncation_at_segment_boundary(multi, boundary):
    data, ct = multi
    # The would-be final segment was sealed as non-final, so opening it as final must fail.
    got, error = decrypt_until_error(decrypt_iter(DEK, AD, [ct[: boundary * SEGMENT_SIZE]]))
    assert got == data[: segment_start(boundary - 1)]
    assert f"segment {boundary - 1}" in str(error)


def test_truncation_mid_segment(multi):
    data, ct = multi
    got, error = decrypt_until_error(decrypt_iter(DEK, AD, [ct[: 2 * SEGMENT_SIZE + 1000]]))
    assert got == data[: segment_start(2)]
    assert "segment 2" in str(error)


def test_truncation_inside_final_segment(multi):
    data, ct = multi
    got, _ = decrypt_until_error(decrypt_iter(DEK, AD, [ct[:-1]]))
    assert got == data[: segment_start(3)]


def test_swapped_segments(multi):
    data, ct = multi
    one = ct[ct_segment(1) : ct_segment(2)]
    two = ct[ct_segment(2) : ct_segment(3)]
    swapped = ct[: ct_segment(1)] + two + one + ct[ct_segment(3) :]
    assert len(swapped) == len(ct)
    got, error = decrypt_until_error(decrypt_iter(DEK, AD, [swapped]))
    assert got == data[:FIRST]
    assert "segment 1" in str(error)


def test_dropped_and_duplicated_segments(multi):
    data, ct = multi
    dropped = ct[: ct_segment(2)] + ct[ct_segment(3) :]
    got, _ = decrypt_until_error(decrypt_iter(DEK, AD, [dropped]))
    assert got == data[: segment_start(2)]
    duplicated = ct[: ct_segment(3)] + ct[ct_segment(2) :]
    got, _ = decrypt_until_error(decrypt_iter(DEK, AD, [duplicated]))
    assert got == data[: segment_start(3)]


@pytest.mark.parametrize("extra", [b"\x00", b"\x00" * TAG_SIZE, b"\x00" * SEGMENT_SIZE])
def test_trailing_bytes(multi, extra):
    data, ct = multi
    got, _ = decrypt_until_error(decrypt_iter(DEK, AD, [ct, extra]))
    assert got == data[: segment_start(3)]


def test_trailing_bytes_after_full_final_segment():
    data = plaintext(FIRST + SEG)
    ct = encrypt(data)[0]
    # A valid non-final-looking segment boundary followed by an empty "final" segment.
    got, error = decrypt_until_error(decrypt_iter(DEK, AD, [ct + b"\x00" * TAG_SIZE]))
    assert got == data[:FIRST]
    assert "segment 1" in str(error)


def test_object_swapped_with_another_artifacts(multi):
    # Same DEK, but the ciphertext belongs to another artifact: associated data differs.
    data, _ = multi
    other = encrypt(data, ad=b"artifact:other/model.safetensors")[0]
    got, error = decrypt_until_error(decrypt_iter(DEK, AD, [other]))
    assert got == b"" and "segment 0" in str(error)


def test_wrong_dek(multi):
    _, ct = multi
    wrong = bytes(b ^ 0xFF for b in DEK)
    got, error = decrypt_until_error(decrypt_iter(wrong, AD, [ct]))
    assert got == b""
    assert DEK.hex() not in str(error) and wrong.hex() not in str(error)


def test_empty_plaintext_tampering():
    ct = encrypt(b"")[0]
    assert b"".join(decrypt_iter(DEK, AD, [ct])) == b""
    for bad in (ct[:-1], ct + b"\x00", flip(ct, len(ct) - 1), ct[:HEADER_SIZE]):
        assert decrypt_until_error(decrypt_iter(DEK, AD, [bad]))[0] == b""


# ---------------------------------------------------------------------------------------------
# Ranged reads


class Reader:
    """read(a, b) over an in-memory object, in random chunk sizes, recording every call."""

    def __init__(self, data: bytes, seed: int = 0) -> None:
        self.data = data
        self.rng = random.Random(seed)
        self.calls: list[tuple[int, int]] = []

    def __call__(self, start: int, end: int) -> Iterator[bytes]:
        self.calls.append((start, end))
        return rechunk(self.data[start:end], self.rng, 300_000)


def read_range(ct: bytes, size: int, start: int, end: int, reader: Reader | None = None):
    return b"".join(decrypt_range(DEK, AD, size, start, end, reader or Reader(ct)))


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, 1),
        (MULTI - 1, MULTI),
        (100, 5000),
        (FIRST - 1, FIRST + 1),
        (FIRST, FIRST + SEG),
        (FIRST + SEG - 10, FIRST + SEG + 10),
        (FIRST - 5, FIRST + 2 * SEG + 5),
        (0, MULTI),
    ],
)
def test_range_matches_slice(multi, start, end):
    data, ct = multi
    reader = Reader(ct)
    assert read_range(ct, MULTI, start, end, reader) == data[start:end]
    _, _, ct_start, ct_end = ciphertext_range(MULTI, start, end)
    assert reader.calls == [(0, HEADER_SIZE), (ct_start, ct_end)]


def test_random_ranges(multi):
    data, ct = multi
    rng = random.Random(42)
    for _ in range(40):
        start = rng.randrange(MULTI)
        end = rng.randint(start + 1, min(MULTI, start + rng.choice([10, 100_000, 3 * MiB])))
        assert read_range(ct, MULTI, start, end, Reader(ct, seed=start)) == data[start:end]


def test_range_in_single_segment_object():
    data = plaintext(1000)
    ct = encrypt(data)[0]
    for start, end in [(0, 1000), (999, 1000), (10, 20)]:
        assert read_range(ct, 1000, start, end) == data[start:end]


def test_tampered_segment_inside_range_raises(multi):
    data, ct = multi
    bad = flip(ct, 2 * SEGMENT_SIZE + 77)
    got, error = decrypt_until_error(
        decrypt_range(DEK, AD, MULTI, FIRST + 5, MULTI - 5, Reader(bad))
    )
    assert got == data[FIRST + 5 : segment_start(2)]
    assert "segment 2" in str(error)


def test_tampered_segment_outside_range_is_not_read(multi):
    data, ct = multi
    bad = flip(ct, 2 * SEGMENT_SIZE + 77)
    reader = Reader(bad)
    assert read_range(bad, MULTI, 10, FIRST + 10, reader) == data[10 : FIRST + 10]
    assert all(end <= 2 * SEGMENT_SIZE for _, end in reader.calls)


def test_range_with_tampered_header(multi):
    _, ct = multi
    got, error = decrypt_until_error(decrypt_range(DEK, AD, MULTI, 0, 10, Reader(flip(ct, 3))))
    assert got == b"" and "segment 0" in str(error)


def test_range_short_and_long_reads(multi):
    _, ct = multi

    def short(start: int, end: int) -> list[bytes]:
        return [ct[start : end - 1]]

    def long(start: int, end: int) -> list[bytes]:
        return [ct[start : end + 1]]

    def empty(start: int, end: int) -> list[bytes]:
        return [] if start else [ct[:HEADER_SIZE]]

    for read in (short, long, empty):
        for start, end in [(0, 10), (FIRST, FIRST + 10), (MULTI - 10, MULTI)]:
            with pytest.raises(StreamIntegrityError):
                b"".join(decrypt_range(DEK, AD, MULTI, start, end, read))


def test_range_with_wrong_plaintext_size(multi):
    _, ct = multi
    for claimed in (MULTI + 1, MULTI - 1, FIRST + 2 * SEG):
        with pytest.raises(StreamIntegrityError):
            read_range(ct, claimed, claimed - 1, claimed)


def test_range_wrong_associated_data(multi):
    _, ct = multi
    with pytest.raises(StreamIntegrityError):
        b"".join(decrypt_range(DEK, b"other", MULTI, 0, 10, Reader(ct)))


def test_decrypt_iter_lets_producer_refill_and_resize_its_buffer(multi):
    data, ct = multi
    sizes = random.Random(8)

    def producer() -> Iterator[bytearray]:
        buffer, pos = bytearray(), 0
        while pos < len(ct):
            size = sizes.choice([1, 39, 41, 500_000, SEGMENT_SIZE, SEGMENT_SIZE + 1])
            buffer[:] = ct[pos : pos + size]  # resizes: fails if a view of it is still held
            pos += size
            yield buffer

    assert b"".join(decrypt_iter(DEK, AD, producer())) == data
