"""Who may do what: every role x action, and token scopes that only ever narrow a role.

The expected table is written out here on purpose, not derived from ROLE_ACTIONS: a change to the
permission table in registry/access.py must show up as a failing test, not pass silently.
"""

from __future__ import annotations

import itertools

import pytest
from django.contrib.auth import get_user_model

from registry.access import Action, Principal, principal_allows, role_allows
from registry.models import ApiToken, Role

R, D, W, V, M, A = (
    Action.READ,
    Action.DOWNLOAD,
    Action.WRITE,
    Action.REVIEW,
    Action.MANAGE,
    Action.AUDIT,
)

EXPECTED: dict[str | None, set[Action]] = {
    "viewer": {R, D},
    "contributor": {R, D, W},
    "reviewer": {R, D, V},
    "admin": {R, D, W, V, M, A},
    # Auditors read metadata and the audit log but never artifact bytes.
    "auditor": {R, A},
    None: set(),  # not a member
    "owner": set(),  # a role name the registry does not know grants nothing
    "": set(),
}

# Which token scope each action needs.
SCOPE_OF = {R: "read", D: "read", A: "read", W: "write", V: "review", M: "admin"}


def user():
    # Never saved: these checks must not need the database.
    return get_user_model()(username="alice")


def token(*scopes: str) -> ApiToken:
    return ApiToken(scopes=list(scopes))


def test_every_role_is_covered():
    assert set(Role.values) <= set(EXPECTED)
    assert set(Action) == set(SCOPE_OF)


@pytest.mark.parametrize(
    ("role", "action"), list(itertools.product(EXPECTED, Action)), ids=lambda v: str(v)
)
def test_role_allows_matrix(role, action):
    assert role_allows(role, action) is (action in EXPECTED[role])


@pytest.mark.parametrize(
    ("role", "action"), list(itertools.product(EXPECTED, Action)), ids=lambda v: str(v)
)
def test_browser_session_gets_exactly_the_role(role, action):
    # No token (a browser session): the role alone decides.
    assert principal_allows(Principal(user=user()), role, action) is (action in EXPECTED[role])


@pytest.mark.parametrize(
    ("role", "action"), list(itertools.product(EXPECTED, Action)), ids=lambda v: str(v)
)
def test_token_with_every_scope_gets_exactly_the_role(role, action):
    principal = Principal(user=user(), token=token("read", "write", "review", "admin"))
    assert principal_allows(principal, role, action) is (action in EXPECTED[role])


@pytest.mark.parametrize("scope", ["read", "write", "review", "admin"])
@pytest.mark.parametrize("role", list(EXPECTED))
def test_single_scope_token_narrows_the_role(role, scope):
    """Allowed = role allows it AND the token holds the action's scope; never more."""
    principal = Principal(user=user(), token=token(scope))
    for action in Action:
        expected = action in EXPECTED[role] and SCOPE_OF[action] == scope
        assert principal_allows(principal, role, action) is expected, (role, scope, action)


def test_scopes_never_widen_a_role():
    # An admin-scoped token of a viewer is still a viewer: scopes are not roles.
    principal = Principal(user=user(), token=token("read", "write", "review", "admin"))
    for action in (W, V, M, A):
        assert not principal_allows(principal, "viewer", action)
    # An auditor with a write token still cannot download bytes.
    assert not principal_allows(principal, "auditor", D)


def test_token_without_scopes_allows_nothing():
    principal = Principal(user=user(), token=token())
    assert [a for a in Action if principal_allows(principal, "admin", a)] == []
    # Control: the same admin through a browser session may do everything.
    assert all(principal_allows(Principal(user=user()), "admin", a) for a in Action)


def test_unknown_scope_grants_nothing():
    principal = Principal(user=user(), token=token("superuser", "*"))
    assert [a for a in Action if principal_allows(principal, "admin", a)] == []


def test_has_scope():
    assert Principal(user=user()).has_scope("admin")  # sessions are not narrowed
    narrowed = Principal(user=user(), token=token("read"))
    assert narrowed.has_scope("read")
    assert not narrowed.has_scope("write")
    assert not narrowed.has_scope("READ")  # scopes are exact strings
