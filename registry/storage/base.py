"""The ObjectStore contract shared by every backend, its errors, and the settings factory."""

from __future__ import annotations

import contextlib
import functools
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

CHUNK_SIZE = 1 << 20
MAX_KEY_LENGTH = 1024  # S3's limit, applied to both stores so keys stay portable
# The FS store names temp files "<last segment>.<32 hex>", which must fit NAME_MAX (255).
MAX_SEGMENT_LENGTH = 200
# Reserved for the FS store's unfinished writes; refused as a key prefix on every backend so
# keys stay portable between them.
INCOMPLETE_DIR = ".incomplete"

_KEY_RE = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")


class StorageError(Exception):
    """The object store failed in a way a retry will not fix by itself."""


class StorageUnavailable(StorageError):
    """The backend is unreachable, slow, overloaded or out of space; callers answer 503."""


class ObjectNotFound(StorageError):
    """No committed object has this key."""


class ObjectExists(StorageError):
    """A write-once put (if_none_match=True) found the key already taken."""


class ObjectWriter(Protocol):
    def write(self, data: bytes | memoryview) -> None: ...

    def commit(self) -> int: ...

    def abort(self) -> None: ...


def validate_key(key: str) -> str:
    """Return key if it is a safe relative POSIX path, else raise ValueError.

    Keys are at most MAX_KEY_LENGTH characters of [A-Za-z0-9._-] in "/"-separated segments,
    with no empty, "." or ".." segment and not under the reserved INCOMPLETE_DIR prefix, so a
    key can never escape the FS store's root or collide with its temp files.
    """
    if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH or not _KEY_RE.fullmatch(key):
        raise ValueError(f"invalid object key {key!r}")
    segments = key.split("/")
    if segments[0] == INCOMPLETE_DIR:
        raise ValueError(f"object key {key!r} uses the reserved prefix {INCOMPLETE_DIR}/")
    for segment in segments:
        if segment in {".", ".."} or len(segment) > MAX_SEGMENT_LENGTH:
            raise ValueError(f"invalid object key {key!r}")
    return key


def check_range(start: int, end: int | None) -> None:
    """Raise ValueError unless [start, end) is a valid byte range (end None: to the end)."""
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"invalid byte range [{start}, {end})")


class ChunkStream(Iterator[bytes]):
    """An object's chunks. close() frees the file or HTTP connection, even if never iterated.

    A bare generator would not do: closing one that never started skips its finally block.
    """

    def __init__(self, chunks: Iterator[bytes], release: Callable[[], None]) -> None:
        self._chunks = chunks
        self._release = release
        self._closed = False

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
        finally:
            self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def empty_stream() -> ChunkStream:
    """A ChunkStream that yields nothing and holds nothing."""
    return ChunkStream(iter(()), lambda: None)


class WriterBase(ABC):
    """Shared state machine of the backends' writers: open -> committed | failed -> aborted."""

    _state = "open"

    @abstractmethod
    def write(self, data: bytes | memoryview) -> None: ...

    @abstractmethod
    def commit(self) -> int: ...

    @abstractmethod
    def abort(self) -> None: ...

    def _check_open(self) -> None:
        if self._state != "open":
            raise StorageError(f"writer is {self._state}; start a new one")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state == "committed":
            return
        if exc_type is None:
            self.abort()
            return
        # The body's exception is the one worth seeing; a failed abort is left to the janitor.
        with contextlib.suppress(StorageError):
            self.abort()


class ObjectStore(ABC):
    @abstractmethod
    def writer(self, key: str, size_hint: int | None = None) -> ObjectWriter:
        """A writer for `key`; `size_hint` (expected bytes) lets S3 size its parts."""

    @abstractmethod
    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes [start, end) of the object (end None: to its end) in chunks of ~1 MiB.

        ObjectNotFound is raised by the call itself, before the first chunk, so a view can
        still answer 404. A range past the end of the object yields nothing.
        """

    @abstractmethod
    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False) -> None: ...

    @abstractmethod
    def abort_incomplete(self, key: str) -> int:
        """Discard every unfinished write to `key`; returns how many there were."""

    @abstractmethod
    def ping(self) -> None:
        """Raise StorageUnavailable unless the backend can take writes now (readiness)."""

    @abstractmethod
    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Keys of committed objects starting with `prefix`, in lexical order."""


@functools.cache
def get_object_store() -> ObjectStore:
    """The process-wide store from settings; get_object_store.cache_clear() forgets it.

    SMR_STORAGE picks the backend: "fs" (a folder, SMR_OBJECTS_DIR) or "s3" (the S3_* settings).
    Anything else raises ImproperlyConfigured.
    """
    # Imported here: Django stays out of the store classes, and the backends import this module.
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    from registry.storage.fs import FileSystemStore
    from registry.storage.s3 import DEFAULT_PART_SIZE, S3Store

    backend = getattr(settings, "SMR_STORAGE", "fs")
    if backend == "fs":
        return FileSystemStore(Path(settings.SMR_OBJECTS_DIR))
    if backend == "s3":
        return S3Store(
            settings.S3_BUCKET,
            endpoint_url=settings.S3_ENDPOINT_URL,
            region=settings.S3_REGION,
            access_key_id=settings.S3_ACCESS_KEY_ID,
            secret_access_key=settings.S3_SECRET_ACCESS_KEY,
            part_size=getattr(settings, "S3_PART_SIZE", DEFAULT_PART_SIZE),
            max_concurrency=getattr(settings, "S3_MAX_CONCURRENCY", 4),
            checksum_algorithm=getattr(settings, "S3_CHECKSUM_ALGORITHM", "CRC32"),
        )
    raise ImproperlyConfigured(f"SMR_STORAGE must be 'fs' or 's3', got {backend!r}")
