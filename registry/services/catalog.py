"""Namespaces, members, models and versions: every metadata state change."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, models, transaction
from django.db.models.functions import Lower
from django.utils import timezone

from registry import storage
from registry.access import Principal
from registry.errors import (
    AlreadyExists,
    EmptyVersion,
    InUse,
    InvalidInput,
    LastAdmin,
    NotFound,
    PermissionDenied,
    VersionNotDraft,
)
from registry.models import (
    Artifact,
    AuditAction,
    DataBlock,
    Job,
    LedgerEntry,
    Membership,
    ModelTombstone,
    ModelVersion,
    Namespace,
    PendingObject,
    RegisteredModel,
    Role,
    TokenScope,
    UploadPart,
    VersionState,
    WebhookEvent,
)
from registry.services import scanning, webhooks
from registry.services.audit import audit_record, audit_target
from registry.services.pending import pending_discard


def fields_validate(obj: models.Model, *, exclude: list[str] | None = None) -> None:
    """Model field validation as an InvalidInput (400) naming the fields, not a ValidationError."""
    try:
        obj.full_clean(exclude=exclude, validate_unique=False, validate_constraints=False)
    except ValidationError as exc:
        raise InvalidInput("Invalid fields.", fields=exc.message_dict) from exc


def namespace_create(
    *, name: str, description: str = "", creator: User, principal: Principal | None = None
) -> Namespace:
    """Create a namespace; its creator becomes its first admin.

    Any authenticated user may create one; through a token, only with the `write` scope.
    `principal` is the caller as authenticated (None for trusted callers: management commands).
    """
    if principal is not None and not principal.has_scope(TokenScope.WRITE):
        raise PermissionDenied("Creating a namespace needs a token with the 'write' scope.")
    name = unicodedata.normalize("NFC", name)
    namespace = Namespace(name=name, description=description, created_by=creator)
    fields_validate(namespace, exclude=["created_by"])
    try:
        with transaction.atomic():
            namespace.save()
            Membership.objects.create(namespace=namespace, user=creator, role=Role.ADMIN)
            audit_record(action=AuditAction.NAMESPACE_CREATE, namespace=name, target=name)
    except IntegrityError as exc:
        raise AlreadyExists(f"Namespace {name!r} already exists.") from exc
    return namespace


def namespace_update(*, namespace: Namespace, description: str | None = None) -> Namespace:
    """Change a namespace's description (audited; nothing happens when nothing is given)."""
    if description is not None:
        with transaction.atomic():
            namespace.description = description
            namespace.save(update_fields=["description"])
            audit_record(
                action=AuditAction.NAMESPACE_UPDATE,
                namespace=namespace.name,
                target=namespace.name,
                details={"fields": ["description"]},
            )
    return namespace


def member_set(*, namespace: Namespace, username: str, role: str) -> Membership:
    """Add `username` to the namespace with `role`, or change their role."""
    if role not in Role.values:
        raise InvalidInput(f"role must be one of {Role.values}", role=role)
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise NotFound(f"No user named {username!r}.")
    with transaction.atomic():
        _lock_members(namespace)
        membership, _created = Membership.objects.select_for_update().get_or_create(
            namespace=namespace, user=user, defaults={"role": role}
        )
        previous = None if _created else membership.role
        if membership.role != role:
            _ensure_admin_remains(namespace, membership, new_role=role)
            membership.role = role
            membership.save(update_fields=["role"])
        audit_record(
            action=AuditAction.MEMBER_SET,
            namespace=namespace.name,
            target=audit_target(namespace.name, "members") + f"/{username}",
            details={"role": role, "previous_role": previous},
        )
    return membership


def member_remove(*, namespace: Namespace, username: str) -> None:
    """Remove `username` from the namespace; the last admin cannot be removed."""
    if "\x00" in username:  # PostgreSQL rejects NUL in text; no user can have such a name
        raise NotFound(f"{username!r} is not a member of {namespace.name!r}.")
    with transaction.atomic():
        _lock_members(namespace)
        membership = (
            Membership.objects.select_for_update()
            .filter(namespace=namespace, user__username=username)
            .first()
        )
        if membership is None:
            raise NotFound(f"{username!r} is not a member of {namespace.name!r}.")
        _ensure_admin_remains(namespace, membership, new_role=None)
        audit_record(
            action=AuditAction.MEMBER_REMOVE,
            namespace=namespace.name,
            target=audit_target(namespace.name, "members") + f"/{username}",
            details={"previous_role": membership.role},
        )
        membership.delete()


def _lock_members(namespace: Namespace) -> None:
    # Serialise membership changes per namespace on the namespace row. Locking only the member
    # rows lets two admins removing each other take them in opposite orders: a deadlock (500).
    # NO KEY UPDATE: inserts that merely reference the namespace (models, members) never wait.
    Namespace.objects.select_for_update(no_key=True).filter(pk=namespace.pk).first()


def _ensure_admin_remains(
    namespace: Namespace, membership: Membership, *, new_role: str | None
) -> None:
    if membership.role != Role.ADMIN or new_role == Role.ADMIN:
        return
    # The namespace row lock (_lock_members) keeps two demotions from both passing this check.
    if Membership.objects.filter(namespace=namespace, role=Role.ADMIN).count() <= 1:
        raise LastAdmin()


def model_create(
    *, namespace: Namespace, name: str, description: str = "", creator: User
) -> RegisteredModel:
    """Create a model in `namespace` (names are unique within it, ignoring case).

    A name that belonged to a deleted model may be used again; its version numbers continue
    after the last one the deleted model reached, so no `.../versions/N` is ever reused.
    """
    name = unicodedata.normalize("NFC", name)
    model = RegisteredModel(
        namespace=namespace, name=name, description=description, created_by=creator
    )
    fields_validate(model, exclude=["namespace", "created_by"])
    try:
        with transaction.atomic():
            model.save()
            # Read after the insert: an insert of a name whose model is being deleted waits
            # on the unique index until that delete commits, so its tombstone is visible here.
            tombstone = (
                ModelTombstone.objects.alias(lower_name=Lower("name"))
                .filter(namespace=namespace, lower_name=name.lower())
                .first()
            )
            if tombstone is not None:
                model.last_version_number = tombstone.last_version_number
                model.save(update_fields=["last_version_number"])
            audit_record(
                action=AuditAction.MODEL_CREATE,
                namespace=namespace.name,
                target=audit_target(namespace.name, name),
                details={"last_version_number": model.last_version_number},
            )
    except IntegrityError as exc:
        raise AlreadyExists(f"Model {namespace.name}/{name} already exists.") from exc
    return model


TAG_KEY_RE = re.compile(r"[A-Za-z0-9_.\-/]{1,64}")
TAGS_MAX = 50
TAG_VALUE_MAX = 256


def tags_validate(tags: object) -> dict[str, str]:
    """`tags` if it is a valid tag set (InvalidInput otherwise).

    At most 50 tags; a key is 1 to 64 letters, digits, '_', '.', '-' or '/' (no ':', which
    separates key and value in the `tag=key:value` list filter); a value is printable text of
    at most 256 characters.
    """
    if not isinstance(tags, dict):
        raise InvalidInput("tags must be an object of string keys to string values.", field="tags")
    if len(tags) > TAGS_MAX:
        raise InvalidInput(f"At most {TAGS_MAX} tags.", field="tags")
    for key, value in tags.items():
        if not isinstance(key, str) or not TAG_KEY_RE.fullmatch(key):
            raise InvalidInput(
                "A tag key is 1 to 64 letters, digits, '_', '.', '-' or '/'.",
                field="tags",
                key=str(key)[:64],
            )
        if not isinstance(value, str) or len(value) > TAG_VALUE_MAX or not value.isprintable():
            raise InvalidInput(
                f"A tag value is printable text of at most {TAG_VALUE_MAX} characters.",
                field="tags",
                key=key,
            )
    return dict(tags)


def _metadata_changes(description: str | None, tags: dict[str, str] | None) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if description is not None:
        changes["description"] = description
    if tags is not None:
        changes["tags"] = tags_validate(tags)
    return changes


def model_update(
    *, model: RegisteredModel, description: str | None = None, tags: dict[str, str] | None = None
) -> RegisteredModel:
    """Change a model's description and/or tags (tags are replaced as a whole; audited with
    the fields changed; nothing happens when nothing is given)."""
    changes = _metadata_changes(description, tags)
    if changes:
        with transaction.atomic():
            for name, value in changes.items():
                setattr(model, name, value)
            model.save(update_fields=[*changes, "updated_at"])
            audit_record(
                action=AuditAction.MODEL_UPDATE,
                namespace=model.namespace.name,
                target=audit_target(model.namespace.name, model.name),
                details={"fields": sorted(changes), "tags": changes.get("tags")},
            )
    return model


def version_update(
    *, version: ModelVersion, description: str | None = None, tags: dict[str, str] | None = None
) -> ModelVersion:
    """Change a version's description and/or tags, in any state (metadata, not files: an
    approved version stays approved). Tags are replaced as a whole; audited."""
    changes = _metadata_changes(description, tags)
    if changes:
        with transaction.atomic():
            # A column UPDATE, not save(): a concurrent state transition is never overwritten.
            ModelVersion.objects.filter(pk=version.pk).update(**changes)
            for name, value in changes.items():
                setattr(version, name, value)
            model = version.model
            audit_record(
                action=AuditAction.VERSION_UPDATE,
                namespace=model.namespace.name,
                target=audit_target(model.namespace.name, model.name, version.number),
                details={"fields": sorted(changes), "tags": changes.get("tags")},
            )
    return version


def model_delete(*, model: RegisteredModel) -> int:
    """Delete a model, all its versions and their stored objects; returns how many objects.

    Rows go in one transaction together with PendingObject records for every object, so the
    bytes are removed right after commit (or later by the janitor if the store is down), never
    orphaned.
    """
    with transaction.atomic():
        # The model row first: version_create holds it while numbering, so no version appears
        # behind this delete and last_version_number is final. A second delete finds nothing.
        locked = RegisteredModel.objects.select_for_update().filter(pk=model.pk).first()
        if locked is None:
            raise NotFound(f"Model {model.namespace.name}/{model.name} not found.")
        # Then the versions: an upload registering a file waits on its version row, so it
        # either lands before this delete (and its object is queued below) or finds no version.
        list(ModelVersion.objects.select_for_update().filter(model=model).values_list("pk"))
        # The DP ledger is append-only and names versions and data files: keep them.
        if (
            LedgerEntry.objects.filter(version__model=model).exists()
            or DataBlock.objects.filter(artifact__version__model=model).exists()
        ):
            raise InUse(
                f"The DP ledger refers to {model.namespace.name}/{model.name} (a version's DP "
                "record, or a dataset block's data); it cannot be deleted. Deprecate its "
                "versions instead."
            )
        keys = list(
            Artifact.objects.filter(version__model=model).values_list("object_key", flat=True)
        )
        # Staged parts of unfinished resumable uploads go too; the version delete cascades
        # their rows away, and nothing else would ever name those objects again.
        keys += UploadPart.objects.filter(session__version__model=model).values_list(
            "object_key", flat=True
        )
        PendingObject.objects.bulk_create(
            [PendingObject(object_key=k, reason="delete") for k in keys], ignore_conflicts=True
        )
        Artifact.objects.filter(version__model=model).delete()
        ModelVersion.objects.filter(model=model).delete()
        audit_record(
            action=AuditAction.MODEL_DELETE,
            namespace=model.namespace.name,
            target=audit_target(model.namespace.name, model.name),
            details={"objects_deleted": len(keys)},
        )
        # The tombstone keeps the name's version numbers from ever being handed out again.
        tombstone = (
            ModelTombstone.objects.select_for_update()
            .alias(lower_name=Lower("name"))
            .filter(namespace_id=model.namespace_id, lower_name=model.name.lower())
            .first()
        ) or ModelTombstone(namespace_id=model.namespace_id, last_version_number=0)
        tombstone.name = model.name
        tombstone.last_version_number = max(
            tombstone.last_version_number, locked.last_version_number
        )
        tombstone.deleted_at = timezone.now()
        tombstone.save()
        model.delete()
    # Outside the transaction: object-store calls never hold database locks.
    store = storage.get_object_store()
    for key in keys:
        pending_discard(store, key)
    return len(keys)


def _version_number_next(model_pk: int) -> int | None:
    """Count the model's version counter up by one and return it (None: no such model).

    One UPDATE ... RETURNING (PostgreSQL, SQLite >= 3.35) rather than a locking read and a
    write: the row lock it takes serialises concurrent creators (no duplicate, no gap) and
    orders this against model_delete, until the caller's transaction ends. The ORM has no
    UPDATE ... RETURNING; the names come from the model.
    """
    meta = RegisteredModel._meta
    q = connection.ops.quote_name
    counter = q(str(meta.get_field("last_version_number").column))
    sql = (
        f"UPDATE {q(meta.db_table)} SET {counter} = {counter} + 1 "  # noqa: S608
        f"WHERE {q(str(meta.pk.column))} = %s RETURNING {counter}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [model_pk])
        row = cursor.fetchone()
    return int(row[0]) if row else None


def version_create(*, model: RegisteredModel, description: str = "", creator: User) -> ModelVersion:
    """Create the next version number of `model` as a draft.

    Numbers count up from the highest ever given under the model's name, including by a
    deleted model of that name: a version number, once used, never names other bytes.
    """
    with transaction.atomic():
        number = _version_number_next(model.pk)
        if number is None:
            raise NotFound(f"Model {model.namespace.name}/{model.name} not found.")
        version = ModelVersion.objects.create(
            model=model, number=number, description=description, created_by=creator
        )
        model.last_version_number = number
        audit_record(
            action=AuditAction.VERSION_CREATE,
            namespace=model.namespace.name,
            target=audit_target(model.namespace.name, model.name, version.number),
        )
        return version


def version_submit(
    *, version: ModelVersion, submitter: User | None = None
) -> tuple[ModelVersion, Job]:
    """Freeze a draft's files and hand it to the scanners: draft -> scanning, with a scan job.

    The version row lock orders this against uploads registering files: a file lands before
    the submit or not at all. The job is enqueued once this commits; the scan then moves the
    version to pending_review or quarantined (registry.services.scanning).
    """
    with transaction.atomic():
        locked = (
            ModelVersion.objects.select_for_update()
            .select_related("model__namespace")
            .get(pk=version.pk)
        )
        if locked.state != VersionState.DRAFT:
            raise VersionNotDraft(
                f"Version {locked.number} is {locked.state}; only drafts can be submitted.",
                state=locked.state,
            )
        if not Artifact.objects.filter(version=locked).exists():
            raise EmptyVersion()
        locked.submitted_at = timezone.now()
        locked.submitted_by = submitter
        locked.save(update_fields=["submitted_at", "submitted_by"])
        job = scanning.scan_schedule(version=locked, user=submitter)
        webhooks.webhooks_emit(
            namespace=locked.model.namespace,
            event=WebhookEvent.VERSION_SUBMITTED,
            payload=webhooks.version_payload(locked),
        )
        audit_record(
            action=AuditAction.VERSION_SUBMIT,
            namespace=version.model.namespace.name,
            target=audit_target(version.model.namespace.name, version.model.name, version.number),
            details={"state": locked.state, "job": str(job.pk)},
        )
    return locked, job
