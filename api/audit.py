"""The audit log for auditors and admins: list, filter, export (JSON Lines), verify."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime

from django.http import HttpResponse, QueryDict, StreamingHttpResponse
from django.utils.dateparse import parse_datetime
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import UserRateThrottle
from rest_framework.views import APIView

from api.pagination import cursor_by
from api.serializers import AuditEventOut, CheckpointOut, VerifyOut
from api.views import ListView, principal_of
from registry import selectors
from registry.errors import InvalidInput
from registry.models import AuditAction, AuditOutcome
from registry.services import audit, audit_reads

FILTERS = [
    OpenApiParameter("actor", str, description="username"),
    OpenApiParameter("token", str, description="token id"),
    OpenApiParameter("action", str, enum=AuditAction.values),
    OpenApiParameter("namespace", str),
    OpenApiParameter("target", str, description="prefix of the target, e.g. ns/model/v1/"),
    OpenApiParameter("sha256", str, description="artifact digest"),
    OpenApiParameter("outcome", str, enum=AuditOutcome.values),
    OpenApiParameter("since", OpenApiTypes.DATETIME),
    OpenApiParameter("until", OpenApiTypes.DATETIME),
]


# RFC 3339 date-time, as the schema's `format: date-time` promises (parse_datetime alone also
# takes a space for the T, or no seconds).
RFC3339_RE = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})\Z")


def _moment(params: QueryDict, name: str) -> datetime | None:
    raw = params.get(name)
    if raw is None:
        return None
    if not RFC3339_RE.match(raw):
        raise InvalidInput(f"{name} must be an RFC 3339 time with a timezone", param=name)
    try:
        moment = parse_datetime(raw)
        # PostgreSQL refuses UTC offsets beyond 15:59 that Python accepts: send UTC.
        moment = moment.astimezone(UTC) if moment and moment.tzinfo else None
    except (ValueError, OverflowError):  # no such day, or outside years 1-9999 in UTC
        moment = None
    if moment is None:
        raise InvalidInput(f"{name} must be an ISO 8601 time with a timezone")
    return moment


def _choice(params: QueryDict, name: str, choices: list[str]) -> str:
    # Present but empty is refused too: the schema's enum has no "" (an absent one is no filter).
    value = params.get(name)
    if value is None:
        return ""
    if value not in choices:
        raise InvalidInput(f"{name} must be one of {', '.join(choices)}", param=name)
    return value


def audit_filters(request: Request) -> selectors.AuditFilters:
    params = request.query_params
    return selectors.AuditFilters(
        actor=params.get("actor", ""),
        token=params.get("token", ""),
        action=_choice(params, "action", AuditAction.values),
        namespace=params.get("namespace", ""),
        target_prefix=params.get("target", ""),
        sha256=params.get("sha256", ""),
        outcome=_choice(params, "outcome", AuditOutcome.values),
        since=_moment(params, "since"),
        until=_moment(params, "until"),
    )


class AuditEventListView(ListView):
    pagination_class = cursor_by("-seq")

    @extend_schema(parameters=FILTERS, responses=AuditEventOut(many=True))
    def get(self, request: Request) -> Response:
        qs = selectors.audit_event_list_for_user(
            principal=principal_of(request), filters=audit_filters(request)
        )
        return self.page(request, qs, AuditEventOut)


class AuditExportView(APIView):
    @extend_schema(
        parameters=FILTERS,
        responses={(200, "application/x-ndjson"): OpenApiTypes.STR},
        description="All matching events as JSON Lines, oldest first, streamed.",
    )
    def get(self, request: Request):
        events = audit_reads.audit_export(
            principal=principal_of(request),
            filters=audit_filters(request),
            query=request.query_params,
        )

        def lines() -> Iterator[bytes]:
            for event in events:
                yield json.dumps(AuditEventOut(event).data, separators=(",", ":")).encode() + b"\n"

        response = StreamingHttpResponse(lines(), content_type="application/x-ndjson")
        response["Content-Disposition"] = 'attachment; filename="audit-events.jsonl"'
        return response


class AuditCheckpointListView(ListView):
    pagination_class = cursor_by("-size")

    @extend_schema(responses=CheckpointOut(many=True))
    def get(self, request: Request) -> Response:
        qs = selectors.audit_checkpoint_list_for_user(principal=principal_of(request))
        return self.page(request, qs, CheckpointOut)


class VerifyThrottle(UserRateThrottle):
    # A verification reads the whole log: a few per user per minute is plenty, and a loop
    # cannot turn it into a denial of service.
    scope = "audit_verify"
    rate = "6/min"


class AuditVerifyView(APIView):
    throttle_classes = [VerifyThrottle]

    @extend_schema(request=None, responses=VerifyOut)
    def post(self, request: Request) -> Response:
        report = audit_reads.audit_verify_for_user(principal=principal_of(request))
        first = report.first
        body = {
            "ok": report.ok,
            "entries": report.entries,
            "checkpoints": report.checkpoints,
            "first_bad": asdict(first) if first else None,
        }
        return Response(VerifyOut(body).data)


class AuditKeyView(APIView):
    permission_classes = [AllowAny]
    authentication_classes: list = []

    @extend_schema(responses={(200, "application/x-pem-file"): OpenApiTypes.STR})
    def get(self, request: Request):
        return HttpResponse(audit.public_key_pem(), content_type="application/x-pem-file")
