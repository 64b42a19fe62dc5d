"""Home: your namespaces, what waits for you, recent activity."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from registry import selectors
from registry.dashboard.views.base import page, principal_of


@page
def home(request: HttpRequest) -> HttpResponse:
    principal = principal_of(request)
    namespaces = list(selectors.namespace_list_for_user(principal=principal).order_by("name"))
    return render(request, "dashboard/home.html", {"namespaces": namespaces})
