"""registry/dashboard/views/reviews.py and the home page with Django's test client: the review
queue, recording a review (and the forged ones the services refuse), what waits for whom."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from registry.access import Principal
from registry.models import Membership, ModelVersion, Review, VersionState
from registry.services import approvals, catalog, scanning
from tests.dashboard.test_browse import UNKNOWN_CALL_PICKLE, login, new_version, text
from tests.registry.scanners.corpus import call
from tests.registry.services.test_approvals import pending
from tests.registry.services.test_scanning import put


@pytest.fixture
def bert(actors):
    return catalog.model_create(namespace=actors.acme, name="bert", creator=actors.users["alice"])


def quarantined(actors, model) -> ModelVersion:
    version = new_version(actors, model)
    put(version, "evil.pkl", call("os", "system", "echo"), actors.users["alice"])
    version, job = catalog.version_submit(version=version, submitter=actors.users["alice"])
    assert scanning.version_scan(job_id=job.pk) == VersionState.QUARANTINED
    return version


def test_the_queue_lists_what_the_reviewer_may_review_oldest_first(client, actors, bert):
    actors.acme.scan_quarantine_severity = "critical"
    actors.acme.save()
    alice = actors.users["alice"]
    v1 = pending(new_version(actors, bert), alice, {"a.json": b"{}", "b.json": b"{}"})
    v2 = pending(new_version(actors, bert), alice, {"model.pkl": UNKNOWN_CALL_PICKLE})
    login(client, actors, "bob")
    page = text(client.get("/reviews"))
    assert "2 versions pending your review" in page
    assert page.index(f"/ns/acme/bert/v/{v1.number}") < page.index(f"/ns/acme/bert/v/{v2.number}")
    assert "<td>2</td>" in page and "<td>1</td>" in page  # file counts
    assert "1 file with findings, up to high" in page and '<span class="badge clean">clean' in page
    assert "<td>alice</td>" in page
    # Once bob has reviewed v1 it leaves his queue.
    approvals.review_record(version=v1, reviewer=actors.users["bob"], decision="approve")
    page = text(client.get("/reviews"))
    assert f'/ns/acme/bert/v/{v1.number}"' not in page and "1 version pending" in page


def test_the_queue_leaves_out_own_uploads_other_teams_and_non_reviewers(client, actors, bert):
    pending(new_version(actors, bert, "root"), actors.users["root"])
    for name in ("root", "alice", "carol", "dave", "mallory"):
        login(client, actors, name)
        assert "Nothing to review" in text(client.get("/reviews")), name
    login(client, actors, "bob")
    assert "1 version pending your review" in text(client.get("/reviews"))
    # Control: once the policy allows self-review, root's own upload is in root's queue.
    approvals.policy_update(namespace=actors.acme, allow_self_review=True)
    login(client, actors, "root")
    assert "1 version pending your review" in text(client.get("/reviews"))


def test_the_queue_pages_and_stays_in_bounded_queries(
    client, actors, bert, django_assert_max_num_queries
):
    alice = actors.users["alice"]
    ModelVersion.objects.bulk_create(
        ModelVersion(model=bert, number=n, created_by=alice, submitted_by=alice, state="draft")
        for n in range(1, 121)
    )
    ModelVersion.objects.filter(model=bert).update(state=VersionState.PENDING_REVIEW)
    login(client, actors, "bob")
    with django_assert_max_num_queries(12):
        page = text(client.get("/reviews"))
    assert "120 versions pending" in page and "Page 1 of 3" in page
    assert "Page 3 of 3" in text(client.get("/reviews", {"page": 3}))


def test_bob_approves_with_a_comment(client, actors, bert):
    version = pending(new_version(actors, bert), actors.users["alice"])
    login(client, actors, "bob")
    response = client.post(
        f"/ns/acme/bert/v/{version.number}/review", {"decision": "approve", "comment": "lgtm"}
    )
    assert response.status_code == 302 and response["Location"] == "/ns/acme/bert/v/1"
    page = text(client.get(response["Location"]))
    assert "Your review (approve) is recorded; version 1 is approved." in page
    assert '<span class="badge approved" id="version-state">approved</span>' in page
    [review] = Review.objects.all()
    assert (review.reviewer, review.decision, review.comment) == (
        actors.users["bob"],
        "approve",
        "lgtm",
    )
    # Reviewing twice is refused by the service: its code on the page, nothing recorded.
    response = client.post(f"/ns/acme/bert/v/{version.number}/review", {"decision": "reject"})
    assert response.status_code == 409 and "version_not_reviewable" in text(response)
    assert Review.objects.count() == 1


def test_forged_reviews_are_refused_by_the_services(client, actors, bert):
    version = pending(new_version(actors, bert), actors.users["alice"])
    url = f"/ns/acme/bert/v/{version.number}/review"
    # alice (a contributor, and the uploader) has no review form, and the POST is refused.
    login(client, actors, "alice")
    assert 'id="review-form"' not in text(client.get(f"/ns/acme/bert/v/{version.number}"))
    response = client.post(url, {"decision": "approve", "comment": "mine"})
    assert response.status_code == 403 and "permission_denied" in text(response)
    # An admin who uploaded is refused too: no self-review by policy.
    own = pending(new_version(actors, bert, "root"), actors.users["root"])
    login(client, actors, "root")
    response = client.post(f"/ns/acme/bert/v/{own.number}/review", {"decision": "approve"})
    assert response.status_code == 403 and "self_review_forbidden" in text(response)
    # Another team's admin learns nothing.
    login(client, actors, "mallory")
    response = client.post(url, {"decision": "approve"})
    assert response.status_code == 404 and "bert" not in text(response).replace(url, "")
    assert not Review.objects.exists()
    version.refresh_from_db()
    assert version.state == VersionState.PENDING_REVIEW


def test_bad_review_input_and_get_are_refused(client, actors, bert):
    version = pending(new_version(actors, bert), actors.users["alice"])
    login(client, actors, "bob")
    url = f"/ns/acme/bert/v/{version.number}/review"
    response = client.post(url, {"decision": "maybe"})
    assert response.status_code == 400 and "invalid_input" in text(response)
    assert client.post(url, {"decision": "approve", "comment": "a\x00b"}).status_code == 400
    assert client.get(url).status_code == 405
    assert not Review.objects.exists()


def test_uploader_filter_agrees_with_the_services_rule(actors, bert):
    """approvals.uploader_q (the queue's filter) against _is_uploader (review_record's)."""
    users = actors.users
    created = pending(new_version(actors, bert), users["alice"])
    uploaded = new_version(actors, bert)
    put(uploaded, "extra.json", b"{}", users["root"])
    uploaded = pending(uploaded, users["alice"])
    for user in (users["alice"], users["root"], users["bob"]):
        for version in (created, uploaded):
            in_filter = ModelVersion.objects.filter(approvals.uploader_q(user), pk=version.pk)
            assert in_filter.exists() == approvals._is_uploader(version, user), (user, version)
    assert approvals.review_allowed(principal=Principal(user=users["bob"]), version=uploaded)
    assert not approvals.review_allowed(principal=Principal(user=users["root"]), version=uploaded)


# --- Home -----------------------------------------------------------------------------------


def test_home_shows_namespaces_roles_and_what_waits(client, actors, bert):
    version = pending(new_version(actors, bert), actors.users["alice"])
    quarantined(actors, bert)
    login(client, actors, "bob")
    page = text(client.get("/"))
    assert '<a href="/ns/acme">acme</a> <span class="role">reviewer</span>' in page
    assert "1 version to review" in page and f"/ns/acme/bert/v/{version.number}" in page
    login(client, actors, "alice")
    page = text(client.get("/"))
    assert "Your versions still scanning or quarantined" in page
    assert '<span class="badge quarantined">quarantined</span>' in page
    assert "to review" not in page
    login(client, actors, "carol")
    assert "Nothing waits for you" in text(client.get("/"))


def test_home_recent_activity_is_scoped_to_your_namespaces(client, actors, bert):
    pending(new_version(actors, bert), actors.users["alice"])
    login(client, actors, "carol")
    page = text(client.get("/"))
    assert "acme/bert v1" in page and '<span class="badge pending_review">' in page
    login(client, actors, "mallory")
    page = text(client.get("/"))
    assert "bert" not in page and "No versions yet in your namespaces" in page
    # A user who belongs nowhere is told how to be added.
    nobody = get_user_model().objects.create(username="zed")
    client.force_login(nobody)
    assert "manage.py issue_token zed" in text(client.get("/"))
    assert not Membership.objects.filter(user=nobody).exists()
