"""Signatures: the registry's signing keys, the publisher keys namespaces trust, and the signatures
of versions (the registry's own and the publishers')."""

from __future__ import annotations

import json

from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from api.pagination import cursor_by
from api.serializers import (
    PublisherKeyIn,
    PublisherKeyOut,
    SignatureIn,
    SignatureOut,
    SigningKeyOut,
)
from api.views import ListView, parse, principal_of, user_of
from registry import selectors
from registry.access import Action
from registry.services import signatures
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

    @extend_schema(
        request=SignatureIn,
        responses={201: SignatureOut},
        description="Record a publisher's OMS bundle (`model_signing sign key`). It is checked "
        "against the namespace's trusted publisher keys and the digests recorded at upload "
        "(the file set must match exactly, but for the bundle's own ignore list) and kept with "
        "its result: valid, invalid (with the reason) or unknown_key. The version's owner and "
        "the namespace's admins.",
    )
    def post(self, request: Request, ns: str, model: str, number: int) -> Response:
        version = selectors.version_get_for_user(
            principal=principal_of(request),
            namespace=ns,
            model=model,
            number=number,
            action=Action.WRITE,
        )
        signature = signatures.signature_record(
            version=version, bundle=parse(SignatureIn, request)["bundle"]
        )
        return Response(SignatureOut(signature).data, status=status.HTTP_201_CREATED)


class PublisherKeyListView(ListView):
    pagination_class = cursor_by("created_at")

    @extend_schema(responses=PublisherKeyOut(many=True))
    def get(self, request: Request, ns: str) -> Response:
        qs = selectors.publisher_key_list_for_user(principal=principal_of(request), namespace=ns)
        return self.page(request, qs, PublisherKeyOut)

    @extend_schema(
        request=PublisherKeyIn,
        responses={201: PublisherKeyOut},
        description="Trust a publisher's public key (admins; audited). 409 publisher_key_exists "
        "if it is trusted already.",
    )
    def post(self, request: Request, ns: str) -> Response:
        namespace = selectors.namespace_get_for_user(
            principal=principal_of(request), name=ns, action=Action.MANAGE
        )
        key = signatures.publisher_key_add(
            namespace=namespace, creator=user_of(request), **parse(PublisherKeyIn, request)
        )
        return Response(PublisherKeyOut(key).data, status=status.HTTP_201_CREATED)


class PublisherKeyDetailView(APIView):
    @extend_schema(responses={204: None})
    def delete(self, request: Request, ns: str, key_id: str) -> Response:
        namespace = selectors.namespace_get_for_user(
            principal=principal_of(request), name=ns, action=Action.MANAGE
        )
        signatures.publisher_key_delete(namespace=namespace, key_id=key_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


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
