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
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from registry import storage
from registry.crypto import keys, stream
from registry.errors import (
    DigestMismatch,
    IncompleteBody,
    IntegrityFailure,
    KeyServiceUnavailable,
    NotFound,
    StorageUnavailable,
    TooLarge,
    VersionNotDraft,
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
from registry.services import audit

logger = logging.getLogger(__name__)

# One segment's worth: big enough to amortise per-call costs, small enough that gunicorn's
# body reader does not assemble (copy) large buffers.
READ_CHUNK = 1 << 20


def artifact_object_key(artifact_id: uuid.UUID) -> str:
    # Names never reach the store: keys are opaque ids, so a bucket listing leaks nothing.
    return f"artifacts/{artifact_id}"


def associated_data(artifact_id: uuid.UUID) -> bytes:
    """Bind a ciphertext to one artifact: swapping two objects fails authentication."""
    return f"smr:artifact:v1:{artifact_id}".encode()


def encryption_context(version: ModelVersion, path: str, artifact_id: uuid.UUID) -> dict[str, str]:
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
    return f"{version.model.namespace.name}/{version.model.name}/v{version.number}/{path}"


def artifact_context(artifact: Artifact) -> dict[str, str]:
    return encryption_context(artifact.version, artifact.path, artifact.id)


@dataclass(frozen=True)
class Written:
    size: int
    sha256: str


def key_call(fn: Callable, *args, **kwargs):
    """Run a KeyProvider call, turning its failures into registry errors."""
    try:
        return fn(*args, **kwargs)
    except keys.KeyUnavailableError as exc:
        raise KeyServiceUnavailable() from exc
    except keys.KeyUnwrapError as exc:
        logger.error("data key could not be unwrapped: %s", exc)
        raise IntegrityFailure() from exc


def write_encrypted(
    *,
    store: storage.ObjectStore,
    key: str,
    dek: bytes,
    ad: bytes,
    chunks: Iterable[bytes],
    size_hint: int | None = None,
) -> Written:
    """Encrypt `chunks` into object `key` in one pass, returning plaintext size and SHA-256.

    The object only becomes visible on commit; on any error the write is aborted.
    """
    encryptor = stream.StreamEncryptor(dek, ad)
    writer = store.writer(
        key, size_hint=stream.ciphertext_size(size_hint) if size_hint is not None else None
    )
    try:
        for chunk in chunks:
            for out in encryptor.update(chunk):
                writer.write(out)
        for out in encryptor.finalize():
            writer.write(out)
        writer.commit()
    except BaseException:
        try:
            writer.abort()
        except storage.StorageError:
            logger.warning("abort of %s failed; the janitor will retry", key)
        raise
    return Written(size=encryptor.plaintext_size, sha256=encryptor.sha256)


def read_body(body, length: int) -> Iterator[bytes]:
    """Yield exactly `length` bytes from a request body, or raise IncompleteBody."""
    remaining = length
    while remaining > 0:
        try:
            chunk = body.read(min(READ_CHUNK, remaining))
        except (OSError, ValueError) as exc:  # client went away mid-body
            raise IncompleteBody(received=length - remaining, expected=length) from exc
        if not chunk:
            raise IncompleteBody(received=length - remaining, expected=length)
        remaining -= len(chunk)
        yield chunk


def pending_begin(key: str, reason: str = "upload") -> None:
    PendingObject.objects.get_or_create(object_key=key, defaults={"reason": reason})


def pending_discard(store: storage.ObjectStore, key: str) -> None:
    """Delete whatever may exist under `key`; keep the pending record if the store is down."""
    try:
        store.abort_incomplete(key)
        store.delete(key)
    except storage.StorageError:
        logger.warning("could not delete %s now; left for the janitor", key)
        PendingObject.objects.filter(object_key=key).update(abandoned_at=timezone.now())
        return
    PendingObject.objects.filter(object_key=key).delete()


def ensure_draft(version: ModelVersion) -> None:
    if version.state != VersionState.DRAFT:
        raise VersionNotDraft(
            f"Version {version.number} is {version.state}; its files are immutable. "
            "Create a new version to change files.",
            state=version.state,
        )


def check_size(size: int) -> None:
    if size > settings.SMR_MAX_ARTIFACT_SIZE:
        raise TooLarge(
            f"The file is {size} bytes; this registry accepts at most "
            f"{settings.SMR_MAX_ARTIFACT_SIZE} bytes per file.",
            limit=settings.SMR_MAX_ARTIFACT_SIZE,
        )


def artifact_store_stream(
    *,
    version: ModelVersion,
    path: str,
    chunks: Iterable[bytes],
    expected_sha256: str | None,
    expected_size: int | None,
    creator: AbstractBaseUser | None,
    on_register: Callable[[Artifact], None] | None = None,
) -> Artifact:
    """Encrypt a plaintext stream as a new file of a draft version and register it.

    Replaces an existing file at the same path (drafts only). Raises DigestMismatch, or the
    store's/KMS's unavailability, with nothing registered and nothing left in the store.
    """
    validate_artifact_path(path)
    ensure_draft(version)
    store = storage.get_object_store()
    artifact_id = uuid.uuid4()
    key = artifact_object_key(artifact_id)
    dek, wrapped = key_call(
        get_key_provider().generate_data_key, encryption_context(version, path, artifact_id)
    )
    pending_begin(key)
    try:
        try:
            written = write_encrypted(
                store=store,
                key=key,
                dek=dek,
                ad=associated_data(artifact_id),
                chunks=chunks,
                size_hint=expected_size,
            )
        except storage.StorageUnavailable as exc:
            raise StorageUnavailable() from exc
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
    written: Written,
    key: str,
    wrapped: keys.WrappedKey,
    creator: AbstractBaseUser | None,
    on_register: Callable[[Artifact], None] | None,
) -> tuple[Artifact, str | None]:
    with transaction.atomic():
        # The row lock orders us against version_submit: a file lands before submit or not at all.
        locked = ModelVersion.objects.select_for_update().filter(pk=version.pk).first()
        if locked is None:
            raise NotFound("The version was deleted while the file was uploading.")
        ensure_draft(locked)
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
        ensure_draft(locked)
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
    wrapped = keys.WrappedKey(kek_id=artifact.kek_id, blob=bytes(artifact.wrapped_dek))
    provider = key_call(provider_for, artifact.kek_id)
    return key_call(provider.unwrap, wrapped, artifact_context(artifact))


def artifact_open(
    *, artifact: Artifact, start: int = 0, end: int | None = None, ranged: bool = False
) -> Iterator[bytes]:
    """Authenticated plaintext of bytes [start, end) of an artifact, streamed segment by segment.

    The download is audited (who, with which token, which digest and range) before any byte
    leaves. Nothing from a segment that fails authentication is ever yielded: the iterator
    raises IntegrityFailure instead, and the failure is audited with its details.
    """
    end = artifact.size if end is None else end
    namespace = artifact.version.model.namespace.name
    target = file_target(artifact.version, artifact.path)
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
        audit.audit_record(
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
    return _guard(inner, artifact, audit.context_snapshot(), namespace, target)


def _guard(
    inner: Iterator[bytes],
    artifact: Artifact,
    ctx: audit.AuditContext,
    namespace: str,
    target: str,
) -> Iterator[bytes]:
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
        raise StorageUnavailable() from exc


def artifact_rewrap(*, artifact: Artifact, target: keys.KeyProvider) -> bool:
    """Re-wrap one artifact's DEK under `target`'s primary KEK; the object is not touched.

    Idempotent: returns False if it is already there. The conditional UPDATE (on the old
    kek_id) makes two concurrent runs safe: the loser changes nothing.
    """
    to_kek = target.primary_kek_id()
    if artifact.kek_id == to_kek:
        return False
    old = keys.WrappedKey(kek_id=artifact.kek_id, blob=bytes(artifact.wrapped_dek))
    context = artifact_context(artifact)
    source = key_call(provider_for, artifact.kek_id)
    if source.scheme == target.scheme:
        new = key_call(source.rewrap, old, context, to_kek_id=to_kek)
    else:
        new = key_call(keys.rewrap_between, old, context, source, target)
    with transaction.atomic():
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


def artifacts_rewrap_all(
    *, target: keys.KeyProvider, progress: Callable[[int, int], None] | None = None
) -> tuple[int, int]:
    """Re-wrap every artifact DEK not yet under `target`'s primary KEK. Returns (moved, total)."""
    to_kek = target.primary_kek_id()
    qs = Artifact.objects.exclude(kek_id=to_kek).select_related("version__model__namespace")
    total = qs.count()
    moved = 0
    for artifact in qs.iterator(chunk_size=500):
        if artifact_rewrap(artifact=artifact, target=target):
            moved += 1
        if progress:
            progress(moved, total)
    return moved, total
