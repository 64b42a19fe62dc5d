"""Artifact bytes: streamed, envelope-encrypted uploads and authenticated, ranged downloads.

Order of work for an upload (no network call inside a DB transaction):
1. wrap a fresh DEK with the KeyProvider (KMS call),
2. record the object key as pending (committed on its own),
3. stream body -> STREAM encryption + SHA-256 (one pass) -> object store,
4. in one short transaction: re-check the version is a draft, insert the Artifact row,
   drop the pending record.
Any failure aborts the write and deletes what reached the store; if the store is down even for
that, the pending record stays and the janitor finishes the cleanup later.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Iterator

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import QuerySet

from registry import storage
from registry.crypto import keys, stream
from registry.errors import (
    DigestMismatch,
    IncompleteBody,
    IntegrityFailure,
    InvalidInput,
    NotFound,
    StorageUnavailable,
    TooLarge,
    VersionNotDraft,
    VersionRevoked,
)
from registry.keyconfig import get_key_provider, provider_for
from registry.models import (
    Artifact,
    AuditAction,
    AuditOutcome,
    ModelVersion,
    PendingObject,
    VersionState,
)
from registry.paths import validate_artifact_path
from registry.services import audit, signatures
from registry.services.envelope import (
    EncryptedWrite,
    encrypt_to_store,
    key_provider_call,
    wrapped_key_rewrap,
)
from registry.services.pending import pending_begin, pending_discard

logger = logging.getLogger(__name__)


def artifact_object_key(artifact_id: uuid.UUID) -> str:
    """The object-store key of an artifact's ciphertext.

    Names never reach the store: keys are opaque ids, so a bucket listing leaks nothing.
    """
    return f"artifacts/{artifact_id}"


def associated_data(artifact_id: uuid.UUID) -> bytes:
    """Bind a ciphertext to one artifact: swapping two objects fails authentication."""
    return f"smr:artifact:v1:{artifact_id}".encode()


def encryption_context(version: ModelVersion, path: str, artifact_id: uuid.UUID) -> dict[str, str]:
    """The KMS encryption context of an artifact's data key (names what the key protects)."""
    model = version.model
    return {
        "smr:namespace": model.namespace.name,
        "smr:model": model.name,
        "smr:version": str(version.number),
        "smr:path": path,
        "smr:artifact": str(artifact_id),
    }


def file_target(version: ModelVersion, path: str) -> str:
    """How the audit log names a file: namespace/model/vN/path."""
    return audit.audit_target(
        version.model.namespace.name, version.model.name, version.number, path
    )


def artifact_context(artifact: Artifact) -> dict[str, str]:
    """The KMS encryption context of a stored artifact's data key."""
    return encryption_context(artifact.version, artifact.path, artifact.id)


def version_ensure_draft(version: ModelVersion) -> None:
    """Raise VersionNotDraft (409) unless the version's files may still change."""
    if version.state != VersionState.DRAFT:
        raise VersionNotDraft(
            f"Version {version.number} is {version.state}; its files are immutable. "
            "Create a new version to change files.",
            state=version.state,
        )


def artifact_size_check(size: int) -> None:
    """Raise TooLarge (413) for a file over the registry's per-file limit."""
    if size < 0:
        raise InvalidInput("size must be >= 0")
    if size > settings.SMR_MAX_ARTIFACT_SIZE:
        raise TooLarge(
            f"The file is {size} bytes; this registry accepts at most "
            f"{settings.SMR_MAX_ARTIFACT_SIZE} bytes per file.",
            limit=settings.SMR_MAX_ARTIFACT_SIZE,
        )


def artifact_upload(
    *,
    version: ModelVersion,
    path: str,
    chunks: Iterable[bytes],
    expected_sha256: str | None,
    expected_size: int | None,
    creator: User | None,
    on_register: Callable[[Artifact], None] | None = None,
) -> Artifact:
    """Encrypt a plaintext stream as a new file of a draft version and register it.

    The path is validated and normalised (NFC), the draft state and the declared size are
    checked before any byte is read. Replaces an existing file at the same path (drafts only).
    Raises DigestMismatch, IncompleteBody, or the store's/KMS's unavailability, with nothing
    registered and nothing left in the store.
    """
    path = validate_artifact_path(path)
    version_ensure_draft(version)
    if expected_size is not None:
        artifact_size_check(expected_size)
    store = storage.get_object_store()
    artifact_id = uuid.uuid4()
    key = artifact_object_key(artifact_id)
    dek, wrapped = key_provider_call(
        get_key_provider().generate_data_key, encryption_context(version, path, artifact_id)
    )
    pending_begin(key=key)
    try:
        written = encrypt_to_store(
            store=store,
            key=key,
            dek=dek,
            ad=associated_data(artifact_id),
            chunks=chunks,
            size_hint=expected_size,
        )
        if expected_size is not None and written.size != expected_size:
            raise IncompleteBody(received=written.size, expected=expected_size)
        if expected_sha256 is not None and written.sha256 != expected_sha256:
            raise DigestMismatch(expected=expected_sha256, actual=written.sha256)
        artifact, replaced = _register(
            version=version,
            artifact_id=artifact_id,
            path=path,
            written=written,
            key=key,
            wrapped=wrapped,
            creator=creator,
            on_register=on_register,
        )
    except BaseException:
        pending_discard(store, key)
        raise
    if replaced:
        pending_discard(store, replaced)
    return artifact


def _register(
    *,
    version: ModelVersion,
    artifact_id: uuid.UUID,
    path: str,
    written: EncryptedWrite,
    key: str,
    wrapped: keys.WrappedKey,
    creator: User | None,
    on_register: Callable[[Artifact], None] | None,
) -> tuple[Artifact, str | None]:
    with transaction.atomic():
        # The row lock orders us against version_submit: a file lands before submit or not at all.
        locked = ModelVersion.objects.select_for_update().filter(pk=version.pk).first()
        if locked is None:
            raise NotFound("The version was deleted while the file was uploading.")
        version_ensure_draft(locked)
        old = Artifact.objects.filter(version=locked, path=path).first()
        replaced = None
        if old is not None:
            replaced = old.object_key
            PendingObject.objects.get_or_create(object_key=replaced, defaults={"reason": "replace"})
            old.delete()
        artifact = Artifact.objects.create(
            id=artifact_id,
            version=locked,
            path=path,
            size=written.size,
            sha256=written.sha256,
            object_key=key,
            wrapped_dek=wrapped.blob,
            kek_id=wrapped.kek_id,
            created_by=creator,
        )
        PendingObject.objects.filter(object_key=key).delete()
        if on_register is not None:
            on_register(artifact)
        audit.audit_record(
            action=AuditAction.ARTIFACT_UPLOAD,
            namespace=version.model.namespace.name,
            target=file_target(version, path),
            target_sha256=written.sha256,
            details={
                "path": path,
                "size": written.size,
                "replaced": replaced is not None,
                "key_op": "wrap",
                "kek_id": wrapped.kek_id,
            },
        )
    artifact.version = version
    return artifact, replaced


def artifact_delete(*, artifact: Artifact) -> None:
    """Remove a file from a draft version (its object is deleted after the row)."""
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=artifact.version_id)
        version_ensure_draft(locked)
        PendingObject.objects.get_or_create(
            object_key=artifact.object_key, defaults={"reason": "delete"}
        )
        Artifact.objects.filter(pk=artifact.pk).delete()
        audit.audit_record(
            action=AuditAction.ARTIFACT_DELETE,
            namespace=artifact.version.model.namespace.name,
            target=file_target(artifact.version, artifact.path),
            target_sha256=artifact.sha256,
        )
    pending_discard(storage.get_object_store(), artifact.object_key)


def artifact_unwrap_dek(artifact: Artifact) -> bytes:
    """The artifact's plaintext data key (never logged, returned or stored).

    A shredded artifact (its version was revoked) has no data key any more: VersionRevoked.
    """
    if artifact_is_shredded(artifact):
        raise VersionRevoked()
    wrapped = keys.WrappedKey(kek_id=artifact.kek_id, blob=bytes(artifact.wrapped_dek))
    provider = key_provider_call(provider_for, artifact.kek_id)
    return key_provider_call(provider.unwrap, wrapped, artifact_context(artifact))


def artifact_open(
    *, artifact: Artifact, start: int = 0, end: int | None = None, ranged: bool = False
) -> DownloadStream:
    """Authenticated plaintext of bytes [start, end) of an artifact, streamed segment by segment.

    The download is audited (who, with which token, which digest and range) before any byte
    leaves. Nothing from a segment that fails authentication is ever yielded: the iterator
    raises IntegrityFailure instead, and the failure is audited with its details.
    """
    end = artifact.size if end is None else end
    namespace = artifact.version.model.namespace.name
    target = file_target(artifact.version, artifact.path)
    # An approved version is served only while its registry signature matches its digests.
    signatures.signature_check(version=artifact.version)
    try:
        dek = artifact_unwrap_dek(artifact)
    except IntegrityFailure:
        audit.audit_record_now(
            action=AuditAction.ARTIFACT_INTEGRITY_FAILURE,
            outcome=AuditOutcome.FAILURE,
            namespace=namespace,
            target=target,
            target_sha256=artifact.sha256,
            details={"reason": "the data key could not be unwrapped", "kek_id": artifact.kek_id},
        )
        raise
    with transaction.atomic():
        event = audit.audit_record(
            action=AuditAction.ARTIFACT_DOWNLOAD,
            namespace=namespace,
            target=target,
            target_sha256=artifact.sha256,
            details={
                "range": [start, end - 1] if ranged else None,
                "bytes": end - start,
                "key_op": "unwrap",
                "kek_id": artifact.kek_id,
            },
        )
    store = storage.get_object_store()
    ad = associated_data(artifact.id)
    key = artifact.object_key
    if artifact.size == 0:
        # Still authenticate the (empty) final segment: a swapped or cut object must fail.
        inner = stream.decrypt_iter(dek, ad, store.read(key))
    else:
        inner = stream.decrypt_range(
            dek, ad, artifact.size, start, end, lambda a, b: store.read(key, a, b)
        )
    return DownloadStream(
        _audited_plaintext(inner, artifact=artifact, ctx=audit.context_snapshot(), target=target),
        artifact=artifact,
        ctx=audit.context_snapshot(),
        target=target,
        expected=end - start,
        download_seq=event.seq,
    )


class DownloadStream:
    """The plaintext of one download, for a streaming response.

    `prefetch()` pulls the first authenticated chunk, so errors before any byte is sent can
    still become a clean error response. `close()` (called by the WSGI server when the
    response ends, also when the client went away) records a follow-up event with the bytes
    actually sent when the download was cut short. A chunk counts as sent once the server asks
    for the next one, so `bytes_sent` never overstates what left.
    """

    def __init__(
        self,
        chunks: Iterator[bytes],
        *,
        artifact: Artifact,
        ctx: audit.AuditContext,
        target: str,
        expected: int,
        download_seq: int,
    ) -> None:
        self._chunks = chunks
        self._artifact = artifact
        self._ctx = ctx
        self._target = target
        self._expected = expected
        self._download_seq = download_seq
        self._prefetched: list[bytes] = []
        self._in_flight = 0
        self.sent = 0
        self._finished = False
        self._closed = False

    def prefetch(self) -> None:
        """Read the first chunk now (raising what reading it raises)."""
        self._prefetched.append(next(self._chunks, b""))

    def __iter__(self) -> DownloadStream:
        return self

    def __next__(self) -> bytes:
        self.sent += self._in_flight
        self._in_flight = 0
        try:
            chunk = self._prefetched.pop() if self._prefetched else next(self._chunks)
        except StopIteration:
            self._finished = True
            raise
        self._in_flight = len(chunk)
        return chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if hasattr(self._chunks, "close"):
            self._chunks.close()
        if not self._finished and self.sent < self._expected:
            audit.audit_record_now(
                ctx=self._ctx,
                action=AuditAction.ARTIFACT_DOWNLOAD_INCOMPLETE,
                outcome=AuditOutcome.FAILURE,
                namespace=self._artifact.version.model.namespace.name,
                target=self._target,
                target_sha256=self._artifact.sha256,
                details={
                    "download_seq": self._download_seq,
                    "bytes_sent": self.sent,
                    "bytes_expected": self._expected,
                },
            )


def _audited_plaintext(
    inner: Iterator[bytes], *, artifact: Artifact, ctx: audit.AuditContext, target: str
) -> Iterator[bytes]:
    """Yield `inner`, turning (and auditing) integrity failures: nothing from a segment that
    fails authentication is ever yielded."""
    namespace = artifact.version.model.namespace.name

    def failed(reason: str) -> None:
        audit.audit_record_now(
            ctx=ctx,
            action=AuditAction.ARTIFACT_INTEGRITY_FAILURE,
            outcome=AuditOutcome.FAILURE,
            namespace=namespace,
            target=target,
            target_sha256=artifact.sha256,
            details={"reason": reason, "object_key": artifact.object_key},
        )

    try:
        yield from inner
    except stream.StreamIntegrityError as exc:
        logger.error(
            "integrity failure reading artifact %s (%s): %s", artifact.id, artifact.sha256, exc
        )
        failed(str(exc))
        raise IntegrityFailure() from exc
    except storage.ObjectNotFound as exc:
        logger.error("object of artifact %s is missing from the store", artifact.id)
        failed("the stored object is missing")
        raise IntegrityFailure() from exc
    except storage.StorageUnavailable as exc:
        logger.error("object store unavailable while streaming artifact %s", artifact.id)
        raise StorageUnavailable() from exc


# What a revoked version's artifacts and upload sessions hold instead of a wrapped data key.
SHREDDED_KEK_ID = ""


def artifact_is_shredded(artifact: Artifact) -> bool:
    """Whether the artifact's data key was destroyed (crypto-shredding on revoke)."""
    return artifact.kek_id == SHREDDED_KEK_ID


def _rewrapped(artifact: Artifact, target: keys.KeyProvider, to_kek: str) -> keys.WrappedKey:
    # Key-service calls only: no transaction is open here.
    old = keys.WrappedKey(kek_id=artifact.kek_id, blob=bytes(artifact.wrapped_dek))
    return wrapped_key_rewrap(old, artifact_context(artifact), target=target, to_kek=to_kek)


def _rewrap_store(artifact: Artifact, new: keys.WrappedKey) -> bool:
    # Conditional on the old kek_id: a concurrent run that got there first, or a revoke that
    # shredded the key meanwhile, makes this change nothing (never a double wrap, never a
    # shredded key brought back).
    updated = Artifact.objects.filter(pk=artifact.pk, kek_id=artifact.kek_id).update(
        wrapped_dek=new.blob, kek_id=new.kek_id
    )
    if updated:
        audit.audit_record(
            action=AuditAction.KEY_REWRAP,
            namespace=artifact.version.model.namespace.name,
            target=file_target(artifact.version, artifact.path),
            target_sha256=artifact.sha256,
            details={"from_kek_id": artifact.kek_id, "to_kek_id": new.kek_id},
        )
    return updated == 1


def artifact_rewrap(*, artifact: Artifact, target: keys.KeyProvider) -> bool:
    """Re-wrap one artifact's DEK under `target`'s primary KEK; the object is not touched.

    Idempotent: returns False if it is already there (or shredded). The conditional UPDATE
    (on the old kek_id) makes two concurrent runs safe: the loser changes nothing.
    """
    to_kek = target.primary_kek_id()
    if artifact.kek_id == to_kek or artifact_is_shredded(artifact):
        return False
    new = _rewrapped(artifact, target, to_kek)
    with transaction.atomic():
        return _rewrap_store(artifact, new)


def artifacts_to_rewrap(*, to_kek: str) -> QuerySet[Artifact]:
    """Artifacts whose DEK is not under `to_kek` yet, in pk order (shredded ones have none)."""
    return (
        Artifact.objects.exclude(kek_id=to_kek)
        .exclude(kek_id=SHREDDED_KEK_ID)
        .select_related("version__model__namespace")
        .order_by("pk")
    )


def artifacts_rewrap_batch(
    *, target: keys.KeyProvider, after: uuid.UUID | None = None, limit: int = 100
) -> tuple[uuid.UUID | None, int]:
    """Re-wrap the next `limit` DEKs (pk order, after `after`) not yet under `target`'s primary.

    The key service is called for the whole batch first, then every row changes in one
    transaction: a run killed midway loses at most this batch, and the next run, which skips
    what is already under the target, carries on from there. Returns (last pk seen or None
    when nothing was left, how many moved).
    """
    to_kek = target.primary_kek_id()
    qs = artifacts_to_rewrap(to_kek=to_kek)
    if after is not None:
        qs = qs.filter(pk__gt=after)
    batch = list(qs[:limit])
    if not batch:
        return None, 0
    rewrapped = [(artifact, _rewrapped(artifact, target, to_kek)) for artifact in batch]
    with transaction.atomic():
        moved = sum(_rewrap_store(artifact, new) for artifact, new in rewrapped)
    return batch[-1].pk, moved


def artifacts_rewrap_all(
    *,
    target: keys.KeyProvider,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 100,
) -> tuple[int, int]:
    """Re-wrap every artifact DEK not yet under `target`'s primary KEK. Returns (moved, total)."""
    total = artifacts_to_rewrap(to_kek=target.primary_kek_id()).count()
    moved = 0
    after: uuid.UUID | None = None
    while True:
        after, count = artifacts_rewrap_batch(target=target, after=after, limit=batch_size)
        if after is None:
            break
        moved += count
        if progress:
            progress(moved, total)
    return moved, total
