"""Permission-scoped reads. An object the caller may not see is NotFound, never Forbidden."""

from __future__ import annotations

from django.db.models import QuerySet

from registry.access import Action, Principal, principal_allows
from registry.errors import NotFound, PermissionDenied
from registry.models import (
    Artifact,
    Membership,
    ModelVersion,
    Namespace,
    RegisteredModel,
    UploadSession,
    VersionState,
)

# Viewers only fetch bytes of versions that passed review.
RELEASED_STATES = {VersionState.APPROVED, VersionState.DEPRECATED}


def role_for(principal: Principal, namespace: Namespace) -> str | None:
    cache = getattr(principal.user, "_smr_roles", None)
    if cache is None:
        cache = {}
        principal.user._smr_roles = cache  # type: ignore[attr-defined]
    if namespace.pk not in cache:
        cache[namespace.pk] = (
            Membership.objects.filter(namespace=namespace, user=principal.user)
            .values_list("role", flat=True)
            .first()
        )
    return cache[namespace.pk]


def _require(principal: Principal, namespace: Namespace, action: Action) -> str:
    role = role_for(principal, namespace)
    if role is None:
        raise NotFound(f"Namespace {namespace.name!r} not found, or you are not a member.")
    if not principal_allows(principal, role, action):
        raise PermissionDenied(
            f"Your role ({role}) or token scopes do not allow '{action}' here.",
            role=role,
            action=str(action),
        )
    return role


def namespace_list_for_user(principal: Principal) -> QuerySet[Namespace]:
    return Namespace.objects.filter(memberships__user=principal.user).distinct()


def namespace_get_for_user(principal: Principal, name: str, action: Action) -> Namespace:
    # PostgreSQL refuses NUL in text parameters (a DataError, i.e. a 500); no name holds one.
    # Names are ASCII and unique ignoring case, so lookups ignore case too (`ACME` is `acme`).
    # Non-ASCII input never names anything; it must not reach UPPER() (U+017F upper-cases to 'S').
    namespace = (
        Namespace.objects.filter(name__iexact=name).first()
        if "\x00" not in name and name.isascii()
        else None
    )
    if namespace is None:
        raise NotFound(f"Namespace {name!r} not found, or you are not a member.")
    _require(principal, namespace, action)
    return namespace


def model_get_for_user(
    principal: Principal, namespace: str, model: str, action: Action
) -> RegisteredModel:
    ns = namespace_get_for_user(principal, namespace, action)
    obj = (  # case-insensitive, as for namespaces
        RegisteredModel.objects.filter(namespace=ns, name__iexact=model)
        .select_related("namespace")
        .first()
        if "\x00" not in model and model.isascii()
        else None
    )
    if obj is None:
        raise NotFound(f"Model {namespace}/{model} not found.")
    return obj


def version_get_for_user(
    principal: Principal, namespace: str, model: str, number: int, action: Action
) -> ModelVersion:
    m = model_get_for_user(principal, namespace, model, action)
    version = (
        ModelVersion.objects.filter(model=m, number=number)
        .select_related("model__namespace")
        .first()
    )
    if version is None:
        raise NotFound(f"Version {number} of {namespace}/{model} not found.")
    if action == Action.DOWNLOAD:
        role = role_for(principal, m.namespace)
        if role == "viewer" and version.state not in RELEASED_STATES:
            raise PermissionDenied(
                "Viewers can download approved versions only.", state=version.state
            )
    return version


def artifact_get_for_user(
    principal: Principal, namespace: str, model: str, number: int, path: str, action: Action
) -> Artifact:
    version = version_get_for_user(principal, namespace, model, number, action)
    artifact = Artifact.objects.filter(version=version, path=path).first()
    if artifact is None:
        raise NotFound(f"No file {path!r} in version {number} of {namespace}/{model}.")
    artifact.version = version
    return artifact


def upload_session_get_for_user(
    principal: Principal, namespace: str, model: str, number: int, upload_id: str, action: Action
) -> UploadSession:
    version = version_get_for_user(principal, namespace, model, number, action)
    session = UploadSession.objects.filter(version=version, pk=upload_id).first()
    if session is None:
        raise NotFound("No such upload session.")
    session.version = version
    return session


def audit_namespaces_for_user(principal: Principal) -> list[str] | None:
    """Namespaces whose audit events the caller may read; None means all (superusers)."""
    if not principal.has_scope("read"):
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
