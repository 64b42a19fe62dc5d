"""S3Store: objects in one bucket of S3 or any S3-compatible server, over HTTP with boto3."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

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

from registry.crypto.stream import byte_view
from registry.storage.base import (
    CHUNK_SIZE,
    ChunkStream,
    ObjectExists,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    StorageUnavailable,
    WriterBase,
    check_range,
    empty_stream,
    validate_key,
)

DEFAULT_PART_SIZE = 16 << 20
S3_MIN_PART_SIZE = 5 << 20  # S3 rejects smaller non-final parts
S3_MAX_PART_SIZE = 5 << 30
S3_MAX_PARTS = 10_000
# How long abort() lets in-flight part uploads finish before aborting the upload under them.
ABORT_DRAIN_TIMEOUT = 10.0

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


class _S3Writer(WriterBase):
    """Buffers one part; past one part, uploads parts on a small pool, at most
    max_concurrency in flight, so memory stays under (max_concurrency + 1) * part_size."""

    def __init__(self, store: S3Store, key: str, size_hint: int | None = None) -> None:
        self._store = store
        self._key = key
        self._part_size = store.part_size
        self._window = store.max_concurrency
        if size_hint and size_hint > store.part_size * (S3_MAX_PARTS - 1):
            # Huge objects (S3 allows 10,000 parts): grow the part size to fit, and shrink the
            # in-flight window so memory stays within the configured budget instead of
            # growing with the object.
            needed = -(-size_hint // (S3_MAX_PARTS - 1))
            self._part_size = min(S3_MAX_PART_SIZE, -(-needed // (1 << 20)) * (1 << 20))
            budget = store.part_size * store.max_concurrency
            self._window = max(1, min(store.max_concurrency, budget // self._part_size))
        self._buf = bytearray()
        self._written = 0
        self._upload_id: str | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: dict[Future[dict[str, Any]], int] = {}
        self._etags: dict[int, dict[str, Any]] = {}
        self._next_part = 1

    def write(self, data: bytes | memoryview) -> None:
        self._check_open()
        view = byte_view(data)
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
            resp = self._store.call(
                "create_multipart_upload", self._key, **self._store.checksum_params()
            )
            self._upload_id = resp["UploadId"]
            self._executor = ThreadPoolExecutor(
                max_workers=self._window, thread_name_prefix="s3-part"
            )
        if self._next_part > S3_MAX_PARTS:
            raise StorageError(
                f"{self._key!r} needs more than {S3_MAX_PARTS} parts of {self._part_size} bytes"
            )
        self._collect(block_until=self._window - 1)
        assert self._executor is not None
        future = self._executor.submit(
            self._store.upload_part, self._key, self._upload_id, self._next_part, body
        )
        self._inflight[future] = self._next_part
        self._next_part += 1

    def _collect(self, *, block_until: int | None) -> None:
        """Record finished parts, re-raising a worker's exception here in the caller's thread.

        With block_until=n, wait until at most n parts are still in flight.
        """
        while self._inflight:
            done: set[Future[dict[str, Any]]] = {f for f in self._inflight if f.done()}
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
                self._store.call(
                    "put_object", self._key, Body=bytes(self._buf), **self._store.checksum_params()
                )
            else:
                if self._buf:
                    part, self._buf = bytes(self._buf), bytearray()
                    self._send_part(part)
                self._collect(block_until=0)
                parts = [{**self._etags[n], "PartNumber": n} for n in sorted(self._etags)]
                self._store.call(
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
            self._store.abort_upload(self._key, self._upload_id)
            self._upload_id = None


class S3Store(ObjectStore):
    """Objects in one bucket of S3 or an S3-compatible server (MinIO, Ceph, moto, ...).

    An unfinished write is a multipart upload; abort_incomplete finds them with
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
        if not S3_MIN_PART_SIZE <= part_size <= S3_MAX_PART_SIZE:
            raise ValueError(f"part_size must be within [{S3_MIN_PART_SIZE}, {S3_MAX_PART_SIZE}]")
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

    def call(self, operation: str, key: str, **params: Any) -> Any:
        """Run one boto3 client operation on this bucket (and `key`, unless empty).

        botocore errors come back as this module's StorageError family (StorageUnavailable,
        ObjectNotFound, ...), so writers and callers never handle boto exceptions themselves.
        """
        try:
            if key:
                params["Key"] = key
            return getattr(self._client, operation)(Bucket=self.bucket, **params)
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(exc, operation, key) from exc

    def checksum_params(self) -> dict[str, str]:
        """Extra request parameters that declare the configured part checksum (or none)."""
        return {"ChecksumAlgorithm": self.checksum_algorithm} if self.checksum_algorithm else {}

    def upload_part(
        self, key: str, upload_id: str, part_number: int, body: bytes
    ) -> dict[str, Any]:
        """Upload one part of a multipart upload; returns its entry for CompleteMultipartUpload.

        The entry holds the ETag and, when a checksum algorithm is configured, the part's
        checksum. A NoSuchUpload answer (someone aborted the upload) is a plain StorageError.
        """
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

    def abort_upload(self, key: str, upload_id: str) -> bool:
        """Abort one multipart upload; False if it was already gone.

        Storage failures raise, so a writer keeps the upload id and can retry its abort().
        """
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
        check_range(start, end)
        if end == start:
            self.size(key)  # an empty range still reports a missing object
            return empty_stream()
        params: dict[str, Any] = {}
        if start or end is not None:
            params["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=key, **params)
        except ClientError as exc:
            # 416: the range starts at or past the end (S3 says so even for bytes=0- on an
            # empty object). The object exists, or this would have been a 404.
            if _client_error_info(exc)[0] == 416:
                return empty_stream()
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
        return int(self.call("head_object", validate_key(key))["ContentLength"])

    def delete(self, key: str) -> None:
        # DeleteObject already succeeds for a missing key.
        self.call("delete_object", validate_key(key))

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
        return sum(self.abort_upload(key, upload_id) for upload_id in ids)

    def ping(self) -> None:
        try:
            self.call("head_bucket", "")
        except StorageError as exc:
            # Readiness: a missing bucket or bad credentials make us just as unable to serve.
            raise StorageUnavailable(f"S3 bucket {self.bucket!r} is not usable: {exc}") from exc
