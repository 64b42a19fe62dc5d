"""Namespace, model and version pages; compare two versions.

Every read goes through registry.selectors and every change through a service, as the API's
do; the `can_*` flags only decide which controls a page shows (the services still decide).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from django import forms
from django.contrib import messages
from django.core.paginator import Page, Paginator
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.template.defaultfilters import filesizeformat
from django.urls import URLPattern, path, reverse
from django.utils.safestring import SafeString, mark_safe
from django.views.decorators.http import require_POST
from markdown_it import MarkdownIt

from registry import selectors
from registry.access import Action, Principal, principal_allows
from registry.dashboard.views.base import flash_error, page, principal_of
from registry.errors import InvalidInput, NotFound, RegistryError
from registry.models import Artifact, ModelVersion, Role, ScanReport, ScanVerdict, VersionState
from registry.scanners.safetensorsfile import Malformed, safetensors_summary
from registry.services import aliases, approvals, artifacts, catalog
from registry.services.audit import audit_target
from registry.services.catalog import TAG_KEY_RE

PAGE_SIZE = 50
# Safetensors headers read automatically per version page; the rest on request (each read is
# an audited download).
SAFETENSORS_AUTO = 10
# The most of a safetensors header this page reads (the format allows 100 MB of JSON).
SAFETENSORS_HEADER_MAX = 1 << 20
# The first read covers the length and most headers at once: one audited range per file.
SAFETENSORS_FIRST_READ = 8 + (64 << 10)
MAX_VERSION = 2**31 - 1

# CommonMark without raw HTML: tags in a description are shown as text, and markdown-it's
# link validation leaves javascript:, vbscript:, file: and data: links as plain text.
_MARKDOWN = MarkdownIt("commonmark", {"html": False})


def markdown(text: str) -> SafeString:
    return mark_safe(_MARKDOWN.render(text))  # noqa: S308 - html disabled: escaped output


def paginate(request: HttpRequest, qs: QuerySet | list, size: int = PAGE_SIZE) -> Page:
    return Paginator(qs, size).get_page(request.GET.get("page"))


def api_base(request: HttpRequest) -> str:
    return request.build_absolute_uri("/api/v1")


def api_version_path(ns: str, model: str, number: int) -> str:
    return f"/api/v1/namespaces/{quote(ns)}/models/{quote(model)}/versions/{number}"


def may(principal: Principal, namespace: Any, action: Action) -> bool:
    return principal_allows(
        principal, selectors.role_for(principal=principal, namespace=namespace), action
    )


# --- Namespace ------------------------------------------------------------------------------


class ModelSearch(forms.Form):
    q = forms.CharField(required=False, max_length=128, label="Name starts with")
    tag = forms.CharField(
        required=False, max_length=2000, label="Tags (key=value, comma-separated)"
    )
    sort = forms.ChoiceField(
        required=False, choices=[("name", "Name"), ("updated", "Last updated")], label="Sort by"
    )

    def clean_tag(self) -> tuple[tuple[str, str], ...]:
        tags = []
        for item in filter(None, (t.strip() for t in self.cleaned_data["tag"].split(","))):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not TAG_KEY_RE.fullmatch(key) or len(value) > 256:
                raise forms.ValidationError("Write tags as key=value, separated by commas.")
            tags.append((key, value))
        return tuple(tags[:50])


MODEL_ORDER = {"name": ("name",), "updated": ("-updated_at", "name")}


class MemberForm(forms.Form):
    username = forms.CharField(max_length=150)
    role = forms.ChoiceField(choices=Role.choices)


@page
def namespace_page(request: HttpRequest, ns: str) -> HttpResponse:
    principal = principal_of(request)
    namespace = selectors.namespace_get_for_user(principal=principal, name=ns, action=Action.READ)
    search = ModelSearch(request.GET)
    filters, order = selectors.ModelFilters(), MODEL_ORDER["name"]
    if search.is_valid():
        data = search.cleaned_data
        filters = selectors.ModelFilters(prefix=data["q"], tags=data["tag"])
        order = MODEL_ORDER[data["sort"] or "name"]
    models = (
        selectors.model_list_for_user(
            principal=principal, namespace=namespace.name, filters=filters
        )
        .annotate(version_count=Count("versions"))
        .order_by(*order)
    )
    filtered = bool(filters.prefix or filters.tags)
    page_obj = paginate(request, models)
    members = selectors.member_list_for_user(principal=principal, namespace=namespace.name)
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "dashboard/browse_namespace.html",
        {
            "namespace": namespace,
            "role": selectors.role_for(principal=principal, namespace=namespace),
            "search": search,
            "filtered": filtered,
            "page_obj": page_obj,
            "query": query.urlencode(),
            "members": members.order_by("user__username"),
            "roles": Role.choices,
            "can_manage": may(principal, namespace, Action.MANAGE),
            "can_write": may(principal, namespace, Action.WRITE),
            "api": api_base(request),
        },
    )


@page
@require_POST
def member_set(request: HttpRequest, ns: str) -> HttpResponse:
    principal = principal_of(request)
    namespace = selectors.namespace_get_for_user(principal=principal, name=ns, action=Action.MANAGE)
    form = MemberForm(request.POST)
    if not form.is_valid():
        flash_error(request, InvalidInput(form_errors(form)))
    else:
        try:
            membership = catalog.member_set(namespace=namespace, **form.cleaned_data)
            messages.success(
                request,
                f"{form.cleaned_data['username']} is now {membership.role} of {namespace.name}.",
            )
        except RegistryError as exc:
            flash_error(request, exc)
    return redirect(reverse("dashboard:namespace", args=[namespace.name]) + "#members")


@page
@require_POST
def member_remove(request: HttpRequest, ns: str, username: str) -> HttpResponse:
    principal = principal_of(request)
    namespace = selectors.namespace_get_for_user(principal=principal, name=ns, action=Action.MANAGE)
    try:
        catalog.member_remove(namespace=namespace, username=username)
        messages.success(request, f"{username} is no longer a member of {namespace.name}.")
    except RegistryError as exc:
        flash_error(request, exc)
    return redirect(reverse("dashboard:namespace", args=[namespace.name]) + "#members")


def form_errors(form: forms.Form) -> str:
    return " ".join(
        f"{name}: {' '.join(str(e) for e in errors)}" for name, errors in form.errors.items()
    )


# --- Model ----------------------------------------------------------------------------------


class AliasForm(forms.Form):
    alias = forms.CharField(max_length=63)
    version = forms.IntegerField(min_value=1, max_value=MAX_VERSION)


@page
def model_page(request: HttpRequest, ns: str, model: str) -> HttpResponse:
    principal = principal_of(request)
    obj = selectors.model_get_for_user(
        principal=principal, namespace=ns, name=model, action=Action.READ
    )
    ns_name, name = obj.namespace.name, obj.name
    versions = selectors.version_list_for_user(principal=principal, namespace=ns_name, model=name)
    page_obj = paginate(request, versions.order_by("-number"))
    alias_rows = [
        (alias, aliases.alias_change_allowed(principal=principal, model=obj, name=alias.name))
        for alias in selectors.alias_list_for_user(
            principal=principal, namespace=ns_name, model=name
        ).order_by("name")
    ]
    can_alias = may(principal, obj.namespace, Action.REVIEW)
    approved: list[int] = []
    if can_alias:
        approved = list(
            versions.filter(state=VersionState.APPROVED)
            .order_by("-number")
            .values_list("number", flat=True)[:200]
        )
    return render(
        request,
        "dashboard/browse_model.html",
        {
            "model": obj,
            "ns": ns_name,
            "description": markdown(obj.description),
            "tags": sorted(obj.tags.items()),
            "page_obj": page_obj,
            "alias_rows": alias_rows,
            "can_alias": can_alias,
            "approved": approved,
            "protected": obj.namespace.protected_aliases,
            "can_write": may(principal, obj.namespace, Action.WRITE),
            "api": api_base(request),
        },
    )


@page
@require_POST
def alias_set(request: HttpRequest, ns: str, model: str) -> HttpResponse:
    principal = principal_of(request)
    # The API's check for alias changes (reviewers and admins); the service adds protection.
    obj = selectors.model_get_for_user(
        principal=principal, namespace=ns, name=model, action=Action.REVIEW
    )
    form = AliasForm(request.POST)
    if not form.is_valid():
        flash_error(request, InvalidInput(form_errors(form)))
    else:
        name, number = form.cleaned_data["alias"], form.cleaned_data["version"]
        try:
            aliases.alias_set(principal=principal, model=obj, name=name, number=number)
            messages.success(request, f"{name} now points at version {number}.")
        except RegistryError as exc:
            flash_error(request, exc)
    return redirect(reverse("dashboard:model", args=[obj.namespace.name, obj.name]) + "#aliases")


@page
@require_POST
def alias_delete(request: HttpRequest, ns: str, model: str, alias: str) -> HttpResponse:
    principal = principal_of(request)
    obj = selectors.model_get_for_user(
        principal=principal, namespace=ns, name=model, action=Action.REVIEW
    )
    try:
        aliases.alias_delete(principal=principal, model=obj, name=alias)
        messages.success(request, f"Alias {alias} removed.")
    except RegistryError as exc:
        flash_error(request, exc)
    return redirect(reverse("dashboard:model", args=[obj.namespace.name, obj.name]) + "#aliases")


# --- Compare --------------------------------------------------------------------------------


def loaded(version: ModelVersion) -> Any:
    """The version with the lists selectors.version_related_load hangs on it (untyped)."""
    return version


def _number(value: str | None) -> int | None:
    if value is None or not value.isdigit() or len(value) > 9:
        return None
    return int(value)


def _side(principal: Principal, ns: str, model: str, number: int) -> dict[str, Any]:
    version = loaded(
        selectors.version_detail_for_user(
            principal=principal, namespace=ns, model=model, number=number
        )
    )
    scans = {r.artifact.path: r for r in selectors.scan_reports_latest(version=version)}
    signatures = list(
        selectors.signature_list_for_user(
            principal=principal, namespace=ns, model=model, number=number
        )
    )
    return {
        "version": version,
        "files": {a.path: a for a in version.loaded_files},
        "scans": scans,
        "signatures": signatures,
        "dp": version.loaded_dp_record,
    }


def _compare_cell(artifact: Artifact | None, report: ScanReport | None) -> dict[str, Any] | None:
    if artifact is None:
        return None
    scan = _scan_cell(report, findings_visible=False)
    return {
        "size": filesizeformat(artifact.size),
        "sha256": artifact.sha256,
        "short": artifact.sha256[:12],
        "scan": scan["scan"],
        "scan_label": scan["scan_label"],
    }


@page
def compare(request: HttpRequest, ns: str, model: str) -> HttpResponse:
    principal = principal_of(request)
    obj = selectors.model_get_for_user(
        principal=principal, namespace=ns, name=model, action=Action.READ
    )
    ns_name, name = obj.namespace.name, obj.name
    numbers = list(
        selectors.version_list_for_user(principal=principal, namespace=ns_name, model=name)
        .order_by("-number")
        .values_list("number", flat=True)[:1000]
    )
    a, b = _number(request.GET.get("a")), _number(request.GET.get("b"))
    context: dict[str, Any] = {"model": obj, "ns": ns_name, "numbers": numbers, "a": a, "b": b}
    if a is not None and b is not None:
        left, right = _side(principal, ns_name, name, a), _side(principal, ns_name, name, b)
        rows = []
        counts = {"added": 0, "removed": 0, "changed": 0, "same": 0}
        for file_path in sorted(left["files"].keys() | right["files"].keys()):
            fa, fb = left["files"].get(file_path), right["files"].get(file_path)
            if fa is None:
                status = "added"
            elif fb is None:
                status = "removed"
            else:
                status = "changed" if fa.sha256 != fb.sha256 else "same"
            counts[status] += 1
            rows.append(
                {
                    "path": file_path,
                    "status": status,
                    "a": _compare_cell(fa, left["scans"].get(file_path)),
                    "b": _compare_cell(fb, right["scans"].get(file_path)),
                }
            )
        context.update(left=left, right=right, rows=rows, counts=counts)
    return render(request, "dashboard/browse_compare.html", context)


# --- Version --------------------------------------------------------------------------------


def _version_number(number: int) -> int:
    if number > MAX_VERSION:
        raise NotFound(f"Version {number} not found.")
    return number


@page
def version_page(request: HttpRequest, ns: str, model: str, number: int) -> HttpResponse:
    principal = principal_of(request)
    version = loaded(
        selectors.version_detail_for_user(
            principal=principal, namespace=ns, model=model, number=_version_number(number)
        )
    )
    m = version.model
    ns_name, name = m.namespace.name, m.name
    reports: dict[Any, ScanReport] = {
        r.artifact_id: r for r in selectors.scan_reports_latest(version=version)
    }
    can_download = selectors.version_download_allowed(principal=principal, version=version)
    findings_visible = selectors.scan_findings_visible(principal=principal, version=version)
    api_path = api_version_path(ns_name, name, version.number)
    st_base = reverse("dashboard:safetensors", args=[ns_name, name, version.number])
    files = []
    auto_headers = 0
    # Rows are prepared here, down to their labels: a version of 1,000 files is 1,000 rows,
    # and every lookup the template does not make is time saved on each of them.
    for artifact in version.loaded_files:
        st_url = ""
        if can_download and artifact.path.lower().endswith(".safetensors"):
            st_url = f"{st_base}?{urlencode({'path': artifact.path})}"
            auto_headers += 1
        files.append(
            {
                "path": artifact.path,
                "size": filesizeformat(artifact.size),
                "sha256": artifact.sha256,
                "url": f"{api_path}/files/{quote(artifact.path)}",
                "st_url": st_url,
                "auto_header": bool(st_url) and auto_headers <= SAFETENSORS_AUTO,
                **_scan_cell(reports.get(artifact.pk), findings_visible),
            }
        )
    signatures = list(
        selectors.signature_list_for_user(
            principal=principal, namespace=ns_name, model=name, number=version.number
        )
    )
    audit_events = None
    if selectors.audit_readable_for_namespace(principal=principal, namespace=m.namespace):
        target = audit_target(ns_name, name, version.number)
        audit_events = list(
            selectors.audit_event_list_for_user(
                principal=principal,
                filters=selectors.AuditFilters(namespace=ns_name, target_prefix=target),
            )
            # ".../v1" is also the start of ".../v10": this version, or what lies below it.
            .filter(Q(target=target) | Q(target__startswith=f"{target}/"))
            .order_by("-seq")[:200]
        )
    first_file = version.loaded_files[0].path if version.loaded_files else "FILE"
    return render(
        request,
        "dashboard/browse_version.html",
        {
            "version": version,
            "model": m,
            "ns": ns_name,
            "description": markdown(version.description),
            "tags": sorted(version.tags.items()),
            "files": files,
            "total_size": sum(a.size for a in version.loaded_files),
            "flagged": sum(1 for r in reports.values() if r.verdict != ScanVerdict.CLEAN),
            "findings_visible": findings_visible,
            "can_download": can_download,
            "signatures": signatures,
            "dp": version.loaded_dp_record,
            "reviews": version.loaded_reviews,
            "approvals": sum(1 for r in version.loaded_reviews if r.decision == "approve"),
            "can_review": approvals.review_allowed(principal=principal, version=version),
            "audit_events": audit_events,
            "api": request.build_absolute_uri(api_path),
            "api_path": api_path,
            "first_file": quote(first_file),
            "pull_ref": f"{ns_name}/{name}:{version.number}",
        },
    )


def _scan_cell(report: ScanReport | None, findings_visible: bool) -> dict[str, Any]:
    # Every key on every row: a key the template misses is a logged lookup failure per row.
    cell: dict[str, Any] = {
        "scan": "",
        "scan_label": "",
        "findings": [],
        "hidden": 0,
        "summary": "",
    }
    if report is None:
        return cell
    if report.verdict == ScanVerdict.CLEAN:
        # Only notes below any severity that matters ("no known model format"): not listed.
        return {**cell, "scan": report.verdict, "scan_label": report.verdict}
    count = len(report.findings)
    return {
        "scan": report.verdict,
        "scan_label": f"{report.verdict} · {report.max_severity}"
        if report.max_severity
        else report.verdict,
        "findings": report.findings if findings_visible else [],
        "hidden": count if not findings_visible else 0,
        "summary": f"{count} finding{'' if count == 1 else 's'}",
    }


class _ArtifactSource:
    """A scanner Source over an artifact read through the download service: ranged, audited,
    and limited to the header's bytes. The first read covers most headers whole."""

    def __init__(self, artifact: Any) -> None:
        self.artifact = artifact
        self.size: int = artifact.size
        self._head = b""

    def _open(self, start: int, end: int) -> bytes:
        body = artifacts.artifact_open(artifact=self.artifact, start=start, end=end, ranged=True)
        try:
            return b"".join(body)
        finally:
            body.close()

    def read(self, start: int, end: int) -> bytes:
        end = min(end, self.size)
        if end > 8 + SAFETENSORS_HEADER_MAX:
            raise Malformed(f"the header is over the {SAFETENSORS_HEADER_MAX >> 20} MiB shown here")
        if not self._head:
            self._head = self._open(0, min(self.size, SAFETENSORS_FIRST_READ))
        if end <= len(self._head):
            return self._head[start:end]
        return self._open(start, end)


@page
def safetensors_header(request: HttpRequest, ns: str, model: str, number: int) -> HttpResponse:
    """The header summary of one safetensors file (an htmx fragment of the version page)."""
    principal = principal_of(request)
    artifact = selectors.artifact_get_for_user(
        principal=principal,
        namespace=ns,
        model=model,
        number=_version_number(number),
        path=request.GET.get("path", ""),
        action=Action.DOWNLOAD,
    )
    summary, error = None, ""
    try:
        summary = safetensors_summary(_ArtifactSource(artifact))
        summary["dtypes"] = sorted(summary["dtypes"].items())
    except Malformed as exc:
        error = f"Not a readable safetensors header: {exc}."
    except RegistryError as exc:
        error = f"{exc.message} ({exc.code})"
    return render(
        request, "dashboard/browse_safetensors.html", {"summary": summary, "error": error}
    )


# Namespace-level pages sit under "-/": no model name can start with "-", so a model is never
# shadowed by a page (or the other way round).
urlpatterns: list[URLPattern] = [
    path("ns/<str:ns>", namespace_page, name="namespace"),
    path("ns/<str:ns>/-/members", member_set, name="member_set"),
    path("ns/<str:ns>/-/members/<str:username>/remove", member_remove, name="member_remove"),
    path("ns/<str:ns>/<str:model>", model_page, name="model"),
    path("ns/<str:ns>/<str:model>/compare", compare, name="compare"),
    path("ns/<str:ns>/<str:model>/aliases", alias_set, name="alias_set"),
    path("ns/<str:ns>/<str:model>/aliases/<str:alias>/delete", alias_delete, name="alias_delete"),
    path("ns/<str:ns>/<str:model>/v/<int:number>", version_page, name="version"),
    path(
        "ns/<str:ns>/<str:model>/v/<int:number>/safetensors",
        safetensors_header,
        name="safetensors",
    ),
]
