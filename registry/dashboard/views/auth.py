"""Sign in and out with a session (django-axes lockout, audited by registry.services.sessions)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods, require_POST

from registry.errors import InvalidCredentials, LockedOut
from registry.services import sessions


def _next(request: HttpRequest) -> str:
    target = request.POST.get("next") or request.GET.get("next") or "/"
    # Only paths of this site: an open redirect would hand a phishing page our login.
    if url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        return target
    return "/"


@require_http_methods(["GET", "POST"])
def login_view(request: HttpRequest) -> HttpResponse:
    error = ""
    status = 200
    if request.method == "POST":
        try:
            sessions.session_login(
                request=request,
                username=request.POST.get("username", "")[:150],
                password=request.POST.get("password", "")[:4096],
            )
            return redirect(_next(request))
        except LockedOut as exc:
            error, status = f"{exc.message} ({exc.code})", 429
        except InvalidCredentials as exc:
            error, status = f"{exc.message} ({exc.code})", 401
    return render(
        request, "dashboard/login.html", {"error": error, "next": _next(request)}, status=status
    )


@require_POST
def logout_view(request: HttpRequest) -> HttpResponse:
    sessions.session_logout(request=request, user=request.user)
    return redirect("dashboard:login")
