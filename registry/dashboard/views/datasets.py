"""Datasets, their budgets (plotted) and ledgers, DP jobs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.contrib import messages
from django.http import HttpRequest, HttpResponse, QueryDict
from django.shortcuts import redirect, render
from django.urls import URLPattern, path, reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from registry import selectors
from registry.access import Action, principal_allows
from registry.dashboard.views.base import flash_error, page, principal_of
from registry.errors import InvalidInput, RegistryError
from registry.models import (
    JOB_ACTIVE_STATES,
    Accountant,
    Artifact,
    Dataset,
    Job,
    JobKind,
    JobState,
    LedgerEntry,
    Namespace,
    PrivacyUnit,
    Sensitivity,
)
from registry.services import ledger

LEDGER_PAGE = 100
JOBS_SHOWN = 20
# DP results plotted: the newest this many succeeded runs.
RESULTS_SHOWN = 1000

# The plots' geometry (SVG user units); the CSS scales the whole drawing.
WIDTH, HEIGHT = 600, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 16, 48


def _number(raw: str, name: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(f"{name} must be a number.", field=name) from None
    return value


def _whole(raw: str, name: str) -> int:
    if not raw.strip().isdigit():
        raise InvalidInput(f"{name} must be a whole number.", field=name)
    return int(raw)


def _may_manage(request: HttpRequest, namespace: Namespace) -> bool:
    principal = principal_of(request)
    return principal_allows(
        principal, selectors.role_for(principal=principal, namespace=namespace), Action.MANAGE
    )


# --- Plots ----------------------------------------------------------------------------------


@dataclass
class Point:
    x: float
    y: float
    label: str  # the <title>: the numbers in words
    data: dict[str, str]  # data-* attributes: the plotted numbers, as the table shows them


@dataclass
class Plot:
    """An SVG plot's parts, in user units, computed here so the template only draws."""

    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = WIDTH - RIGHT
    top: int = TOP
    bottom: int = HEIGHT - BOTTOM
    points: list[Point] = field(default_factory=list)
    line: str = ""  # a <polyline>'s points
    y_ticks: list[tuple[float, str]] = field(default_factory=list)
    x_ticks: list[tuple[float, str, str]] = field(default_factory=list)  # x, label, anchor
    cap_y: float | None = None
    cap_label: str = ""


def _fmt(value: float) -> str:
    return f"{value:.4f}"


def _ticks(high: float, count: int = 4) -> list[float]:
    return [high * i / count for i in range(count + 1)]


def _y(plot: Plot, value: float, high: float) -> float:
    return round(plot.bottom - (plot.bottom - plot.top) * value / high, 2)


def budget_plot(history: list[tuple[datetime, float]], cap: float) -> Plot:
    """Epsilon spent after each commit (a step line: spending jumps at a commit and stays),
    against the block's cap."""
    plot = Plot()
    spent = [eps for _, eps in history if math.isfinite(eps)]
    high = max([cap, *spent]) * 1.1
    plot.y_ticks = [(_y(plot, v, high), f"{v:g}") for v in _ticks(high / 1.1)]
    plot.cap_y = _y(plot, cap, high)
    plot.cap_label = f"cap ε = {cap:g}"
    if not history:
        return plot
    start, end = history[0][0].timestamp(), history[-1][0].timestamp()
    span = end - start

    def x(moment: datetime) -> float:
        fraction = (moment.timestamp() - start) / span if span > 0 else 0.5
        return round(plot.left + (plot.right - plot.left) * fraction, 2)

    line = [(x(history[0][0]), _y(plot, 0.0, high))]
    for moment, eps in history:
        shown = eps if math.isfinite(eps) else high
        px, py = x(moment), _y(plot, shown, high)
        line += [(px, line[-1][1]), (px, py)]
        when = moment.strftime("%Y-%m-%d %H:%M:%S UTC")
        plot.points.append(
            Point(
                x=px,
                y=py,
                label=f"{when}: ε spent {_fmt(eps)} of {cap:g}",
                data={"epsilon": _fmt(eps), "time": moment.isoformat()},
            )
        )
    plot.line = " ".join(f"{px},{py}" for px, py in line)
    shape = "%Y-%m-%d %H:%M:%S" if span < 3600 else "%Y-%m-%d %H:%M"
    if span > 0:
        # The ends of the axis: labels anchored inwards, so neither runs off the drawing.
        plot.x_ticks = [
            (x(history[0][0]), history[0][0].strftime(shape), "start"),
            (x(history[-1][0]), history[-1][0].strftime(shape), "end"),
        ]
    else:
        plot.x_ticks = [(x(history[0][0]), history[0][0].strftime(shape), "middle")]
    return plot


def accuracy_plot(results: list[dict[str, Any]]) -> Plot:
    """Accuracy on the held-out data against epsilon, one point per run."""
    plot = Plot()
    shown = [r for r in results if r["epsilon"] is not None and r["accuracy"] is not None]
    high_eps = max([r["epsilon"] for r in shown] or [1.0]) * 1.1
    plot.y_ticks = [(_y(plot, v, 1.0), f"{v:.2f}") for v in _ticks(1.0)]
    plot.x_ticks = [
        (round(plot.left + (plot.right - plot.left) * v / high_eps, 2), f"{v:.2g}", "middle")
        for v in _ticks(high_eps / 1.1)
    ]
    for r in shown:
        auc = r["auc"]
        plot.points.append(
            Point(
                x=round(plot.left + (plot.right - plot.left) * r["epsilon"] / high_eps, 2),
                y=_y(plot, r["accuracy"], 1.0),
                label=f"job {r['job'].pk}: ε {_fmt(r['epsilon'])}, accuracy "
                f"{_fmt(r['accuracy'])}" + (f", MIA AUC {_fmt(auc)}" if auc is not None else ""),
                data={
                    "epsilon": _fmt(r["epsilon"]),
                    "accuracy": _fmt(r["accuracy"]),
                    "auc": _fmt(auc) if auc is not None else "",
                },
            )
        )
    return plot


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _result_of(job: Job) -> dict[str, Any]:
    """The figures a finished DP job reported (Job.result), None where it has none."""
    result = job.result if isinstance(job.result, dict) else {}
    mia = result.get("membership_inference")
    epsilon = _float(result.get("epsilon"))
    if job.kind == JobKind.PRIVACY_AUDIT and isinstance(result.get("dp_record"), dict):
        epsilon = _float(result["dp_record"].get("epsilon"))
    return {
        "job": job,
        "epsilon": epsilon,
        "accuracy": _float(result.get("accuracy")),
        "auc": _float(mia.get("auc")) if isinstance(mia, dict) else None,
        "model": result.get("model"),
        "version": result.get("version"),
    }


# --- Pages ----------------------------------------------------------------------------------


def _list_context(request: HttpRequest, ns: str, form: QueryDict | None = None) -> dict[str, Any]:
    principal = principal_of(request)
    namespace = selectors.namespace_get_for_user(principal=principal, name=ns, action=Action.READ)
    datasets = selectors.dataset_list_for_user(principal=principal, namespace=ns).order_by("name")
    return {
        "namespace": namespace,
        "datasets": list(datasets[:1000]),
        "more": datasets.count() > 1000,
        "may_manage": _may_manage(request, namespace),
        "sensitivities": Sensitivity.values,
        "privacy_units": PrivacyUnit.values,
        "form": form or QueryDict(),
    }


@page
@require_http_methods(["GET", "POST"])
def dataset_list(request: HttpRequest, ns: str) -> HttpResponse:
    if request.method != "POST":
        return render(request, "dashboard/datasets_list.html", _list_context(request, ns))
    namespace = selectors.namespace_get_for_user(
        principal=principal_of(request), name=ns, action=Action.MANAGE
    )
    form = request.POST
    try:
        dataset = ledger.dataset_create(
            namespace=namespace,
            name=form.get("name", "").strip(),
            sensitivity=form.get("sensitivity", ""),
            privacy_unit=form.get("privacy_unit", PrivacyUnit.RECORD),
            delta=_number(form.get("delta", ""), "delta"),
            description=form.get("description", "")[:10000],
            creator=principal_of(request).user,
        )
    except RegistryError as exc:
        flash_error(request, exc)
        context = _list_context(request, ns, form)
        return render(request, "dashboard/datasets_list.html", context, status=exc.status)
    messages.success(request, f"Dataset {dataset.name} registered; add a block with its budget.")
    return redirect("dashboard:dataset", ns=namespace.name, dataset=dataset.name)


def _dataset(request: HttpRequest, ns: str, name: str, action: Action) -> Dataset:
    return selectors.dataset_get_for_user(
        principal=principal_of(request), namespace=ns, name=name, action=action
    )


def _ledger_page(
    request: HttpRequest, ns: str, dataset: Dataset
) -> tuple[list[LedgerEntry], str | None]:
    entries = selectors.ledger_entry_list_for_user(
        principal=principal_of(request), namespace=ns, dataset=dataset.name
    ).order_by("-id")
    before = request.GET.get("before", "")
    if before:
        if not before.isdigit() or len(before) > 18:
            raise InvalidInput("The ledger page cursor must be an entry id; use the page links.")
        entries = entries.filter(id__lt=int(before))
    rows = list(entries[: LEDGER_PAGE + 1])
    older = None
    if len(rows) > LEDGER_PAGE:
        rows = rows[:LEDGER_PAGE]
        url = reverse("dashboard:dataset", kwargs={"ns": ns, "dataset": dataset.name})
        older = f"{url}?before={rows[-1].id}#ledger"
    return rows, older


def _jobs_context(request: HttpRequest, dataset: Dataset) -> dict[str, Any]:
    jobs = list(
        selectors.dataset_job_list_for_user(principal=principal_of(request), dataset=dataset)[
            :JOBS_SHOWN
        ]
    )
    return {
        "dataset": dataset,
        "jobs": jobs,
        "active": any(job.state in JOB_ACTIVE_STATES for job in jobs),
    }


@page
@require_GET
def dataset_detail(request: HttpRequest, ns: str, dataset: str) -> HttpResponse:
    found = _dataset(request, ns, dataset, Action.READ)
    budgets = ledger.dataset_budget(dataset=found)
    histories = ledger.spend_history_of([budget.block for budget in budgets])
    blocks = []
    for budget in budgets:
        history = histories[budget.block.pk]
        summary = budget.as_dict()
        blocks.append(
            {
                "block": budget.block,
                "summary": {
                    key: _fmt(summary[key])
                    for key in ("spent_epsilon", "reserved_epsilon", "remaining_epsilon")
                },
                "plot": budget_plot(history, budget.block.epsilon),
                "history": [(moment, _fmt(eps)) for moment, eps in history],
            }
        )
    entries, older = _ledger_page(request, ns, found)
    finished = selectors.dataset_job_list_for_user(
        principal=principal_of(request), dataset=found
    ).filter(state=JobState.SUCCEEDED)
    retrains = [_result_of(job) for job in finished.filter(kind=JobKind.DP_RETRAIN)[:RESULTS_SHOWN]]
    audits = [
        _result_of(job) for job in finished.filter(kind=JobKind.PRIVACY_AUDIT)[:RESULTS_SHOWN]
    ]
    context = {
        "namespace": found.namespace,
        "dataset": found,
        "blocks": blocks,
        "entries": entries,
        "older": older,
        "retrains": retrains,
        "audits": audits,
        "accuracy": accuracy_plot(retrains),
        "may_manage": _may_manage(request, found.namespace),
        "accountants": Accountant.values,
        **_jobs_context(request, found),
    }
    return render(request, "dashboard/datasets_detail.html", context)


@page
@require_GET
def dataset_jobs(request: HttpRequest, ns: str, dataset: str) -> HttpResponse:
    """The jobs panel alone: htmx polls it while a job is queued or running."""
    found = _dataset(request, ns, dataset, Action.READ)
    return render(request, "dashboard/datasets_jobs.html", _jobs_context(request, found))


def _block_file(request: HttpRequest, ns: str, form: QueryDict) -> Artifact | None:
    model, version, file_path = (form.get(k, "").strip() for k in ("model", "version", "path"))
    if not (model or version or file_path):
        return None
    if not (model and version and file_path):
        raise InvalidInput("A block's data file needs its model, version and path (or none).")
    # The API's lookup (api/datasets.py BlockListView): a file of a version the caller reads.
    return selectors.artifact_get_for_user(
        principal=principal_of(request),
        namespace=ns,
        model=model,
        number=_whole(version, "version"),
        path=file_path,
        action=Action.READ,
    )


@page
@require_POST
def block_create(request: HttpRequest, ns: str, dataset: str) -> HttpResponse:
    found = _dataset(request, ns, dataset, Action.MANAGE)
    form = request.POST
    try:
        delta, records = form.get("delta", "").strip(), form.get("records", "").strip()
        block = ledger.data_block_create(
            dataset=found,
            name=form.get("name", "").strip(),
            epsilon=_number(form.get("epsilon", ""), "epsilon"),
            accountant=form.get("accountant", ""),
            delta=_number(delta, "delta") if delta else None,
            artifact=_block_file(request, found.namespace.name, form),
            records=_whole(records, "records") if records else None,
            creator=principal_of(request).user,
        )
    except RegistryError as exc:
        flash_error(request, exc)
    else:
        messages.success(request, f"Block {block.name} added with a cap of ε {block.epsilon:g}.")
    return redirect("dashboard:dataset", ns=found.namespace.name, dataset=found.name)


urlpatterns: list[URLPattern] = [
    path("ns/<str:ns>/-/datasets", dataset_list, name="datasets"),
    path("ns/<str:ns>/-/datasets/<str:dataset>", dataset_detail, name="dataset"),
    path("ns/<str:ns>/-/datasets/<str:dataset>/jobs", dataset_jobs, name="dataset_jobs"),
    path("ns/<str:ns>/-/datasets/<str:dataset>/blocks", block_create, name="dataset_block_create"),
]
