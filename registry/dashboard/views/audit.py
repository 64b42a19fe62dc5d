"""The audit log: filters, cursor pages, verify now, export."""

from __future__ import annotations

import json
import re
from typing import cast

from django.contrib import messages
from django.http import HttpRequest, HttpResponse, QueryDict
from django.shortcuts import redirect, render
from django.urls import URLPattern, path, reverse
from django.views.decorators.http import require_GET, require_POST
from rest_framework.request import Request

from api.audit import VerifyThrottle, audit_filters
from registry import selectors
from registry.dashboard.views.base import flash_error, page, principal_of
from registry.errors import InvalidInput, PermissionDenied
from registry.models import AuditAction, AuditEvent, AuditOutcome
from registry.services import audit_reads

PAGE_SIZE = 50
# The form's fields, named as the REST API's query parameters (api/audit.py FILTERS).
FILTER_FIELDS = ("actor", "action", "namespace", "target", "sha256", "outcome", "since", "until")
# What an <input type="datetime-local"> sends: no zone (the form says the times are UTC).
LOCAL_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?$")
SEQ_RE = re.compile(r"^[0-9]{1,18}$")


class _Query:
    """What api.audit.audit_filters reads of a DRF request: its query parameters."""

    def __init__(self, params: QueryDict) -> None:
        self.query_params = params


def api_query(params: QueryDict) -> QueryDict:
    """The form's filters as the REST API's query: blank fields dropped (a form sends every
    field, the API takes a present-but-empty one as a bad value), local times as UTC RFC 3339.
    The same query narrows the page and the export link, so both show the same events."""
    query = QueryDict(mutable=True)
    for name in FILTER_FIELDS:
        value = params.get(name, "").strip()
        if not value:
            continue
        if name in ("since", "until") and LOCAL_TIME_RE.match(value):
            value = f"{value}Z" if value.count(":") == 2 else f"{value}:00Z"
        query[name] = value
    return query


def _seq(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not SEQ_RE.match(raw):
        raise InvalidInput("The page cursor must be an entry number; use the page links.")
    return int(raw)


def _page_link(params: QueryDict, **cursor: int) -> str:
    query = QueryDict(mutable=True)
    for name in FILTER_FIELDS:
        value = params.get(name, "")
        if value:
            query[name] = value
    for name, seq in cursor.items():
        query[name] = str(seq)
    return f"{reverse('dashboard:audit')}?{query.urlencode()}"


def _may_verify(request: HttpRequest) -> bool:
    try:
        selectors.audit_log_verifier_check(principal=principal_of(request))
    except PermissionDenied:
        return False
    return True


@page
@require_GET
def audit_list(request: HttpRequest) -> HttpResponse:
    principal = principal_of(request)
    # Raises the selector's refusal for anyone who is neither auditor nor admin anywhere.
    visible = selectors.audit_namespaces_for_user(principal=principal)
    params = request.GET
    query = api_query(params)
    events: list[AuditEvent] = []
    newer = older = None
    export = ""
    try:
        # The API's own parsing: the same choices, the same RFC 3339 times with a zone.
        filters = audit_filters(cast(Request, _Query(query)))
        before, after = _seq(params.get("before")), _seq(params.get("after"))
        qs = selectors.audit_event_list_for_user(principal=principal, filters=filters).defer(
            "canonical"
        )
        if after is not None:
            rows = list(qs.filter(seq__gt=after).order_by("seq")[: PAGE_SIZE + 1])
            has_newer = len(rows) > PAGE_SIZE
            events = rows[:PAGE_SIZE][::-1]
            has_older = bool(events) and qs.filter(seq__lt=events[-1].seq).exists()
        else:
            scoped = qs if before is None else qs.filter(seq__lt=before)
            rows = list(scoped.order_by("-seq")[: PAGE_SIZE + 1])
            has_older = len(rows) > PAGE_SIZE
            events = rows[:PAGE_SIZE]
            has_newer = (
                bool(events) and before is not None and qs.filter(seq__gt=events[0].seq).exists()
            )
        if events and has_newer:
            newer = _page_link(params, after=events[0].seq)
        if events and has_older:
            older = _page_link(params, before=events[-1].seq)
        export = f"/api/v1/audit/events/export?{query.urlencode()}"
    except InvalidInput as exc:
        flash_error(request, exc)
    rows_out = [
        (event, json.dumps(event.details, indent=1, sort_keys=True) if event.details else "")
        for event in events
    ]
    context = {
        "form": {name: params.get(name, "") for name in FILTER_FIELDS},
        "actions": AuditAction.values,
        "outcomes": AuditOutcome.values,
        "namespaces": visible or [],
        "rows": rows_out,
        "newer": newer,
        "older": older,
        "export": export,
        "may_verify": _may_verify(request),
        "filtered": bool(query),
    }
    return render(request, "dashboard/audit_list.html", context)


@page
@require_POST
def audit_verify(request: HttpRequest) -> HttpResponse:
    # The API's throttle (same scope, same count): a verification reads the whole log, and
    # the dashboard must not be a way around the API's limit. It reads only the user and cache.
    throttle = VerifyThrottle()
    if not throttle.allow_request(request, None):  # type: ignore[arg-type]
        wait = throttle.wait()
        messages.error(
            request,
            f"Verification is limited to {throttle.rate}; try again in "
            f"{int(wait or 60)} s. (throttled)",
        )
        return redirect("dashboard:audit")
    report = audit_reads.audit_verify_for_user(principal=principal_of(request))
    context = {"report": report, "first": report.first}
    if request.headers.get("HX-Request"):
        return render(request, "dashboard/audit_verify_result.html", context)
    return render(request, "dashboard/audit_verify.html", context)


urlpatterns: list[URLPattern] = [
    path("audit", audit_list, name="audit"),
    path("audit/verify", audit_verify, name="audit_verify"),
]
