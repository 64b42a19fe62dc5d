"""registry.services.aliases: the rules without HTTP."""

from __future__ import annotations

import pytest

from registry.access import Principal
from registry.errors import AliasProtected, InvalidInput, VersionNotApproved
from registry.models import AuditEvent, ModelAlias, VersionState
from registry.services import aliases, approvals


def _approve(version) -> None:
    type(version).objects.filter(pk=version.pk).update(state=VersionState.APPROVED)
    version.refresh_from_db()


def test_alias_set_moves_and_audits(actors, draft):
    root = Principal(user=actors.users["root"])
    with pytest.raises(VersionNotApproved):
        aliases.alias_set(principal=root, model=draft.model, name="production", number=1)
    _approve(draft)
    alias = aliases.alias_set(principal=root, model=draft.model, name="production", number=1)
    assert alias.version_id == draft.pk
    assert ModelAlias.objects.count() == 1
    event = AuditEvent.objects.get(action="alias.set")
    assert event.target == "acme/bert/aliases/production"
    assert event.details == {"alias": "production", "from": None, "to": 1}


def test_protected_aliases_follow_the_policy(actors, draft):
    _approve(draft)
    bob = Principal(user=actors.users["bob"])
    with pytest.raises(AliasProtected):
        aliases.alias_set(principal=bob, model=draft.model, name="production", number=1)
    approvals.policy_update(namespace=actors.acme, protected_aliases=[])
    draft.model.namespace.refresh_from_db()
    aliases.alias_set(principal=bob, model=draft.model, name="production", number=1)
    with pytest.raises(InvalidInput):
        approvals.policy_update(namespace=actors.acme, protected_aliases=["42"])


def test_a_read_token_of_an_admin_cannot_move_a_protected_alias(actors, draft):
    from registry.services.tokens import token_create

    _approve(draft)
    token = token_create(user=actors.users["root"], scopes=["read", "review"]).token
    with pytest.raises(AliasProtected):
        aliases.alias_set(
            principal=Principal(user=actors.users["root"], token=token),
            model=draft.model,
            name="production",
            number=1,
        )
