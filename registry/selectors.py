"""Permission-scoped reads. An object the caller may not see is NotFound, never Forbidden.

Every read the API, the dashboard or the CLI makes goes through a selector here, so the rule
"who may see what" lives in one place. Refusals of access to an existing namespace's objects
are recorded in the audit log (folded per actor, see `_denied`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from django.contrib.auth.models import User
from django.db.models import (
    Case,
    Exists,
    F,
    Func,
    IntegerField,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Value,
    When,
)
from django.db.models.fields.json import KT
from django.db.models.functions import Coalesce, Greatest

from registry import joinload
from registry.access import Action, Principal, principal_allows
from registry.errors import NotFound, PermissionDenied, VersionQuarantined, VersionRevoked
from registry.models import (
    SEVERITY_CHOICES,
    ApiToken,
    Artifact,
    AuditCheckpoint,
    AuditEvent,
    DataBlock,
    Dataset,
    Job,
    JobKind,
    LedgerEntry,
    Membership,
    ModelAlias,
    ModelVersion,
    Namespace,
    PublisherKey,
    RegisteredModel,
    Review,
    Role,
    ScanReport,
    ScanVerdict,
    Signature,
    TokenScope,
    UploadSession,
    VersionState,
)
from registry.paths import validate_artifact_path
from registry.services import ledger
from registry.services.audit import audit_target
from registry.services.denials import access_denied_record

# Viewers only fetch bytes of versions that passed review.
RELEASED_STATES = frozenset({VersionState.APPROVED, VersionState.DEPRECATED})

# A version as the URL names it: its number, or the name of an alias pointing at it.
VersionRef = int | str


def _text_ok(*values: str) -> bool:
    # PostgreSQL refuses NUL in text parameters (a DataError, i.e. a 500); no name holds one.
    return not any("\x00" in v for v in values)


# --- The hot lookups: namespace, model (and version) and the caller's role in one query ------
# See registry/joinload.py for why these are composed by hand. Names compare lowercased: they
# are ASCII (checked first), and the unique constraints are on Lower("name").

_NS = joinload.Part(Namespace, "n")
_MODEL = joinload.Part(RegisteredModel, "m")
_VERSION = joinload.Part(ModelVersion, "v")
_CREATOR = joinload.Part(User, "cu", ("id", "username"))
_SUBMITTER = joinload.Part(User, "su", ("id", "username"))


def _role_column() -> str:
    q = joinload.quote
    ms = joinload.Part(Membership, "ms")
    # Names from the models; the user id is a parameter.
    return (
        f"(SELECT {joinload.col(ms, 'role')} FROM {joinload.table(ms)} "  # noqa: S608
        f"WHERE {joinload.col(ms, 'namespace_id')} = {joinload.col(_NS, 'id')} "
        f"AND {joinload.col(ms, 'user_id')} = %s) AS {q('caller_role')}"
    )


def _names_match() -> str:
    return (
        f"LOWER({joinload.col(_NS, 'name')}) = LOWER(%s) "
        f"AND LOWER({joinload.col(_MODEL, 'name')}) = LOWER(%s)"
    )


def _join(part: joinload.Part, on: str, *, left: bool = False) -> str:
    return f"{'LEFT ' if left else ''}JOIN {joinload.table(part)} ON {on}"


def _model_query() -> tuple[str, joinload.Hydrator]:
    """Parameters: the caller's user id, namespace name, model name."""
    c = joinload.col
    parts = [_MODEL, _NS]
    sql = " ".join(
        [
            f"SELECT {joinload.select_list(parts)}, {_role_column()}",
            f"FROM {joinload.table(_MODEL)}",
            _join(_NS, f"{c(_NS, 'id')} = {c(_MODEL, 'namespace_id')}"),
            f"WHERE {_names_match()}",
        ]
    )
    return sql, joinload.Hydrator(parts)


def _version_query(*, by_alias: bool) -> tuple[str, joinload.Hydrator]:
    """Parameters: the caller's user id, the alias name (by_alias only), namespace name,
    model name, the version number (not by_alias)."""
    c = joinload.col
    alias = joinload.Part(ModelAlias, "a")
    parts = [_VERSION, _MODEL, _NS, _CREATOR, _SUBMITTER]
    clauses = [
        f"SELECT {joinload.select_list(parts)}, {_role_column()}",
        f"FROM {joinload.table(_VERSION)}",
    ]
    if by_alias:
        clauses.append(
            _join(
                alias, f"{c(alias, 'version_id')} = {c(_VERSION, 'id')} AND {c(alias, 'name')} = %s"
            )
        )
    clauses += [
        _join(_MODEL, f"{c(_MODEL, 'id')} = {c(_VERSION, 'model_id')}"),
        _join(_NS, f"{c(_NS, 'id')} = {c(_MODEL, 'namespace_id')}"),
        _join(_CREATOR, f"{c(_CREATOR, 'id')} = {c(_VERSION, 'created_by_id')}", left=True),
        _join(_SUBMITTER, f"{c(_SUBMITTER, 'id')} = {c(_VERSION, 'submitted_by_id')}", left=True),
        f"WHERE {_names_match()}",
    ]
    if not by_alias:
        clauses.append(f"AND {c(_VERSION, 'number')} = %s")
    return " ".join(clauses), joinload.Hydrator(parts)


def _files_query() -> tuple[str, joinload.Hydrator]:
    """Parameter: the version id."""
    files = joinload.Part(Artifact, "f")
    sql = " ".join(
        [
            f"SELECT {joinload.select_list([files])}",
            f"FROM {joinload.table(files)}",
            f"WHERE {joinload.col(files, 'version_id')} = %s",
            f"ORDER BY {joinload.col(files, 'path')}",
        ]
    )
    return sql, joinload.Hydrator([files])


_MODEL_LOOKUP = joinload.JoinQuery(_model_query)
_FILES_LOOKUP = joinload.JoinQuery(_files_query)
_VERSION_LOOKUP = joinload.JoinQuery(lambda: _version_query(by_alias=False))
_VERSION_BY_ALIAS = joinload.JoinQuery(lambda: _version_query(by_alias=True))


def _names_ok(*names: str) -> bool:
    # Names are ASCII and unique ignoring case, so lookups ignore case too (`ACME` is `acme`).
    # Non-ASCII input never names anything; it must not reach UPPER() (U+017F upper-cases to 'S').
    return _text_ok(*names) and all(n.isascii() for n in names)


def role_for(*, principal: Principal, namespace: Namespace) -> str | None:
    """The caller's role in `namespace` (None if not a member), cached for the request."""
    if namespace.pk not in principal.roles:
        principal.roles[namespace.pk] = (
            Membership.objects.filter(namespace=namespace, user=principal.user)
            .values_list("role", flat=True)
            .first()
        )
    return principal.roles[namespace.pk]


def _require(
    principal: Principal, namespace: Namespace, action: Action, *, target: str = ""
) -> str:
    role = role_for(principal=principal, namespace=namespace)
    if role is None:
        # The hiding 404: the namespace exists, so this is a refused access worth recording.
        _denied(principal, namespace, action, target, reason="not a member")
        raise NotFound(f"Namespace {namespace.name!r} not found, or you are not a member.")
    if not principal_allows(principal, role, action):
        _denied(principal, namespace, action, target, reason=f"role {role} or token scopes")
        raise PermissionDenied(
            f"Your role ({role}) or token scopes do not allow '{action}' here.",
            role=role,
            action=str(action),
        )
    return role


def _denied(
    principal: Principal, namespace: Namespace, action: Action, target: str, *, reason: str
) -> None:
    access_denied_record(
        user=principal.user.get_username(),
        namespace=namespace.name,
        target=target or namespace.name,
        operation=str(action),
        reason=reason,
    )


def namespace_list_for_user(*, principal: Principal) -> QuerySet[Namespace]:
    """Namespaces the caller is a member of (listing them is a read: needs the read scope)."""
    if not principal.has_scope(TokenScope.READ):
        raise PermissionDenied("Listing namespaces needs a token with the 'read' scope.")
    return Namespace.objects.filter(memberships__user=principal.user).distinct()


def namespace_get_for_user(
    *, principal: Principal, name: str, action: Action, target: str = ""
) -> Namespace:
    """The namespace `name` if the caller may do `action` in it (NotFound for non-members)."""
    namespace = Namespace.objects.filter(name__iexact=name).first() if _names_ok(name) else None
    if namespace is None:
        raise NotFound(f"Namespace {name!r} not found, or you are not a member.")
    _require(principal, namespace, action, target=target or name)
    return namespace


def member_list_for_user(*, principal: Principal, namespace: str) -> QuerySet[Membership]:
    """Members of a namespace the caller belongs to."""
    ns = namespace_get_for_user(principal=principal, name=namespace, action=Action.READ)
    return Membership.objects.filter(namespace=ns).select_related("user")


@dataclass(frozen=True)
class ModelFilters:
    """Narrowing of a model listing: a name prefix and tags (key, value) that must all match."""

    prefix: str = ""
    tags: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class VersionFilters:
    """Narrowing of a version listing; empty values mean "any", tags must all match."""

    state: str = ""
    tags: tuple[tuple[str, str], ...] = ()
    alias: str = ""
    created_by: str = ""


def _tags_filter(qs: QuerySet, tags: tuple[tuple[str, str], ...]) -> QuerySet:
    # KT (a key transform to text) works on PostgreSQL and SQLite alike, for any key string.
    for i, (key, value) in enumerate(tags):
        qs = qs.alias(**{f"_tag{i}": KT(f"tags__{key}")}).filter(**{f"_tag{i}": value})
    return qs


def model_list_for_user(
    *, principal: Principal, namespace: str, filters: ModelFilters | None = None
) -> QuerySet[RegisteredModel]:
    """Models of a namespace the caller belongs to, narrowed by `filters`."""
    ns = namespace_get_for_user(principal=principal, name=namespace, action=Action.READ)
    qs = RegisteredModel.objects.filter(namespace=ns).select_related("namespace")
    f = filters or ModelFilters()
    if f.prefix:
        qs = qs.filter(name__istartswith=f.prefix)
    return _tags_filter(qs, f.tags).prefetch_related("aliases__version")


def model_get_for_user(
    *, principal: Principal, namespace: str, name: str, action: Action, target: str = ""
) -> RegisteredModel:
    """Model `namespace/name` if the caller may do `action` on it."""
    target = target or audit_target(namespace, name)
    found = (
        _MODEL_LOOKUP.first([principal.user.pk, namespace, name])
        if _names_ok(namespace, name)
        else None
    )
    if found is None:
        # Which part is missing, or refused, decides the answer: the namespace's own lookup.
        namespace_get_for_user(principal=principal, name=namespace, action=action, target=target)
        raise NotFound(f"Model {namespace}/{name} not found.")
    (obj, ns), (role,) = found
    assert isinstance(obj, RegisteredModel) and isinstance(ns, Namespace)
    obj.namespace = ns
    principal.roles[ns.pk] = role
    _require(principal, ns, action, target=target)
    return obj


def version_list_for_user(
    *, principal: Principal, namespace: str, model: str, filters: VersionFilters | None = None
) -> QuerySet[ModelVersion]:
    """Versions of a model the caller may read, narrowed by `filters`."""
    obj = model_get_for_user(
        principal=principal, namespace=namespace, name=model, action=Action.READ
    )
    qs = ModelVersion.objects.filter(model=obj).select_related("model__namespace", "created_by")
    f = filters or VersionFilters()
    if f.state:
        qs = qs.filter(state=f.state)
    if f.created_by:
        qs = qs.filter(created_by__username=f.created_by)
    if f.alias:
        qs = qs.filter(Exists(ModelAlias.objects.filter(version=OuterRef("pk"), name=f.alias)))
    return _tags_filter(qs, f.tags).prefetch_related("aliases")


def alias_list_for_user(
    *, principal: Principal, namespace: str, model: str
) -> QuerySet[ModelAlias]:
    """Aliases of a model the caller may read."""
    obj = model_get_for_user(
        principal=principal, namespace=namespace, name=model, action=Action.READ
    )
    return ModelAlias.objects.filter(model=obj).select_related("version", "updated_by")


def alias_names_by_version(*, version_ids: list[int]) -> dict[int, list[str]]:
    """Alias names pointing at each of `version_ids` (versions the caller already read through
    a selector; no permission check)."""
    out: dict[int, list[str]] = {}
    if version_ids:
        names = ModelAlias.objects.filter(version_id__in=version_ids).values_list(
            "version_id", "name"
        )
        for version_id, name in names:
            out.setdefault(version_id, []).append(name)
    return out


def _version_target(namespace: str, model: str, ref: VersionRef, path: str | None = None) -> str:
    if isinstance(ref, int):
        return audit_target(namespace, model, ref, path)
    # An alias not yet resolved (the caller may not even see the model): named as given.
    return "/".join([audit_target(namespace, model), f"@{ref}", *([path] if path else [])])


def version_get_for_user(
    *,
    principal: Principal,
    namespace: str,
    model: str,
    number: VersionRef,
    action: Action,
    target: str = "",
) -> ModelVersion:
    """Version `number` (or the version alias `number` points at) of a model if the caller
    may do `action` on it. Every version route resolves aliases here, and only here.

    Downloads by viewers are limited to released (approved or deprecated) versions; the
    files of a quarantined version only to its owner and the namespace's admins.
    """
    target = target or _version_target(namespace, model, number)
    found = None
    if _names_ok(namespace, model):
        if isinstance(number, int):
            found = _VERSION_LOOKUP.first([principal.user.pk, namespace, model, number])
        elif _text_ok(number):
            found = _VERSION_BY_ALIAS.first([principal.user.pk, number, namespace, model])
    if found is None:
        # Namespace, model or version missing, or refused: the model's lookup answers first.
        model_get_for_user(
            principal=principal, namespace=namespace, name=model, action=action, target=target
        )
        raise NotFound(f"Version {number} of {namespace}/{model} not found.")
    (version, m, ns, creator, submitter), (role,) = found
    assert isinstance(version, ModelVersion) and isinstance(m, RegisteredModel)
    assert isinstance(ns, Namespace)
    m.namespace = ns
    version.model = m
    # Partial users (id and username; anything else loads on first use), or None.
    version.created_by = creator  # type: ignore[assignment]
    version.submitted_by = submitter  # type: ignore[assignment]
    principal.roles[ns.pk] = role
    _require(principal, ns, action, target=target)
    if action == Action.WRITE and not _owner_or_admin(principal, version, role):
        # A contributor changes their own versions (files, uploads, submit, metadata); the
        # namespace's admins change any.
        _denied(principal, ns, action, target, reason="not the version's owner")
        raise PermissionDenied(
            "Only the version's creator and the namespace's admins may change it.",
            role=role,
            action=str(action),
        )
    if not isinstance(number, int):
        # Audit records name the version the alias pointed at when it was used.
        target = target.replace(
            _version_target(namespace, model, number),
            audit_target(namespace, model, version.number),
        )
    if action == Action.DOWNLOAD:
        if version.state == VersionState.REVOKED:
            # Everyone, owner and admins included: a revoked version's bytes are never served.
            raise VersionRevoked(state=version.state)
        role = role_for(principal=principal, namespace=m.namespace)
        if version.state not in RELEASED_STATES and not _may_download_unreleased(
            principal, version, role
        ):
            if role == Role.VIEWER:
                _denied(principal, m.namespace, action, target, reason="viewers: released only")
                raise PermissionDenied(
                    "Viewers can download approved versions only.", state=version.state
                )
            if version.state == VersionState.QUARANTINED:
                _denied(principal, m.namespace, action, target, reason="version quarantined")
                raise VersionQuarantined(state=version.state)
            _denied(principal, m.namespace, action, target, reason="unreleased, not yours")
            raise PermissionDenied(
                "Until it is approved, a version's files are for its owner, the namespace's "
                "admins, and reviewers while it is pending review.",
                state=version.state,
            )
    return version


def review_list_for_user(
    *, principal: Principal, namespace: str, model: str, number: VersionRef
) -> QuerySet[Review]:
    """The reviews of a version the caller may read, oldest first."""
    version = version_get_for_user(
        principal=principal, namespace=namespace, model=model, number=number, action=Action.READ
    )
    return Review.objects.filter(version=version).select_related("reviewer")


def _may_download_unreleased(principal: Principal, version: ModelVersion, role: str | None) -> bool:
    # Contributors fetch their own drafts, reviewers what they are asked to review, admins all.
    if role == Role.REVIEWER and version.state == VersionState.PENDING_REVIEW:
        return True
    return _owner_or_admin(principal, version, role)


def _owner_or_admin(principal: Principal, version: ModelVersion, role: str | None) -> bool:
    uid = principal.user.pk
    return role == Role.ADMIN or uid in (version.created_by_id, version.submitted_by_id)


def scan_findings_visible(*, principal: Principal, version: ModelVersion) -> bool:
    """Whether the caller may read the scan findings of `version` (already readable to them).

    A quarantined version's findings say how to attack a loader; only its owner (creator or
    submitter) and the namespace's admins see them. Findings of other versions are for every
    reader: reviewers need them.
    """
    if version.state != VersionState.QUARANTINED:
        return True
    role = role_for(principal=principal, namespace=version.model.namespace)
    return _owner_or_admin(principal, version, role)


def scan_reports_latest(*, version: ModelVersion) -> list[ScanReport]:
    """The reports of the version's most recent finished scan (one per file); no permission
    check: for callers that already hold a version read through version_get_for_user."""
    if version.state == VersionState.DRAFT:
        return []  # scans start with the submission, which ends the draft state
    latest = (
        ScanReport.objects.filter(artifact__version=version)
        .order_by("-created_at")
        .values_list("job_id", flat=True)
        .first()
    )
    if latest is None:
        return []
    return list(
        ScanReport.objects.filter(job_id=latest)
        .select_related("artifact")
        .order_by("artifact__path")
    )


def scan_report_list_for_user(
    *, principal: Principal, namespace: str, model: str, number: VersionRef
) -> QuerySet[ScanReport]:
    """Every scan report of a version, newest first (owner and admins only when quarantined)."""
    target = _version_target(namespace, model, number) + "/scans"
    version = version_get_for_user(
        principal=principal,
        namespace=namespace,
        model=model,
        number=number,
        action=Action.READ,
        target=target,
    )
    if not scan_findings_visible(principal=principal, version=version):
        _denied(principal, version.model.namespace, Action.READ, target, reason="quarantined")
        raise VersionQuarantined(state=version.state)
    return ScanReport.objects.filter(artifact__version=version).select_related("artifact")


def job_list_for_user(*, principal: Principal) -> QuerySet[Job]:
    """Jobs of every namespace the caller may read (superusers: all)."""
    if not principal.has_scope(TokenScope.READ):
        raise PermissionDenied("Listing jobs needs a token with the 'read' scope.")
    qs = Job.objects.select_related("namespace", "version__model", "created_by")
    if principal.user.is_superuser:
        return qs
    readable = [
        m.namespace_id
        for m in Membership.objects.filter(user=principal.user)
        if principal_allows(principal, m.role, Action.READ)
    ]
    return qs.filter(namespace_id__in=readable)


def job_get_for_user(*, principal: Principal, job_id: uuid.UUID) -> Job:
    """One job, if it belongs to a namespace the caller may read (NotFound otherwise)."""
    job = job_list_for_user(principal=principal).filter(pk=job_id).first()
    if job is None:
        raise NotFound("No such job, or it belongs to a namespace you are not a member of.")
    return job


def version_detail_for_user(
    *, principal: Principal, namespace: str, model: str, number: VersionRef
) -> ModelVersion:
    """A version the caller may read, with what its detail view shows loaded in bulk."""
    version = version_get_for_user(
        principal=principal, namespace=namespace, model=model, number=number, action=Action.READ
    )
    return version_related_load(version=version)


def version_related_load(*, version: ModelVersion) -> ModelVersion:
    """Load what a version's detail view shows, for a version already read through a
    selector (or just changed by a service): `loaded_files` (by path), `loaded_reviews`
    (oldest first, with their reviewers) and `loaded_aliases` (names, sorted).

    A draft is not asked for reviews or aliases: versions leave the draft state on submission
    and never return to it, and reviews and aliases (like scans) come after submission.
    """
    found = _FILES_LOOKUP.all([version.pk])
    version.loaded_files = [instances[0] for instances, _ in found]  # type: ignore[attr-defined]
    draft = version.state == VersionState.DRAFT
    version.loaded_reviews = (  # type: ignore[attr-defined]
        []
        if draft
        else list(
            Review.objects.filter(version=version)
            .select_related("reviewer")
            .order_by("created_at", "pk")
        )
    )
    version.loaded_aliases = (  # type: ignore[attr-defined]
        []
        if draft
        else list(
            ModelAlias.objects.filter(version=version)
            .order_by("name")
            .values_list("name", flat=True)
        )
    )
    # A draft may carry one already: a declared run, or the job that wrote it.
    version.loaded_dp_record = ledger.dp_record_of(version)  # type: ignore[attr-defined]
    return version


def publisher_key_list_for_user(*, principal: Principal, namespace: str) -> QuerySet[PublisherKey]:
    """The publisher keys a namespace trusts (its members may read them)."""
    ns = namespace_get_for_user(principal=principal, name=namespace, action=Action.READ)
    return PublisherKey.objects.filter(namespace=ns).select_related("created_by")


def signature_list_for_user(
    *, principal: Principal, namespace: str, model: str, number: VersionRef
) -> QuerySet[Signature]:
    """The signatures of a version the caller may read (registry and publisher), oldest first."""
    version = version_get_for_user(
        principal=principal, namespace=namespace, model=model, number=number, action=Action.READ
    )
    return Signature.objects.filter(version=version).order_by("created_at", "pk")


def signature_get_for_user(
    *, principal: Principal, namespace: str, model: str, number: VersionRef, signature_id: int
) -> Signature:
    """One signature of a version the caller may read (NotFound if it is another's)."""
    signature = (
        signature_list_for_user(
            principal=principal, namespace=namespace, model=model, number=number
        )
        .filter(pk=signature_id)
        .first()
    )
    if signature is None:
        raise NotFound("No such signature of this version.")
    return signature


def artifact_list_for_user(
    *, principal: Principal, namespace: str, model: str, number: VersionRef
) -> QuerySet[Artifact]:
    """Files of a version the caller may read (metadata only)."""
    version = version_get_for_user(
        principal=principal, namespace=namespace, model=model, number=number, action=Action.READ
    )
    return Artifact.objects.filter(version=version)


def artifact_get_for_user(
    *,
    principal: Principal,
    namespace: str,
    model: str,
    number: VersionRef,
    path: str,
    action: Action,
) -> Artifact:
    """File `path` of a version if the caller may do `action` on it (a refused download is
    audited as access.denied). An invalid path is an InvalidPath (400), whoever asks."""
    path = validate_artifact_path(path)
    version = version_get_for_user(
        principal=principal,
        namespace=namespace,
        model=model,
        number=number,
        action=action,
        target=_version_target(namespace, model, number, path),
    )
    artifact = Artifact.objects.filter(version=version, path=path).first()
    if artifact is None:
        raise NotFound(f"No file {path!r} in version {number} of {namespace}/{model}.")
    artifact.version = version
    return artifact


def upload_session_get_for_user(
    *,
    principal: Principal,
    namespace: str,
    model: str,
    number: VersionRef,
    upload_id: uuid.UUID | str,
    action: Action,
) -> UploadSession:
    """A resumable upload session of a version the caller may write to."""
    version = version_get_for_user(
        principal=principal, namespace=namespace, model=model, number=number, action=action
    )
    session = UploadSession.objects.filter(version=version, pk=upload_id).first()
    if session is None:
        raise NotFound("No such upload session.")
    session.version = version
    return session


def token_list_for_user(*, user: User) -> QuerySet[ApiToken]:
    """The caller's own tokens (never anyone else's)."""
    return ApiToken.objects.filter(user=user)


# --- The audit log ------------------------------------------------------------------------------


def audit_namespaces_for_user(*, principal: Principal) -> list[str] | None:
    """Namespaces whose audit events the caller may read; None means all (superusers)."""
    if not principal.has_scope(TokenScope.READ):
        raise PermissionDenied("Reading the audit log needs a token with the 'read' scope.")
    if principal.user.is_superuser:
        return None
    names = [
        m.namespace.name
        for m in Membership.objects.filter(user=principal.user).select_related("namespace")
        if principal_allows(principal, m.role, Action.AUDIT)
    ]
    if not names:
        raise PermissionDenied("Only auditors and admins can read the audit log.")
    return names


def audit_log_verifier_check(*, principal: Principal) -> None:
    """Raise unless the caller may verify the whole log and read its signed checkpoints.

    Checkpoints and verification cover every namespace's events (hashes, not contents), so they
    are for superusers and auditors, whose job it is. A namespace admin reads their own
    namespace's events but does not learn the size and health of every other team's log.
    """
    if not principal.has_scope(TokenScope.READ):
        raise PermissionDenied("Verifying the audit log needs a token with the 'read' scope.")
    if principal.user.is_superuser:
        return
    if not Membership.objects.filter(user=principal.user, role=Role.AUDITOR).exists():
        raise PermissionDenied(
            "Only auditors verify the audit log and read its checkpoints; namespace admins can "
            "read their namespace's events at /audit/events."
        )


@dataclass(frozen=True)
class AuditFilters:
    """Narrowing of an audit-event listing; empty strings and None mean "any"."""

    actor: str = ""
    token: str = ""
    action: str = ""
    namespace: str = ""
    target_prefix: str = ""
    sha256: str = ""
    outcome: str = ""
    since: datetime | None = None
    until: datetime | None = None


def audit_event_list_for_user(
    *, principal: Principal, filters: AuditFilters | None = None
) -> QuerySet[AuditEvent]:
    """Audit events of the namespaces the caller audits, narrowed by `filters`."""
    visible = audit_namespaces_for_user(principal=principal)
    qs = AuditEvent.objects.all()
    if visible is not None:
        qs = qs.filter(namespace__in=visible)
    f = filters or AuditFilters()
    exact = {
        "actor_user": f.actor,
        "actor_token": f.token,
        "action": f.action,
        "namespace": f.namespace,
        "target_sha256": f.sha256,
        "outcome": f.outcome,
    }
    for column, value in exact.items():
        if value:
            qs = qs.filter(**{column: value.replace("\x00", "")})
    if f.target_prefix:
        qs = qs.filter(target__startswith=f.target_prefix.replace("\x00", ""))
    if f.since is not None:
        qs = qs.filter(created_at__gte=f.since)
    if f.until is not None:
        qs = qs.filter(created_at__lt=f.until)
    return qs


def audit_checkpoint_list_for_user(*, principal: Principal) -> QuerySet[AuditCheckpoint]:
    """Signed checkpoints of the whole log (auditors and superusers)."""
    audit_log_verifier_check(principal=principal)
    return AuditCheckpoint.objects.all()


def dataset_list_for_user(*, principal: Principal, namespace: str) -> QuerySet[Dataset]:
    """Datasets of a namespace the caller may read."""
    ns = namespace_get_for_user(principal=principal, name=namespace, action=Action.READ)
    return Dataset.objects.filter(namespace=ns).select_related("namespace", "created_by")


def dataset_get_for_user(
    *, principal: Principal, namespace: str, name: str, action: Action
) -> Dataset:
    """Dataset `name` if the caller may do `action` in its namespace (NotFound otherwise)."""
    target = f"{namespace}/datasets/{name}"
    ns = namespace_get_for_user(principal=principal, name=namespace, action=action, target=target)
    dataset = (
        Dataset.objects.filter(namespace=ns, name__iexact=name).select_related("created_by").first()
        if _names_ok(name)
        else None
    )
    if dataset is None:
        raise NotFound(f"Dataset {name!r} not found in namespace {ns.name!r}.")
    dataset.namespace = ns
    return dataset


def ledger_entry_list_for_user(
    *, principal: Principal, namespace: str, dataset: str
) -> QuerySet[LedgerEntry]:
    """A dataset's ledger, every entry of every block (readers of the namespace)."""
    found = dataset_get_for_user(
        principal=principal, namespace=namespace, name=dataset, action=Action.READ
    )
    return LedgerEntry.objects.filter(dataset=found).select_related(
        "block", "version__model", "created_by"
    )


def job_get_for_cancel(*, principal: Principal, job_id: uuid.UUID) -> Job:
    """A job the caller may cancel: their own (a write token is enough), or any of a namespace
    they administer. A job of another namespace is a NotFound, as everywhere."""
    job = (
        Job.objects.select_related("namespace", "version__model", "created_by")
        .filter(pk=job_id)
        .first()
    )
    if job is not None and job.namespace is None:
        if principal.user.is_superuser and principal.has_scope(TokenScope.ADMIN):
            return job
        job = None
    role = (
        None
        if job is None or job.namespace is None
        else role_for(principal=principal, namespace=job.namespace)
    )
    if job is None or job.namespace is None:
        raise NotFound("No such job, or it belongs to a namespace you are not a member of.")
    if role is None and not principal.user.is_superuser:
        # Superusers see every job (job_list_for_user), so theirs is a refusal, not a 404.
        raise NotFound("No such job, or it belongs to a namespace you are not a member of.")
    own = job.created_by_id == principal.user.pk and principal_allows(principal, role, Action.WRITE)
    if own or principal_allows(principal, role, Action.MANAGE):
        return job
    _denied(principal, job.namespace, Action.WRITE, f"jobs/{job.pk}", reason="not the job's owner")
    raise PermissionDenied("Only the job's creator or a namespace admin can cancel it.")


def dataset_job_list_for_user(*, principal: Principal, dataset: Dataset) -> QuerySet[Job]:
    """The DP jobs (retraining, privacy audits) run on `dataset`, newest first, for a caller
    who may read its namespace (`dataset` comes from dataset_get_for_user)."""
    return (
        job_list_for_user(principal=principal)
        .filter(
            namespace_id=dataset.namespace_id,
            kind__in=[JobKind.DP_RETRAIN, JobKind.PRIVACY_AUDIT],
            params__dataset=dataset.name,
        )
        .order_by("-created_at")
    )


# --- The dashboard's overviews: home and the review queue --------------------------------------


def membership_list_for_user(*, principal: Principal) -> QuerySet[Membership]:
    """The caller's own memberships (namespace and role), by namespace name."""
    if not principal.has_scope(TokenScope.READ):
        raise PermissionDenied("Listing namespaces needs a token with the 'read' scope.")
    return (
        Membership.objects.filter(user=principal.user)
        .select_related("namespace")
        .order_by("namespace__name")
    )


def _namespace_ids_allowing(principal: Principal, action: Action) -> list[int]:
    return [
        m.namespace_id
        for m in Membership.objects.filter(user=principal.user).only("namespace_id", "role")
        if principal_allows(principal, m.role, action)
    ]


def version_recent_for_user(*, principal: Principal, limit: int = 20) -> list[ModelVersion]:
    """The versions of the caller's namespaces that changed last (created, submitted or
    approved), newest change first, each with `changed_at`."""
    readable = _namespace_ids_allowing(principal, Action.READ)
    changed = Greatest(
        "created_at",
        Coalesce("submitted_at", "created_at"),
        Coalesce("approved_at", "created_at"),
    )
    return list(
        ModelVersion.objects.filter(model__namespace_id__in=readable)
        .annotate(changed_at=changed)
        .select_related("model__namespace", "created_by")
        .order_by("-changed_at", "-pk")[:limit]
    )


def version_list_awaiting_owner_for_user(*, principal: Principal) -> QuerySet[ModelVersion]:
    """The caller's own versions (created or submitted by them) still scanning or quarantined,
    in namespaces they may read, oldest first."""
    readable = _namespace_ids_allowing(principal, Action.READ)
    user = principal.user
    return (
        ModelVersion.objects.filter(
            model__namespace_id__in=readable,
            state__in=[VersionState.SCANNING, VersionState.QUARANTINED],
        )
        .filter(Q(created_by=user) | Q(submitted_by=user))
        .select_related("model__namespace")
        .order_by("created_at", "pk")
    )


def _count(qs: QuerySet) -> Coalesce:
    # A correlated COUNT per row, rather than joins that multiply each other's rows.
    return Coalesce(
        Subquery(
            qs.order_by()
            .annotate(n=Func(F("pk"), function="COUNT", output_field=IntegerField()))
            .values("n")
        ),
        0,
    )


_SEVERITY_RANK = Case(
    *[When(max_severity=name, then=Value(rank)) for rank, (name, _) in enumerate(SEVERITY_CHOICES)],
    default=Value(-1),
)


def review_queue_for_user(*, principal: Principal) -> QuerySet[ModelVersion]:
    """Versions pending review that the caller may review now, oldest submission first: in the
    namespaces where their role and token allow reviewing, not reviewed by them yet, and not
    their own uploads unless the namespace allows self-review (approvals.uploader_q, the rule
    review_record applies). Each carries `file_count`, `flagged_files` (files in which its
    deciding scan found something) and `worst_severity` (the highest one found, or "")."""
    from registry.services import approvals  # approvals imports this module

    user = principal.user
    reviewable = _namespace_ids_allowing(principal, Action.REVIEW)
    reports = ScanReport.objects.filter(job_id=OuterRef("scan_job_id"))
    worst = (
        reports.exclude(max_severity="")
        .annotate(rank=_SEVERITY_RANK)
        .order_by("-rank")
        .values("max_severity")[:1]
    )
    return (
        ModelVersion.objects.filter(
            model__namespace_id__in=reviewable, state=VersionState.PENDING_REVIEW
        )
        .exclude(approvals.uploader_q(user) & Q(model__namespace__allow_self_review=False))
        .exclude(Exists(Review.objects.filter(version=OuterRef("pk"), reviewer=user)))
        .annotate(
            file_count=_count(Artifact.objects.filter(version=OuterRef("pk"))),
            flagged_files=_count(reports.exclude(verdict=ScanVerdict.CLEAN)),
            worst_severity=Coalesce(Subquery(worst), Value("")),
        )
        .select_related("model__namespace", "submitted_by")
        .order_by("submitted_at", "pk")
    )


def version_download_allowed(*, principal: Principal, version: ModelVersion) -> bool:
    """Whether the caller may fetch the files of `version` (already read through a selector):
    the rule version_get_for_user applies to Action.DOWNLOAD, without auditing anything. For
    showing download controls only: downloads themselves go through artifact_get_for_user."""
    if version.state == VersionState.REVOKED:
        return False
    role = role_for(principal=principal, namespace=version.model.namespace)
    if not principal_allows(principal, role, Action.DOWNLOAD):
        return False
    return version.state in RELEASED_STATES or _may_download_unreleased(principal, version, role)


def audit_readable_for_namespace(*, principal: Principal, namespace: Namespace) -> bool:
    """Whether the caller may read `namespace`'s audit events (audit_event_list_for_user's
    rule: superusers, and the namespace's auditors and admins)."""
    if not principal.has_scope(TokenScope.READ):
        return False
    if principal.user.is_superuser:
        return True
    role = role_for(principal=principal, namespace=namespace)
    return principal_allows(principal, role, Action.AUDIT)


def data_block_list_for_user(
    *, principal: Principal, namespace: str, dataset: str
) -> QuerySet[DataBlock]:
    """A dataset's blocks with their data files (readers of the namespace)."""
    found = dataset_get_for_user(
        principal=principal, namespace=namespace, name=dataset, action=Action.READ
    )
    return DataBlock.objects.filter(dataset=found).select_related("artifact__version__model")
