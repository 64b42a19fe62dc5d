"""The audit log for auditors and admins: list, filter, export (JSON Lines), verify."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC

from django.db.models import QuerySet
from django.http import HttpResponse, StreamingHttpResponse
from django.utils.dateparse import parse_datetime
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from api.pagination import cursor_by
from api.views import ListView, principal_of
from registry import selectors
from registry.errors import InvalidInput
from registry.models import AuditAction, AuditCheckpoint, AuditEvent
from registry.services import audit


class AuditEventOut(serializers.Serializer):
    seq = serializers.IntegerField()
    time = serializers.DateTimeField(source="created_at")
    actor = serializers.SerializerMethodField()
    action = serializers.CharField()
    namespace = serializers.CharField()
    target = serializers.CharField()
    target_sha256 = serializers.CharField()
    request_id = serializers.CharField()
    client_ip = serializers.CharField()
    outcome = serializers.CharField()
    details = serializers.JSONField()
    prev_hash = serializers.CharField()
    entry_hash = serializers.CharField()

    def get_actor(self, obj) -> dict:
        return {"kind": obj.actor_kind, "user": obj.actor_user, "token": obj.actor_token}


class CheckpointOut(serializers.Serializer):
    size = serializers.IntegerField()
    head_hash = serializers.CharField()
    merkle_root = serializers.CharField()
    prev_checkpoint_hash = serializers.CharField()
    checkpoint_hash = serializers.CharField()
    created_at = serializers.DateTimeField()
    key_id = serializers.CharField()
    signature = serializers.CharField()
    body = serializers.SerializerMethodField()

    def get_body(self, obj) -> str:
        return bytes(obj.body).decode()


FILTERS = [
    OpenApiParameter("actor", str, description="username"),
    OpenApiParameter("token", str, description="token id"),
    OpenApiParameter("action", str, enum=AuditAction.values),
    OpenApiParameter("namespace", str),
    OpenApiParameter("target", str, description="prefix of the target, e.g. ns/model/v1/"),
    OpenApiParameter("sha256", str, description="artifact digest"),
    OpenApiParameter("outcome", str, enum=["success", "failure", "denied"]),
    OpenApiParameter("since", OpenApiTypes.DATETIME),
    OpenApiParameter("until", OpenApiTypes.DATETIME),
]


def filtered_events(request: Request) -> QuerySet[AuditEvent]:
    visible = selectors.audit_namespaces_for_user(principal_of(request))
    qs = AuditEvent.objects.all()
    if visible is not None:
        qs = qs.filter(namespace__in=visible)
    params = request.query_params
    exact = {
        "actor": "actor_user",
        "token": "actor_token",
        "action": "action",
        "namespace": "namespace",
        "sha256": "target_sha256",
        "outcome": "outcome",
    }
    for param, column in exact.items():
        if params.get(param):
            qs = qs.filter(**{column: params[param].replace("\x00", "")})
    if params.get("target"):
        qs = qs.filter(target__startswith=params["target"].replace("\x00", ""))
    for param, lookup in (("since", "created_at__gte"), ("until", "created_at__lt")):
        if params.get(param):
            try:
                moment = parse_datetime(params[param])
                # PostgreSQL refuses UTC offsets beyond 15:59 that Python accepts: send UTC.
                moment = moment.astimezone(UTC) if moment and moment.tzinfo else None
            except (ValueError, OverflowError):  # no such day, or outside years 1-9999 in UTC
                moment = None
            if moment is None:
                raise InvalidInput(f"{param} must be an ISO 8601 time with a timezone")
            qs = qs.filter(**{lookup: moment})
    return qs


class AuditEventListView(ListView):
    pagination_class = cursor_by("-seq")

    @extend_schema(parameters=FILTERS, responses=AuditEventOut(many=True))
    def get(self, request: Request) -> Response:
        return self.page(request, filtered_events(request), AuditEventOut)


class AuditExportView(APIView):
    @extend_schema(
        parameters=FILTERS,
        responses={(200, "application/x-ndjson"): OpenApiTypes.STR},
        description="All matching events as JSON Lines, oldest first, streamed.",
    )
    def get(self, request: Request):
        qs = filtered_events(request).order_by("seq")
        audit.audit_record_now(
            action=AuditAction.AUDIT_EXPORT,
            target="audit/events",
            details={"filters": {k: v[:200] for k, v in request.query_params.items()}},
        )

        def lines() -> Iterator[bytes]:
            for event in qs.iterator(chunk_size=2000):
                yield json.dumps(AuditEventOut(event).data, separators=(",", ":")).encode() + b"\n"

        response = StreamingHttpResponse(lines(), content_type="application/x-ndjson")
        response["Content-Disposition"] = 'attachment; filename="audit-events.jsonl"'
        return response


class AuditCheckpointListView(ListView):
    pagination_class = cursor_by("-size")

    @extend_schema(responses=CheckpointOut(many=True))
    def get(self, request: Request) -> Response:
        selectors.audit_namespaces_for_user(principal_of(request))
        return self.page(request, AuditCheckpoint.objects.all(), CheckpointOut)


class VerifyOut(serializers.Serializer):
    ok = serializers.BooleanField()
    entries = serializers.IntegerField()
    checkpoints = serializers.IntegerField()
    first_bad = serializers.DictField(allow_null=True)


class AuditVerifyView(APIView):
    @extend_schema(request=None, responses=VerifyOut)
    def post(self, request: Request) -> Response:
        selectors.audit_namespaces_for_user(principal_of(request))
        report = audit.audit_verify()
        first = report.first
        body = {
            "ok": report.ok,
            "entries": report.entries,
            "checkpoints": report.checkpoints,
            "first_bad": vars(first) if first else None,
        }
        audit.audit_record_now(
            action=AuditAction.AUDIT_VERIFY,
            outcome="success" if report.ok else "failure",
            target="audit/log",
            details={"entries": report.entries, "first_bad": body["first_bad"]},
        )
        return Response(body)


class AuditKeyView(APIView):
    permission_classes = [AllowAny]
    authentication_classes: list = []

    @extend_schema(responses={(200, "application/x-pem-file"): OpenApiTypes.STR})
    def get(self, request: Request):
        return HttpResponse(audit.public_key_pem(), content_type="application/x-pem-file")
