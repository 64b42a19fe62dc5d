"""OpenAPI: every operation documents the error responses it can give (DESIGN §9, §10)."""

from __future__ import annotations

from drf_spectacular import openapi
from rest_framework import serializers
from rest_framework.permissions import AllowAny


class ErrorOut(serializers.Serializer):
    code = serializers.CharField(help_text="Stable machine-readable code, e.g. `invalid_input`.")
    message = serializers.CharField(help_text="What went wrong and how to fix it.")
    extra = serializers.DictField(help_text="Details that depend on the code; may be empty.")

    class Meta:
        ref_name = "Error"


ERRORS = {
    "400": "Malformed request: bad JSON, an invalid field, query parameter, header or path.",
    "401": "No credentials, or an invalid, expired or revoked token.",
    "403": "Your role or token scope does not allow this.",
    "404": "Not found, or you do not have access to it.",
    "409": "The request conflicts with the current state (e.g. the version is not a draft).",
    "411": "Content-Length is missing.",
    "413": "The request body is too large.",
    "415": "Unsupported Content-Type for the request body.",
    "410": "The version was revoked; its files are gone for good.",
    "416": "The requested byte range is outside the file.",
    "429": "Too many requests; retry after Retry-After.",
    "502": "A stored object failed its integrity check; the incident was recorded.",
    "503": "The database, object store or key service is unavailable; retry after Retry-After.",
}


class AutoSchema(openapi.AutoSchema):
    def _map_basic_serializer(self, serializer, direction):
        schema = super()._map_basic_serializer(serializer, direction)
        if direction == "request":
            # api.views.parse refuses a field the endpoint does not take; say so.
            schema["additionalProperties"] = False
        return schema

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        ref = self.resolve_serializer(ErrorOut, direction).ref
        for status in self._error_statuses():
            if status not in responses:
                response = {
                    "description": ERRORS[status],
                    "content": {"application/json": {"schema": ref}},
                }
                if status in ("429", "503"):
                    response["headers"] = {
                        "Retry-After": {
                            "description": "Seconds to wait before retrying.",
                            "schema": {"type": "integer"},
                        }
                    }
                responses[status] = response
        return responses

    def _error_statuses(self) -> list[str]:
        statuses = ["400"]
        if not all(isinstance(p, AllowAny) for p in self.view.get_permissions()):
            statuses += ["401", "403"]
        # POST /jobs names its namespace, dataset and model in the body.
        if "{" in self.path or (self.path.endswith("/jobs") and self.method == "POST"):
            statuses.append("404")
        if self.method in ("POST", "PUT", "PATCH", "DELETE"):
            statuses.append("409")
        if self.method in ("POST", "PUT", "PATCH"):
            statuses += ["413", "415"]
        raw_file = "/files/{" in self.path or "/parts/{" in self.path
        if raw_file and self.method == "PUT":
            statuses.append("411")
        if raw_file and self.method in ("GET", "HEAD"):
            statuses += ["410", "416", "502"]
        if self.view.get_throttles():
            statuses.append("429")
        statuses.append("503")
        return statuses
