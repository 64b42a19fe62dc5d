"""Upload files or a folder to a version through the REST API's resumable sessions.

The pages here only create models and draft versions, submit, and report the scan: the bytes
go from the browser straight to `/api/v1/.../uploads` (static/dashboard/upload.js), in parts,
so that an upload survives a page reload and no file is ever held whole in the page.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from registry import selectors
from registry.access import Action
from registry.dashboard.views.base import flash_error, page, principal_of
from registry.errors import RegistryError
from registry.models import JOB_ACTIVE_STATES, ModelVersion, ScanVerdict, VersionState
from registry.services import catalog

# The upload page lists this many of a version's files (sorted by path) and counts the rest;
# the version's own page pages through all of them.
FILES_SHOWN = 200
DRAFTS_SHOWN = 50


def _browse_url(name: str, *args: object) -> str | None:
    # Model and version pages belong to the browse module; link to them when they exist.
    try:
        return reverse(f"dashboard:{name}", args=args)
    except NoReverseMatch:
        return None


def _version_page(version: ModelVersion) -> str | None:
    m = version.model
    return _browse_url("version", m.namespace.name, m.name, version.number)


def _api_base(version: ModelVersion) -> str:
    m = version.model
    return f"/api/v1/namespaces/{m.namespace.name}/models/{m.name}/versions/{version.number}"


@page
@require_http_methods(["GET", "POST"])
def model_new(request: HttpRequest, ns: str) -> HttpResponse:
    principal = principal_of(request)
    namespace = selectors.namespace_get_for_user(principal=principal, name=ns, action=Action.WRITE)
    form = {"name": "", "description": ""}
    status = 200
    if request.method == "POST":
        form = {
            "name": request.POST.get("name", "").strip()[:200],
            "description": request.POST.get("description", "")[:20000],
        }
        try:
            model = catalog.model_create(
                namespace=namespace,
                name=form["name"],
                description=form["description"],
                creator=principal.user,
            )
            return redirect("dashboard:upload_model", ns=namespace.name, model=model.name)
        except RegistryError as exc:
            flash_error(request, exc)
            status = exc.status
    return render(
        request,
        "dashboard/upload_model_new.html",
        {"namespace": namespace, "form": form},
        status=status,
    )


@page
@require_http_methods(["GET", "POST"])
def upload_model(request: HttpRequest, ns: str, model: str) -> HttpResponse:
    principal = principal_of(request)
    obj = selectors.model_get_for_user(
        principal=principal, namespace=ns, name=model, action=Action.WRITE
    )
    if request.method == "POST":
        version = catalog.version_create(
            model=obj,
            description=request.POST.get("description", "")[:20000],
            creator=principal.user,
        )
        return redirect(
            "dashboard:upload_version", ns=obj.namespace.name, model=obj.name, number=version.number
        )
    # The caller's own drafts: the ones a contributor may continue (admins reach any draft
    # through its version page).
    drafts = list(
        selectors.version_list_for_user(
            principal=principal,
            namespace=obj.namespace.name,
            model=obj.name,
            filters=selectors.VersionFilters(
                state=VersionState.DRAFT, created_by=principal.user.get_username()
            ),
        ).order_by("-number")[:DRAFTS_SHOWN]
    )
    return render(
        request,
        "dashboard/upload_model.html",
        {
            "model": obj,
            "namespace": obj.namespace,
            "model_page": _browse_url("model", obj.namespace.name, obj.name),
            "drafts": drafts,
            "drafts_max": DRAFTS_SHOWN,
        },
    )


def _files(request: HttpRequest, version: ModelVersion) -> dict:
    m = version.model
    files = selectors.artifact_list_for_user(
        principal=principal_of(request),
        namespace=m.namespace.name,
        model=m.name,
        number=version.number,
    ).order_by("path")
    shown = list(files.only("path", "size", "sha256")[: FILES_SHOWN + 1])
    more = len(shown) > FILES_SHOWN
    return {
        "files": shown[:FILES_SHOWN],
        "files_total": files.count() if more else len(shown),
        "files_more": more,
    }


def _status_context(request: HttpRequest, version: ModelVersion) -> dict:
    job = version.scan_job if version.state == VersionState.SCANNING else None
    context: dict = {
        "version": version,
        # A scan whose job failed leaves the version in `scanning` until an admin re-scans:
        # nothing would change by polling.
        "polling": version.state == VersionState.SCANNING
        and (job is None or job.state in JOB_ACTIVE_STATES),
        "version_page": _version_page(version),
        "job": job,
        "reports": [],
        "findings_hidden": False,
    }
    if version.state == VersionState.QUARANTINED:
        if selectors.scan_findings_visible(principal=principal_of(request), version=version):
            context["reports"] = [
                r
                for r in selectors.scan_reports_latest(version=version)
                if r.verdict != ScanVerdict.CLEAN
            ]
        else:
            context["findings_hidden"] = True
    return context


def _version(request: HttpRequest, ns: str, model: str, number: int, action: Action):
    return selectors.version_get_for_user(
        principal=principal_of(request), namespace=ns, model=model, number=number, action=action
    )


@page
@require_GET
def upload_version(request: HttpRequest, ns: str, model: str, number: int) -> HttpResponse:
    version = _version(request, ns, model, number, Action.WRITE)
    m = version.model
    context = {
        "version": version,
        "model": m,
        "namespace": m.namespace,
        "model_page": _browse_url("model", m.namespace.name, m.name),
        "draft": version.state == VersionState.DRAFT,
        "api_base": _api_base(version),
        "version_key": f"{m.namespace.name}/{m.name}/{version.number}",
        **_status_context(request, version),
    }
    if context["draft"]:
        context.update(_files(request, version))
    return render(request, "dashboard/upload_version.html", context)


@page
@require_GET
def upload_files(request: HttpRequest, ns: str, model: str, number: int) -> HttpResponse:
    version = _version(request, ns, model, number, Action.READ)
    return render(
        request,
        "dashboard/upload_files.html",
        {"version": version, **_files(request, version)},
    )


@page
@require_GET
def upload_status(request: HttpRequest, ns: str, model: str, number: int) -> HttpResponse:
    version = _version(request, ns, model, number, Action.READ)
    return render(request, "dashboard/upload_status.html", _status_context(request, version))


@page
@require_POST
def upload_submit(request: HttpRequest, ns: str, model: str, number: int) -> HttpResponse:
    version = _version(request, ns, model, number, Action.WRITE)
    htmx = request.headers.get("HX-Request") == "true"
    try:
        version, _job = catalog.version_submit(
            version=version, submitter=principal_of(request).user
        )
    except RegistryError as exc:
        if htmx:
            # Shown beside the button; the uploader stays (htmx swaps 2xx answers only).
            response = render(request, "dashboard/upload_submit_error.html", {"error": exc})
            response["HX-Retarget"] = "#submit-error"
            response["HX-Reswap"] = "innerHTML"
            return response
        flash_error(request, exc)
        return redirect("dashboard:upload_version", ns=ns, model=model, number=number)
    if htmx:
        return render(
            request, "dashboard/upload_status_box.html", _status_context(request, version)
        )
    return redirect(
        "dashboard:upload_version",
        ns=version.model.namespace.name,
        model=version.model.name,
        number=version.number,
    )


V = "ns/<str:ns>/<str:model>/v/<int:number>/upload"
urlpatterns: list[URLPattern] = [
    # `-` is never a model name (they start with a letter or digit), so no model hides this page.
    path("ns/<str:ns>/-/new-model", model_new, name="model_new"),
    path("ns/<str:ns>/<str:model>/upload", upload_model, name="upload_model"),
    path(V, upload_version, name="upload_version"),
    path(f"{V}/files", upload_files, name="upload_files"),
    path(f"{V}/status", upload_status, name="upload_status"),
    path(f"{V}/submit", upload_submit, name="upload_submit"),
]
