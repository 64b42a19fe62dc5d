"""Personal access tokens: `smr_<key id>_<secret>`, hashed at rest, shown once."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from registry import joinload
from registry.errors import InvalidInput, NotFound, PermissionDenied
from registry.models import ApiToken, AuditAction, AuditOutcome, TokenScope
from registry.services.audit import audit_record, audit_record_now, context_set_actor

TOKEN_PREFIX = "smr_"  # noqa: S105 - a public prefix, not a secret
KEY_ID_CHARS = frozenset("0123456789abcdef")


def _token_query() -> tuple[str, joinload.Hydrator]:
    """The token with key id %s and its user, in one query (every API call runs it; see
    registry/joinload.py for why it is composed by hand)."""
    token, user = joinload.Part(ApiToken, "t"), joinload.Part(User, "u")
    c = joinload.col
    sql = " ".join(
        [
            f"SELECT {joinload.select_list([token, user])}",
            f"FROM {joinload.table(token)}",
            f"JOIN {joinload.table(user)} ON {c(user, 'id')} = {c(token, 'user_id')}",
            f"WHERE {c(token, 'key_id')} = %s",
        ]
    )
    return sql, joinload.Hydrator([token, user])


_TOKEN_LOOKUP = joinload.JoinQuery(_token_query)


class _Default(Enum):
    EXPIRY = "default"


# `expires_at=DEFAULT_EXPIRY`: SMR_TOKEN_DEFAULT_DAYS from now, and never after the issuing token.
DEFAULT_EXPIRY = _Default.EXPIRY


@dataclass(frozen=True)
class IssuedToken:
    """A new token and its plaintext, which exists only in this object."""

    token: ApiToken
    plaintext: str  # returned to the caller once; never stored or logged


def _hash(secret: str) -> str:
    # Tokens carry 256 bits of entropy, so a fast hash is enough (no password stretching needed).
    return hashlib.sha256(secret.encode()).hexdigest()


def token_create(
    *,
    user: User,
    scopes: list[str],
    name: str = "",
    expires_at: datetime | _Default | None = None,
    issued_by: ApiToken | None = None,
) -> IssuedToken:
    """Create a token for `user` with the given scopes and return its plaintext once.

    `issued_by` is the token the request authenticated with, if any: a token can only mint
    tokens with scopes it holds and that expire no later than it does (no escalation by
    minting). `expires_at=DEFAULT_EXPIRY` (what the API uses when the client does not say)
    means SMR_TOKEN_DEFAULT_DAYS from now, and no later than the issuing token.
    """
    if isinstance(expires_at, _Default):
        expires_at = _default_expiry_for(issued_by)
    unknown = sorted(set(scopes) - set(TokenScope.values))
    if not scopes or unknown:
        raise InvalidInput(
            f"scopes must be a non-empty subset of {sorted(TokenScope.values)}",
            unknown=unknown,
        )
    if issued_by is not None:
        if not set(scopes) <= set(issued_by.scopes):
            raise PermissionDenied("A token cannot create a token with scopes it lacks.")
        limit = issued_by.expires_at
        if limit is not None and (expires_at is None or expires_at > limit):
            raise PermissionDenied(
                "A token cannot create a token that expires after it does.",
                expires_at_max=limit.isoformat(),
            )
    if expires_at is not None and expires_at <= timezone.now():
        raise InvalidInput("expires_at must be in the future")
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    with transaction.atomic():
        token = ApiToken.objects.create(
            user=user,
            name=name,
            key_id=key_id,
            secret_hash=_hash(secret),
            scopes=sorted(set(scopes)),
            expires_at=expires_at,
        )
        audit_record(
            action=AuditAction.TOKEN_CREATE,
            target=f"token:{key_id}",
            details={
                "owner": user.get_username(),
                "scopes": token.scopes,
                "expires_at": expires_at.isoformat() if expires_at else None,
            },
        )
    return IssuedToken(token=token, plaintext=f"{TOKEN_PREFIX}{key_id}_{secret}")


def default_expiry(days: int) -> datetime | None:
    """`days` from now; None (no expiry) when days is 0 or less."""
    return timezone.now() + timedelta(days=days) if days > 0 else None


def _default_expiry_for(issued_by: ApiToken | None) -> datetime | None:
    expires_at = default_expiry(settings.SMR_TOKEN_DEFAULT_DAYS)
    if issued_by is not None and issued_by.expires_at is not None:
        # Unasked, a minted token simply ends with the token that minted it.
        expires_at = min(filter(None, [expires_at, issued_by.expires_at]))
    return expires_at


def token_authenticate(raw: str) -> ApiToken | None:
    """Return the live token matching `raw`, or None (audited). Constant-time on the secret.

    `raw` is what follows `Bearer ` in the Authorization header; on success the token's owner
    becomes the actor of the request's audit context.
    """
    raw = raw.strip()
    token, reason = (None, "malformed") if not raw or " " in raw else _token_check(raw)
    if token is None:
        key_id = raw[len(TOKEN_PREFIX) :].partition("_")[0] if raw.startswith(TOKEN_PREFIX) else ""
        audit_record_now(
            action=AuditAction.AUTH_FAILED,
            outcome=AuditOutcome.FAILURE,
            target=f"token:{key_id[:16]}" if key_id and set(key_id) <= KEY_ID_CHARS else "",
            details={"method": "bearer", "reason": reason},
        )
    else:
        context_set_actor(user=token.user.get_username(), token=token.key_id)
    return token


def _token_check(raw: str) -> tuple[ApiToken | None, str]:
    if not raw.startswith(TOKEN_PREFIX):
        return None, "malformed"
    key_id, sep, secret = raw[len(TOKEN_PREFIX) :].partition("_")
    if not sep or not key_id or not secret or len(key_id) > 16 or not set(key_id) <= KEY_ID_CHARS:
        return None, "malformed"
    found = _TOKEN_LOOKUP.first([key_id])
    token: ApiToken | None = None
    if found is not None:
        (row_token, user), _ = found
        assert isinstance(row_token, ApiToken) and isinstance(user, User)
        token, token.user = row_token, user
    # Hash even when the key id is unknown so timing does not reveal which ids exist.
    candidate = _hash(secret)
    expected = token.secret_hash if token else _hash(secrets.token_urlsafe(32))
    if not hmac.compare_digest(candidate, expected) or token is None:
        return None, "unknown_or_bad_secret"
    now = timezone.now()
    if token.revoked_at is not None:
        return None, "revoked"
    if token.expires_at is not None and token.expires_at <= now:
        return None, "expired"
    if not token.user.is_active:
        return None, "inactive_user"
    # Cheap enough per request, and useful to find stale tokens; skip if updated recently.
    if token.last_used_at is None or now - token.last_used_at > timedelta(minutes=1):
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token, ""


def token_revoke(*, user: User, key_id: str, revoked_by: ApiToken | None = None) -> ApiToken:
    """Revoke one of `user`'s tokens.

    Any token may revoke itself (a leaked token can always be killed with itself), but
    revoking the owner's other tokens needs the admin scope: otherwise a leaked read-only token
    could lock its owner out of every script.
    """
    if (
        revoked_by is not None
        and revoked_by.key_id != key_id
        and TokenScope.ADMIN not in revoked_by.scopes
    ):
        raise PermissionDenied("Revoking another token needs a token with the 'admin' scope.")
    if not key_id or not set(key_id) <= KEY_ID_CHARS:  # also keeps NUL away from PostgreSQL
        raise NotFound("No such token.")
    with transaction.atomic():
        token = ApiToken.objects.select_for_update().filter(user=user, key_id=key_id).first()
        if token is None:
            raise NotFound("No such token.")
        if token.revoked_at is None:
            token.revoked_at = timezone.now()
            token.save(update_fields=["revoked_at"])
            audit_record(
                action=AuditAction.TOKEN_REVOKE,
                target=f"token:{key_id}",
                details={"owner": user.get_username()},
            )
    return token
