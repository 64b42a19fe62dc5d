"""registry/services/approvals.py: the policy, four eyes, gates, the approval race, deprecate
and revoke. Versions reach pending_review through the real submit and an in-process scan."""

from __future__ import annotations

import threading

import pytest
from django.contrib.auth import get_user_model
from django.db import connections, transaction

from registry.errors import (
    AlreadyReviewed,
    GateNotMet,
    InvalidInput,
    ScanGateNotClean,
    SelfReviewForbidden,
    VersionAlreadyRevoked,
    VersionNotApproved,
    VersionNotReviewable,
)
from registry.models import (
    AuditEvent,
    Membership,
    ModelVersion,
    Namespace,
    Review,
    VersionState,
)
from registry.services import approvals, audit, catalog, scanning
from tests.registry.services.test_scanning import (
    MALICIOUS_PICKLE,
    PLACEHOLDER,
    put,
    wait_for_lock_waiters,
)


def events(version: ModelVersion, action: str) -> list[AuditEvent]:
    target = audit.audit_target("acme", version.model.name, version.number)
    return list(AuditEvent.objects.filter(action=action, target=target).order_by("seq"))


def pending(version: ModelVersion, user, files: dict[str, bytes] | None = None) -> ModelVersion:
    """Upload (as `user`), submit and scan: a version pending review."""
    for path, data in (files or {"config.json": b'{"a": 1}'}).items():
        put(version, path, data, user)
    version, job = catalog.version_submit(version=version, submitter=user)
    assert scanning.version_scan(job_id=job.pk) == VersionState.PENDING_REVIEW
    version.refresh_from_db()
    return version


@pytest.fixture
def erin(actors):
    """A second reviewer of acme."""
    user = get_user_model().objects.create(username="erin")
    Membership.objects.create(namespace=actors.acme, user=user, role="reviewer")
    return user


@pytest.fixture
def ready(actors, draft) -> ModelVersion:
    return pending(draft, actors.users["alice"])


def set_policy(actors, **policy) -> Namespace:
    ns = approvals.policy_update(namespace=actors.acme, **policy)
    actors.acme.refresh_from_db()
    return ns


def test_one_approval_by_a_reviewer_approves(actors, ready):
    review = approvals.review_record(
        version=ready, reviewer=actors.users["bob"], decision="approve", comment="lgtm"
    )
    assert ready.state == VersionState.APPROVED and ready.approved_at is not None
    ready.refresh_from_db()
    assert ready.state == VersionState.APPROVED and review.comment == "lgtm"
    assert [e.details["decision"] for e in events(ready, "review.record")] == ["approve"]
    [transition] = events(ready, "version.approve")
    assert transition.details == {"previous_state": "pending_review", "state": "approved"}
    assert audit.audit_verify().ok


def test_the_uploader_may_not_review_unless_the_policy_allows(actors, draft):
    root = actors.users["root"]
    version = pending(draft, root)
    with pytest.raises(SelfReviewForbidden) as exc:
        approvals.review_record(version=version, reviewer=root, decision="approve")
    assert exc.value.status == 403 and exc.value.code == "self_review_forbidden"
    assert not Review.objects.exists()
    # Control: the same admin passes once the policy allows self-review.
    set_policy(actors, allow_self_review=True)
    approvals.review_record(version=version, reviewer=root, decision="approve")
    assert version.state == VersionState.APPROVED


def test_uploading_one_file_is_enough_to_be_an_uploader(actors, draft):
    """root neither created nor submitted the version, but uploaded one of its files."""
    put(draft, "extra.json", b"{}", actors.users["root"])
    version = pending(draft, actors.users["alice"])
    with pytest.raises(SelfReviewForbidden):
        approvals.review_record(version=version, reviewer=actors.users["root"], decision="reject")
    approvals.review_record(version=version, reviewer=actors.users["bob"], decision="reject")
    assert version.state == VersionState.REJECTED


def test_two_approvals_need_two_distinct_reviewers(actors, ready, erin):
    set_policy(actors, approvals_required=2)
    bob = actors.users["bob"]
    approvals.review_record(version=ready, reviewer=bob, decision="approve")
    assert ready.state == VersionState.PENDING_REVIEW
    with pytest.raises(AlreadyReviewed):
        approvals.review_record(version=ready, reviewer=bob, decision="approve")
    assert ready.state == VersionState.PENDING_REVIEW and not events(ready, "version.approve")
    approvals.review_record(version=ready, reviewer=erin, decision="approve")
    ready.refresh_from_db()
    assert ready.state == VersionState.APPROVED
    assert len(events(ready, "review.record")) == 2 and len(events(ready, "version.approve")) == 1


def test_one_rejection_rejects_and_a_rejected_version_stays_rejected(actors, ready, erin):
    approvals.review_record(version=ready, reviewer=actors.users["bob"], decision="reject")
    ready.refresh_from_db()
    assert ready.state == VersionState.REJECTED
    with pytest.raises(VersionNotReviewable) as exc:
        approvals.review_record(version=ready, reviewer=erin, decision="approve")
    assert exc.value.status == 409 and exc.value.extra == {"state": "rejected"}
    ready.refresh_from_db()
    assert ready.state == VersionState.REJECTED
    assert len(events(ready, "version.reject")) == 1 and not events(ready, "version.approve")


def test_a_draft_is_not_reviewable(actors, draft):
    with pytest.raises(VersionNotReviewable):
        approvals.review_record(version=draft, reviewer=actors.users["bob"], decision="approve")


def test_a_still_scanning_version_fails_the_scan_gate(actors, draft):
    put(draft, "a.json", b"{}", actors.users["alice"])
    version, _job = catalog.version_submit(version=draft, submitter=actors.users["alice"])
    assert version.state == VersionState.SCANNING
    with pytest.raises(GateNotMet) as exc:
        approvals.review_record(version=version, reviewer=actors.users["bob"], decision="approve")
    assert isinstance(exc.value, ScanGateNotClean) and exc.value.code == "gate_scan_not_clean"
    assert not Review.objects.exists()


@pytest.mark.skipif(PLACEHOLDER, reason="the scanners are a placeholder")
def test_a_quarantined_version_fails_the_scan_gate(actors, draft):
    put(draft, "model.pkl", MALICIOUS_PICKLE, actors.users["alice"])
    version, job = catalog.version_submit(version=draft, submitter=actors.users["alice"])
    assert scanning.version_scan(job_id=job.pk) == VersionState.QUARANTINED
    with pytest.raises(ScanGateNotClean) as exc:
        approvals.review_record(version=version, reviewer=actors.users["bob"], decision="approve")
    assert exc.value.extra == {"state": "quarantined"}


def test_the_gate_registry_names_every_policy_gate(actors):
    assert actors.acme.required_gates == ["scan_clean"]
    assert set(actors.acme.required_gates) <= set(approvals.GATES)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("required", [1, 2])
def test_racing_final_approvals_make_one_transition(actors, draft, erin, required):
    """bob and erin approve at once while the test holds the version row; both reach the
    lock. With one approval required the second finds the version approved (409); with two,
    the second counts the first's review and approves. Bug caught: counting approvals without
    the row lock gives two transitions (required=1) or none (required=2)."""
    set_policy(actors, approvals_required=required)
    version = pending(draft, actors.users["alice"])
    results: dict[str, object] = {}

    def approve(user) -> None:
        try:
            approvals.review_record(version=version, reviewer=user, decision="approve")
            results[user.username] = "ok"
        except Exception as exc:
            results[user.username] = exc
        finally:
            connections.close_all()

    with transaction.atomic():
        ModelVersion.objects.select_for_update().get(pk=version.pk)
        threads = [threading.Thread(target=approve, args=(u,)) for u in (actors.users["bob"], erin)]
        for t in threads:
            t.start()
        wait_for_lock_waiters(2)
    for t in threads:
        t.join(60)
    outcomes = sorted(type(r).__name__ if r != "ok" else "ok" for r in results.values())
    assert outcomes == (["VersionNotReviewable", "ok"] if required == 1 else ["ok", "ok"])
    version.refresh_from_db()
    assert version.state == VersionState.APPROVED
    assert Review.objects.filter(version=version).count() == (1 if required == 1 else 2)
    assert len(events(version, "version.approve")) == 1
    assert audit.audit_verify().ok


def test_deprecate_only_from_approved(actors, ready):
    with pytest.raises(VersionNotApproved) as exc:
        approvals.version_deprecate(version=ready)
    assert exc.value.status == 409 and exc.value.code == "version_not_approved"
    approvals.review_record(version=ready, reviewer=actors.users["bob"], decision="approve")
    approvals.version_deprecate(version=ready)
    ready.refresh_from_db()
    assert ready.state == VersionState.DEPRECATED
    assert events(ready, "version.deprecate")[0].details["previous_state"] == "approved"


@pytest.mark.parametrize("how", ["draft", "pending", "approved"])
def test_revoke_from_any_state_once(actors, draft, how):
    version = draft
    if how != "draft":
        version = pending(draft, actors.users["alice"])
    if how == "approved":
        approvals.review_record(version=version, reviewer=actors.users["bob"], decision="approve")
    approvals.version_revoke(version=version)
    version.refresh_from_db()
    assert version.state == VersionState.REVOKED
    assert events(version, "version.revoke")[0].details["previous_state"] == (
        "pending_review" if how == "pending" else how
    )
    with pytest.raises(VersionAlreadyRevoked):
        approvals.version_revoke(version=version)
    assert len(events(version, "version.revoke")) == 1


def test_a_scan_finishing_after_a_revoke_changes_nothing(actors, draft):
    put(draft, "a.json", b"{}", actors.users["alice"])
    version, job = catalog.version_submit(version=draft, submitter=actors.users["alice"])
    approvals.version_revoke(version=version)
    assert scanning.version_scan(job_id=job.pk) is None
    version.refresh_from_db()
    assert version.state == VersionState.REVOKED


def test_policy_update_is_audited_with_before_and_after(actors):
    set_policy(actors, approvals_required=3, required_gates=["scan_clean", "scan_clean"])
    assert (actors.acme.approvals_required, actors.acme.required_gates) == (3, ["scan_clean"])
    [event] = AuditEvent.objects.filter(action="policy.update")
    assert event.namespace == "acme" and event.target == "acme/policy"
    assert event.details["before"]["approvals_required"] == 1
    assert event.details["after"]["approvals_required"] == 3
    assert event.details["after"]["allow_self_review"] is False


@pytest.mark.parametrize(
    "bad",
    [
        {"approvals_required": 0},
        {"required_gates": ["no_such_gate"]},
        {"scan_quarantine_severity": "huge"},
    ],
)
def test_policy_update_refuses_bad_values(actors, bad):
    with pytest.raises(InvalidInput):
        approvals.policy_update(namespace=actors.acme, **bad)
    actors.acme.refresh_from_db()
    assert approvals.policy_of(actors.acme) == {
        "approvals_required": 1,
        "allow_self_review": False,
        "scan_quarantine_severity": "medium",
        "required_gates": ["scan_clean"],
        "protected_aliases": ["production"],
    }
    assert not AuditEvent.objects.filter(action="policy.update").exists()
