"""Segmented streaming AEAD, byte-compatible with Tink's AES256_GCM_HKDF_1MB.

Artifacts are far larger than memory, so they cannot be sealed with one AES-GCM call. Instead
the plaintext is cut into segments that are sealed independently under the online-AE scheme
STREAM (Hoang, Reyhanitabar, Rogaway, Vizár, "Online Authenticated-Encryption and its
Nonce-Reuse Misuse-Resistance", CRYPTO 2015): each segment's nonce binds its position in the
stream and whether it is the last one, so segments cannot be reordered, dropped, duplicated or
truncated away without a tag failing, and a reader can release each segment's plaintext as soon
as that segment authenticates instead of buffering the whole object.

The wire format is exactly Tink's AES-GCM-HKDF streaming AEAD (parameters: derived key size 32,
HKDF-SHA256, ciphertext segment size 1 MiB, ciphertext offset 0), so any Tink implementation
can decrypt what we write and vice versa::

    header   = 0x28 (header length, 40) || salt (32 random bytes) || nonce prefix (7 random bytes)
    file key = HKDF-SHA256(ikm=DEK, salt=salt, info=associated_data, length=32)
    nonce_i  = nonce prefix || uint32_be(i) || (0x01 if segment i is the last else 0x00)
    segment_i = AES-256-GCM(file key, nonce_i, plaintext_i, aad=empty) = ciphertext_i || tag_i
    object   = header || segment_0 || segment_1 || ... || segment_n-1

The associated data is bound through the key derivation, not as GCM AAD. Every ciphertext
segment is SEGMENT_SIZE bytes except the last, which is shorter or equal; segment 0 shares its
SEGMENT_SIZE bytes with the header, so segment i always starts at object offset i * SEGMENT_SIZE
(HEADER_SIZE for i = 0), which is what makes ranged reads cheap. A full segment is written as
non-final only when more plaintext follows, so the last segment is empty only for an empty
plaintext (then the object is the header plus a bare 16-byte tag).

Streams carry no length field: a reader learns which segment is last only by reaching the end of
the ciphertext, which is why decrypt_iter reads one byte ahead before opening a segment.
"""

from __future__ import annotations

import hashlib
import os
import queue
import struct
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "FIRST_SEGMENT_PLAINTEXT",
    "HEADER_SIZE",
    "SEGMENT_PLAINTEXT",
    "SEGMENT_SIZE",
    "TAG_SIZE",
    "StreamEncryptor",
    "StreamIntegrityError",
    "byte_view",
    "ciphertext_range",
    "ciphertext_size",
    "decrypt_iter",
    "decrypt_range",
    "segment_count",
]

SEGMENT_SIZE = 1 << 20
HEADER_SIZE = 40
TAG_SIZE = 16
FIRST_SEGMENT_PLAINTEXT = SEGMENT_SIZE - HEADER_SIZE - TAG_SIZE
SEGMENT_PLAINTEXT = SEGMENT_SIZE - TAG_SIZE

_KEY_SIZE = 32
_SALT_SIZE = 32
_NONCE_PREFIX_SIZE = 7
# The segment counter in the nonce is 32 bits wide; past that nonces would repeat.
_MAX_SEGMENTS = 1 << 32


class StreamIntegrityError(Exception):
    """The ciphertext is malformed or failed authentication (never carries key material)."""


# ---------------------------------------------------------------------------------------------
# Geometry


def segment_count(plaintext_size: int) -> int:
    """Number of segments a plaintext of this size is encrypted into (at least 1)."""
    if plaintext_size < 0:
        raise ValueError("plaintext_size must be >= 0")
    if plaintext_size <= FIRST_SEGMENT_PLAINTEXT:
        return 1
    return 1 + -(-(plaintext_size - FIRST_SEGMENT_PLAINTEXT) // SEGMENT_PLAINTEXT)


def ciphertext_size(plaintext_size: int) -> int:
    """Exact size of the encrypted object, header included."""
    return HEADER_SIZE + plaintext_size + TAG_SIZE * segment_count(plaintext_size)


def _segment_of(offset: int) -> int:
    if offset < FIRST_SEGMENT_PLAINTEXT:
        return 0
    return 1 + (offset - FIRST_SEGMENT_PLAINTEXT) // SEGMENT_PLAINTEXT


def _plaintext_start(index: int) -> int:
    return 0 if index == 0 else FIRST_SEGMENT_PLAINTEXT + (index - 1) * SEGMENT_PLAINTEXT


def _ciphertext_start(index: int) -> int:
    return HEADER_SIZE if index == 0 else index * SEGMENT_SIZE


def _full_ciphertext_len(index: int) -> int:
    return SEGMENT_SIZE - HEADER_SIZE if index == 0 else SEGMENT_SIZE


def ciphertext_range(plaintext_size: int, start: int, end: int) -> tuple[int, int, int, int]:
    """Segments and object byte range [ct_start, ct_end) holding plaintext[start:end].

    Whole segments are returned because a segment can only be authenticated as a unit. For
    segment 0 the range begins after the header, which callers fetch separately.
    """
    if not 0 <= start < end <= plaintext_size:
        raise ValueError(
            f"invalid plaintext range [{start}, {end}) for plaintext of {plaintext_size} bytes"
        )
    first = _segment_of(start)
    last = _segment_of(end - 1)
    ct_start = _ciphertext_start(first)
    if last == segment_count(plaintext_size) - 1:
        ct_end = ciphertext_size(plaintext_size)
    else:
        ct_end = _ciphertext_start(last + 1)
    return first, last, ct_start, ct_end


# ---------------------------------------------------------------------------------------------
# Primitives


def _check_key(dek: bytes, associated_data: bytes) -> None:
    if not isinstance(dek, bytes | bytearray) or len(dek) != _KEY_SIZE:
        raise ValueError(f"DEK must be {_KEY_SIZE} bytes")
    if not isinstance(associated_data, bytes | bytearray):
        raise TypeError("associated_data must be bytes")


def _file_cipher(dek: bytes, salt: bytes, associated_data: bytes) -> AESGCM:
    key = HKDF(
        algorithm=hashes.SHA256(), length=_KEY_SIZE, salt=salt, info=bytes(associated_data)
    ).derive(bytes(dek))
    return AESGCM(key)


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", index, 1 if last else 0)


def byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat memoryview of `data` whose len() counts bytes, without copying.

    A memoryview of wider items (array('I'), numpy buffers) would otherwise report its length
    in items, and slicing it would cut at item, not byte, boundaries.
    """
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _open_header(
    dek: bytes, associated_data: bytes, header: bytes | bytearray
) -> tuple[AESGCM, bytes]:
    if len(header) != HEADER_SIZE:
        raise StreamIntegrityError(f"header: got {len(header)} bytes, expected {HEADER_SIZE}")
    if header[0] != HEADER_SIZE:
        raise StreamIntegrityError(
            f"header: length byte is {header[0]}, expected {HEADER_SIZE} "
            "(not an AES-GCM-HKDF stream, or corrupted)"
        )
    salt = bytes(header[1 : 1 + _SALT_SIZE])
    prefix = bytes(header[1 + _SALT_SIZE : HEADER_SIZE])
    return _file_cipher(dek, salt, associated_data), prefix


def _open_segment(
    cipher: AESGCM, prefix: bytes, index: int, segment: memoryview, last: bool
) -> bytes:
    if index >= _MAX_SEGMENTS:
        raise StreamIntegrityError(f"segment {index}: stream exceeds {_MAX_SEGMENTS} segments")
    if len(segment) < TAG_SIZE:
        raise StreamIntegrityError(
            f"segment {index}: {len(segment)} bytes is shorter than its {TAG_SIZE}-byte tag "
            "(truncated)"
        )
    try:
        return cipher.decrypt(_nonce(prefix, index, last), segment, None)
    except InvalidTag:
        role = "final" if last else "non-final"
        raise StreamIntegrityError(
            f"segment {index} (opened as {role}): authentication failed - corrupted, truncated, "
            "reordered or extended ciphertext, or wrong key / associated data"
        ) from None


# ---------------------------------------------------------------------------------------------
# Overlapped hashing
#
# SHA-256, even with SHA-NI, is about half the speed of AES-GCM with VAES, so hashing and then
# encrypting each segment would run at ~70% of the hash alone. hashlib and cryptography both
# release the GIL on large buffers, so the hash runs on a helper thread while this thread
# encrypts. The helper hashes whole segment buffers that the encryptor owns, in order, through
# a queue: with two buffers it always has the next one waiting, so it never idles for a
# per-call handshake (a synchronous hand-off per update() measured ~10% slower).


def _parallel_hashing_available() -> bool:
    try:
        return len(os.sched_getaffinity(0)) > 1
    except AttributeError:  # not Linux
        return (os.cpu_count() or 1) > 1


def _hash_worker(
    digest: hashlib._Hash,
    todo: queue.SimpleQueue[memoryview | None],
    done: queue.SimpleQueue[BaseException | None],
) -> None:
    while (view := todo.get()) is not None:
        try:
            digest.update(view)
        except BaseException as exc:  # handed to the encrypting thread, which re-raises
            done.put(exc)
        else:
            done.put(None)
        del view


class _Hasher:
    """Feeds buffers to a digest in order, on a helper thread when one is worth it."""

    def __init__(self, digest: hashlib._Hash) -> None:
        self._digest = digest
        self._todo: queue.SimpleQueue[memoryview | None] | None = None
        self._done: queue.SimpleQueue[BaseException | None] | None = None
        self._pending = 0

    def submit(self, view: memoryview) -> None:
        if self._todo is None:
            if len(view) < SEGMENT_PLAINTEXT // 2 or not _parallel_hashing_available():
                # Small objects finish before a thread would even start.
                self._digest.update(view)
                return
            self._start()
        assert self._todo is not None
        self._todo.put(view)
        self._pending += 1

    def _start(self) -> None:
        self._todo = queue.SimpleQueue()
        self._done = queue.SimpleQueue()
        threading.Thread(
            target=_hash_worker,
            args=(self._digest, self._todo, self._done),
            name="stream-sha256",
            daemon=True,
        ).start()
        # An encryptor dropped without finalize() must not strand its thread on todo.get().
        weakref.finalize(self, self._todo.put, None)

    def wait(self, keep: int = 0) -> None:
        """Block until at most ``keep`` submitted buffers are still unhashed."""
        while self._pending > keep:
            assert self._done is not None
            error = self._done.get()
            self._pending -= 1
            if error is not None:
                raise error

    def close(self) -> None:
        if self._todo is not None:
            self._todo.put(None)
            self._todo = None


# ---------------------------------------------------------------------------------------------
# Encryption


class StreamEncryptor:
    """Incremental encryptor that also computes the plaintext's SHA-256 and size in one pass.

    Not thread-safe; one instance per stream. Plaintext is staged in two segment-sized buffers
    the encryptor owns (the caller may reuse its buffers as soon as update() returns), so at
    most two segments of plaintext are held.
    """

    def __init__(self, dek: bytes, associated_data: bytes) -> None:
        _check_key(dek, associated_data)
        salt = os.urandom(_SALT_SIZE)
        self._prefix = os.urandom(_NONCE_PREFIX_SIZE)
        self._header: bytes | None = bytes([HEADER_SIZE]) + salt + self._prefix
        self._cipher = _file_cipher(dek, salt, associated_data)
        self._digest = hashlib.sha256()
        self._hasher = _Hasher(self._digest)
        # Fixed-size buffers written by slice assignment: plain memcpy, never reallocated.
        # The second is allocated only once an object outgrows one segment.
        self._buffers: list[memoryview | None] = [memoryview(bytearray(SEGMENT_PLAINTEXT)), None]
        self._current = 0
        self._fill = 0
        # A full segment is kept back until more data proves it is not the last one.
        self._held: memoryview | None = None
        self._index = 0
        self._done = False
        self.plaintext_size = 0
        self.sha256: str | None = None

    def update(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Feed plaintext; returns the ciphertext chunks that are complete now (maybe none)."""
        self._check_usable()
        view = byte_view(data)
        self.plaintext_size += len(view)
        out: list[bytes] = []
        try:
            while view:
                if self._held is not None:
                    self._seal(out, self._held, last=False)
                    self._held = None
                capacity = FIRST_SEGMENT_PLAINTEXT if self._index == 0 else SEGMENT_PLAINTEXT
                take = min(capacity - self._fill, len(view))
                buffer = self._buffers[self._current]
                assert buffer is not None
                buffer[self._fill : self._fill + take] = view[:take]
                self._fill += take
                view = view[take:]
                if self._fill == capacity:
                    self._held = buffer[:capacity]
                    self._hasher.submit(self._held)
                    self._switch_buffer()
        except BaseException:
            self._abort()
            raise
        return out

    def finalize(self) -> list[bytes]:
        """Seal the last segment; sets ``plaintext_size`` and ``sha256``."""
        self._check_usable()
        out: list[bytes] = []
        try:
            if self._held is not None:
                last, self._held = self._held, None
            else:
                buffer = self._buffers[self._current]
                assert buffer is not None
                last = buffer[: self._fill]
                self._hasher.submit(last)
            self._seal(out, last, last=True)
            self._hasher.wait()
        except BaseException:
            self._abort()
            raise
        self._hasher.close()
        self._done = True
        self._buffers = [None, None]
        self.sha256 = self._digest.hexdigest()
        return out

    def _check_usable(self) -> None:
        if self._done:
            raise RuntimeError("StreamEncryptor already finalized or failed")

    def _switch_buffer(self) -> None:
        self._current ^= 1
        self._fill = 0
        if self._buffers[self._current] is None:
            self._buffers[self._current] = memoryview(bytearray(SEGMENT_PLAINTEXT))
        else:
            # The just-filled buffer stays queued, so the helper has work while we wait for it
            # to finish with this one.
            self._hasher.wait(keep=1)

    def _seal(self, out: list[bytes], segment: memoryview, last: bool) -> None:
        if self._index >= _MAX_SEGMENTS:
            raise ValueError(f"plaintext too large: more than {_MAX_SEGMENTS} segments")
        if self._header is not None:
            out.append(self._header)
            self._header = None
        out.append(self._cipher.encrypt(_nonce(self._prefix, self._index, last), segment, None))
        self._index += 1

    def _abort(self) -> None:
        self._done = True
        self._hasher.close()


# ---------------------------------------------------------------------------------------------
# Decryption


def _split_segments(
    chunks: Iterable[bytes | bytearray | memoryview], index: int
) -> Iterator[tuple[int, memoryview, bool]]:
    """Cut a ciphertext stream (after the header) into (index, segment, at_end) triples.

    A full-length segment is yielded as not-at-end only once at least one more byte has
    arrived; whatever remains when the input ends is yielded last with at_end=True. Each
    yielded view is valid only until the generator is resumed.
    """
    buffer = bytearray(SEGMENT_SIZE)
    held = memoryview(buffer)
    fill = 0
    length = _full_ciphertext_len(index)
    for chunk in chunks:
        view = byte_view(chunk)
        if fill + len(view) <= length:
            held[fill : fill + len(view)] = view
            fill += len(view)
        else:
            if fill:
                take = length - fill
                held[fill:length] = view[:take]
                view = view[take:]
                yield index, held[:length], False
                index += 1
                fill = 0
                length = SEGMENT_SIZE
            while len(view) > length:
                yield index, view[:length], False
                view = view[length:]
                index += 1
                length = SEGMENT_SIZE
            held[: len(view)] = view
            fill = len(view)
        # Drop our export of the caller's buffer before asking for the next chunk, so a
        # producer that resizes or refills it is unaffected (the tail was copied above).
        view.release()
    yield index, held[:fill], True


def decrypt_iter(
    dek: bytes, associated_data: bytes, chunks: Iterable[bytes | bytearray | memoryview]
) -> Iterator[bytes]:
    """Decrypt a whole ciphertext stream, yielding each segment's plaintext once authentic.

    Raises StreamIntegrityError on any malformed, tampered, reordered, truncated or extended
    stream; plaintext already yielded belongs to earlier segments that did authenticate.
    """
    _check_key(dek, associated_data)
    return _decrypt_stream(dek, associated_data, iter(chunks))


def _decrypt_stream(
    dek: bytes, associated_data: bytes, chunks: Iterator[bytes | bytearray | memoryview]
) -> Iterator[bytes]:
    header = bytearray()
    rest: memoryview | None = None
    for chunk in chunks:
        view = byte_view(chunk)
        need = HEADER_SIZE - len(header)
        header += view[:need]
        if len(header) == HEADER_SIZE:
            rest = view[need:]
            view.release()
            break
        view.release()
    cipher, prefix = _open_header(dek, associated_data, header)

    def body() -> Iterator[bytes | bytearray | memoryview]:
        assert rest is not None
        yield rest
        rest.release()  # consumed; see _split_segments
        yield from chunks

    for index, segment, at_end in _split_segments(body(), 0):
        plaintext = _open_segment(cipher, prefix, index, segment, last=at_end)
        if plaintext:  # only an empty object has an empty segment; yield nothing for it
            yield plaintext


def decrypt_range(
    dek: bytes,
    associated_data: bytes,
    plaintext_size: int,
    start: int,
    end: int,
    read: Callable[[int, int], Iterable[bytes | bytearray | memoryview]],
) -> Iterator[bytes]:
    """Yield exactly plaintext[start:end], fetching and authenticating only the segments needed.

    ``read(a, b)`` must return the object's bytes [a, b) as an iterable of chunks.
    ``plaintext_size`` decides which segment is opened as final, so a wrong size fails
    authentication whenever the final segment is read.
    """
    _check_key(dek, associated_data)
    first, last, ct_start, ct_end = ciphertext_range(plaintext_size, start, end)
    final_index = segment_count(plaintext_size) - 1
    return _decrypt_range(
        dek, associated_data, start, end, read, first, last, ct_start, ct_end, final_index
    )


def _decrypt_range(
    dek: bytes,
    associated_data: bytes,
    start: int,
    end: int,
    read: Callable[[int, int], Iterable[bytes | bytearray | memoryview]],
    first: int,
    last: int,
    ct_start: int,
    ct_end: int,
    final_index: int,
) -> Iterator[bytes]:
    header = b"".join(bytes(chunk) for chunk in read(0, HEADER_SIZE))
    cipher, prefix = _open_header(dek, associated_data, header)
    last_length = ct_end - _ciphertext_start(last)
    for index, segment, at_end in _split_segments(read(ct_start, ct_end), first):
        if index > last or (index == last and not at_end):
            raise StreamIntegrityError(
                f"segment {index}: read({ct_start}, {ct_end}) returned more bytes than requested"
            )
        if at_end and (index < last or len(segment) != last_length):
            raise StreamIntegrityError(
                f"segment {index}: short read from read({ct_start}, {ct_end}) (truncated object)"
            )
        plaintext = _open_segment(cipher, prefix, index, segment, last=index == final_index)
        offset = _plaintext_start(index)
        lo = max(start - offset, 0)
        hi = min(end - offset, len(plaintext))
        if lo == 0 and hi == len(plaintext):
            yield plaintext
        elif hi > lo:
            yield plaintext[lo:hi]
