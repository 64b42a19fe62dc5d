"""The review queue across the reviewer's namespaces, and recording a review."""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import URLPattern, path, reverse
from django.views.decorators.http import require_POST

from registry import selectors
from registry.access import Action
from registry.dashboard.views.base import page, principal_of
from registry.dashboard.views.browse import MAX_VERSION, form_errors, paginate
from registry.errors import InvalidInput, NotFound
from registry.models import ReviewDecision
from registry.services import approvals


@page
def queue(request: HttpRequest) -> HttpResponse:
    principal = principal_of(request)
    versions = selectors.review_queue_for_user(principal=principal)
    return render(
        request, "dashboard/reviews_queue.html", {"page_obj": paginate(request, versions)}
    )


class ReviewForm(forms.Form):
    decision = forms.ChoiceField(choices=ReviewDecision.choices)
    comment = forms.CharField(required=False, max_length=10000, widget=forms.Textarea)


@page
@require_POST
def review_record(request: HttpRequest, ns: str, model: str, number: int) -> HttpResponse:
    """Approve or reject: the API's checks (the `review` action, then review_record's own:
    state, self-review, one review per reviewer, gates). A refusal is its error page, with
    the service's status and code."""
    if number > MAX_VERSION:
        raise NotFound(f"Version {number} not found.")
    principal = principal_of(request)
    version = selectors.version_get_for_user(
        principal=principal, namespace=ns, model=model, number=number, action=Action.REVIEW
    )
    form = ReviewForm(request.POST)
    if not form.is_valid():
        raise InvalidInput(form_errors(form))
    assert isinstance(request.user, User)
    approvals.review_record(version=version, reviewer=request.user, **form.cleaned_data)
    messages.success(
        request,
        f"Your review ({form.cleaned_data['decision']}) is recorded; "
        f"version {version.number} is {version.state}.",
    )
    ns_name, name = version.model.namespace.name, version.model.name
    return redirect(reverse("dashboard:version", args=[ns_name, name, version.number]))


urlpatterns: list[URLPattern] = [
    path("reviews", queue, name="reviews"),
    path("ns/<str:ns>/<str:model>/v/<int:number>/review", review_record, name="review_record"),
]
