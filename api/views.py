"""Metadata endpoints: parse input, call one service or selector, serialize the output."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

from django.contrib.auth.models import User
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotAuthenticated
from rest_framework.generics import GenericAPIView
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from api import throttles
from api.pagination import cursor_by
from api.serializers import (
    AliasIn,
    AliasOut,
    JobOut,
    MemberIn,
    MemberOut,
    ModelIn,
    ModelOut,
    ModelPatch,
    NamespaceIn,
    NamespaceOut,
    NamespacePatch,
    PolicyOut,
    PolicyPatch,
    ReviewIn,
    ReviewOut,
    ReviewResultOut,
    ScanReportOut,
    TokenCreatedOut,
    TokenIn,
    TokenOut,
    VersionDetailOut,
    VersionIn,
    VersionJobOut,
    VersionOut,
    VersionPatch,
    WebhookCreatedOut,
    WebhookDeliveryOut,
    WebhookIn,
    WebhookOut,
)
from registry import selectors
from registry.access import Action, Principal
from registry.errors import InvalidInput
from registry.models import ALIAS_NAME_RE, ApiToken, Job, ModelVersion, Namespace, VersionState
from registry.services import aliases, approvals, catalog, scanning, tokens, webhooks
from registry.services.catalog import TAG_KEY_RE


def user_of(request: Request) -> User:
    """The authenticated user (every endpoint but the public key requires one)."""
    if not isinstance(request.user, User):
        raise NotAuthenticated()
    return request.user


def principal_of(request: Request) -> Principal:
    token = request.auth if isinstance(request.auth, ApiToken) else None
    return Principal(user=user_of(request), token=token)


def parse(
    serializer_class: type[serializers.Serializer], request: Request, *, partial: bool = False
) -> dict[str, Any]:
    """Validated input; a field the endpoint does not take (unknown or read-only) is a 400
    rather than a silent no-op."""
    serializer = serializer_class(data=request.data, partial=partial)
    if isinstance(request.data, Mapping):
        writable = {name for name, f in serializer.fields.items() if not f.read_only}
        unknown = sorted(str(k) for k in request.data if k not in writable)
        if unknown:
            raise InvalidInput(
                f"Unknown or read-only field(s): {', '.join(unknown)[:200]}. "
                f"This endpoint takes: {', '.join(sorted(writable))}.",
                fields=unknown[:20],
            )
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


class ListView(GenericAPIView):
    """A paginated list whose queryset comes from a selector."""

    # `?ordering=` values a list takes (the first is the default); empty: one fixed order.
    orderings: tuple[str, ...] = ()

    def order(self, request: Request) -> None:
        """Page by the requested ordering. A cursor paginator has one fixed ordering, so the
        paginator class is picked per request; a cursor is only valid with the ordering it
        came from (the `next` links keep `ordering`)."""
        chosen = request.query_params.get("ordering", self.orderings[0])
        if chosen not in self.orderings:
            raise InvalidInput(
                f"ordering must be one of: {', '.join(self.orderings)}.", param="ordering"
            )
        self.pagination_class = cursor_by(chosen)

    def page(self, request: Request, qs: QuerySet, out: type[serializers.Serializer]) -> Response:
        rows = getattr(out, "rows", None)  # a serializer that writes pages from rows
        page = self.paginate_queryset(rows(qs) if rows else qs)
        return self.get_paginated_response(out(page, many=True).data)


class NamespaceListView(ListView):
    pagination_class = cursor_by("name")

    @extend_schema(responses=NamespaceOut(many=True))
    def get(self, request: Request) -> Response:
        qs = selectors.namespace_list_for_user(principal=principal_of(request))
        return self.page(request, qs, NamespaceOut)

    @extend_schema(request=NamespaceIn, responses={201: NamespaceOut})
    def post(self, request: Request) -> Response:
        ns = catalog.namespace_create(
            principal=principal_of(request), creator=user_of(request), **parse(NamespaceIn, request)
        )
        return Response(NamespaceOut(ns).data, status=status.HTTP_201_CREATED)


class NamespaceDetailView(APIView):
    @extend_schema(responses=NamespaceOut)
    def get(self, request: Request, ns: str) -> Response:
        namespace = selectors.namespace_get_for_user(
            principal=principal_of(request), name=ns, action=Action.READ
        )
        return Response(NamespaceOut(namespace).data)

    @extend_schema(request=NamespacePatch, responses=NamespaceOut)
    def patch(self, request: Request, ns: str) -> Response:
        namespace = selectors.namespace_get_for_user(
            principal=principal_of(request), name=ns, action=Action.MANAGE
        )
        namespace = catalog.namespace_update(
            namespace=namespace, **parse(NamespacePatch, request, partial=True)
        )
        return Response(NamespaceOut(namespace).data)


class PolicyView(APIView):
    def _namespace(self, request: Request, ns: str):
        return selectors.namespace_get_for_user(
            principal=principal_of(request), name=ns, action=Action.MANAGE
        )

    @extend_schema(responses=PolicyOut, description="The namespace's approval policy (admins).")
    def get(self, request: Request, ns: str) -> Response:
        return Response(PolicyOut(approvals.policy_of(self._namespace(request, ns))).data)

    @extend_schema(request=PolicyPatch, responses=PolicyOut)
    def patch(self, request: Request, ns: str) -> Response:
        namespace = approvals.policy_update(
            namespace=self._namespace(request, ns), **parse(PolicyPatch, request, partial=True)
        )
        return Response(PolicyOut(approvals.policy_of(namespace)).data)


class MemberListView(ListView):
    pagination_class = cursor_by("created_at")

    @extend_schema(responses=MemberOut(many=True))
    def get(self, request: Request, ns: str) -> Response:
        qs = selectors.member_list_for_user(principal=principal_of(request), namespace=ns)
        return self.page(request, qs, MemberOut)

    @extend_schema(request=MemberIn, responses={200: MemberOut})
    def post(self, request: Request, ns: str) -> Response:
        namespace = selectors.namespace_get_for_user(
            principal=principal_of(request), name=ns, action=Action.MANAGE
        )
        membership = catalog.member_set(namespace=namespace, **parse(MemberIn, request))
        return Response(MemberOut(membership).data)


class MemberDetailView(APIView):
    @extend_schema(responses={204: None})
    def delete(self, request: Request, ns: str, username: str) -> Response:
        namespace = selectors.namespace_get_for_user(
            principal=principal_of(request), name=ns, action=Action.MANAGE
        )
        catalog.member_remove(namespace=namespace, username=username)
        return Response(status=status.HTTP_204_NO_CONTENT)


def _text_param(request: Request, name: str, max_length: int) -> str:
    value = request.query_params.get(name, "")
    # NUL would reach PostgreSQL as a text parameter (a DataError, i.e. a 500).
    if len(value) > max_length or "\x00" in value:
        raise InvalidInput(f"{name} is text of at most {max_length} characters, without NUL.")
    return value


def _text_param_schema(name: str, max_length: int, description: str) -> OpenApiParameter:
    return OpenApiParameter(
        name, str, pattern=f"^[^\\u0000]{{0,{max_length}}}$", description=description
    )


def _tag_params(request: Request) -> tuple[tuple[str, str], ...]:
    tags = []
    for raw in request.query_params.getlist("tag"):
        key, sep, value = raw.partition(":")
        if not sep or not TAG_KEY_RE.fullmatch(key) or len(value) > 256 or "\x00" in value:
            raise InvalidInput("tag filters are `key:value` (repeat `tag` to need several).")
        tags.append((key, value))
    if len(tags) > 50:
        raise InvalidInput("At most 50 tag filters.", param="tag")
    return tuple(tags)


TAG_PARAM = OpenApiParameter(
    "tag",
    str,
    many=True,
    pattern="^[A-Za-z0-9_./-]{1,64}:[^\\u0000]{0,256}$",
    description="`key:value`; repeat to require several tags (at most 50).",
)
ALIAS_PARAM = OpenApiParameter(
    "alias", str, OpenApiParameter.PATH, pattern=ALIAS_NAME_RE.removesuffix(r"\Z") + "$"
)


def _ordering_param(choices: tuple[str, ...]) -> OpenApiParameter:
    return OpenApiParameter("ordering", str, enum=list(choices), default=choices[0])


MODEL_ORDERINGS = ("name", "-name", "-updated_at", "updated_at")
VERSION_ORDERINGS = ("-number", "number", "-created_at", "created_at")


class ModelListView(ListView):
    pagination_class = cursor_by("name")
    orderings = MODEL_ORDERINGS

    @extend_schema(
        responses=ModelOut(many=True),
        parameters=[
            _text_param_schema("prefix", 128, "Names starting with this (any case)."),
            TAG_PARAM,
            _ordering_param(MODEL_ORDERINGS),
        ],
    )
    def get(self, request: Request, ns: str) -> Response:
        filters = selectors.ModelFilters(
            prefix=_text_param(request, "prefix", 128), tags=_tag_params(request)
        )
        self.order(request)
        qs = selectors.model_list_for_user(
            principal=principal_of(request), namespace=ns, filters=filters
        )
        return self.page(request, qs, ModelOut)

    @extend_schema(request=ModelIn, responses={201: ModelOut})
    def post(self, request: Request, ns: str) -> Response:
        namespace = selectors.namespace_get_for_user(
            principal=principal_of(request), name=ns, action=Action.WRITE
        )
        model = catalog.model_create(
            namespace=namespace, creator=user_of(request), **parse(ModelIn, request)
        )
        return Response(ModelOut(model).data, status=status.HTTP_201_CREATED)


class ModelDetailView(APIView):
    def _model(self, request: Request, ns: str, model: str, action: Action):
        return selectors.model_get_for_user(
            principal=principal_of(request), namespace=ns, name=model, action=action
        )

    @extend_schema(responses=ModelOut)
    def get(self, request: Request, ns: str, model: str) -> Response:
        return Response(ModelOut(self._model(request, ns, model, Action.READ)).data)

    @extend_schema(request=ModelPatch, responses=ModelOut)
    def patch(self, request: Request, ns: str, model: str) -> Response:
        obj = catalog.model_update(
            model=self._model(request, ns, model, Action.WRITE),
            **parse(ModelPatch, request, partial=True),
        )
        return Response(ModelOut(obj).data)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, ns: str, model: str) -> Response:
        catalog.model_delete(model=self._model(request, ns, model, Action.MANAGE))
        return Response(status=status.HTTP_204_NO_CONTENT)


class VersionListView(ListView):
    pagination_class = cursor_by("-number")
    orderings = VERSION_ORDERINGS

    @extend_schema(
        responses=VersionOut(many=True),
        parameters=[
            OpenApiParameter("state", str, enum=VersionState.values),
            TAG_PARAM,
            OpenApiParameter("alias", str, pattern=ALIAS_NAME_RE.removesuffix(r"\Z") + "$"),
            _text_param_schema("created_by", 150, "The creator's username."),
            _ordering_param(VERSION_ORDERINGS),
        ],
    )
    def get(self, request: Request, ns: str, model: str) -> Response:
        state = request.query_params.get("state", "")
        if state and state not in VersionState.values:
            raise InvalidInput(f"state must be one of: {', '.join(VersionState.values)}.")
        alias = request.query_params.get("alias", "")
        if alias and not re.match(ALIAS_NAME_RE, alias):
            raise InvalidInput("alias is an alias name (a lowercase letter first).")
        filters = selectors.VersionFilters(
            state=state,
            tags=_tag_params(request),
            alias=alias,
            created_by=_text_param(request, "created_by", 150),
        )
        self.order(request)
        qs = selectors.version_list_for_user(
            principal=principal_of(request), namespace=ns, model=model, filters=filters
        )
        return self.page(request, qs, VersionOut)

    @extend_schema(request=VersionIn, responses={201: VersionDetailOut})
    def post(self, request: Request, ns: str, model: str) -> Response:
        principal = principal_of(request)
        obj = selectors.model_get_for_user(
            principal=principal, namespace=ns, name=model, action=Action.WRITE
        )
        version = catalog.version_create(
            model=obj, creator=user_of(request), **parse(VersionIn, request)
        )
        return Response(version_detail(principal, version), status=status.HTTP_201_CREATED)


class VersionDetailView(APIView):
    @extend_schema(responses=VersionDetailOut)
    def get(self, request: Request, ns: str, model: str, number: int) -> Response:
        principal = principal_of(request)
        version = selectors.version_detail_for_user(
            principal=principal, namespace=ns, model=model, number=number
        )
        return Response(VersionDetailOut(version, context={"principal": principal}).data)

    @extend_schema(request=VersionPatch, responses=VersionDetailOut)
    def patch(self, request: Request, ns: str, model: str, number: int) -> Response:
        principal = principal_of(request)
        data = parse(VersionPatch, request, partial=True)
        version = selectors.version_get_for_user(
            principal=principal, namespace=ns, model=model, number=number, action=Action.WRITE
        )
        version = catalog.version_update(version=version, **data)
        return Response(version_detail(principal, version))


class AliasListView(ListView):
    pagination_class = cursor_by("name")

    @extend_schema(responses=AliasOut(many=True))
    def get(self, request: Request, ns: str, model: str) -> Response:
        qs = selectors.alias_list_for_user(
            principal=principal_of(request), namespace=ns, model=model
        )
        return self.page(request, qs, AliasOut)


class AliasDetailView(APIView):
    """Aliases move by reviewers and admins (the `review` action); protected aliases (the
    namespace policy's `protected_aliases`) by admins only."""

    def _model(self, request: Request, ns: str, model: str):
        return selectors.model_get_for_user(
            principal=principal_of(request), namespace=ns, name=model, action=Action.REVIEW
        )

    @extend_schema(
        request=AliasIn,
        responses=AliasOut,
        parameters=[ALIAS_PARAM],
        description="Point the alias at an approved version (created if new). Reviewers and "
        "admins; a protected alias only admins (403 alias_protected); a version that is not "
        "approved is a 409 version_not_approved.",
    )
    def put(self, request: Request, ns: str, model: str, alias: str) -> Response:
        data = parse(AliasIn, request)
        obj = aliases.alias_set(
            principal=principal_of(request),
            model=self._model(request, ns, model),
            name=alias,
            number=data["version"],
        )
        return Response(AliasOut(obj).data)

    @extend_schema(responses={204: None}, parameters=[ALIAS_PARAM])
    def delete(self, request: Request, ns: str, model: str, alias: str) -> Response:
        aliases.alias_delete(
            principal=principal_of(request), model=self._model(request, ns, model), name=alias
        )
        return Response(status=status.HTTP_204_NO_CONTENT)


def version_detail(principal: Principal, version: ModelVersion) -> dict[str, Any]:
    """A version's detail JSON, its files, reviews and aliases loaded in bulk first."""
    version = selectors.version_related_load(version=version)
    return VersionDetailOut(version, context={"principal": principal}).data


def version_job_response(principal: Principal, version: ModelVersion, job: Job) -> Response:
    body = {
        "version": version_detail(principal, version),
        "job": JobOut(job).data,
    }
    return Response(body, status=status.HTTP_202_ACCEPTED)


class VersionSubmitView(APIView):
    @extend_schema(
        request=None,
        responses={202: VersionJobOut},
        description="Freeze the draft's files and start scanning them: the version moves to "
        "`scanning` and a scan job is queued. Poll `GET /jobs/{id}`; the scan moves the "
        "version to `pending_review` (clean) or `quarantined`.",
    )
    def post(self, request: Request, ns: str, model: str, number: int) -> Response:
        principal = principal_of(request)
        version = selectors.version_get_for_user(
            principal=principal,
            namespace=ns,
            model=model,
            number=number,
            action=Action.WRITE,
        )
        version, job = catalog.version_submit(version=version, submitter=user_of(request))
        return version_job_response(principal, version, job)


class VersionRescanView(APIView):
    @extend_schema(
        request=None,
        responses={202: VersionJobOut},
        description="Scan a pending_review or quarantined version again (namespace admins), "
        "e.g. after the scanner's rules were updated. Every report records the scanner version.",
    )
    def post(self, request: Request, ns: str, model: str, number: int) -> Response:
        principal = principal_of(request)
        version = selectors.version_get_for_user(
            principal=principal,
            namespace=ns,
            model=model,
            number=number,
            action=Action.MANAGE,
        )
        version, job = scanning.version_rescan(version=version, requested_by=user_of(request))
        return version_job_response(principal, version, job)


class ReviewListView(ListView):
    pagination_class = cursor_by("created_at")

    @extend_schema(responses=ReviewOut(many=True))
    def get(self, request: Request, ns: str, model: str, number: int) -> Response:
        qs = selectors.review_list_for_user(
            principal=principal_of(request), namespace=ns, model=model, number=number
        )
        return self.page(request, qs, ReviewOut)

    @extend_schema(
        request=ReviewIn,
        responses={201: ReviewResultOut},
        description="Approve or reject a version pending review (reviewers and admins, never "
        "its uploader unless the policy allows). Enough distinct approvals with every gate "
        "holding approve the version; one rejection rejects it.",
    )
    def post(self, request: Request, ns: str, model: str, number: int) -> Response:
        principal = principal_of(request)
        version = selectors.version_get_for_user(
            principal=principal, namespace=ns, model=model, number=number, action=Action.REVIEW
        )
        review = approvals.review_record(
            version=version, reviewer=user_of(request), **parse(ReviewIn, request)
        )
        body = {
            "review": ReviewOut(review).data,
            "version": version_detail(principal, version),
        }
        return Response(body, status=status.HTTP_201_CREATED)


class VersionDeprecateView(APIView):
    @extend_schema(request=None, responses=VersionDetailOut, description="approved -> deprecated.")
    def post(self, request: Request, ns: str, model: str, number: int) -> Response:
        principal = principal_of(request)
        version = selectors.version_get_for_user(
            principal=principal, namespace=ns, model=model, number=number, action=Action.MANAGE
        )
        version = approvals.version_deprecate(version=version)
        return Response(version_detail(principal, version))


class VersionRevokeView(APIView):
    @extend_schema(
        request=None,
        responses=VersionDetailOut,
        description="Revoke a version in any state: its files answer 410 from now on.",
    )
    def post(self, request: Request, ns: str, model: str, number: int) -> Response:
        principal = principal_of(request)
        version = selectors.version_get_for_user(
            principal=principal, namespace=ns, model=model, number=number, action=Action.MANAGE
        )
        version = approvals.version_revoke(version=version)
        return Response(version_detail(principal, version))


class ScanReportListView(ListView):
    pagination_class = cursor_by("-created_at")

    @extend_schema(responses=ScanReportOut(many=True))
    def get(self, request: Request, ns: str, model: str, number: int) -> Response:
        qs = selectors.scan_report_list_for_user(
            principal=principal_of(request), namespace=ns, model=model, number=number
        )
        return self.page(request, qs, ScanReportOut)


class JobListView(ListView):
    pagination_class = cursor_by("-created_at")

    @extend_schema(responses=JobOut(many=True))
    def get(self, request: Request) -> Response:
        return self.page(
            request, selectors.job_list_for_user(principal=principal_of(request)), JobOut
        )


class JobDetailView(APIView):
    @extend_schema(responses=JobOut)
    def get(self, request: Request, job_id: uuid.UUID) -> Response:
        job = selectors.job_get_for_user(principal=principal_of(request), job_id=job_id)
        return Response(JobOut(job).data)


class TokenListView(ListView):
    pagination_class = cursor_by("-created_at")
    throttle_classes = throttles.TOKEN_CREATE  # POST only

    @extend_schema(responses=TokenOut(many=True))
    def get(self, request: Request) -> Response:
        return self.page(request, selectors.token_list_for_user(user=user_of(request)), TokenOut)

    @extend_schema(request=TokenIn, responses={201: TokenCreatedOut})
    def post(self, request: Request) -> Response:
        data = parse(TokenIn, request)
        issued = tokens.token_create(
            user=user_of(request),
            scopes=data["scopes"],
            name=data.get("name", ""),
            expires_at=data.get("expires_at", tokens.DEFAULT_EXPIRY),
            issued_by=principal_of(request).token,
        )
        body = dict(TokenOut(issued.token).data, token=issued.plaintext)
        return Response(body, status=status.HTTP_201_CREATED)


class TokenDetailView(APIView):
    @extend_schema(responses={204: None})
    def delete(self, request: Request, token_id: str) -> Response:
        tokens.token_revoke(
            user=user_of(request), key_id=token_id, revoked_by=principal_of(request).token
        )
        return Response(status=status.HTTP_204_NO_CONTENT)


class WebhookListView(ListView):
    pagination_class = cursor_by("created_at")

    def _namespace(self, request: Request, ns: str) -> Namespace:
        return selectors.namespace_get_for_user(
            principal=principal_of(request), name=ns, action=Action.MANAGE
        )

    @extend_schema(responses=WebhookOut(many=True), description="Webhooks (admins).")
    def get(self, request: Request, ns: str) -> Response:
        qs = webhooks.webhook_list(namespace=self._namespace(request, ns))
        return self.page(request, qs.select_related("created_by"), WebhookOut)

    @extend_schema(
        request=WebhookIn,
        responses={201: WebhookCreatedOut},
        description="Register a receiver (admins). The response carries the signing secret, "
        "shown this once.",
    )
    def post(self, request: Request, ns: str) -> Response:
        webhook, secret = webhooks.webhook_create(
            namespace=self._namespace(request, ns),
            creator=user_of(request),
            **parse(WebhookIn, request),
        )
        body = {**WebhookOut(webhook).data, "secret": secret}
        return Response(body, status=status.HTTP_201_CREATED)


class WebhookDetailView(APIView):
    @extend_schema(responses={204: None})
    def delete(self, request: Request, ns: str, webhook_id: uuid.UUID) -> Response:
        namespace = selectors.namespace_get_for_user(
            principal=principal_of(request), name=ns, action=Action.MANAGE
        )
        webhooks.webhook_delete(namespace=namespace, webhook_id=webhook_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class WebhookDeliveryListView(ListView):
    pagination_class = cursor_by("-created_at")

    @extend_schema(
        responses=WebhookDeliveryOut(many=True),
        description="Delivery history, one entry per attempt, newest first (admins).",
    )
    def get(self, request: Request, ns: str, webhook_id: uuid.UUID) -> Response:
        namespace = selectors.namespace_get_for_user(
            principal=principal_of(request), name=ns, action=Action.MANAGE
        )
        webhook = webhooks.webhook_get(namespace=namespace, webhook_id=webhook_id)
        return self.page(request, webhooks.webhook_deliveries(webhook=webhook), WebhookDeliveryOut)
