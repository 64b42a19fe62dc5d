"""Push and pull whole models: parallel, resumable, verified end to end.

push: a file or folder becomes a draft version. Every file is hashed first (streamed), then
sent with its SHA-256 so the server refuses anything that changed on the way: files under
PUT_LIMIT in one streamed `PUT .../files/{path}` with `Content-Digest`, bigger ones through a
resumable upload session whose parts go in parallel. A state file under
$XDG_STATE_HOME/smr/pushes/ (rewritten atomically after every file and part) remembers the
version, the sessions and the hashes, so the same push run again continues where it stopped.

pull: the version's files are checked against the registry's signature (smr.verify) before a
byte is downloaded, then fetched with parallel ranged GETs into the content-addressed cache
(smr.cache); a blob gets its name only once its SHA-256 matched. Into DEST, files are
hard-linked (or copied) under temporary names and renamed into place only when every file of
the pull verified: a failed pull leaves nothing new in DEST.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from smr import cache, config
from smr.errors import SmrError, UsageError, VerificationError
from smr.http import API, RETRIES, RETRY_STATUSES, path_quote, raise_for
from smr.verify import digest_header, registry_signature, safe_relpath, write_json_atomic

if TYPE_CHECKING:
    from smr.refs import Ref
    from smr.sdk import Progress, PullResult, PushResult, Registry

# Files below this size go in one PUT; bigger ones through a resumable upload session.
PUT_LIMIT = 64 << 20
# A session's parts: about PARTS_PER_WORKER per worker, so the bytes a kill can waste (the
# parts in flight) stay under 1/PARTS_PER_WORKER of the file, within the server's limits
# (1 MiB to 5 GiB a part, 10,000 parts) and never so small that requests dominate.
PARTS_PER_WORKER = 16
PART_MIN = 16 << 20
PART_MAX = 5 << 30
# A download is split into ranges of this size, several in flight (across files too).
RANGE_SIZE = 64 << 20
# Bytes per read and write: large enough to keep per-call costs down, small enough to keep
# the client's memory flat whatever the file size.
CHUNK = 1 << 20
HASH_CHUNK = 1 << 20
# A download range records its progress (for resume) every this many bytes.
CHECKPOINT = 4 << 20
# How long a transfer waits for a response once its body is sent: a part's or a big file's
# `complete` answers only after the server re-encrypted it.
SLOW_RESPONSE = httpx.Timeout(600.0, connect=10.0)
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SKIP_DIRS = frozenset({".git"})
TMP_PREFIX = ".smr-tmp-"


class Cancelled(Exception):
    """Another worker failed or the user interrupted: stop this transfer."""


@dataclass
class _Shared:
    """What every worker of one push or pull shares: the cancel flag, byte counts and the
    progress callback (called from several threads; the CLI's bars lock)."""

    progress: Progress | None
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    bytes: int = 0
    per_file: dict[str, int] = field(default_factory=dict)

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled()

    def moved(self, event: str, path: str, n: int, total: int) -> None:
        with self.lock:
            self.bytes += n
            done = self.per_file[path] = self.per_file.get(path, 0) + n
        if self.progress is not None:
            self.progress(event, path, done, total)

    def report(self, event: str, path: str, done: int, total: int) -> None:
        with self.lock:
            self.per_file[path] = done
        if self.progress is not None:
            self.progress(event, path, done, total)


class _Group:
    """Tasks on named thread pools, which may queue more tasks (a hashed file queues its
    upload, the last part of a file its completion). join() waits for every one; the first
    failure, or Ctrl-C, cancels the rest and is raised once the running ones have stopped."""

    def __init__(self, shared: _Shared, pools: dict[str, int]) -> None:
        self.shared = shared
        self.pools = {
            name: ThreadPoolExecutor(max_workers=max(1, n), thread_name_prefix=f"smr-{name}")
            for name, n in pools.items()
        }
        self.cond = threading.Condition()
        self.pending = 0
        self.error: BaseException | None = None

    def submit(self, pool: str, task: Callable[[], None]) -> None:
        self.shared.check()
        with self.cond:
            self.pending += 1
        try:
            future = self.pools[pool].submit(task)
        except RuntimeError:  # shut down: the group is failing
            self._finished(None)
            raise Cancelled() from None
        future.add_done_callback(self._finished)

    def _finished(self, future: Future[None] | None) -> None:
        error = None if future is None or future.cancelled() else future.exception()
        with self.cond:
            self.pending -= 1
            if error is not None and not isinstance(error, Cancelled) and self.error is None:
                self.error = error
                self.shared.cancel.set()
            self.cond.notify_all()

    def _wait(self) -> None:
        with self.cond:
            while self.pending and self.error is None:
                # A timeout, so that Ctrl-C reaches the main thread while it waits.
                self.cond.wait(0.2)

    def join(self, *, drain_on_interrupt: bool = False) -> None:
        """Wait for every task. With `drain_on_interrupt`, a first Ctrl-C lets the running
        tasks finish (a part half sent would be sent again by the next run) and starts no
        new one; a second one stops them at once."""
        try:
            try:
                self._wait()
            except KeyboardInterrupt:
                if not drain_on_interrupt:
                    raise
                for pool in self.pools.values():
                    pool.shutdown(wait=False, cancel_futures=True)
                self._wait()
                raise
        except BaseException:
            self.shared.cancel.set()
            self._close()
            raise
        self._close()
        if self.error is not None:
            raise self.error

    def _close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown(wait=True, cancel_futures=True)


def _run(tasks: Sequence[Callable[[], None]], workers: int, shared: _Shared) -> None:
    """Run `tasks` on `workers` threads (see _Group)."""
    if not tasks:
        return
    group = _Group(shared, {"work": min(workers, len(tasks))})
    for task in tasks:
        group.submit("work", task)
    group.join()


def _selected(path: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatch.fnmatch(path, g) for g in include):
        return False
    return not any(fnmatch.fnmatch(path, g) for g in exclude)


def _sha256_file(path: Path, shared: _Shared | None = None) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK)  # one buffer, reused: memory stays flat
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            if shared is not None:
                shared.check()
            digest.update(view[:n])
    return digest.hexdigest()


def _retrying(call: Callable[[], Any], shared: _Shared) -> Any:
    """`call` again after a broken connection or a 429/5xx (a fresh body each time)."""
    for attempt in range(RETRIES + 1):
        shared.check()
        try:
            return call()
        except SmrError as exc:
            retry = exc.code == "connection_error" or exc.status in RETRY_STATUSES
            if not retry or attempt == RETRIES:
                raise
            time.sleep(min(2**attempt * 0.5, 10))
    raise AssertionError("unreachable")


# --- push ---------------------------------------------------------------------------------------


@dataclass
class _Local:
    rel: str
    path: Path
    size: int
    mtime_ns: int
    sha256: str = ""


def _walk(root: Path, include: Sequence[str], exclude: Sequence[str]) -> list[_Local]:
    """The files to push: `root` itself, or every regular file under it (not .git folders
    nor a pull's temporary files), as relative POSIX paths filtered by the globs."""
    if root.is_file():
        candidates = [(root.name, root)]
    elif root.is_dir():
        candidates = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            for name in sorted(names):
                full = Path(folder) / name
                if name.startswith(TMP_PREFIX) or not full.is_file():
                    continue
                candidates.append((full.relative_to(root).as_posix(), full))
    else:
        raise UsageError(f"{root} is neither a file nor a folder.")
    out = []
    for rel, full in candidates:
        if _selected(rel, include, exclude):
            stat = full.stat()
            out.append(_Local(rel, full, stat.st_size, stat.st_mtime_ns))
    return out


def part_size(size: int, workers: int) -> int:
    """The part size of a session for a file of `size` bytes pushed by `workers` threads."""
    wanted = -(-size // (PARTS_PER_WORKER * max(1, workers)))
    wanted = -(-wanted // (1 << 20)) << 20  # whole MiB
    return max(PART_MIN, min(PART_MAX, wanted))


def push_state_path(url: str, ref: Ref, path: Path) -> Path:
    key = f"{url.rstrip('/')}\n{ref}\n{path.absolute()}"
    name = hashlib.sha256(key.encode()).hexdigest()[:32]
    return config.state_dir() / "pushes" / f"{name}.json"


class _PushState:
    """The push's state file: {url, ref, path, version, files: {rel: {size, mtime_ns, sha256,
    upload, parts}}}, rewritten atomically under a lock after every change."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self.lock = threading.Lock()

    @classmethod
    def load(cls, path: Path) -> _PushState | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("version"), int):
            return None
        data.setdefault("files", {})
        return cls(path, data)

    def save(self) -> None:
        with self.lock:
            write_json_atomic(self.path, self.data)

    def update(self, change: Callable[[dict[str, Any]], None]) -> None:
        with self.lock:
            change(self.data)
            write_json_atomic(self.path, self.data)

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _file_body(
    path: Path, offset: int, length: int, shared: _Shared, rel: str, total: int
) -> Iterator[bytes]:
    """`length` bytes of `path` from `offset`, read from disk as they are sent."""
    with path.open("rb") as handle:
        handle.seek(offset)
        remaining = length
        while remaining > 0:
            shared.check()
            chunk = handle.read(min(CHUNK, remaining))
            if not chunk:
                raise SmrError(
                    f"{path} got shorter while it was being pushed; run the push again.",
                    code="file_changed",
                )
            remaining -= len(chunk)
            shared.moved("upload", rel, len(chunk), total)
            yield chunk


def _version_or_none(registry: Registry, ref: Ref, number: int) -> dict[str, Any] | None:
    try:
        body: dict[str, Any] = registry.api.json("GET", ref.version_path(number))
        return body
    except SmrError as exc:
        if exc.status == 404:
            return None
        raise


def _create_version(registry: Registry, ref: Ref, description: str) -> int:
    api = registry.api
    try:
        body = api.json("POST", f"{ref.model_path}/versions", json={"description": description})
    except SmrError as exc:
        if exc.status != 404:
            raise
        # A first push creates the model, as `hf upload` creates the repository.
        api.json("POST", f"/namespaces/{ref.namespace}/models", json={"name": ref.model})
        body = api.json("POST", f"{ref.model_path}/versions", json={"description": description})
    return int(body["number"])


def push(
    registry: Registry,
    ref: Ref,
    path: Path,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    submit: bool = False,
    tags: dict[str, str] | None = None,
    description: str = "",
    workers: int = 4,
    progress: Progress | None = None,
) -> PushResult:
    """Upload the file or folder `path` as a new draft version of `ref` (NS/MODEL), or into
    draft NS/MODEL:VERSION, then tag, describe and submit it when asked.

    Run again after an interruption, the same push (same registry, ref and path) continues
    its version: files the server holds with the same digest are skipped, and a big file's
    upload session gets only its missing parts.
    """
    from smr.sdk import PushResult

    if ref.alias is not None:
        raise UsageError("Push to NS/MODEL (a new version) or NS/MODEL:VERSION (a draft).")
    root = path.absolute()
    local = _walk(root, include, exclude)
    if not local:
        raise UsageError(f"No file to push under {path} (check --include/--exclude).")
    api = registry.api
    shared = _Shared(progress)
    state = _PushState.load(push_state_path(registry.url, ref, root))
    resumed = created = False
    if state is not None:
        existing = _version_or_none(registry, ref, state.data["version"])
        resumed = existing is not None and existing.get("state") == "draft"
        if not resumed:
            state.discard()
            state = None
    if state is None:
        if ref.version is not None:
            existing = _version_or_none(registry, ref, ref.version)
            if existing is None:
                raise SmrError(f"{ref} does not exist.", code="not_found", status=404)
            number = ref.version
        else:
            number = _create_version(registry, ref, description)
            created = True
        state = _PushState(
            push_state_path(registry.url, ref, root),
            {"url": registry.url, "ref": str(ref), "path": str(root), "version": number},
        )
        state.data["files"] = {}
        state.save()
    number = int(state.data["version"])
    vpath = ref.version_path(number)

    remote = {f["path"]: f["sha256"] for f in api.pages(f"{vpath}/files")}
    if resumed:
        # The version is this push's own: files the folder no longer has go.
        wanted = {i.rel for i in local}
        for stale in sorted(remote.keys() - wanted):
            api.request("DELETE", f"{vpath}/files/{path_quote(stale)}")

    # Each file is hashed first (streamed): its digest travels with the upload. Its upload
    # is queued as soon as it is hashed, biggest files first, so hashing, sending and the
    # server's assembling of completed sessions overlap; a `complete` (the server re-reads
    # the whole file) runs on its own threads and never holds up the parts of other files.
    group = _Group(shared, {"hash": min(workers, 2), "send": workers, "complete": workers})

    def schedule(item: _Local) -> None:
        if remote.get(item.rel) == item.sha256:
            shared.report("skip", item.rel, item.size, item.size)
        elif item.size < PUT_LIMIT:
            group.submit("send", _put_task(registry, vpath, item, shared, state))
        else:
            parts = _session_tasks(
                registry,
                vpath,
                item,
                shared,
                state,
                lambda task: group.submit("complete", task),
                workers,
            )
            for task in parts:
                group.submit("send", task)

    def hash_then_schedule(item: _Local) -> Callable[[], None]:
        def run() -> None:
            item.sha256 = _sha256_file(item.path, shared)

            def record(data: dict[str, Any]) -> None:
                entry = data["files"].setdefault(item.rel, {})
                if entry.get("sha256") != item.sha256:
                    entry.clear()  # another content: its old upload session is useless
                entry.update(size=item.size, mtime_ns=item.mtime_ns, sha256=item.sha256)

            state.update(record)
            schedule(item)

        return run

    try:
        for item in sorted(local, key=lambda i: (-i.size, i.rel)):
            # A file unchanged since an interrupted run (same size and mtime) keeps the digest
            # the state file recorded.
            known = state.data["files"].get(item.rel, {})
            if known.get("size") == item.size and known.get("mtime_ns") == item.mtime_ns:
                item.sha256 = str(known.get("sha256", ""))
            if SHA256_RE.match(item.sha256):
                schedule(item)
            else:
                group.submit("hash", hash_then_schedule(item))
    except BaseException:
        shared.cancel.set()
        with contextlib.suppress(BaseException):
            group.join()
        raise
    group.join(drain_on_interrupt=True)

    patch: dict[str, Any] = {}
    if tags:
        patch["tags"] = tags
    if description and not created:
        patch["description"] = description
    if patch:
        api.json("PATCH", vpath, json=patch)
    if submit:
        api.json("POST", f"{vpath}/submit")
    state.discard()
    files = [{"path": i.rel, "size": i.size, "sha256": i.sha256} for i in local]
    return PushResult(
        ref=ref, version=number, files=files, bytes_sent=shared.bytes, submitted=submit
    )


def _put_task(
    registry: Registry, vpath: str, item: _Local, shared: _Shared, state: _PushState
) -> Callable[[], None]:
    url = f"{vpath}/files/{path_quote(item.rel)}"
    headers = {
        "Content-Length": str(item.size),
        "Content-Digest": digest_header(item.sha256),
        "Content-Type": "application/octet-stream",
    }

    def send() -> None:
        with shared.lock:
            shared.per_file[item.rel] = 0  # a retry starts the file's bar again
        body = _file_body(item.path, 0, item.size, shared, item.rel, item.size)
        registry.api.request(
            "PUT", url, content=body if item.size else b"", headers=headers, timeout=SLOW_RESPONSE
        )

    def run() -> None:
        with _changed_guard(item, state):
            _retrying(send, shared)
        state.update(lambda data: data["files"][item.rel].update(done=True))
        shared.report("done", item.rel, item.size, item.size)

    return run


@contextlib.contextmanager
def _changed_guard(item: _Local, state: _PushState) -> Iterator[None]:
    """The server found other bytes than the digest we sent (the file changed after it was
    hashed): forget its digest, so the next run hashes it again."""
    try:
        yield
    except SmrError as exc:
        if exc.code != "digest_mismatch":
            raise
        state.update(lambda data: data["files"].pop(item.rel, None))
        raise SmrError(
            f"{item.path} changed while it was being pushed; run the push again.",
            code="file_changed",
        ) from exc


def _open_session(
    registry: Registry, vpath: str, item: _Local, state: _PushState, workers: int
) -> dict:
    """The file's upload session: the one the state file names if it is still open for the
    same content, else a new one (recorded before any part is sent)."""
    api = registry.api
    entry = state.data["files"].get(item.rel, {})
    upload_id = entry.get("upload")
    if upload_id:
        try:
            session: dict[str, Any] = api.json("GET", f"{vpath}/uploads/{upload_id}")
            if (
                session.get("state") == "open"
                and session.get("size") == item.size
                and session.get("sha256") in ("", item.sha256)
            ):
                return session
        except SmrError as exc:
            if exc.status != 404:
                raise
    session = api.json(
        "POST",
        f"{vpath}/uploads",
        json={
            "path": item.rel,
            "size": item.size,
            "sha256": item.sha256,
            "part_size": part_size(item.size, workers),
        },
    )
    state.update(
        lambda data: data["files"][item.rel].update(
            upload=session["id"], part_size=session["part_size"], parts=[]
        )
    )
    return session


def _session_tasks(
    registry: Registry,
    vpath: str,
    item: _Local,
    shared: _Shared,
    state: _PushState,
    finish: Callable[[Callable[[], None]], None],
    workers: int,
) -> list[Callable[[], None]]:
    """One task per missing part; the task that stores the last part has `finish` queue
    the session's completion."""
    api = registry.api
    session = _open_session(registry, vpath, item, state, workers)
    upload = f"{vpath}/uploads/{session['id']}"
    size_of_part = int(session["part_size"])
    missing = sorted(int(n) for n in session["missing_parts"])
    done_bytes = item.size - sum(
        min(size_of_part, item.size - (n - 1) * size_of_part) for n in missing
    )
    shared.report("upload", item.rel, done_bytes, item.size)
    remaining = {"parts": len(missing)}
    lock = threading.Lock()

    def complete() -> None:
        try:
            with _changed_guard(item, state):
                api.request("POST", f"{upload}/complete", timeout=SLOW_RESPONSE)
        except SmrError as exc:
            # A retried complete whose first attempt won answers 409: the session says so.
            if exc.status != 409 or api.json("GET", upload).get("state") != "completed":
                raise
        state.update(lambda data: data["files"][item.rel].update(done=True))
        shared.report("done", item.rel, item.size, item.size)

    def part_task(number: int) -> Callable[[], None]:
        offset = (number - 1) * size_of_part
        length = min(size_of_part, item.size - offset)

        def send() -> None:
            body = _file_body(item.path, offset, length, shared, item.rel, item.size)
            registry.api.request(
                "PUT",
                f"{upload}/parts/{number}",
                content=body,
                headers={"Content-Length": str(length), "Content-Type": "application/octet-stream"},
                timeout=SLOW_RESPONSE,
            )

        def run() -> None:
            _retrying(send, shared)

            def record(data: dict[str, Any]) -> None:
                entry = data["files"][item.rel]
                entry["parts"] = sorted({*entry.get("parts", []), number})

            state.update(record)
            with lock:
                remaining["parts"] -= 1
                last = remaining["parts"] == 0
            if last:
                finish(complete)

        return run

    if not missing:
        finish(complete)
        return []
    return [part_task(n) for n in missing]


# --- pull ---------------------------------------------------------------------------------------


def _resolve(registry: Registry, ref: Ref) -> dict[str, Any]:
    """The version detail JSON `ref` names: its number, its alias, or (neither) the newest
    approved version. Everything after this uses the number, so an alias that moves during
    the pull cannot mix two versions."""
    api = registry.api
    if ref.selector is not None:
        body: dict[str, Any] = api.json("GET", ref.version_path())
        return body
    page = api.json("GET", f"{ref.model_path}/versions", params={"state": "approved", "limit": 1})
    results = page.get("results") or []
    if not results:
        raise SmrError(
            f"{ref} has no approved version; name one with :VERSION or @ALIAS.",
            code="not_found",
            status=404,
        )
    latest: dict[str, Any] = api.json("GET", ref.version_path(int(results[0]["number"])))
    return latest


class _Blob:
    """One content to download into the cache: ranges written in place into `<hex>.partial`
    (pre-sized), their progress in `<hex>.partial.json`; hashed in order as ranges finish;
    renamed to `<hex>` only if the SHA-256 matches."""

    def __init__(self, sha256: str, size: int, rel: str, url: str) -> None:
        self.sha256 = sha256
        self.size = size
        self.rel = rel
        self.url = url
        self.final = cache.blob_path(sha256)
        self.partial = self.final.with_name(sha256 + cache.PARTIAL)
        self.sidecar = self.final.with_name(sha256 + cache.PARTIAL + ".json")
        self.lock = threading.Lock()
        self.hash_lock = threading.Lock()
        self.hasher = hashlib.sha256()
        self.hashed = 0
        self.finished: dict[int, int] = {}  # start -> end of ranges fully written
        self.progress: dict[int, int] = {}  # start -> bytes written from start
        self.ranges = [
            (start, min(start + RANGE_SIZE, size)) for start in range(0, size, RANGE_SIZE)
        ]

    def prepare(self) -> int:
        """Open (or resume) the partial file; the bytes already there."""
        self.final.parent.mkdir(parents=True, exist_ok=True)
        recorded: dict[str, int] = {}
        if self.partial.exists() and self.sidecar.exists():
            try:
                side = json.loads(self.sidecar.read_text())
                if side.get("size") == self.size and side.get("sha256") == self.sha256:
                    recorded = {str(k): int(v) for k, v in side.get("ranges", {}).items()}
            except (OSError, ValueError):
                recorded = {}
            if self.partial.stat().st_size != self.size:
                recorded = {}
        if not recorded:
            with self.partial.open("wb") as handle:
                handle.truncate(self.size)
        for start, end in self.ranges:
            done = max(0, min(recorded.get(str(start), 0), end - start))
            self.progress[start] = done
            if done == end - start:
                self.finished[start] = end
        self.checkpoint()
        return sum(self.progress.values())

    def checkpoint(self) -> None:
        with self.lock:
            ranges = {str(k): v for k, v in self.progress.items()}
            write_json_atomic(
                self.sidecar, {"sha256": self.sha256, "size": self.size, "ranges": ranges}
            )

    def advance_hash(self) -> None:
        """Hash the finished ranges that continue the hashed prefix (one thread at a time;
        a range finishing meanwhile is picked up by the check after the release)."""
        while True:
            if not self.hash_lock.acquire(blocking=False):
                return
            try:
                buffer = bytearray(HASH_CHUNK)
                view = memoryview(buffer)
                with self.partial.open("rb", buffering=0) as handle:
                    while (end := self.finished.get(self.hashed)) is not None:
                        handle.seek(self.hashed)
                        left = end - self.hashed
                        while left > 0:
                            n = handle.readinto(view[: min(HASH_CHUNK, left)])
                            if not n:
                                raise SmrError(f"{self.partial} was truncated.", code="cache")
                            self.hasher.update(view[:n])
                            left -= n
                        self.hashed = end
            finally:
                self.hash_lock.release()
            if self.finished.get(self.hashed) is None:
                return

    def commit(self) -> None:
        """Rename the partial file into the cache if its SHA-256 matches, else delete it."""
        self.advance_hash()
        actual = self.hasher.hexdigest() if self.hashed == self.size else None
        if actual != self.sha256:
            self.discard()
            raise VerificationError(
                f"{self.rel}: the downloaded bytes do not match the signed SHA-256 "
                f"(expected {self.sha256}, got {actual}); nothing was written.",
                code="digest_mismatch",
                path=self.rel,
                expected=self.sha256,
                actual=actual,
            )
        os.replace(self.partial, self.final)
        cache.blob_verified(self.sha256)
        with contextlib.suppress(FileNotFoundError):
            self.sidecar.unlink()

    def discard(self) -> None:
        for p in (self.partial, self.sidecar):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _range_task(
    registry: Registry, blob: _Blob, start: int, end: int, shared: _Shared
) -> Callable[[], None]:
    client = registry.api.client

    def fetch(position: int) -> int:
        """Stream [position, end) into the partial file; the position reached."""
        headers = {"Range": f"bytes={position}-{end - 1}", "If-Range": f'"{blob.sha256}"'}
        with (
            client.stream("GET", blob.url, headers=headers, timeout=SLOW_RESPONSE) as response,
            blob.partial.open("r+b") as handle,
        ):
            if response.status_code != 206:
                response.read()
                raise_for(response)
                raise SmrError(
                    f"{blob.rel} changed on the registry during the pull (HTTP "
                    f"{response.status_code} to a ranged request); pull again.",
                    code="file_changed",
                )
            expected = f"bytes {position}-{end - 1}/{blob.size}"
            if response.headers.get("Content-Range") != expected:
                raise VerificationError(
                    f"{blob.rel}: the registry answered range "
                    f"{response.headers.get('Content-Range')!r}, not {expected!r}.",
                    code="bad_range",
                )
            handle.seek(position)
            since = 0
            try:
                for chunk in response.iter_bytes(CHUNK):
                    shared.check()
                    if position + len(chunk) > end:
                        raise VerificationError(
                            f"{blob.rel}: the registry sent more bytes than the range holds.",
                            code="bad_range",
                        )
                    handle.write(chunk)
                    position += len(chunk)
                    since += len(chunk)
                    shared.moved("download", blob.rel, len(chunk), blob.size)
                    with blob.lock:
                        blob.progress[start] = position - start
                    if since >= CHECKPOINT:
                        # Data before metadata: the recorded offset never runs ahead.
                        handle.flush()
                        blob.checkpoint()
                        since = 0
            finally:
                # Stopped (Ctrl-C, a broken connection) or done: what arrived is kept.
                handle.flush()
                blob.checkpoint()
        return position

    def run() -> None:
        position = start + blob.progress[start]
        for attempt in range(RETRIES + 1):
            shared.check()
            try:
                position = fetch(position)
            except httpx.TransportError as exc:
                with blob.lock:
                    position = start + blob.progress[start]
                if attempt == RETRIES:
                    raise SmrError(
                        f"Cannot download {blob.rel} from {registry.url}: {exc}",
                        code="connection_error",
                    ) from exc
                time.sleep(min(2**attempt * 0.5, 10))
                continue
            except SmrError as exc:
                if exc.status not in RETRY_STATUSES or attempt == RETRIES:
                    raise
                time.sleep(min(2**attempt * 0.5, 10))
                continue
            if position == end:
                break
            # A body shorter than the range (the connection closed early): ask for the rest.
        if position != end:
            raise SmrError(f"{blob.rel}: the download stopped short.", code="incomplete_body")
        with blob.lock:
            blob.finished[start] = end
        blob.checkpoint()
        blob.advance_hash()

    return run


def _check_files(files: Sequence[dict[str, Any]]) -> None:
    for f in files:
        safe_relpath(str(f.get("path", "")))
        if not SHA256_RE.match(str(f.get("sha256", ""))):
            raise VerificationError(f"{f.get('path')}: the registry lists no valid SHA-256.")
        if not isinstance(f.get("size"), int) or f["size"] < 0:
            raise VerificationError(f"{f.get('path')}: the registry lists no valid size.")


def pull(
    registry: Registry,
    ref: Ref,
    dest: Path | None,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    trusted_key: Path | None = None,
    workers: int = 4,
    progress: Progress | None = None,
) -> PullResult:
    """Download a version, verified: the registry's signature first (approved versions;
    drafts and versions pending review carry none and are checked against their recorded
    digests only: `signature` is None), then every file's SHA-256 against the signed
    manifest. Returns the cache's snapshot folder, or DEST with the files linked (or copied)
    into it.
    Raises VerificationError (exit 3) with nothing new in DEST if anything does not match.
    """
    from smr.sdk import PullResult

    version = _resolve(registry, ref)
    number = int(version["number"])
    files: list[dict[str, Any]] = list(version.get("files") or [])
    _check_files(files)
    # Before any byte: the signature over every file of the version.
    check = registry_signature(registry, ref, version, trusted_key)
    selected = [f for f in files if _selected(f["path"], include, exclude)]
    if not selected and (include or exclude):
        raise UsageError(f"No file of {ref} matches --include/--exclude.")
    vpath = ref.version_path(number)
    shared = _Shared(progress)

    # A cached blob is used as it is while it is unchanged since it was verified (its size,
    # mtime and inode); else it is hashed again, and downloaded again if it no longer matches.
    wanted: dict[str, dict[str, Any]] = {}
    for f in selected:
        wanted.setdefault(f["sha256"], f)
    cached = {sha for sha, f in wanted.items() if cache.blob_exists(sha, f["size"])}
    stale = sorted(sha for sha in cached if not cache.blob_trusted(sha, wanted[sha]["size"]))
    if stale:
        results: dict[str, bool] = {}

        def recheck(sha: str) -> Callable[[], None]:
            def run() -> None:
                results[sha] = _sha256_file(cache.blob_path(sha), shared) == sha

            return run

        _run([recheck(sha) for sha in stale], workers, shared)
        for sha, good in results.items():
            if good:
                cache.blob_verified(sha)
            else:
                cache.blob_remove(sha)
                cached.discard(sha)
    blobs = [
        _Blob(sha, f["size"], f["path"], f"{API}{vpath}/files/{path_quote(f['path'])}")
        for sha, f in wanted.items()
        if sha not in cached
    ]
    for f in selected:
        if f["sha256"] in cached:
            shared.report("cached", f["path"], f["size"], f["size"])
    tasks: list[Callable[[], None]] = []
    for blob in blobs:
        already = blob.prepare()
        shared.report("download", blob.rel, already, blob.size)
        tasks.extend(
            _range_task(registry, blob, s, e, shared)
            for s, e in blob.ranges
            if blob.progress[s] < e - s
        )
    _run(tasks, workers, shared)
    for blob in blobs:
        blob.commit()
        shared.report("verified", blob.rel, blob.size, blob.size)

    snapshot = cache.snapshot_path(ref.namespace, ref.model, number)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in selected:
        cache.link_into_snapshot(snapshot, f["path"], f["sha256"])
    target = snapshot
    if dest is not None:
        _place(dest, selected)
        target = dest
    return PullResult(
        ref=ref,
        version=number,
        path=target,
        files=[{"path": f["path"], "size": f["size"], "sha256": f["sha256"]} for f in selected],
        bytes_received=shared.bytes,
        signature=check.as_dict() if check is not None else None,
    )


def _place(dest: Path, files: Sequence[dict[str, Any]]) -> None:
    """Put verified blobs into DEST: all under temporary names first, then each renamed into
    place, so a failure leaves no new file in DEST. A hard link where DEST shares the cache's
    file system (no second copy of the bytes; an edit in DEST changes the blob's stamp, so
    the cache checks it again before using it), else a copy."""
    staged: list[tuple[Path, Path]] = []
    try:
        for f in files:
            blob = cache.blob_path(f["sha256"])
            final = dest / safe_relpath(f["path"])
            final.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                if os.path.samefile(final, blob):
                    continue  # pulled here before: it is this very blob already
            tmp = final.parent / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{final.name}"
            staged.append((tmp, final))
            try:
                os.link(blob, tmp)
            except OSError:
                shutil.copyfile(blob, tmp)
            if tmp.stat().st_size != f["size"]:
                raise VerificationError(f"{f['path']}: the cached copy has the wrong size.")
        for tmp, final in staged:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
