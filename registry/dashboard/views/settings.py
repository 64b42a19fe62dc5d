"""Tokens, namespace policy, webhooks and their deliveries, publisher keys."""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings as django_settings
from django.contrib import messages
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import URLPattern, path
from django.views.decorators.http import require_GET, require_POST

from registry import selectors
from registry.access import Action, principal_allows
from registry.dashboard.views.base import flash_error, page, principal_of
from registry.errors import InvalidInput, RegistryError
from registry.models import SEVERITY_CHOICES, Namespace, TokenScope, WebhookEvent
from registry.services import approvals, signatures, tokens, webhooks

TOKEN_PAGE = 100
DELIVERY_PAGE = 50
# Expiry choices of the token form, in days ("never": no expiry).
EXPIRY_DAYS = (7, 30, 90, 365)


def _no_store(response: HttpResponse) -> HttpResponse:
    # A page that shows a secret once must not be kept by the browser or a proxy.
    response["Cache-Control"] = "no-store"
    return response


# --- Your tokens ------------------------------------------------------------------------------


def _administered(request: HttpRequest) -> list[Namespace]:
    principal = principal_of(request)
    return [
        ns
        for ns in selectors.namespace_list_for_user(principal=principal).order_by("name")
        if principal_allows(
            principal, selectors.role_for(principal=principal, namespace=ns), Action.MANAGE
        )
    ]


def _settings_context(request: HttpRequest) -> dict[str, Any]:
    user = principal_of(request).user
    qs = selectors.token_list_for_user(user=user).order_by("-pk")
    before = request.GET.get("before", "")
    if before:
        if not before.isdigit() or len(before) > 18:
            raise InvalidInput("The token page cursor must be a number; use the page links.")
        qs = qs.filter(pk__lt=int(before))
    rows = list(qs[: TOKEN_PAGE + 1])
    older = rows[TOKEN_PAGE - 1].pk if len(rows) > TOKEN_PAGE else None
    return {
        "tokens": rows[:TOKEN_PAGE],
        "older": older,
        "scopes": TokenScope.values,
        "expiry_days": EXPIRY_DAYS,
        "default_days": django_settings.SMR_TOKEN_DEFAULT_DAYS,
        "administered": _administered(request),
    }


@page
@require_GET
def settings_home(request: HttpRequest) -> HttpResponse:
    return render(request, "dashboard/settings_home.html", _settings_context(request))


def _expiry(raw: str) -> Any:
    if raw in ("", "default"):
        return tokens.DEFAULT_EXPIRY
    if raw == "never":
        return None
    if not raw.isdigit() or int(raw) not in EXPIRY_DAYS:
        raise InvalidInput("Pick an expiry from the list.", field="expires")
    return tokens.default_expiry(int(raw))


@page
@require_POST
def token_create(request: HttpRequest) -> HttpResponse:
    try:
        issued = tokens.token_create(
            user=principal_of(request).user,
            scopes=request.POST.getlist("scopes"),
            name=request.POST.get("name", "").strip()[:100],
            expires_at=_expiry(request.POST.get("expires", "")),
        )
    except RegistryError as exc:
        flash_error(request, exc)
        return redirect("dashboard:settings")
    # Rendered straight into this response, never put in the session or a message: the
    # plaintext exists only here and is gone when the page is left.
    context = {"issued": issued.token, "plaintext": issued.plaintext}
    return _no_store(render(request, "dashboard/settings_token_created.html", context, status=201))


@page
@require_POST
def token_revoke(request: HttpRequest, key_id: str) -> HttpResponse:
    try:
        token = tokens.token_revoke(user=principal_of(request).user, key_id=key_id)
    except RegistryError as exc:
        flash_error(request, exc)
    else:
        messages.success(request, f"Token {token} ({token.name or 'unnamed'}) is revoked.")
    return redirect("dashboard:settings")


# --- A namespace's settings (admins) ----------------------------------------------------------


def _admin_namespace(request: HttpRequest, ns: str) -> Namespace:
    # NotFound for non-members, PermissionDenied for members who are not admins: the page
    # decorator shows either, like the API's answers.
    return selectors.namespace_get_for_user(
        principal=principal_of(request), name=ns, action=Action.MANAGE
    )


def _namespace_context(request: HttpRequest, namespace: Namespace) -> dict[str, Any]:
    return {
        "namespace": namespace,
        "policy": approvals.policy_of(namespace),
        "gates": sorted(approvals.GATES),
        "severities": [value for value, _label in SEVERITY_CHOICES],
        "webhooks": list(webhooks.webhook_list(namespace=namespace).select_related("created_by")),
        "webhook_events": WebhookEvent.values,
        "keys": list(
            selectors.publisher_key_list_for_user(
                principal=principal_of(request), namespace=namespace.name
            ).order_by("created_at")
        ),
    }


@page
@require_GET
def namespace_settings(request: HttpRequest, ns: str) -> HttpResponse:
    namespace = _admin_namespace(request, ns)
    return render(
        request, "dashboard/settings_namespace.html", _namespace_context(request, namespace)
    )


def _aliases(raw: str) -> list[str]:
    return [name for name in raw.replace(",", " ").split() if name]


@page
@require_POST
def policy_update(request: HttpRequest, ns: str) -> HttpResponse:
    namespace = _admin_namespace(request, ns)
    form = request.POST
    try:
        required = form.get("approvals_required", "").strip()
        if not required.isdigit() or not 1 <= int(required) <= 100:
            raise InvalidInput(
                "approvals_required must be a whole number from 1 to 100.",
                field="approvals_required",
            )
        approvals.policy_update(
            namespace=namespace,
            approvals_required=int(required),
            allow_self_review=form.get("allow_self_review") == "on",
            scan_quarantine_severity=form.get("scan_quarantine_severity", ""),
            required_gates=form.getlist("required_gates"),
            protected_aliases=_aliases(form.get("protected_aliases", "")),
        )
    except RegistryError as exc:
        flash_error(request, exc)
    else:
        messages.success(request, "Policy saved.")
    return redirect("dashboard:namespace_settings", ns=namespace.name)


@page
@require_POST
def webhook_create(request: HttpRequest, ns: str) -> HttpResponse:
    namespace = _admin_namespace(request, ns)
    try:
        url = request.POST.get("url", "").strip()
        if len(url) > 2000:
            raise InvalidInput("The webhook URL is longer than 2000 characters.", field="url")
        webhook, secret = webhooks.webhook_create(
            namespace=namespace,
            url=url,
            events=request.POST.getlist("events"),
            creator=principal_of(request).user,
        )
    except RegistryError as exc:
        flash_error(request, exc)
        return redirect("dashboard:namespace_settings", ns=namespace.name)
    context = {"namespace": namespace, "webhook": webhook, "secret": secret}
    return _no_store(
        render(request, "dashboard/settings_webhook_created.html", context, status=201)
    )


@page
@require_GET
def webhook_deliveries(request: HttpRequest, ns: str, webhook_id: uuid.UUID) -> HttpResponse:
    namespace = _admin_namespace(request, ns)
    webhook = webhooks.webhook_get(namespace=namespace, webhook_id=webhook_id)
    deliveries = webhooks.webhook_deliveries(webhook=webhook).order_by("-created_at", "-attempt")
    pages = Paginator(deliveries, DELIVERY_PAGE)
    number = request.GET.get("page", "1")
    if not number.isdigit() or not 1 <= int(number) <= max(pages.num_pages, 1):
        raise InvalidInput("No such page of deliveries; use the page links.", param="page")
    context = {"namespace": namespace, "webhook": webhook, "page": pages.page(int(number))}
    return render(request, "dashboard/settings_webhook.html", context)


@page
@require_POST
def webhook_delete(request: HttpRequest, ns: str, webhook_id: uuid.UUID) -> HttpResponse:
    namespace = _admin_namespace(request, ns)
    try:
        webhooks.webhook_delete(namespace=namespace, webhook_id=webhook_id)
    except RegistryError as exc:
        flash_error(request, exc)
    else:
        messages.success(request, "Webhook deleted with its delivery history.")
    return redirect("dashboard:namespace_settings", ns=namespace.name)


@page
@require_POST
def publisher_key_add(request: HttpRequest, ns: str) -> HttpResponse:
    namespace = _admin_namespace(request, ns)
    try:
        key = signatures.publisher_key_add(
            namespace=namespace,
            public_key_pem=request.POST.get("public_key_pem", "")[:10000],
            name=request.POST.get("name", "").strip()[:100],
            creator=principal_of(request).user,
        )
    except RegistryError as exc:
        flash_error(request, exc)
    else:
        messages.success(request, f"Publisher key {key.key_id[:16]}… is trusted now.")
    return redirect("dashboard:namespace_settings", ns=namespace.name)


@page
@require_POST
def publisher_key_delete(request: HttpRequest, ns: str, key_id: str) -> HttpResponse:
    namespace = _admin_namespace(request, ns)
    try:
        signatures.publisher_key_delete(namespace=namespace, key_id=key_id)
    except RegistryError as exc:
        flash_error(request, exc)
    else:
        messages.success(request, f"Publisher key {key_id[:16]}… is no longer trusted.")
    return redirect("dashboard:namespace_settings", ns=namespace.name)


urlpatterns: list[URLPattern] = [
    path("settings", settings_home, name="settings"),
    path("settings/tokens", token_create, name="token_create"),
    path("settings/tokens/<str:key_id>/revoke", token_revoke, name="token_revoke"),
    path("ns/<str:ns>/-/settings", namespace_settings, name="namespace_settings"),
    path("ns/<str:ns>/-/settings/policy", policy_update, name="policy_update"),
    path("ns/<str:ns>/-/settings/webhooks", webhook_create, name="webhook_create"),
    path(
        "ns/<str:ns>/-/settings/webhooks/<uuid:webhook_id>",
        webhook_deliveries,
        name="webhook_deliveries",
    ),
    path(
        "ns/<str:ns>/-/settings/webhooks/<uuid:webhook_id>/delete",
        webhook_delete,
        name="webhook_delete",
    ),
    path("ns/<str:ns>/-/settings/keys", publisher_key_add, name="publisher_key_add"),
    path(
        "ns/<str:ns>/-/settings/keys/<str:key_id>/delete",
        publisher_key_delete,
        name="publisher_key_delete",
    ),
]
