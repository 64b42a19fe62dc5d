"""Password logins for the dashboard: a Django session cookie, audited, behind django-axes.

Bearer tokens (services/tokens.py) remain the API's credentials; a session is what a browser
holds after `POST /auth/login`. Every failed password (Django's user_login_failed signal) is
audited by registry/signals.py; axes counts the failures per username and client address and,
past AXES_FAILURE_LIMIT, refuses that pair for AXES_COOLOFF_TIME, even with the right password.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth import authenticate, login, logout
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, User
from django.db import transaction
from django.http import HttpRequest

from registry.errors import InvalidCredentials, LockedOut
from registry.models import AuditAction, AuditOutcome, Membership
from registry.services.audit import audit_record, audit_record_now, context_set_actor


def lockout_error() -> LockedOut:
    """The error a locked-out login gets (its Retry-After is the whole cool-off)."""
    seconds = int(settings.AXES_COOLOFF_TIME.total_seconds())
    return LockedOut(retry_after=seconds)


@dataclass(frozen=True)
class NamespaceRole:
    namespace: str
    role: str


def session_login(*, request: HttpRequest, username: str, password: str) -> User:
    """Check the password and start a session for the user, audited as `auth.login`.

    `request` is Django's request (axes reads and flags it). A wrong password raises
    InvalidCredentials; a username+address pair past the failure limit raises LockedOut, also
    for the right password. Failures are audited by the user_login_failed receiver, lockouts by
    the user_locked_out one.
    """
    user = authenticate(request, username=username, password=password)
    if getattr(request, "axes_locked_out", False):
        raise lockout_error()
    if not isinstance(user, User):
        raise InvalidCredentials()
    with transaction.atomic():
        # login() rotates the session key (no fixation) and the CSRF token.
        login(request, user)
        context_set_actor(user=user.get_username())
        audit_record(
            action=AuditAction.LOGIN,
            target=f"user:{user.get_username()}",
            details={"method": "session"},
        )
    return user


def session_logout(*, request: HttpRequest, user: AbstractBaseUser | AnonymousUser) -> None:
    """End the request's session (flushed server-side), audited as `auth.logout`."""
    with transaction.atomic():
        if user.is_authenticated:
            audit_record(
                action=AuditAction.LOGOUT,
                target=f"user:{user.get_username()}",
                details={"method": "session"},
            )
        logout(request)


def login_failure_record(*, username: str) -> None:
    """Audit a failed password check (its own transaction: the login is being refused)."""
    audit_record_now(
        action=AuditAction.LOGIN_FAILED,
        outcome=AuditOutcome.FAILURE,
        target=f"user:{username[:150]}",
        details={"method": "session"},
    )


def lockout_record(*, username: str, **details: Any) -> None:
    """Audit a login refused because its username+address is locked out."""
    audit_record_now(
        action=AuditAction.LOCKED_OUT,
        outcome=AuditOutcome.FAILURE,
        target=f"user:{username[:150]}",
        details={
            "method": "session",
            "failure_limit": settings.AXES_FAILURE_LIMIT,
            "cooloff_seconds": int(settings.AXES_COOLOFF_TIME.total_seconds()),
            **details,
        },
    )


def session_user_roles(*, user: User) -> list[NamespaceRole]:
    """The user's namespaces and role in each, by namespace name."""
    rows = (
        Membership.objects.filter(user=user)
        .order_by("namespace__name")
        .values_list("namespace__name", "role")
    )
    return [NamespaceRole(namespace=name, role=role) for name, role in rows]
