"""Object store contract, run against both backends: a tmp folder and moto's S3 over HTTP."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    HTTPClientError,
)

from registry.storage import (
    CHUNK_SIZE,
    S3_MIN_PART_SIZE,
    FileSystemStore,
    ObjectExists,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    StorageError,
    StorageUnavailable,
    get_object_store,
    s3_config,
)
from registry.storage.s3 import _s3_error
from tests.conftest import REGION, s3_client
from tests.support.netproxy import TcpProxy

PART = S3_MIN_PART_SIZE  # keeps multipart tests small; S3 refuses smaller non-final parts
TEMP_NAME = re.compile(r"(.+)\.[0-9a-f]{32}")


@pytest.fixture(params=["fs", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "fs":
        return FileSystemStore(tmp_path / "objects")
    # Only S3 cases start moto.
    bucket = request.getfixturevalue("s3_bucket")
    endpoint = request.getfixturevalue("moto_endpoint")
    # max_concurrency=2 so a three-part write has to wait for the window to open.
    return S3Store(bucket, endpoint_url=endpoint, part_size=PART, max_concurrency=2)


def backend_leftovers(store: ObjectStore) -> list[str]:
    """Keys of unfinished writes as the backend itself sees them, not as the store reports them:
    S3's multipart uploads, or the temp files in the folder's .incomplete directory."""
    if isinstance(store, S3Store):
        endpoint = store._client.meta.endpoint_url
        uploads = s3_client(endpoint).list_multipart_uploads(Bucket=store.bucket)
        return sorted(u["Key"] for u in uploads.get("Uploads", []))
    assert isinstance(store, FileSystemStore)
    incomplete = store.root / ".incomplete"
    if not incomplete.exists():
        return []
    keys = []
    for path in incomplete.rglob("*"):
        if path.is_file():
            match = TEMP_NAME.fullmatch(path.relative_to(incomplete).as_posix())
            keys.append(match.group(1) if match else str(path))
    return sorted(keys)


def read_all(store: ObjectStore, key: str, start: int = 0, end: int | None = None) -> bytes:
    chunks = list(store.read(key, start, end))
    assert all(len(c) <= CHUNK_SIZE for c in chunks)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "size",
    [0, 1, 1000, 2 * PART + 12345],
    ids=["empty", "one-byte", "under-a-part", "three-parts"],
)
def test_round_trip(store: ObjectStore, size: int) -> None:
    data = os.urandom(size)
    w = store.writer("objects/ab/round-trip")
    # Uneven writes, so parts straddle write() calls.
    step = 3 * CHUNK_SIZE + 7
    for i in range(0, size, step):
        w.write(memoryview(data)[i : i + step])
    assert not store.exists("objects/ab/round-trip")  # invisible until commit
    assert w.commit() == size
    assert store.exists("objects/ab/round-trip")
    assert store.size("objects/ab/round-trip") == size
    assert read_all(store, "objects/ab/round-trip") == data
    assert backend_leftovers(store) == []


def test_write_after_commit_is_refused(store: ObjectStore) -> None:
    w = store.writer("k")
    w.write(b"x")
    w.commit()
    with pytest.raises(StorageError):
        w.write(b"y")
    w.abort()  # a no-op: the committed object stays
    assert read_all(store, "k") == b"x"


def test_ranged_reads(store: ObjectStore) -> None:
    data = os.urandom(PART + 3 * CHUNK_SIZE + 17)
    with store.writer("blob") as w:
        w.write(data)
        w.commit()
    n = len(data)
    assert read_all(store, "blob", 100) == data[100:]
    assert read_all(store, "blob", 5, 2 * CHUNK_SIZE + 9) == data[5 : 2 * CHUNK_SIZE + 9]
    assert read_all(store, "blob", n - 1) == data[-1:]
    assert read_all(store, "blob", n - 1, n) == data[-1:]
    assert read_all(store, "blob", 10, 10) == b""
    assert read_all(store, "blob", n) == b""
    assert read_all(store, "blob", n - 2, n + 100) == data[-2:]
    with pytest.raises(ValueError):
        store.read("blob", 10, 5)
    with pytest.raises(ValueError):
        store.read("blob", -1)


def test_ranged_read_of_empty_object(store: ObjectStore) -> None:
    store.put_bytes("empty", b"")
    assert read_all(store, "empty") == b""
    assert read_all(store, "empty", 0, 0) == b""
    assert read_all(store, "empty", 3) == b""


def test_read_can_be_closed_early(store: ObjectStore) -> None:
    store.put_bytes("k", os.urandom(3 * CHUNK_SIZE))
    stream = store.read("k")
    assert len(next(stream)) == CHUNK_SIZE
    stream.close()
    store.read("k").close()  # never iterated: still releases the file or connection


def test_size_exists_delete(store: ObjectStore) -> None:
    store.put_bytes("a/b/c", b"hello")
    assert store.exists("a/b/c")
    assert store.size("a/b/c") == 5
    assert not store.exists("a/b")
    store.delete("a/b/c")
    assert not store.exists("a/b/c")
    store.delete("a/b/c")  # idempotent
    store.delete("never/existed")


def test_missing_key(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        store.read("nope")
    with pytest.raises(ObjectNotFound):
        store.read("nope", 5, 5)
    with pytest.raises(ObjectNotFound):
        store.size("nope")
    assert not store.exists("nope")


def test_put_bytes_overwrites_and_if_none_match(store: ObjectStore) -> None:
    store.put_bytes("checkpoints/1", b"first")
    store.put_bytes("checkpoints/1", b"second")
    assert read_all(store, "checkpoints/1") == b"second"

    store.put_bytes("checkpoints/2", b"signed", if_none_match=True)
    with pytest.raises(ObjectExists):
        store.put_bytes("checkpoints/2", b"forged", if_none_match=True)
    assert read_all(store, "checkpoints/2") == b"signed"
    assert backend_leftovers(store) == []


@pytest.mark.parametrize("size", [10, 2 * PART + 1], ids=["buffered", "multipart"])
def test_abort_leaves_nothing(store: ObjectStore, size: int) -> None:
    w = store.writer("aborted")
    w.write(os.urandom(size))
    w.abort()
    w.abort()  # twice is fine
    with pytest.raises(StorageError):
        w.commit()
    assert not store.exists("aborted")
    assert backend_leftovers(store) == []


def test_context_manager_aborts_on_error(store: ObjectStore) -> None:
    with pytest.raises(RuntimeError), store.writer("ctx") as w:
        w.write(os.urandom(PART + 1))
        raise RuntimeError("client went away")
    assert not store.exists("ctx")
    assert backend_leftovers(store) == []


def test_abort_incomplete(store: ObjectStore) -> None:
    # More than a part, so S3 has a multipart upload to abort.
    w1 = store.writer("a/b")
    w1.write(os.urandom(PART + 1))
    w2 = store.writer("a/bc")  # shares a prefix: must survive abort_incomplete("a/b")
    w2.write(os.urandom(PART + 1))
    assert backend_leftovers(store) == ["a/b", "a/bc"]

    assert store.abort_incomplete("a/b") == 1
    assert store.abort_incomplete("a/b") == 0
    assert backend_leftovers(store) == ["a/bc"]
    with pytest.raises(StorageError):
        w1.commit()
    w1.abort()
    assert not store.exists("a/b")

    assert w2.commit() == PART + 1
    assert backend_leftovers(store) == []


@pytest.mark.parametrize(
    "key", ["", "/abs", "../up", "a/../b", "a//b", "a/./b", "a/", "sp ace", "ü", ".incomplete/x"]
)
def test_invalid_keys(store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.writer(key)
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")


def test_ping(store: ObjectStore, tmp_path: Path) -> None:
    store.ping()  # usable: no exception
    # The probe leaves nothing behind that a listing or the janitor would trip over.
    assert list(store.list_keys()) == []
    assert backend_leftovers(store) == []
    # Control: the same store fails ping once its backend is gone, so ping really checks it.
    if isinstance(store, S3Store):
        s3_client(store._client.meta.endpoint_url).delete_bucket(Bucket=store.bucket)
    else:
        (tmp_path / "objects").rename(tmp_path / "moved")
        (tmp_path / "objects").write_bytes(b"")  # a file where the folder was: not writable
    with pytest.raises(StorageUnavailable):
        store.ping()


def test_ping_fails_without_bucket(moto_endpoint: str) -> None:
    with pytest.raises(StorageUnavailable):
        S3Store("no-such-bucket-here", endpoint_url=moto_endpoint).ping()


def test_ping_fails_when_folder_unusable(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageUnavailable):
        FileSystemStore(tmp_path / "file" / "objects").ping()


def test_s3_rejects_parts_below_minimum() -> None:
    with pytest.raises(ValueError):
        S3Store("b", endpoint_url="http://127.0.0.1:9", part_size=S3_MIN_PART_SIZE - 1)


def client_error(status: int, code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "Op",
    )


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (client_error(503, "SlowDown"), StorageUnavailable),
        (client_error(500, "InternalError"), StorageUnavailable),
        (client_error(400, "RequestTimeout"), StorageUnavailable),
        (client_error(404, "NoSuchKey"), ObjectNotFound),
        (client_error(404, "404"), ObjectNotFound),
        (client_error(404, "NoSuchBucket"), StorageError),
        (client_error(403, "AccessDenied"), StorageError),
        (EndpointConnectionError(endpoint_url="http://x"), StorageUnavailable),
    ],
)
def test_s3_error_mapping(exc: Exception, expected: type[StorageError]) -> None:
    assert type(_s3_error(exc, "op", "k")) is expected


@pytest.mark.parametrize("when", ["before-part-connects", "mid-part-body"])
def test_s3_outage_mid_write(moto_endpoint: str, s3_bucket: str, when: str) -> None:
    moto = urlsplit(moto_endpoint)
    # Throttled, a 5 MiB part takes over a second to go through, so the cut lands inside it.
    rate = 4 << 20 if when == "mid-part-body" else None
    direct = s3_client(moto_endpoint)
    with TcpProxy(moto.hostname, moto.port, bytes_per_second=rate) as proxy:
        # The store's own client config, not a test-tuned one: the retry budget is the real one.
        config = s3_config(max_concurrency=2)
        client = boto3.session.Session().client(
            "s3", endpoint_url=f"http://127.0.0.1:{proxy.port}", region_name=REGION, config=config
        )
        # botocore's own hooks (not the store's code) tell the test what each attempt did.
        part_one_sent, cut_done = threading.Event(), threading.Event()
        attempts: dict[str, list[type[BaseException] | None]] = {}  # UploadPart url -> tries

        def before_send(request, **_):
            if "partNumber=1&" in request.url + "&":
                part_one_sent.set()
                if when == "before-part-connects":
                    cut_done.wait(timeout=30)  # hold part 1 until the endpoint is gone

        def needs_retry(request_dict, caught_exception=None, **_):
            url = request_dict["url"]
            attempts.setdefault(url, []).append(
                type(caught_exception) if caught_exception is not None else None
            )

        client.meta.events.register("before-send.s3.UploadPart", before_send)
        client.meta.events.register("needs-retry.s3.UploadPart", needs_retry)
        store = S3Store(s3_bucket, client=client, part_size=PART, max_concurrency=2)

        w = store.writer("big")
        w.write(os.urandom(PART + 100))  # creates the multipart upload; part 1 goes out
        assert part_one_sent.wait(timeout=30)
        if when == "mid-part-body":
            time.sleep(0.3)  # let part 1's body start flowing through the throttle
        proxy.cut()
        cut_done.set()

        with pytest.raises(StorageUnavailable):
            for _ in range(6):
                w.write(os.urandom(PART))
            w.commit()
        # The endpoint is still down, so abort may fail; the upload is left for abort_incomplete.
        with contextlib.suppress(StorageUnavailable):
            w.abort()

        proxy.restore()
        uploads = direct.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
        assert [u["Key"] for u in uploads] == ["big"]
        # Which path ran: part 1 never landed, and its first attempt failed on a connection
        # that was already open and carrying it (mid-body) or on connecting at all (before).
        parts = direct.list_parts(Bucket=s3_bucket, Key="big", UploadId=uploads[0]["UploadId"])
        assert parts.get("Parts", []) == []
        [part_one] = [url for url in attempts if "partNumber=1&" in url + "&"]
        first_error = attempts[part_one][0]
        assert first_error is not None
        if when == "mid-part-body":
            assert issubclass(first_error, HTTPClientError), first_error
        else:
            assert issubclass(first_error, EndpointConnectionError), first_error
        # No part upload hung or looped: each gave up within the client's retry budget.
        budget = client.meta.config.retries["total_max_attempts"]
        assert all(len(tries) <= budget for tries in attempts.values()), attempts
        assert store.abort_incomplete("big") == 1

    assert direct.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    with pytest.raises(ClientError):
        direct.head_object(Bucket=s3_bucket, Key="big")


def test_get_object_store_fs(settings, tmp_path: Path) -> None:
    settings.SMR_STORAGE = "fs"
    settings.SMR_OBJECTS_DIR = tmp_path / "objs"
    get_object_store.cache_clear()
    try:
        s = get_object_store()
        assert isinstance(s, FileSystemStore)
        assert s.root == tmp_path / "objs"
        assert get_object_store() is s
    finally:
        get_object_store.cache_clear()


def test_get_object_store_s3(settings, moto_endpoint: str, s3_bucket: str) -> None:
    settings.SMR_STORAGE = "s3"
    settings.S3_ENDPOINT_URL = moto_endpoint
    settings.S3_BUCKET = s3_bucket
    settings.S3_PART_SIZE = PART
    settings.S3_MAX_CONCURRENCY = 3
    get_object_store.cache_clear()
    try:
        s = get_object_store()
        assert isinstance(s, S3Store)
        assert (s.bucket, s.part_size, s.max_concurrency) == (s3_bucket, PART, 3)
        s.put_bytes("via-settings", b"ok")
        assert read_all(s, "via-settings") == b"ok"
    finally:
        get_object_store.cache_clear()


def test_fs_exclusive_put_without_hard_links(tmp_path: Path, monkeypatch) -> None:
    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    store = FileSystemStore(tmp_path)
    store.put_bytes("cp", b"signed", if_none_match=True)
    with pytest.raises(ObjectExists):
        store.put_bytes("cp", b"forged", if_none_match=True)
    assert read_all(store, "cp") == b"signed"
    assert backend_leftovers(store) == []


def test_fs_key_that_collides_with_a_file(tmp_path: Path) -> None:
    store = FileSystemStore(tmp_path)
    store.put_bytes("a", b"x")
    w = store.writer("a/b")
    w.write(b"y")
    with pytest.raises(StorageError):
        w.commit()
    w.abort()
    assert backend_leftovers(store) == []
    assert not store.exists("a/b")
    with pytest.raises(ObjectNotFound):
        store.read("a/b")


def test_s3_writer_grows_parts_for_huge_objects_within_memory_budget(moto_endpoint, s3_bucket):
    """A 1 TB object must fit S3's 10,000-part limit without buffering more than the budget."""
    store = S3Store(s3_bucket, endpoint_url=moto_endpoint, part_size=16 << 20, max_concurrency=4)
    small = store.writer("small", size_hint=100 << 20)
    huge = store.writer("huge", size_hint=1 << 40)
    try:
        assert (small._part_size, small._window) == (16 << 20, 4)
        assert huge._part_size * 9_999 >= 1 << 40
        # In-flight bytes never exceed the configured part_size * max_concurrency budget.
        assert huge._part_size * huge._window <= max(64 << 20, huge._part_size)
    finally:
        small.abort()
        huge.abort()
