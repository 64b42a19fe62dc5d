"""Segmented streaming AEAD, byte-compatible with Tink's AES256_GCM_HKDF_1MB.

Artifacts are far larger than memory, so they cannot be sealed with one AES-GCM call. Instead
the plaintext is cut into segments that are sealed independently under the online-AE scheme
STREAM (Hoang, Reyhanitabar, Rogaway, Vizar, "Online Authenticated-Encryption and its
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
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

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
    "ciphertext_range",
    "ciphertext_size",
    "decrypt_iter",
    "decrypt_range",
    "encrypt_iter",
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

# Handing a hash job to another thread costs tens of microseconds; below this it is cheaper to
# hash inline than to overlap.
_HASH_OFFLOAD_MIN = 256 * 1024


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


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _open_header(dek: bytes, associated_data: bytes, header: bytes) -> tuple[AESGCM, bytes]:
    if len(header) != HEADER_SIZE:
        raise StreamIntegrityError(f"header: truncated ({len(header)} of {HEADER_SIZE} bytes)")
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
# SHA-256 (even with SHA-NI) is several times slower than AES-GCM with AES-NI/VAES, so hashing
# and encrypting one after the other would cost ~1.5x the hash alone. Both hashlib and
# cryptography drop the GIL on large buffers, so hashing a batch of segments on a pool thread
# while this thread encrypts the same (read-only) memory hides the encryption almost entirely.

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _parallelism() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _hash_executor() -> ThreadPoolExecutor | None:
    global _executor
    if _executor is None:
        workers = _parallelism()
        if workers < 2:
            return None
        with _executor_lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(
                    max_workers=workers, thread_name_prefix="stream-sha256"
                )
    return _executor


def _forget_executor_after_fork() -> None:
    # Threads do not survive fork (Celery prefork, gunicorn): a child must build its own pool.
    global _executor, _executor_lock
    _executor = None
    _executor_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_executor_after_fork)


def _hash_views(digest: hashlib._Hash, views: list[memoryview]) -> None:
    for view in views:
        digest.update(view)


def _begin_hash(digest: hashlib._Hash, views: list[memoryview]) -> Future[None] | None:
    if sum(len(v) for v in views) >= _HASH_OFFLOAD_MIN:
        executor = _hash_executor()
        if executor is not None:
            return executor.submit(_hash_views, digest, views)
    _hash_views(digest, views)
    return None


def _end_hash(digest: hashlib._Hash, views: list[memoryview], job: Future[None] | None) -> None:
    if job is None:
        return
    if job.cancel():
        # The pool is busy with other streams; waiting in its queue would be slower than
        # hashing here now that this thread's encryption is done.
        _hash_views(digest, views)
    else:
        job.result()


# ---------------------------------------------------------------------------------------------
# Encryption


class StreamEncryptor:
    """Incremental encryptor that also computes the plaintext's SHA-256 and size in one pass.

    Not thread-safe; one instance per stream. Holds at most one segment of plaintext.
    """

    def __init__(self, dek: bytes, associated_data: bytes) -> None:
        _check_key(dek, associated_data)
        salt = os.urandom(_SALT_SIZE)
        self._prefix = os.urandom(_NONCE_PREFIX_SIZE)
        self._header: bytes | None = bytes([HEADER_SIZE]) + salt + self._prefix
        self._cipher = _file_cipher(dek, salt, associated_data)
        self._digest = hashlib.sha256()
        # Fixed-size buffer written by slice assignment: plain memcpy, never reallocated.
        self._buffer = bytearray(SEGMENT_PLAINTEXT)
        self._view = memoryview(self._buffer)
        self._fill = 0
        self._index = 0
        self._done = False
        self.plaintext_size = 0
        self.sha256: str | None = None

    def _capacity(self, index: int) -> int:
        return FIRST_SEGMENT_PLAINTEXT if index == 0 else SEGMENT_PLAINTEXT

    def _check_usable(self) -> None:
        if self._done:
            raise RuntimeError("StreamEncryptor already finalized or failed")

    def update(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Feed plaintext; returns the ciphertext chunks that are complete now (maybe none)."""
        self._check_usable()
        view = _byte_view(data)
        size = len(view)
        if size == 0:
            return []
        self.plaintext_size += size
        capacity = self._capacity(self._index)
        if self._fill + size <= capacity:
            # Even a segment that is now exactly full must wait: only more data proves it
            # is not the last one.
            self._view[self._fill : self._fill + size] = view
            self._fill += size
            return []

        segments: list[memoryview] = []
        if self._fill:
            take = capacity - self._fill
            self._view[self._fill : capacity] = view[:take]
            segments.append(self._view[:capacity])
            view = view[take:]
            capacity = SEGMENT_PLAINTEXT
        # Whole segments straight from the caller's memory; the strict > keeps back the tail
        # (1..capacity bytes) as the candidate last segment.
        while len(view) > capacity:
            segments.append(view[:capacity])
            view = view[capacity:]
            capacity = SEGMENT_PLAINTEXT
        out = self._seal(segments, last=False)
        self._view[: len(view)] = view
        self._fill = len(view)
        return out

    def finalize(self) -> list[bytes]:
        """Seal the last segment; sets ``plaintext_size`` and ``sha256``."""
        self._check_usable()
        out = self._seal([self._view[: self._fill]], last=True)
        self._done = True
        self.sha256 = self._digest.hexdigest()
        self._view.release()
        self._buffer = bytearray()
        return out

    def _seal(self, segments: list[memoryview], last: bool) -> list[bytes]:
        out: list[bytes] = []
        if self._header is not None:
            out.append(self._header)
            self._header = None
        if self._index + len(segments) > _MAX_SEGMENTS:
            self._done = True
            raise ValueError(f"plaintext too large: more than {_MAX_SEGMENTS} segments")
        job = _begin_hash(self._digest, segments)
        try:
            final_position = len(segments) - 1
            for position, segment in enumerate(segments):
                nonce = _nonce(self._prefix, self._index, last and position == final_position)
                out.append(self._cipher.encrypt(nonce, segment, None))
                self._index += 1
        except BaseException:
            self._done = True
            raise
        finally:
            # The buffer is about to be overwritten, so the hash must be done with it.
            _end_hash(self._digest, segments, job)
        return out


def encrypt_iter(
    dek: bytes, associated_data: bytes, chunks: Iterable[bytes | bytearray | memoryview]
) -> Iterator[bytes]:
    """Encrypt a plaintext stream into ciphertext chunks (header first)."""
    encryptor = StreamEncryptor(dek, associated_data)
    return _encrypt_chunks(encryptor, chunks)


def _encrypt_chunks(
    encryptor: StreamEncryptor, chunks: Iterable[bytes | bytearray | memoryview]
) -> Iterator[bytes]:
    for chunk in chunks:
        yield from encryptor.update(chunk)
    yield from encryptor.finalize()


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
        view = _byte_view(chunk)
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
    rest = b""
    for chunk in chunks:
        view = _byte_view(chunk)
        need = HEADER_SIZE - len(header)
        header += view[:need]
        if len(header) == HEADER_SIZE:
            rest = bytes(view[need:])
            break
    cipher, prefix = _open_header(dek, associated_data, header)

    def body() -> Iterator[bytes | bytearray | memoryview]:
        if rest:
            yield rest
        yield from chunks

    for index, segment, at_end in _split_segments(body(), 0):
        yield _open_segment(cipher, prefix, index, segment, last=at_end)


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
