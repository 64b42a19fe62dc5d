"""Resumable uploads: a multi-GB file arrives in parts that can be re-sent after a broken
connection, in any order, and is assembled into one encrypted artifact on `complete`.

Each part is staged as its own STREAM ciphertext under a per-session DEK (associated data names
the session and part number). `complete` streams the parts in order through decryption into a
fresh artifact encryption, computing the whole-file SHA-256 in that same pass. (A SHA-256 state
cannot be persisted between requests, so one assembling pass is the price of resumability.)
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Iterator
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from registry import storage
from registry.crypto import keys, stream
from registry.errors import Conflict, IncompleteBody, IntegrityFailure, InvalidInput
from registry.keyconfig import get_key_provider, provider_for
from registry.models import (
    Artifact,
    AuditAction,
    ModelVersion,
    PendingObject,
    UploadPart,
    UploadSession,
    UploadState,
)
from registry.paths import validate_artifact_path
from registry.services.artifacts import (
    artifact_size_check,
    artifact_upload,
    file_target,
    version_ensure_draft,
)
from registry.services.audit import audit_record
from registry.services.envelope import encrypt_to_store, key_provider_call, wrapped_key_rewrap
from registry.services.pending import pending_begin, pending_discard

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Limits of a resumable upload session's parts (independent of the object store's own limits:
# each part is staged as its own object).
UPLOAD_MIN_PART_SIZE = 1 << 20
UPLOAD_MAX_PART_SIZE = 5 << 30
UPLOAD_MAX_PARTS = 10_000


def _session_context(session_id: uuid.UUID, version: ModelVersion) -> dict[str, str]:
    return {
        "smr:upload": str(session_id),
        "smr:namespace": version.model.namespace.name,
        "smr:model": version.model.name,
        "smr:version": str(version.number),
    }


def _part_ad(session: UploadSession, number: int) -> bytes:
    return f"smr:upload-part:v1:{session.id}:{number}".encode()


def expected_part_size(session: UploadSession, number: int) -> int:
    """The exact size part `number` of the session must have (the last one may be shorter)."""
    if number < session.part_count:
        return session.part_size
    return session.size - (session.part_count - 1) * session.part_size


def upload_session_create(
    *,
    version: ModelVersion,
    path: str,
    size: int,
    sha256: str | None,
    part_size: int | None,
    creator: User,
) -> UploadSession:
    """Open a resumable upload of `size` bytes to `path` of a draft version."""
    path = validate_artifact_path(path)
    version_ensure_draft(version)
    artifact_size_check(size)
    if sha256 is not None and not SHA256_RE.match(sha256):
        raise InvalidInput("sha256 must be 64 lowercase hex characters", sha256=sha256)
    part_size = part_size or settings.SMR_UPLOAD_PART_SIZE
    if not UPLOAD_MIN_PART_SIZE <= part_size <= UPLOAD_MAX_PART_SIZE:
        raise InvalidInput(
            f"part_size must be between {UPLOAD_MIN_PART_SIZE} and {UPLOAD_MAX_PART_SIZE} bytes",
            part_size=part_size,
        )
    if -(-size // part_size) > UPLOAD_MAX_PARTS:
        raise InvalidInput(
            f"{size} bytes in parts of {part_size} would need more than {UPLOAD_MAX_PARTS} "
            "parts; "
            "use a larger part_size",
        )
    session_id = uuid.uuid4()
    _dek, wrapped = key_provider_call(
        get_key_provider().generate_data_key, _session_context(session_id, version)
    )
    with transaction.atomic():
        session = UploadSession.objects.create(
            id=session_id,
            version=version,
            path=path,
            size=size,
            sha256=sha256 or "",
            part_size=part_size,
            wrapped_dek=wrapped.blob,
            kek_id=wrapped.kek_id,
            created_by=creator,
            expires_at=timezone.now() + timedelta(seconds=settings.SMR_UPLOAD_SESSION_TTL),
        )
        audit_record(
            action=AuditAction.UPLOAD_CREATE,
            namespace=version.model.namespace.name,
            target=file_target(version, path),
            details={
                "upload": str(session_id),
                "size": size,
                "part_size": part_size,
                "key_op": "wrap",
                "kek_id": wrapped.kek_id,
            },
        )
    return session


def _ensure_open(session: UploadSession) -> None:
    if session.state != UploadState.OPEN:
        raise Conflict(f"The upload session is {session.state}.", state=session.state)
    if session.expires_at <= timezone.now():
        raise Conflict("The upload session has expired; start a new one.", state="expired")
    version_ensure_draft(session.version)


def upload_session_missing_parts(session: UploadSession) -> list[int]:
    """Part numbers not uploaded yet, in order (empty once every part is there)."""
    have = {p.number for p in session.parts.all()}
    return [n for n in range(1, session.part_count + 1) if n not in have]


def _session_dek(session: UploadSession) -> bytes:
    wrapped = keys.WrappedKey(kek_id=session.kek_id, blob=bytes(session.wrapped_dek))
    provider = key_provider_call(provider_for, session.kek_id)
    return key_provider_call(
        provider.unwrap, wrapped, _session_context(session.id, session.version)
    )


def upload_sessions_rewrap_all(*, target: keys.KeyProvider) -> tuple[int, int]:
    """Re-wrap the DEK of every open upload session not yet under `target`'s primary KEK
    (audited), so that its staged parts outlive the old KEK: (moved, total). Finished sessions
    are skipped: their parts are gone and their keys open nothing. The UPDATE is conditional on
    the old kek_id, as for artifacts."""
    to_kek = target.primary_kek_id()
    qs = (
        UploadSession.objects.filter(state=UploadState.OPEN)
        .exclude(kek_id=to_kek)
        .select_related("version__model__namespace")
        .order_by("pk")
    )
    total = qs.count()
    moved = 0
    for session in qs.iterator():
        old = keys.WrappedKey(kek_id=session.kek_id, blob=bytes(session.wrapped_dek))
        context = _session_context(session.id, session.version)
        new = wrapped_key_rewrap(old, context, target=target, to_kek=to_kek)
        with transaction.atomic():
            updated = UploadSession.objects.filter(pk=session.pk, kek_id=session.kek_id).update(
                wrapped_dek=new.blob, kek_id=new.kek_id
            )
            if updated:
                audit_record(
                    action=AuditAction.KEY_REWRAP,
                    namespace=session.version.model.namespace.name,
                    target=file_target(session.version, session.path),
                    details={
                        "upload": str(session.id),
                        "from_kek_id": session.kek_id,
                        "to_kek_id": new.kek_id,
                    },
                )
        moved += updated
    return moved, total


def upload_part_put(
    *, session: UploadSession, number: int, chunks: Iterable[bytes], length: int
) -> UploadPart:
    """Store part `number` (1-based) from `chunks`, which must hold exactly `length` bytes.

    Re-sending a part replaces it; a broken send changes nothing.
    """
    _ensure_open(session)
    if not 1 <= number <= session.part_count:
        raise InvalidInput(f"part number must be between 1 and {session.part_count}", number=number)
    expected = expected_part_size(session, number)
    if length != expected:
        raise InvalidInput(
            f"part {number} must be exactly {expected} bytes (Content-Length was {length})",
            expected=expected,
        )
    dek = _session_dek(session)
    store = storage.get_object_store()
    # A fresh key per attempt: a concurrent or failed re-send can never clobber a good part.
    key = f"uploads/{session.id}/{number:05d}-{uuid.uuid4().hex[:8]}"
    pending_begin(key=key, reason="upload-part")
    try:
        written = encrypt_to_store(
            store=store,
            key=key,
            dek=dek,
            ad=_part_ad(session, number),
            chunks=chunks,
            size_hint=length,
        )
        if written.size != length:
            raise IncompleteBody(received=written.size, expected=length)
        with transaction.atomic():
            locked = UploadSession.objects.select_for_update().get(pk=session.pk)
            if locked.state != UploadState.OPEN:
                raise Conflict(f"The upload session is {locked.state}.", state=locked.state)
            old = UploadPart.objects.filter(session=locked, number=number).first()
            replaced = old.object_key if old else None
            if old is not None:
                PendingObject.objects.get_or_create(
                    object_key=replaced, defaults={"reason": "replace"}
                )
                old.delete()
            part = UploadPart.objects.create(
                session=locked,
                number=number,
                size=written.size,
                sha256=written.sha256,
                object_key=key,
            )
            PendingObject.objects.filter(object_key=key).delete()
            audit_record(
                action=AuditAction.UPLOAD_PART,
                namespace=session.version.model.namespace.name,
                target=file_target(session.version, session.path),
                details={
                    "upload": str(session.id),
                    "part": number,
                    "size": written.size,
                    "sha256": written.sha256,
                    "replaced": replaced is not None,
                },
            )
    except BaseException:
        pending_discard(store, key)
        raise
    if replaced:
        pending_discard(store, replaced)
    return part


def _assembled(session: UploadSession, parts: list[UploadPart], dek: bytes) -> Iterator[bytes]:
    store = storage.get_object_store()
    for part in parts:
        try:
            yield from stream.decrypt_iter(
                dek, _part_ad(session, part.number), store.read(part.object_key)
            )
        except storage.ObjectNotFound as exc:
            # A concurrent complete (or abort) that won discards the staged parts: that is a
            # lost race (409), not corruption.
            state = UploadSession.objects.filter(pk=session.pk).values_list("state", flat=True)
            if state.first() != UploadState.OPEN:
                raise Conflict(
                    "The upload session was completed or aborted meanwhile.", state=state.first()
                ) from exc
            raise IntegrityFailure() from exc
        except stream.StreamIntegrityError as exc:
            raise IntegrityFailure() from exc


def upload_session_complete(*, session: UploadSession, creator: User) -> Artifact:
    """Assemble the parts into the artifact; verifies size and (if given) SHA-256."""
    _ensure_open(session)
    parts = list(session.parts.order_by("number"))
    missing = upload_session_missing_parts(session)
    if missing and session.size > 0:
        raise Conflict(
            f"{len(missing)} part(s) are missing; upload them before completing.",
            missing=missing[:100],
        )
    dek = _session_dek(session)

    def mark_completed(artifact: Artifact) -> None:
        # Runs inside the registering transaction: exactly one `complete` can win.
        won = UploadSession.objects.filter(pk=session.pk, state=UploadState.OPEN).update(
            state=UploadState.COMPLETED, artifact=artifact
        )
        if not won:
            raise Conflict("The upload session was completed or aborted meanwhile.")
        audit_record(
            action=AuditAction.UPLOAD_COMPLETE,
            namespace=session.version.model.namespace.name,
            target=file_target(session.version, session.path),
            target_sha256=artifact.sha256,
            details={"upload": str(session.id), "parts": len(parts)},
        )

    artifact = artifact_upload(
        version=session.version,
        path=session.path,
        chunks=_assembled(session, parts, dek),
        expected_sha256=session.sha256 or None,
        expected_size=session.size,
        creator=creator,
        on_register=mark_completed,
    )
    _discard_parts(session)
    return artifact


def upload_session_abort(*, session: UploadSession) -> UploadSession:
    """Abort an open session and delete its staged parts."""
    with transaction.atomic():
        updated = UploadSession.objects.filter(pk=session.pk, state=UploadState.OPEN).update(
            state=UploadState.ABORTED
        )
        if not updated:
            raise Conflict(f"The upload session is {session.state}.", state=session.state)
        version = ModelVersion.objects.select_related("model__namespace").get(pk=session.version_id)
        audit_record(
            action=AuditAction.UPLOAD_ABORT,
            namespace=version.model.namespace.name,
            target=file_target(version, session.path),
            details={"upload": str(session.id)},
        )
    session.state = UploadState.ABORTED
    _discard_parts(session)
    return session


def _discard_parts(session: UploadSession) -> None:
    store = storage.get_object_store()
    with transaction.atomic():
        keys_ = list(session.parts.values_list("object_key", flat=True))
        PendingObject.objects.bulk_create(
            [PendingObject(object_key=k, reason="upload-part") for k in keys_],
            ignore_conflicts=True,
        )
        session.parts.all().delete()
    for key in keys_:
        pending_discard(store, key)
