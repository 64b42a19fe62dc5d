"""Reviews, the approval policy, deprecate and revoke over HTTP.

Scans run in-process (the service a worker calls); tests/registry/services/test_approvals.py
covers the service rules and the approval race.
"""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from registry.models import AuditEvent, Membership, VersionState
from registry.services import scanning
from registry.services.tokens import token_create

API = "/api/v1"
VERSION = f"{API}/namespaces/acme/models/bert/versions/1"
REVIEWS = f"{VERSION}/reviews"
POLICY = f"{API}/namespaces/acme/policy"
OCTET = "application/octet-stream"


def put(client, path: str, data: bytes):
    return client.put(f"{VERSION}/files/{path}", data, content_type=OCTET)


def submit(actors, who: str = "alice", *, scan: bool = True) -> None:
    client = actors.client(who)
    assert put(client, "config.json", b'{"a": 1}').status_code == 201
    response = client.post(f"{VERSION}/submit")
    assert response.status_code == 202, response.content
    if scan:
        job_id = response.json()["job"]["id"]
        assert scanning.version_scan(job_id=job_id) == VersionState.PENDING_REVIEW


def review(actors, who: str, decision: str = "approve", comment: str = ""):
    return actors.client(who).post(
        REVIEWS, {"decision": decision, "comment": comment}, format="json"
    )


def add_user(actors, name: str, role: str | None, *, superuser: bool = False):
    user = get_user_model().objects.create(username=name, is_superuser=superuser)
    if role is not None:
        Membership.objects.create(namespace=actors.acme, user=user, role=role)
    token = token_create(user=user, scopes=["read", "write", "review", "admin"]).plaintext
    actors.tokens[name] = token
    return user


def approved(actors) -> None:
    submit(actors)
    assert review(actors, "bob").status_code == 201


def test_four_eyes(actors, draft):
    submit(actors)
    response = review(actors, "alice")
    assert response.status_code == 403 and response.json()["code"] == "permission_denied"
    response = review(actors, "bob", comment="checked the config")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["review"]["reviewer"] == "bob" and body["review"]["decision"] == "approve"
    assert body["version"]["state"] == "approved" and body["version"]["approvals"] == 1
    detail = actors.client("carol").get(VERSION).json()
    assert detail["state"] == "approved" and detail["approved_at"] is not None
    assert [r["comment"] for r in detail["reviews"]] == ["checked the config"]
    listing = actors.client("carol").get(REVIEWS).json()["results"]
    assert [(r["reviewer"], r["decision"]) for r in listing] == [("bob", "approve")]
    # An approved version's files cannot change.
    response = put(actors.client("alice"), "config.json", b"{}")
    assert response.status_code == 409 and response.json()["code"] == "version_not_draft"
    response = put(actors.client("root"), "new.json", b"{}")
    assert response.status_code == 409 and response.json()["code"] == "version_not_draft"


def test_an_admin_who_uploaded_cannot_approve(actors, draft):
    submit(actors, "root")
    response = review(actors, "root")
    assert response.status_code == 403 and response.json()["code"] == "self_review_forbidden"
    assert actors.client("root").get(VERSION).json()["state"] == "pending_review"


def test_two_approvals_needed_by_policy(actors, draft):
    add_user(actors, "erin", "reviewer")
    response = actors.client("root").patch(POLICY, {"approvals_required": 2}, format="json")
    assert response.status_code == 200
    submit(actors)
    assert review(actors, "bob").json()["version"]["state"] == "pending_review"
    response = review(actors, "bob")
    assert response.status_code == 409 and response.json()["code"] == "already_reviewed"
    body = review(actors, "erin").json()
    assert body["version"]["state"] == "approved" and body["version"]["approvals"] == 2


def test_a_rejected_version_cannot_be_approved_later(actors, draft):
    add_user(actors, "erin", "reviewer")
    submit(actors)
    assert review(actors, "bob", "reject").json()["version"]["state"] == "rejected"
    response = review(actors, "erin")
    assert response.status_code == 409
    assert response.json()["code"] == "version_not_reviewable"
    assert response.json()["extra"] == {"state": "rejected"}


def test_a_scanning_version_fails_the_named_gate(actors, draft):
    submit(actors, scan=False)
    response = review(actors, "bob")
    assert response.status_code == 409 and response.json()["code"] == "gate_scan_not_clean"


def test_superusers_review_only_through_a_role(actors, draft):
    submit(actors)
    add_user(actors, "su", None, superuser=True)
    assert review(actors, "su").status_code == 404
    add_user(actors, "su2", "viewer", superuser=True)
    assert review(actors, "su2").status_code == 403
    assert actors.client("root").get(VERSION).json()["state"] == "pending_review"


def test_review_input_is_validated(actors, draft):
    submit(actors)
    bob = actors.client("bob")
    assert bob.post(REVIEWS, {"decision": "maybe"}, format="json").status_code == 400
    assert bob.post(REVIEWS, {"decision": "approve", "x": 1}, format="json").status_code == 400
    assert review(actors, "mallory").status_code == 404


def test_revoked_files_answer_410_to_everyone(actors, draft):
    approved(actors)
    for who in ("bob", "mallory", "alice"):
        response = actors.client(who).post(f"{VERSION}/revoke")
        assert response.status_code == {"bob": 403, "mallory": 404, "alice": 403}[who]
    files = f"{VERSION}/files/config.json"
    # Control: before the revoke the owner and the viewer read the file.
    assert actors.client("alice").get(files).status_code == 200
    assert actors.client("carol").get(files).status_code == 200
    response = actors.client("root").post(f"{VERSION}/revoke")
    assert response.status_code == 200 and response.json()["state"] == "revoked"
    for who in ("alice", "root", "bob", "carol"):
        client = actors.client(who)
        for response in (client.get(files), client.head(files)):
            assert response.status_code == 410, who
        assert client.get(files).json()["code"] == "version_revoked"
    assert actors.client("root").post(f"{VERSION}/revoke").status_code == 409
    assert AuditEvent.objects.filter(action="version.revoke").count() == 1


def test_deprecate_only_from_approved(actors, draft):
    submit(actors)
    response = actors.client("root").post(f"{VERSION}/deprecate")
    assert response.status_code == 409 and response.json()["code"] == "version_not_approved"
    assert review(actors, "bob").status_code == 201
    assert actors.client("bob").post(f"{VERSION}/deprecate").status_code == 403
    response = actors.client("root").post(f"{VERSION}/deprecate")
    assert response.status_code == 200 and response.json()["state"] == "deprecated"
    # Deprecated versions stay downloadable to viewers.
    assert actors.client("carol").get(f"{VERSION}/files/config.json").status_code == 200
    assert AuditEvent.objects.filter(action="version.deprecate").count() == 1


def test_policy_is_for_admins_and_audited(actors):
    root = actors.client("root")
    assert root.get(POLICY).json() == {
        "approvals_required": 1,
        "allow_self_review": False,
        "scan_quarantine_severity": "medium",
        "required_gates": ["scan_clean"],
        "protected_aliases": ["production"],
    }
    assert actors.client("bob").get(POLICY).status_code == 403
    assert (
        actors.client("bob").patch(POLICY, {"approvals_required": 2}, format="json").status_code
        == 403
    )
    assert actors.client("mallory").get(POLICY).status_code == 404
    assert (
        actors.client("mallory").patch(POLICY, {"approvals_required": 2}, format="json").status_code
        == 404
    )
    assert not AuditEvent.objects.filter(action="policy.update").exists()
    response = root.patch(
        POLICY, {"approvals_required": 2, "scan_quarantine_severity": "high"}, format="json"
    )
    assert response.status_code == 200
    assert response.json()["approvals_required"] == 2
    [event] = AuditEvent.objects.filter(action="policy.update")
    assert event.details["before"]["scan_quarantine_severity"] == "medium"
    assert event.details["after"]["scan_quarantine_severity"] == "high"
    actors.acme.refresh_from_db()
    assert actors.acme.scan_quarantine_severity == "high"


@pytest.mark.parametrize(
    "bad",
    [
        {"approvals_required": 0},
        {"approvals_required": "two"},
        {"allow_self_review": "perhaps"},
        {"allow_self_review": 0},
        {"approvals_required": "2"},
        {"scan_quarantine_severity": "huge"},
        {"required_gates": ["no_such_gate"]},
        {"required_gates": "scan_clean"},
        {"approvals": 2},
    ],
)
def test_bad_policy_values_are_400(actors, bad):
    response = actors.client("root").patch(POLICY, bad, format="json")
    assert response.status_code == 400, response.content
    assert not AuditEvent.objects.filter(action="policy.update").exists()
