"""Metadata endpoints: parse input, call one service, serialize the output."""

from __future__ import annotations

from django.conf import settings
from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.generics import GenericAPIView
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from api.pagination import cursor_by
from api.serializers import (
    MemberIn,
    MemberOut,
    ModelIn,
    ModelOut,
    ModelPatch,
    NamespaceIn,
    NamespaceOut,
    NamespacePatch,
    TokenCreatedOut,
    TokenIn,
    TokenOut,
    VersionDetailOut,
    VersionIn,
    VersionOut,
)
from registry import selectors, storage
from registry.access import Action, Principal
from registry.errors import PermissionDenied
from registry.models import ApiToken, Membership, ModelVersion, RegisteredModel
from registry.services import catalog, tokens
from registry.services.artifacts import pending_discard


def principal_of(request: Request) -> Principal:
    token = request.auth if isinstance(request.auth, ApiToken) else None
    return Principal(user=request.user, token=token)


def parse(serializer_class, request: Request, *, partial: bool = False) -> dict:
    serializer = serializer_class(data=request.data, partial=partial)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


class ListView(GenericAPIView):
    """A paginated list whose queryset comes from a selector."""

    def page(self, request: Request, qs: QuerySet, out) -> Response:
        page = self.paginate_queryset(qs)
        return self.get_paginated_response(out(page, many=True).data)


class NamespaceListView(ListView):
    pagination_class = cursor_by("name")

    @extend_schema(responses=NamespaceOut(many=True))
    def get(self, request: Request) -> Response:
        return self.page(
            request, selectors.namespace_list_for_user(principal_of(request)), NamespaceOut
        )

    @extend_schema(request=NamespaceIn, responses={201: NamespaceOut})
    def post(self, request: Request) -> Response:
        principal = principal_of(request)
        if not principal.has_scope("write"):
            raise PermissionDenied("Creating a namespace needs a token with the 'write' scope.")
        data = parse(NamespaceIn, request)
        ns = catalog.namespace_create(creator=request.user, **data)
        return Response(NamespaceOut(ns).data, status=status.HTTP_201_CREATED)


class NamespaceDetailView(APIView):
    @extend_schema(responses=NamespaceOut)
    def get(self, request: Request, ns: str) -> Response:
        namespace = selectors.namespace_get_for_user(principal_of(request), ns, Action.READ)
        return Response(NamespaceOut(namespace).data)

    @extend_schema(request=NamespacePatch, responses=NamespaceOut)
    def patch(self, request: Request, ns: str) -> Response:
        namespace = selectors.namespace_get_for_user(principal_of(request), ns, Action.MANAGE)
        namespace = catalog.namespace_update(namespace=namespace, **parse(NamespacePatch, request))
        return Response(NamespaceOut(namespace).data)


class MemberListView(ListView):
    pagination_class = cursor_by("created_at")

    @extend_schema(responses=MemberOut(many=True))
    def get(self, request: Request, ns: str) -> Response:
        namespace = selectors.namespace_get_for_user(principal_of(request), ns, Action.READ)
        qs = Membership.objects.filter(namespace=namespace).select_related("user")
        return self.page(request, qs, MemberOut)

    @extend_schema(request=MemberIn, responses={200: MemberOut})
    def post(self, request: Request, ns: str) -> Response:
        namespace = selectors.namespace_get_for_user(principal_of(request), ns, Action.MANAGE)
        membership = catalog.member_set(namespace=namespace, **parse(MemberIn, request))
        return Response(MemberOut(membership).data)


class MemberDetailView(APIView):
    @extend_schema(responses={204: None})
    def delete(self, request: Request, ns: str, username: str) -> Response:
        namespace = selectors.namespace_get_for_user(principal_of(request), ns, Action.MANAGE)
        catalog.member_remove(namespace=namespace, username=username)
        return Response(status=status.HTTP_204_NO_CONTENT)


class ModelListView(ListView):
    pagination_class = cursor_by("name")

    @extend_schema(responses=ModelOut(many=True))
    def get(self, request: Request, ns: str) -> Response:
        namespace = selectors.namespace_get_for_user(principal_of(request), ns, Action.READ)
        qs = RegisteredModel.objects.filter(namespace=namespace).select_related("namespace")
        return self.page(request, qs, ModelOut)

    @extend_schema(request=ModelIn, responses={201: ModelOut})
    def post(self, request: Request, ns: str) -> Response:
        namespace = selectors.namespace_get_for_user(principal_of(request), ns, Action.WRITE)
        model = catalog.model_create(
            namespace=namespace, creator=request.user, **parse(ModelIn, request)
        )
        return Response(ModelOut(model).data, status=status.HTTP_201_CREATED)


class ModelDetailView(APIView):
    @extend_schema(responses=ModelOut)
    def get(self, request: Request, ns: str, model: str) -> Response:
        obj = selectors.model_get_for_user(principal_of(request), ns, model, Action.READ)
        return Response(ModelOut(obj).data)

    @extend_schema(request=ModelPatch, responses=ModelOut)
    def patch(self, request: Request, ns: str, model: str) -> Response:
        obj = selectors.model_get_for_user(principal_of(request), ns, model, Action.WRITE)
        obj = catalog.model_update(model=obj, **parse(ModelPatch, request))
        return Response(ModelOut(obj).data)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, ns: str, model: str) -> Response:
        obj = selectors.model_get_for_user(principal_of(request), ns, model, Action.MANAGE)
        keys = catalog.model_delete(model=obj)
        store = storage.get_object_store()
        for key in keys:
            pending_discard(store, key)
        return Response(status=status.HTTP_204_NO_CONTENT)


def _versions(qs: QuerySet[ModelVersion]) -> QuerySet[ModelVersion]:
    return qs.select_related("model__namespace", "created_by")


class VersionListView(ListView):
    pagination_class = cursor_by("-number")

    @extend_schema(responses=VersionOut(many=True))
    def get(self, request: Request, ns: str, model: str) -> Response:
        obj = selectors.model_get_for_user(principal_of(request), ns, model, Action.READ)
        return self.page(request, _versions(ModelVersion.objects.filter(model=obj)), VersionOut)

    @extend_schema(request=VersionIn, responses={201: VersionDetailOut})
    def post(self, request: Request, ns: str, model: str) -> Response:
        obj = selectors.model_get_for_user(principal_of(request), ns, model, Action.WRITE)
        version = catalog.version_create(
            model=obj, creator=request.user, **parse(VersionIn, request)
        )
        return Response(VersionDetailOut(version).data, status=status.HTTP_201_CREATED)


class VersionDetailView(APIView):
    @extend_schema(responses=VersionDetailOut)
    def get(self, request: Request, ns: str, model: str, number: int) -> Response:
        version = selectors.version_get_for_user(
            principal_of(request), ns, model, number, Action.READ
        )
        return Response(VersionDetailOut(version).data)


class VersionSubmitView(APIView):
    @extend_schema(request=None, responses=VersionDetailOut)
    def post(self, request: Request, ns: str, model: str, number: int) -> Response:
        version = selectors.version_get_for_user(
            principal_of(request), ns, model, number, Action.WRITE
        )
        version = catalog.version_submit(version=version)
        return Response(VersionDetailOut(version).data)


class TokenListView(ListView):
    pagination_class = cursor_by("-created_at")

    @extend_schema(responses=TokenOut(many=True))
    def get(self, request: Request) -> Response:
        return self.page(request, ApiToken.objects.filter(user=request.user), TokenOut)

    @extend_schema(request=TokenIn, responses={201: TokenCreatedOut})
    def post(self, request: Request) -> Response:
        data = parse(TokenIn, request)
        principal = principal_of(request)
        if "expires_at" in data:
            expires_at = data["expires_at"]
        else:
            expires_at = tokens.default_expiry(settings.SMR_TOKEN_DEFAULT_DAYS)
            if principal.token is not None and principal.token.expires_at is not None:
                # Unasked, a minted token simply ends with the token that minted it.
                expires_at = min(filter(None, [expires_at, principal.token.expires_at]))
        issued = tokens.token_create(
            user=request.user,
            scopes=data["scopes"],
            name=data.get("name", ""),
            expires_at=expires_at,
            issued_by=principal.token,
        )
        body = dict(TokenOut(issued.token).data, token=issued.plaintext)
        return Response(body, status=status.HTTP_201_CREATED)


class TokenDetailView(APIView):
    @extend_schema(responses={204: None})
    def delete(self, request: Request, token_id: str) -> Response:
        tokens.token_revoke(
            user=request.user, key_id=token_id, revoked_by=principal_of(request).token
        )
        return Response(status=status.HTTP_204_NO_CONTENT)
