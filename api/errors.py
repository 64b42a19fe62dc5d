"""One place that turns every error into `{"code", "message", "extra"}` with a stable code."""

from __future__ import annotations

import logging

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, JsonResponse
from rest_framework import exceptions as drf
from rest_framework.response import Response
from rest_framework.views import set_rollback

from registry.errors import RegistryError

logger = logging.getLogger(__name__)

DRF_CODES: dict[type[drf.APIException], str] = {
    drf.NotAuthenticated: "not_authenticated",
    drf.AuthenticationFailed: "authentication_failed",
    drf.PermissionDenied: "permission_denied",
    drf.NotFound: "not_found",
    drf.MethodNotAllowed: "method_not_allowed",
    drf.NotAcceptable: "not_acceptable",
    drf.UnsupportedMediaType: "unsupported_media_type",
    drf.Throttled: "throttled",
    drf.ParseError: "malformed_request",
    drf.ValidationError: "invalid_input",
}


def error_body(code: str, message: str, extra: dict | None = None) -> dict:
    return {"code": code, "message": message, "extra": extra or {}}


def exception_handler(exc: Exception, context: dict) -> Response | None:
    if isinstance(exc, RegistryError):
        set_rollback()
        headers = {}
        if exc.status == 416 and "size" in exc.extra:
            headers["Content-Range"] = f"bytes */{exc.extra['size']}"
        return Response(
            error_body(exc.code, exc.message, exc.extra), status=exc.status, headers=headers
        )
    if isinstance(exc, Http404):
        exc = drf.NotFound("Not found, or you do not have access to it.")
    elif isinstance(exc, DjangoPermissionDenied):
        exc = drf.PermissionDenied()
    if isinstance(exc, drf.APIException):
        set_rollback()
        headers = {}
        if getattr(exc, "auth_header", None):
            headers["WWW-Authenticate"] = exc.auth_header
        if getattr(exc, "wait", None):
            headers["Retry-After"] = str(int(exc.wait))
        code = next((c for t, c in DRF_CODES.items() if isinstance(exc, t)), "error")
        if isinstance(exc, drf.ValidationError):
            return Response(
                error_body(
                    code, "Some fields are invalid; see extra.fields.", {"fields": exc.detail}
                ),
                status=exc.status_code,
            )
        return Response(error_body(code, str(exc.detail)), status=exc.status_code, headers=headers)
    return None


def handler404(request, exception=None) -> JsonResponse:
    return JsonResponse(error_body("not_found", "No such endpoint."), status=404)


def handler500(request) -> JsonResponse:
    return JsonResponse(
        error_body("internal_error", "Unexpected server error; it has been logged."), status=500
    )


def handler400(request, exception=None) -> JsonResponse:
    return JsonResponse(error_body("bad_request", "Malformed request."), status=400)
