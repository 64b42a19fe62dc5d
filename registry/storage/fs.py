"""FileSystemStore: objects as files under one folder (embedded mode, or a mounted volume)."""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import re
import stat
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from registry.fsutil import fsync_dir
from registry.storage.base import (
    CHUNK_SIZE,
    INCOMPLETE_DIR,
    ChunkStream,
    ObjectExists,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    StorageUnavailable,
    WriterBase,
    check_range,
    validate_key,
)

_FS_WRITEBACK_EVERY = 32 << 20
_FS_QUEUE_DEPTH = 8
_TEMP_SUFFIX_RE = re.compile(r"(.+)\.[0-9a-f]{32}")

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


class _FileWriter(WriterBase):
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
        self.publish(exclusive=False)
        return self._written

    def publish(self, *, exclusive: bool) -> None:
        """Make the written bytes visible under the key, durably (fsync of file and folder).

        With exclusive=False an existing object is replaced atomically (what commit() does);
        with exclusive=True the write fails with ObjectExists instead, which is how
        FileSystemStore.put_bytes(if_none_match=True) gets write-once semantics.
        """
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
            fsync_dir(self._target.parent)
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

    A write for key "a/b" goes to ".incomplete/a/b.<uuid hex>", so abort_incomplete can tell
    which key a leftover temp file belonged to.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._incomplete = self.root / INCOMPLETE_DIR

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
                    dirs[:] = [d for d in dirs if d != INCOMPLETE_DIR]
                for name in files:
                    key = name if rel == "." else f"{rel}/{name}"
                    if key.startswith(prefix):
                        keys.append(key)
        except OSError as exc:
            raise _fs_error(exc, "list", prefix) from exc
        return iter(sorted(keys))

    def read(self, key: str, start: int = 0, end: int | None = None) -> ChunkStream:
        check_range(start, end)
        path = self._path(key)
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 - ChunkStream closes it
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise _fs_error(exc, "open", key) from exc
        return ChunkStream(self._read_chunks(f, key, start, end), f.close)

    @staticmethod
    def _read_chunks(f: BinaryIO, key: str, start: int, end: int | None) -> Iterator[bytes]:
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
            w.publish(exclusive=if_none_match)
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

    def ping(self) -> None:
        # Creating a file proves the mount is there and writable, which stat() alone does not.
        probe = self._incomplete / f".ping-{uuid.uuid4().hex}"
        try:
            self._incomplete.mkdir(parents=True, exist_ok=True)
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            os.unlink(probe)
        except OSError as exc:
            raise StorageUnavailable(f"object folder {self.root} is not usable: {exc}") from exc
