"""Home: your namespaces, what waits for you, recent activity."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from registry import selectors
from registry.dashboard.views.base import page, principal_of

QUEUE_SHOWN = 10


@page
def home(request: HttpRequest) -> HttpResponse:
    principal = principal_of(request)
    queue = selectors.review_queue_for_user(principal=principal)
    return render(
        request,
        "dashboard/home.html",
        {
            "memberships": list(selectors.membership_list_for_user(principal=principal)),
            "queue": list(queue[:QUEUE_SHOWN]),
            "queue_count": queue.count(),
            "mine": list(selectors.version_list_awaiting_owner_for_user(principal=principal)[:50]),
            "recent": selectors.version_recent_for_user(principal=principal, limit=20),
        },
    )
