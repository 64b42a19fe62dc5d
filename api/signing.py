"""Signatures: the registry's published signing keys and the signatures of versions."""

from __future__ import annotations

import json

from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from api.pagination import cursor_by
from api.serializers import SignatureOut, SigningKeyOut
from api.views import ListView, principal_of
from registry import selectors
from registry.signing.keys import signing_keys_all


class SigningKeyListView(APIView):
    """The registry's public signing keys, the current one and every retired one (bundles
    they signed stay verifiable). Public: anyone checking a download needs them."""

    permission_classes = [AllowAny]
    authentication_classes: list = []

    @extend_schema(responses=SigningKeyOut(many=True))
    def get(self, request: Request) -> Response:
        return Response(SigningKeyOut(signing_keys_all(), many=True).data)


class SignatureListView(ListView):
    pagination_class = cursor_by("created_at")

    @extend_schema(responses=SignatureOut(many=True))
    def get(self, request: Request, ns: str, model: str, number: int) -> Response:
        qs = selectors.signature_list_for_user(
            principal=principal_of(request), namespace=ns, model=model, number=number
        )
        return self.page(request, qs, SignatureOut)


class SignatureFileView(APIView):
    @extend_schema(
        responses={(200, "application/json"): OpenApiResponse(OpenApiTypes.BINARY)},
        description="The bundle as a `.sig` file, for `model_signing verify key <folder> "
        "--signature <file> --public_key <the key's PEM from /signing-keys>`.",
    )
    def get(self, request: Request, ns: str, model: str, number: int, signature_id: int):
        signature = selectors.signature_get_for_user(
            principal=principal_of(request),
            namespace=ns,
            model=model,
            number=number,
            signature_id=signature_id,
        )
        response = HttpResponse(json.dumps(signature.bundle), content_type="application/json")
        name = f"{model}-v{signature.version.number}-{signature.kind}-{signature.pk}.sig"
        response["Content-Disposition"] = f'attachment; filename="{name}"'
        return response
