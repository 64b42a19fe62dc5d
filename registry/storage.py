"""Object store for encrypted artifact objects: a local folder or any S3-compatible bucket.

Objects can be many GB, so writes stream through an ObjectWriter and reads yield ~1 MiB chunks;
nothing here holds a whole object in memory. Failures a retry may cure (endpoint down, timeouts,
5xx, throttling, a full disk) raise StorageUnavailable, which callers turn into HTTP 503; every
other backend failure is a plain StorageError.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import queue
import re
import stat
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import boto3
import urllib3.exceptions
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ChecksumError,
    ClientError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

CHUNK_SIZE = 1 << 20
DEFAULT_PART_SIZE = 16 << 20
MIN_PART_SIZE = 5 << 20  # S3 rejects smaller non-final parts
MAX_PART_SIZE = 5 << 30
MAX_PARTS = 10_000
MAX_KEY_LENGTH = 1024  # S3's limit, applied to both stores so keys stay portable
# The FS store names temp files "<last segment>.<32 hex>", which must fit NAME_MAX (255).
MAX_SEGMENT_LENGTH = 200
# How long abort() lets in-flight part uploads finish before aborting the upload under them.
ABORT_DRAIN_TIMEOUT = 10.0

_FS_WRITEBACK_EVERY = 32 << 20
_FS_QUEUE_DEPTH = 8
_INCOMPLETE_DIR = ".incomplete"
_KEY_RE = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
_TEMP_SUFFIX_RE = re.compile(r"(.+)\.[0-9a-f]{32}")


class StorageError(Exception):
    """The object store failed in a way a retry will not fix by itself."""


class StorageUnavailable(StorageError):
    """The backend is unreachable, slow, overloaded or out of space; callers answer 503."""


class ObjectNotFound(StorageError):
    pass


class ObjectExists(StorageError):
    pass


class ObjectWriter(Protocol):
    def write(self, data: bytes | memoryview) -> None: ...

    def commit(self) -> int: ...

    def abort(self) -> None: ...


def validate_key(key: str) -> str:
    """Return key if it is a safe relative POSIX path, else raise ValueError."""
    if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH or not _KEY_RE.fullmatch(key):
        raise ValueError(f"invalid object key {key!r}")
    segments = key.split("/")
    if segments[0] == _INCOMPLETE_DIR:
        raise ValueError(f"object key {key!r} uses the reserved prefix {_INCOMPLETE_DIR}/")
    for segment in segments:
        if segment in {".", ".."} or len(segment) > MAX_SEGMENT_LENGTH:
            raise ValueError(f"invalid object key {key!r}")
    return key


def _check_range(start: int, end: int | None) -> None:
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"invalid byte range [{start}, {end})")


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    # cast("B") makes len() count bytes even for memoryviews of wider item types.
    return memoryview(data).cast("B")


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


def _empty_stream() -> ChunkStream:
    return ChunkStream(iter(()), lambda: None)


class _WriterBase(ABC):
    """Shared state machine: open -> committed | failed -> aborted."""

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
    def abort_incomplete(self, key: str) -> int: ...

    @abstractmethod
    def list_incomplete(self, prefix: str = "") -> list[str]: ...

    @abstractmethod
    def ping(self) -> None: ...

    @abstractmethod
    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Keys of committed objects starting with `prefix`, in lexical order."""


# --- file system -----------------------------------------------------------------------------

# errnos that mean "the disk or mount is in trouble", not "this request is wrong".
_FS_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.EROFS,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOMEM,
        errno.EAGAIN,
        errno.EBUSY,
        errno.EINTR,
        errno.ETIMEDOUT,
        errno.ESTALE,
    }
)


def _fs_error(exc: OSError, action: str, key: str) -> StorageError:
    cls = StorageUnavailable if exc.errno in _FS_TRANSIENT_ERRNOS else StorageError
    return cls(f"{action} {key!r}: {exc}")


def _fsync_dir(path: Path) -> None:
    # Without this, a crash right after os.replace/os.link can lose the new directory entry.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileWriter(_WriterBase):
    def __init__(self, key: str, target: Path, tmp: Path) -> None:
        self._key = key
        self._target = target
        self._tmp = tmp
        self._written = 0
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise _fs_error(exc, "create temp file for", key) from exc
        # Unbuffered: callers hand over segment-sized chunks, so a buffer would only add a copy.
        self._file = os.fdopen(fd, "wb", buffering=0)
        # Disk writes run on their own thread, a few chunks behind the caller, so receiving
        # and encrypting the next chunk overlaps with the kernel writing (and throttling) the
        # last one. The queue bound keeps memory at _FS_QUEUE_DEPTH chunks.
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_FS_QUEUE_DEPTH)
        self._error: OSError | None = None
        self._discard = False
        self._thread = threading.Thread(target=self._drain, name="fs-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        fd = self._file.fileno()
        written = flushed = 0
        while (item := self._queue.get()) is not None:
            if self._error is not None or self._discard:
                continue  # keep draining so a producer blocked in put() is released
            try:
                view = memoryview(item)
                while view:
                    view = view[os.write(fd, view) :]
                written += len(item)
                if written - flushed >= _FS_WRITEBACK_EVERY:
                    # Start write-back now (async) so the fsync at commit has little left to
                    # wait for, and keep GBs of ciphertext out of the page cache.
                    os.posix_fadvise(fd, flushed, written - flushed, os.POSIX_FADV_DONTNEED)
                    flushed = written
            except OSError as exc:
                self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            self._state = "failed"
            raise _fs_error(self._error, "write", self._key) from self._error

    def _stop_thread(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def write(self, data: bytes | memoryview) -> None:
        self._check_open()
        self._raise_if_failed()
        # The thread writes later: take a private copy unless the bytes are immutable.
        item = data if isinstance(data, bytes) else bytes(data)
        self._queue.put(item)
        self._written += len(item)

    def commit(self) -> int:
        self._publish(exclusive=False)
        return self._written

    def _publish(self, *, exclusive: bool) -> None:
        self._check_open()
        self._stop_thread()
        self._raise_if_failed()
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._target.parent.mkdir(parents=True, exist_ok=True)
            if exclusive:
                self._link_exclusive()
            else:
                os.replace(self._tmp, self._target)
            _fsync_dir(self._target.parent)
        except ObjectExists:
            self._state = "failed"
            raise
        except FileNotFoundError as exc:
            self._state = "failed"
            if not self._tmp.exists():
                raise StorageError(f"write to {self._key!r} was aborted by someone else") from exc
            raise _fs_error(exc, "commit", self._key) from exc
        except OSError as exc:
            self._state = "failed"
            raise _fs_error(exc, "commit", self._key) from exc
        self._state = "committed"

    def _link_exclusive(self) -> None:
        # link() is atomic and fails if the target exists: readers never see a partial file.
        try:
            os.link(self._tmp, self._target)
        except FileExistsError:
            raise ObjectExists(self._key) from None
        except OSError as exc:
            if exc.errno not in {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP}:
                raise
            # No hard links on this file system (some FUSE/SMB mounts): O_EXCL still makes the
            # create exclusive, at the cost of readers briefly seeing a short file.
            self._copy_exclusive()
        os.unlink(self._tmp)

    def _copy_exclusive(self) -> None:
        try:
            fd = os.open(self._target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            raise ObjectExists(self._key) from None
        with os.fdopen(fd, "wb") as dst, open(self._tmp, "rb") as src:
            while chunk := src.read(CHUNK_SIZE):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())

    def abort(self) -> None:
        if self._state in {"committed", "aborted"}:
            return
        self._state = "aborted"
        self._discard = True
        self._stop_thread()
        # A failed flush here only concerns data we are discarding anyway.
        with contextlib.suppress(OSError):
            self._file.close()
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _fs_error(exc, "abort write to", self._key) from exc


class FileSystemStore(ObjectStore):
    """Objects are files under root; unfinished writes live under root/.incomplete/.

    A write for key "a/b" goes to ".incomplete/a/b.<uuid hex>", so list_incomplete and
    abort_incomplete can tell which key a leftover temp file belonged to.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._incomplete = self.root / _INCOMPLETE_DIR

    def __repr__(self) -> str:
        return f"FileSystemStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _tmp_path(self, key: str) -> Path:
        return self._incomplete / f"{validate_key(key)}.{uuid.uuid4().hex}"

    def writer(self, key: str, size_hint: int | None = None) -> _FileWriter:
        return _FileWriter(key, self._path(key), self._tmp_path(key))

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        keys = []
        try:
            for folder, dirs, files in os.walk(self.root):
                rel = Path(folder).relative_to(self.root).as_posix()
                if rel == ".":
                    dirs[:] = [d for d in dirs if d != _INCOMPLETE_DIR]
                for name in files:
                    key = name if rel == "." else f"{rel}/{name}"
                    if key.startswith(prefix):
                        keys.append(key)
        except OSError as exc:
            raise _fs_error(exc, "list", prefix) from exc
        return iter(sorted(keys))

    def read(self, key: str, start: int = 0, end: int | None = None) -> ChunkStream:
        _check_range(start, end)
        path = self._path(key)
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 - ChunkStream closes it
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise _fs_error(exc, "open", key) from exc
        return ChunkStream(self._read_chunks(f, key, start, end), f.close)

    @staticmethod
    def _read_chunks(f: Any, key: str, start: int, end: int | None) -> Iterator[bytes]:
        remaining = None if end is None else end - start
        try:
            f.seek(start)
            while remaining is None or remaining > 0:
                chunk = f.read(CHUNK_SIZE if remaining is None else min(CHUNK_SIZE, remaining))
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
        except OSError as exc:
            raise _fs_error(exc, "read", key) from exc

    def size(self, key: str) -> int:
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise _fs_error(exc, "stat", key) from exc
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFound(key)
        return st.st_size

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass
        except OSError as exc:
            raise _fs_error(exc, "delete", key) from exc

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False) -> None:
        w = self.writer(key)
        try:
            w.write(data)
            w._publish(exclusive=if_none_match)
        finally:
            w.abort()

    def abort_incomplete(self, key: str) -> int:
        validate_key(key)
        parent, _, name = key.rpartition("/")
        folder = self._incomplete / parent if parent else self._incomplete
        count = 0
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return 0
        except OSError as exc:
            raise _fs_error(exc, "list unfinished writes for", key) from exc
        for entry in entries:
            match = _TEMP_SUFFIX_RE.fullmatch(entry.name)
            if match is None or match.group(1) != name or not entry.is_file(follow_symlinks=False):
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _fs_error(exc, "abort unfinished write to", key) from exc
            count += 1
        return count

    def list_incomplete(self, prefix: str = "") -> list[str]:
        keys: set[str] = set()
        try:
            for folder, _dirs, files in os.walk(self._incomplete):
                rel = Path(folder).relative_to(self._incomplete).as_posix()
                for name in files:
                    match = _TEMP_SUFFIX_RE.fullmatch(name)
                    if match is None:
                        continue
                    key = match.group(1) if rel == "." else f"{rel}/{match.group(1)}"
                    if key.startswith(prefix):
                        keys.add(key)
        except OSError as exc:
            raise _fs_error(exc, "list unfinished writes under", prefix) from exc
        return sorted(keys)

    def ping(self) -> None:
        # Creating a file proves the mount is there and writable, which stat() alone does not.
        probe = self._incomplete / f".ping-{uuid.uuid4().hex}"
        try:
            self._incomplete.mkdir(parents=True, exist_ok=True)
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            os.unlink(probe)
        except OSError as exc:
            raise StorageUnavailable(f"object folder {self.root} is not usable: {exc}") from exc


# --- S3 --------------------------------------------------------------------------------------

_S3_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        # A concurrent conditional write won the race or is still running: retry to find out.
        "ConditionalRequestConflict",
    }
)
# HEAD responses have no body, so botocore can only report the status as the code.
_S3_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_S3_TRANSIENT_ERRORS = (
    HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
    BotoConnectionError,  # EndpointConnectionError, ConnectTimeoutError, SSLError
    IncompleteReadError,
    ChecksumError,
    FlexibleChecksumError,
)


def _client_error_info(exc: ClientError) -> tuple[int, str, str]:
    error = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return status, str(error.get("Code", "")), str(error.get("Message", ""))


def _s3_error(exc: Exception, action: str, key: str) -> StorageError:
    if isinstance(exc, ClientError):
        status, code, message = _client_error_info(exc)
        text = f"S3 {action} {key!r}: {code or status} {message}".rstrip()
        if status >= 500 or status == 429 or code in _S3_TRANSIENT_CODES:
            return StorageUnavailable(text)
        if code in _S3_NOT_FOUND_CODES:
            return ObjectNotFound(key)
        return StorageError(text)
    text = f"S3 {action} {key!r}: {exc}"
    if isinstance(exc, _S3_TRANSIENT_ERRORS):
        return StorageUnavailable(text)
    return StorageError(text)


def s3_config(
    *,
    max_concurrency: int = 4,
    connect_timeout: float = 5,
    read_timeout: float = 60,
    max_attempts: int = 3,
) -> Config:
    """The botocore Config S3Store uses; tests shorten the timeouts through it."""
    return Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        # Every part upload in flight holds a connection; leave room for reads and HEADs.
        max_pool_connections=max(10, max_concurrency + 4),
        s3={"addressing_style": "path"},
        # Default CRC32 headers trip up several S3-compatible servers. Without them botocore
        # signs the SHA-256 of each body instead, so S3 still rejects a corrupted upload.
        request_checksum_calculation="when_required",
    )


class _S3Writer(_WriterBase):
    """Buffers one part; past one part, uploads parts on a small pool, at most
    max_concurrency in flight, so memory stays under (max_concurrency + 1) * part_size."""

    def __init__(self, store: S3Store, key: str, size_hint: int | None = None) -> None:
        self._store = store
        self._key = key
        self._part_size = store.part_size
        self._window = store.max_concurrency
        if size_hint and size_hint > store.part_size * (MAX_PARTS - 1):
            # Huge objects (S3 allows 10,000 parts): grow the part size to fit, and shrink the
            # in-flight window so memory stays within the configured budget instead of
            # growing with the object.
            needed = -(-size_hint // (MAX_PARTS - 1))
            self._part_size = min(MAX_PART_SIZE, -(-needed // (1 << 20)) * (1 << 20))
            budget = store.part_size * store.max_concurrency
            self._window = max(1, min(store.max_concurrency, budget // self._part_size))
        self._buf = bytearray()
        self._written = 0
        self._upload_id: str | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: dict[Future[str], int] = {}
        self._etags: dict[int, dict[str, Any]] = {}
        self._next_part = 1

    def write(self, data: bytes | memoryview) -> None:
        self._check_open()
        view = _byte_view(data)
        size = len(view)
        try:
            self._collect(block_until=None)
            while view:
                if not self._buf and len(view) >= self._part_size:
                    # Whole parts straight from the caller's data: one copy instead of two.
                    part = bytes(view[: self._part_size])
                    view = view[self._part_size :]
                else:
                    taken = view[: self._part_size - len(self._buf)]
                    self._buf += taken
                    view = view[len(taken) :]
                    if len(self._buf) < self._part_size:
                        break
                    part, self._buf = bytes(self._buf), bytearray()
                self._send_part(part)
        except StorageError:
            self._fail()
            raise
        self._written += size

    def _send_part(self, body: bytes) -> None:
        if self._upload_id is None:
            resp = self._store._call(
                "create_multipart_upload", self._key, **self._store.checksum_params()
            )
            self._upload_id = resp["UploadId"]
            self._executor = ThreadPoolExecutor(
                max_workers=self._window, thread_name_prefix="s3-part"
            )
        if self._next_part > MAX_PARTS:
            raise StorageError(
                f"{self._key!r} needs more than {MAX_PARTS} parts of {self._part_size} bytes"
            )
        self._collect(block_until=self._window - 1)
        assert self._executor is not None
        future = self._executor.submit(
            self._store._upload_part, self._key, self._upload_id, self._next_part, body
        )
        self._inflight[future] = self._next_part
        self._next_part += 1

    def _collect(self, *, block_until: int | None) -> None:
        """Record finished parts, re-raising a worker's exception here in the caller's thread.

        With block_until=n, wait until at most n parts are still in flight.
        """
        while self._inflight:
            done = [f for f in self._inflight if f.done()]
            if not done:
                if block_until is None or len(self._inflight) <= block_until:
                    return
                done, _ = wait(self._inflight, return_when=FIRST_COMPLETED)
            for future in done:
                part_number = self._inflight.pop(future)
                self._etags[part_number] = future.result()

    def commit(self) -> int:
        self._check_open()
        try:
            if self._upload_id is None:
                self._store._call(
                    "put_object", self._key, Body=bytes(self._buf), **self._store.checksum_params()
                )
            else:
                if self._buf:
                    part, self._buf = bytes(self._buf), bytearray()
                    self._send_part(part)
                self._collect(block_until=0)
                parts = [{**self._etags[n], "PartNumber": n} for n in sorted(self._etags)]
                self._store._call(
                    "complete_multipart_upload",
                    self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except StorageError:
            self._fail()
            raise
        self._state = "committed"
        self._buf = bytearray()
        self._upload_id = None
        self._shutdown_pool()
        return self._written

    def _fail(self) -> None:
        self._state = "failed"
        for future in self._inflight:
            future.cancel()

    def _shutdown_pool(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def abort(self) -> None:
        if self._state == "committed":
            return
        self._state = "aborted"
        self._buf = bytearray()
        if self._inflight:
            for future in self._inflight:
                future.cancel()
            # A part that lands after the abort can linger as billed storage on real S3, so
            # give running uploads a moment to finish; the janitor catches any stragglers.
            wait(self._inflight, timeout=ABORT_DRAIN_TIMEOUT)
            self._inflight.clear()
        self._shutdown_pool()
        if self._upload_id is not None:
            # Kept until this succeeds, so calling abort() again retries it.
            self._store._abort_upload(self._key, self._upload_id)
            self._upload_id = None


class S3Store(ObjectStore):
    """Objects in one bucket of S3 or an S3-compatible server (MinIO, Ceph, moto, ...).

    An unfinished write is a multipart upload; abort_incomplete/list_incomplete find them with
    ListMultipartUploads. Note that with botocore's retries, put_bytes(if_none_match=True) can
    raise ObjectExists for an object that its own first, lost-response attempt created.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        max_concurrency: int = 4,
        checksum_algorithm: str | None = "CRC32",
        client: Any = None,
    ) -> None:
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError(f"part_size must be within [{MIN_PART_SIZE}, {MAX_PART_SIZE}]")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.bucket = bucket
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        # A declared part checksum lets S3 (and MinIO, moto) verify and combine parts cheaply;
        # without one, some servers re-read the whole object on CompleteMultipartUpload.
        # Empty/None for S3-compatible servers that reject the checksum headers.
        self.checksum_algorithm = checksum_algorithm or None
        if client is None:
            # A private session: boto3's default session is not safe to share across threads.
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint_url or None,
                region_name=region,
                aws_access_key_id=access_key_id or None,
                aws_secret_access_key=secret_access_key or None,
                config=s3_config(max_concurrency=max_concurrency),
            )
        self._client = client

    def __repr__(self) -> str:
        return f"S3Store({self.bucket!r}, endpoint_url={self._client.meta.endpoint_url!r})"

    def _call(self, operation: str, key: str, **params: Any) -> Any:
        try:
            if key:
                params["Key"] = key
            return getattr(self._client, operation)(Bucket=self.bucket, **params)
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(exc, operation, key) from exc

    def checksum_params(self) -> dict[str, str]:
        return {"ChecksumAlgorithm": self.checksum_algorithm} if self.checksum_algorithm else {}

    def _upload_part(
        self, key: str, upload_id: str, part_number: int, body: bytes
    ) -> dict[str, Any]:
        try:
            resp = self._client.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=part_number,
                Body=body,
                **self.checksum_params(),
            )
        except ClientError as exc:
            if _client_error_info(exc)[1] == "NoSuchUpload":
                raise StorageError(f"upload of {key!r} was aborted by someone else") from exc
            raise _s3_error(exc, "upload_part", key) from exc
        except BotoCoreError as exc:
            raise _s3_error(exc, "upload_part", key) from exc
        part = {"ETag": resp["ETag"]}
        if self.checksum_algorithm:
            name = f"Checksum{self.checksum_algorithm.upper()}"
            if resp.get(name):
                part[name] = resp[name]
        return part

    def _abort_upload(self, key: str, upload_id: str) -> bool:
        """Abort one multipart upload; False if it was already gone."""
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as exc:
            if _client_error_info(exc)[1] == "NoSuchUpload":
                return False
            raise _s3_error(exc, "abort_multipart_upload", key) from exc
        except BotoCoreError as exc:
            raise _s3_error(exc, "abort_multipart_upload", key) from exc
        return True

    def _uploads(self, prefix: str) -> Iterator[dict[str, Any]]:
        try:
            pages = self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                yield from page.get("Uploads", [])
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(exc, "list_multipart_uploads", prefix) from exc

    def writer(self, key: str, size_hint: int | None = None) -> _S3Writer:
        return _S3Writer(self, validate_key(key), size_hint)

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"]
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(exc, "list_objects_v2", prefix) from exc

    def read(self, key: str, start: int = 0, end: int | None = None) -> ChunkStream:
        validate_key(key)
        _check_range(start, end)
        if end == start:
            self.size(key)  # an empty range still reports a missing object
            return _empty_stream()
        params: dict[str, Any] = {}
        if start or end is not None:
            params["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=key, **params)
        except ClientError as exc:
            # 416: the range starts at or past the end (S3 says so even for bytes=0- on an
            # empty object). The object exists, or this would have been a 404.
            if _client_error_info(exc)[0] == 416:
                return _empty_stream()
            raise _s3_error(exc, "get_object", key) from exc
        except BotoCoreError as exc:
            raise _s3_error(exc, "get_object", key) from exc
        body = resp["Body"]
        return ChunkStream(self._body_chunks(body, key), body.close)

    @staticmethod
    def _body_chunks(body: Any, key: str) -> Iterator[bytes]:
        # botocore's retries end once the headers arrive; a stream cut later surfaces here.
        try:
            yield from body.iter_chunks(CHUNK_SIZE)
        except BotoCoreError as exc:
            raise _s3_error(exc, "read", key) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageUnavailable(f"S3 read {key!r} interrupted: {exc}") from exc

    def size(self, key: str) -> int:
        return int(self._call("head_object", validate_key(key))["ContentLength"])

    def delete(self, key: str) -> None:
        # DeleteObject already succeeds for a missing key.
        self._call("delete_object", validate_key(key))

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False) -> None:
        validate_key(key)
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": data}
        if if_none_match:
            params["IfNoneMatch"] = "*"
        try:
            self._client.put_object(**params)
        except ClientError as exc:
            if if_none_match and _client_error_info(exc)[0] == 412:
                raise ObjectExists(key) from None
            raise _s3_error(exc, "put_object", key) from exc
        except BotoCoreError as exc:
            raise _s3_error(exc, "put_object", key) from exc

    def abort_incomplete(self, key: str) -> int:
        validate_key(key)
        # The listing matches by prefix, so "a/b" would also catch uploads to "a/bc".
        ids = [u["UploadId"] for u in self._uploads(key) if u["Key"] == key]
        return sum(self._abort_upload(key, upload_id) for upload_id in ids)

    def list_incomplete(self, prefix: str = "") -> list[str]:
        return sorted({u["Key"] for u in self._uploads(prefix)})

    def ping(self) -> None:
        try:
            self._call("head_bucket", "")
        except StorageError as exc:
            # Readiness: a missing bucket or bad credentials make us just as unable to serve.
            raise StorageUnavailable(f"S3 bucket {self.bucket!r} is not usable: {exc}") from exc


@functools.cache
def get_object_store() -> ObjectStore:
    """The process-wide store from settings; get_object_store.cache_clear() forgets it."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

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
