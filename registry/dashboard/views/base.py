"""What every dashboard view shares: the signed-in principal, service errors as messages."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib import messages
from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse

from registry.access import Principal
from registry.errors import NotFound, RegistryError

View = Callable[..., HttpResponse]


def principal_of(request: HttpRequest) -> Principal:
    """The caller as the services see them: a session has no token, so no scope narrows it."""
    user = request.user
    assert isinstance(user, User)
    return Principal(user=user)


def page(view: View) -> View:
    """A dashboard page: signed-in users only (others go to the login page), and a
    RegistryError becomes a page with its code and message (a 404 stays a 404: the same
    hiding as the API's), never a stack trace."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect(f"{reverse('dashboard:login')}?next={request.path}")
        try:
            return view(request, *args, **kwargs)
        except RegistryError as exc:
            status = 404 if isinstance(exc, NotFound) else exc.status
            return render(
                request,
                "dashboard/error.html",
                {"code": exc.code, "message": exc.message},
                status=status,
            )

    return wrapper


def flash_error(request: HttpRequest, exc: RegistryError) -> None:
    messages.error(request, f"{exc.message} ({exc.code})")
