from __future__ import annotations

from axes.backends import AxesStandaloneBackend
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from api.throttles import auth_failure_note, auth_failure_wait, client_ip
from registry.services.tokens import token_authenticate


class LockoutBackend(AxesStandaloneBackend):
    """django-axes' lockout check for password logins (AUTHENTICATION_BACKENDS, first).

    A call without a request (the shell, a management command) has no client address to lock
    out and is left to the next backend; every login over HTTP passes its request.
    """

    def authenticate(self, request, username=None, password=None, **kwargs):
        if request is None:
            return None
        return super().authenticate(request, username=username, password=password, **kwargs)


class BearerTokenAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer smr_...` personal access tokens (checked and audited by the
    tokens service)."""

    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, raw = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        # An address that keeps failing is refused before any token lookup (no DB, no audit
        # row per guess) until its window ends.
        ip = client_ip(request)
        wait = auth_failure_wait(ip)
        if wait is not None:
            raise exceptions.Throttled(wait)
        token = token_authenticate(raw)
        if token is None:
            auth_failure_note(ip)
            raise exceptions.AuthenticationFailed("Invalid, expired, revoked or malformed token.")
        return token.user, token

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="smr"'


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """Describes the bearer tokens in the OpenAPI schema (so /api/docs/ can send them)."""

    target_class = "api.authentication.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "bearerFormat": "smr_<id>_<secret>"}
