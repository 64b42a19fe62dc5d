"""Who may do what: roles per namespace, narrowed by the token's scopes."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from django.contrib.auth.models import User

from registry.models import ApiToken, Role, TokenScope


class Action(StrEnum):
    READ = "read"  # metadata
    DOWNLOAD = "download"  # artifact bytes
    WRITE = "write"  # create models/versions, upload, submit
    REVIEW = "review"
    MANAGE = "manage"  # members, namespace settings, deletes
    AUDIT = "audit"


ROLE_ACTIONS: dict[str, frozenset[Action]] = {
    Role.VIEWER: frozenset({Action.READ, Action.DOWNLOAD}),
    Role.CONTRIBUTOR: frozenset({Action.READ, Action.DOWNLOAD, Action.WRITE}),
    Role.REVIEWER: frozenset({Action.READ, Action.DOWNLOAD, Action.REVIEW}),
    Role.ADMIN: frozenset(Action),
    # Auditors see metadata and the audit log, never artifact bytes.
    Role.AUDITOR: frozenset({Action.READ, Action.AUDIT}),
}

ACTION_SCOPE: dict[Action, TokenScope] = {
    Action.READ: TokenScope.READ,
    Action.DOWNLOAD: TokenScope.READ,
    Action.AUDIT: TokenScope.READ,
    Action.WRITE: TokenScope.WRITE,
    Action.REVIEW: TokenScope.REVIEW,
    Action.MANAGE: TokenScope.ADMIN,
}


@dataclass(frozen=True)
class Principal:
    """The caller: a user, and the token it authenticated with (None for a browser session)."""

    user: User
    token: ApiToken | None = None
    # Roles looked up during this request, by namespace id (selectors.role_for fills it): one
    # query per namespace per request, without hanging state on the user object.
    roles: dict[int, str | None] = field(default_factory=dict, compare=False, repr=False)

    def has_scope(self, scope: TokenScope) -> bool:
        return self.token is None or scope in self.token.scopes


def role_allows(role: str | None, action: Action) -> bool:
    return role is not None and action in ROLE_ACTIONS.get(role, frozenset())


def principal_allows(principal: Principal, role: str | None, action: Action) -> bool:
    return role_allows(role, action) and principal.has_scope(ACTION_SCOPE[action])
