"""Aliases: named pointers (`production`, `staging`) at approved versions of a model.

Who may move what: the caller already holds the `review` action on the model (reviewers and
admins; the view checks it through the selectors). Aliases the namespace policy lists as
protected (`protected_aliases`, default `["production"]`) move or go only by namespace admins.
Every change is audited in the transaction that makes it, with the version before and after.
"""

from __future__ import annotations

import re

from django.db import transaction

from registry import selectors
from registry.access import Action, Principal, principal_allows
from registry.errors import AliasProtected, InvalidInput, NotFound, VersionNotApproved
from registry.models import (
    ALIAS_NAME_RE,
    AuditAction,
    ModelAlias,
    ModelVersion,
    RegisteredModel,
    VersionState,
    WebhookEvent,
)
from registry.services import webhooks
from registry.services.audit import audit_record, audit_target
from registry.services.denials import access_denied_record

_ALIAS_NAME = re.compile(ALIAS_NAME_RE)


def alias_name_validate(name: str) -> str:
    """`name` if it is a valid alias name (InvalidInput otherwise)."""
    if not _ALIAS_NAME.match(name):
        raise InvalidInput(
            "An alias name is 1 to 63 characters: a lowercase letter first, then lowercase "
            "letters, digits, '_' or '-' (it must not look like a version number).",
            field="alias",
        )
    return name


def _alias_target(model: RegisteredModel, name: str) -> str:
    return f"{audit_target(model.namespace.name, model.name)}/aliases/{name}"


def _protected_check(*, principal: Principal, model: RegisteredModel, name: str) -> None:
    namespace = model.namespace
    if name not in namespace.protected_aliases:
        return
    role = selectors.role_for(principal=principal, namespace=namespace)
    if not principal_allows(principal, role, Action.MANAGE):
        access_denied_record(
            user=principal.user.get_username(),
            namespace=namespace.name,
            target=_alias_target(model, name),
            operation=str(Action.MANAGE),
            reason="protected alias",
        )
        raise AliasProtected(alias=name)


def alias_set(
    *, principal: Principal, model: RegisteredModel, name: str, number: int
) -> ModelAlias:
    """Point alias `name` of `model` at version `number` (created if new; audited alias.set).

    Only an `approved` version may be the target (VersionNotApproved otherwise); a protected
    alias needs a namespace admin (AliasProtected otherwise).
    """
    alias_name_validate(name)
    _protected_check(principal=principal, model=model, name=name)
    with transaction.atomic():
        # The version row lock orders this against deprecate/revoke: the alias never lands on
        # a version that stopped being approved while we looked.
        version = (
            ModelVersion.objects.select_for_update(of=("self",))
            .filter(model=model, number=number)
            .first()
        )
        if version is None:
            raise NotFound(f"Version {number} of {model.namespace.name}/{model.name} not found.")
        if version.state != VersionState.APPROVED:
            raise VersionNotApproved(
                f"Version {number} is {version.state}; an alias can point at approved versions "
                "only.",
                state=version.state,
            )
        alias = (
            ModelAlias.objects.select_for_update()
            .select_related("version")
            .filter(model=model, name=name)
            .first()
        )
        before = alias.version.number if alias is not None else None
        if alias is None:
            alias, _ = ModelAlias.objects.get_or_create(
                model=model,
                name=name,
                defaults={"version": version, "updated_by": principal.user},
            )
        alias.version, alias.updated_by = version, principal.user
        alias.save(update_fields=["version", "updated_by", "updated_at"])
        webhooks.webhooks_emit(
            namespace=model.namespace,
            event=WebhookEvent.ALIAS_MOVED,
            payload={
                "namespace": model.namespace.name,
                "model": model.name,
                "alias": name,
                "from": before,
                "to": number,
            },
        )
        audit_record(
            action=AuditAction.ALIAS_SET,
            namespace=model.namespace.name,
            target=_alias_target(model, name),
            details={"alias": name, "from": before, "to": number},
        )
    alias.model = model
    return alias


def alias_delete(*, principal: Principal, model: RegisteredModel, name: str) -> None:
    """Remove alias `name` of `model` (audited alias.delete; NotFound if there is none)."""
    alias_name_validate(name)
    _protected_check(principal=principal, model=model, name=name)
    with transaction.atomic():
        alias = (
            ModelAlias.objects.select_for_update()
            .select_related("version")
            .filter(model=model, name=name)
            .first()
        )
        if alias is None:
            raise NotFound(f"No alias {name!r} on {model.namespace.name}/{model.name}.")
        before = alias.version.number
        alias.delete()
        audit_record(
            action=AuditAction.ALIAS_DELETE,
            namespace=model.namespace.name,
            target=_alias_target(model, name),
            details={"alias": name, "from": before, "to": None},
        )


def alias_change_allowed(*, principal: Principal, model: RegisteredModel, name: str) -> bool:
    """Whether the caller may move or delete alias `name` of `model`: the `review` action the
    API checks on the model, and the namespace's `manage` action for a protected alias (the
    rule of `_protected_check`). For showing controls only: alias_set and alias_delete decide."""
    namespace = model.namespace
    role = selectors.role_for(principal=principal, namespace=namespace)
    needed = Action.MANAGE if name in namespace.protected_aliases else Action.REVIEW
    return principal_allows(principal, role, needed)
