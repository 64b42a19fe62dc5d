from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from registry.models import AuditAction, AuditOutcome
from registry.services import audit
from registry.services.tokens import token_authenticate


class BearerTokenAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer smr_...` personal access tokens."""

    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, raw = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        raw = raw.strip()
        if not raw or " " in raw:
            audit.audit_record_now(
                action=AuditAction.AUTH_FAILED,
                outcome=AuditOutcome.FAILURE,
                details={"method": "bearer", "reason": "malformed"},
            )
            raise exceptions.AuthenticationFailed("Malformed bearer token header.")
        token = token_authenticate(raw)
        if token is None:
            raise exceptions.AuthenticationFailed("Invalid, expired or revoked token.")
        audit.context_set_actor(user=token.user.get_username(), token=token.key_id)
        return token.user, token

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="smr"'


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """Describes the bearer tokens in the OpenAPI schema (so /api/docs/ can send them)."""

    target_class = "api.authentication.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "bearerFormat": "smr_<id>_<secret>"}
