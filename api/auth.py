"""Session login for the dashboard: login, logout, who am I.

CSRF: the login view is exempt (DRF exempts views without SessionAuthentication), as a JSON
API's login may be: it accepts only `application/json` (api.parsers), which a cross-site form
cannot send and a cross-site script cannot send without a CORS preflight this server never
grants, so another site cannot log a victim in to the attacker's account. Only this view
creates sessions; every other unsafe call made with the session cookie (logout included) goes
through SessionAuthentication, which enforces CSRF: send the `csrftoken` cookie's value (set by
the login response) as X-CSRFToken.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AnonymousUser, User
from django.http import HttpRequest, HttpResponse
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.authentication import SessionAuthentication
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from api.errors import registry_error_response
from api.schema import ErrorOut
from api.throttles import auth_failure_note, client_ip
from api.views import parse, user_of
from registry.errors import InvalidCredentials, LockedOut
from registry.services import sessions


class LoginIn(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    password = serializers.CharField(max_length=4096, trim_whitespace=False)


class NamespaceRoleOut(serializers.Serializer):
    namespace = serializers.CharField()
    role = serializers.CharField()


class MeOut(serializers.Serializer):
    username = serializers.CharField()
    namespaces = NamespaceRoleOut(many=True)


def me_body(user: User) -> dict:
    roles = sessions.session_user_roles(user=user)
    return MeOut({"username": user.get_username(), "namespaces": roles}).data


class HttpRequestView(APIView):
    # Keeps Django's HttpRequest as `http_request`: django.contrib.auth's login()/logout() and
    # django-axes need the request the middleware sees (axes flags it with axes_locked_out,
    # which AxesMiddleware reads), and DRF's Request reads through to it but keeps attributes
    # set on it to itself. Django's View.setup() is handed it before DRF wraps it.
    # A comment, not a docstring: drf-spectacular would show a docstring in the subclasses'
    # operations.

    http_request: HttpRequest

    def setup(self, request: HttpRequest, *args: Any, **kwargs: Any) -> None:
        super().setup(request, *args, **kwargs)
        self.http_request = request


class LoginView(HttpRequestView):
    # No authenticator: no CSRF check (see the module docstring) and a stale cookie or token
    # cannot get in the way of logging in.
    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema(
        request=LoginIn,
        responses={
            200: MeOut,
            401: OpenApiResponse(ErrorOut, description="Wrong username or password."),
        },
        description="Starts a session (cookie `sessionid`) and sets the `csrftoken` cookie. "
        "A wrong username or password is 401 `invalid_credentials`; too many for one username "
        "from one address is 429 `locked_out` until Retry-After, even with the right password.",
    )
    def post(self, request: Request) -> Response:
        data = parse(LoginIn, request)
        try:
            user = sessions.session_login(
                request=self.http_request, username=data["username"], password=data["password"]
            )
        except (InvalidCredentials, LockedOut):
            auth_failure_note(client_ip(request))
            raise
        return Response(me_body(user))


class LogoutView(HttpRequestView):
    @extend_schema(request=None, responses={204: None})
    def post(self, request: Request) -> Response:
        # Only a session logs out: a bearer-token call has no session to end and records no
        # logout (DRF copies the token's user onto the HttpRequest, so ask how it logged in).
        by_session = isinstance(request.successful_authenticator, SessionAuthentication)
        user = request.user if by_session else AnonymousUser()
        sessions.session_logout(request=self.http_request, user=user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class MeView(APIView):
    @extend_schema(responses=MeOut)
    def get(self, request: Request) -> Response:
        return Response(me_body(user_of(request)))


def lockout_response(
    request: HttpRequest, original_response: HttpResponse | None = None, credentials=None
) -> HttpResponse:
    """AXES_LOCKOUT_CALLABLE: axes' middleware answers a locked-out login with our 429.

    A view that already answered the lockout itself (the dashboard's login page, a 429 with
    the form and the message) keeps its own response.
    """
    if original_response is not None and original_response.status_code == 429:
        return original_response
    return registry_error_response(sessions.lockout_error())
