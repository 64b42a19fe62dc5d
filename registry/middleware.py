"""Per-request audit context: a request id (echoed as X-Request-ID) and the client address."""

from __future__ import annotations

import re
import uuid

from django.conf import settings

from api.errors import DATABASE_DOWN, database_unavailable, registry_error_response
from registry.services import audit

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class AuditContextMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        supplied = request.META.get("HTTP_X_REQUEST_ID", "")
        request_id = supplied if REQUEST_ID_RE.match(supplied) else uuid.uuid4().hex
        client = request.META.get("REMOTE_ADDR", "")
        if settings.SMR_TRUST_X_FORWARDED_FOR:
            forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
            client = forwarded.split(",")[0].strip()[:64] or client
        token = audit.context_begin(request_id=request_id, client_ip=client)
        try:
            try:
                # The first database query of a request with a session cookie happens here.
                authenticated = (
                    getattr(request, "user", None) is not None and request.user.is_authenticated
                )
            except DATABASE_DOWN as exc:
                response = registry_error_response(database_unavailable(exc))
            else:
                if authenticated:
                    audit.context_set_actor(user=request.user.get_username())
                response = self.get_response(request)
        finally:
            # Streaming responses run after this returns; they captured what they need.
            audit.context_end(token)
        response["X-Request-ID"] = request_id
        return response
