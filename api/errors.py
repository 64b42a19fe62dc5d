"""One place that turns every error into `{"code", "message", "extra"}` with a stable code."""

from __future__ import annotations

import logging
import sys

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from rest_framework import exceptions as drf
from rest_framework.response import Response
from rest_framework.views import set_rollback

from registry.errors import DatabaseUnavailable, RegistryError, TooLarge

logger = logging.getLogger(__name__)

# Seconds a client should wait before retrying a 503 (an outage, not an overload).
RETRY_AFTER = 5

# A lost or refused database connection. Django wraps driver errors raised through its
# cursors; the driver's own classes cover any that escape unwrapped.
DATABASE_DOWN: tuple[type[Exception], ...] = (OperationalError, InterfaceError)
try:
    import psycopg

    DATABASE_DOWN += (psycopg.OperationalError, psycopg.InterfaceError)
except ImportError:  # pragma: no cover - SQLite-only installs
    pass

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


def database_unavailable(exc: BaseException) -> DatabaseUnavailable:
    # An outage is not a bug: one line in the log, no traceback per request.
    logger.warning("database unavailable: %s: %s", type(exc).__name__, exc)
    return DatabaseUnavailable()


def as_registry_error(exc: BaseException) -> RegistryError | None:
    """The RegistryError that a framework or driver exception stands for, if any."""
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, DATABASE_DOWN):
        return database_unavailable(exc)
    if isinstance(exc, RequestDataTooBig):
        return TooLarge(
            f"The request body is over {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes. "
            "Send artifact files as a raw PUT to .../files/{path} or as a resumable upload.",
            limit=settings.DATA_UPLOAD_MAX_MEMORY_SIZE,
        )
    return None


def headers_for(exc: RegistryError) -> dict[str, str]:
    headers = exc.response_headers()
    if exc.status == 416 and "size" in exc.extra:
        headers["Content-Range"] = f"bytes */{exc.extra['size']}"
    if exc.status == 503:
        headers["Retry-After"] = str(RETRY_AFTER)
    return headers


def exception_handler(exc: Exception, context: dict) -> Response | None:
    exc = as_registry_error(exc) or exc
    if isinstance(exc, RegistryError):
        set_rollback()
        headers = headers_for(exc)
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
        auth_header = getattr(exc, "auth_header", None)
        if auth_header:
            headers["WWW-Authenticate"] = auth_header
        wait = getattr(exc, "wait", None)
        if wait:
            headers["Retry-After"] = str(int(wait))
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


def registry_error_response(exc: RegistryError) -> JsonResponse:
    response = JsonResponse(error_body(exc.code, exc.message, exc.extra), status=exc.status)
    for name, value in headers_for(exc).items():
        response[name] = value
    return response


def handler500(request) -> JsonResponse:
    # Django calls this inside its `except` block: an outage raised outside any view (in a
    # middleware, say) still becomes a 503 rather than a 500.
    current = sys.exc_info()[1]
    mapped = as_registry_error(current) if current is not None else None
    if mapped is not None:
        return registry_error_response(mapped)
    return JsonResponse(
        error_body("internal_error", "Unexpected server error; it has been logged."), status=500
    )


def handler400(request, exception=None) -> JsonResponse:
    mapped = as_registry_error(exception) if exception is not None else None
    if mapped is not None:
        return registry_error_response(mapped)
    return JsonResponse(error_body("bad_request", "Malformed request."), status=400)


class OutageMiddleware:
    """Answers a database outage anywhere below it with a 503 and Retry-After, never a 500.

    DRF views get the same from exception_handler; this covers plain Django views and code
    that runs after the view, and keeps the outage out of the error log's tracebacks.
    """

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        mapped = as_registry_error(exception)
        return registry_error_response(mapped) if mapped is not None else None
