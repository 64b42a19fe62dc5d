"""Aliases over HTTP: who may move them, what they may point at, and resolution."""

from __future__ import annotations

import pytest

from registry.models import AuditEvent, ModelVersion, VersionState
from registry.services import approvals, catalog, scanning

API = "/api/v1"
MODEL = f"{API}/namespaces/acme/models/bert"
ALIASES = f"{MODEL}/aliases"
OCTET = "application/octet-stream"


def approved_version(actors, model, payload: bytes) -> ModelVersion:
    """A new version of `model` with one file holding `payload`, scanned clean and approved by
    bob through the services (as a worker and a reviewer would)."""
    version = catalog.version_create(model=model, creator=actors.users["alice"])
    response = actors.client("alice").put(
        f"{MODEL}/versions/{version.number}/files/weights.json", payload, content_type=OCTET
    )
    assert response.status_code == 201, response.content
    version, job = catalog.version_submit(version=version, submitter=actors.users["alice"])
    assert scanning.version_scan(job_id=job.pk) == VersionState.PENDING_REVIEW
    approvals.review_record(version=version, reviewer=actors.users["bob"], decision="approve")
    version.refresh_from_db()
    assert version.state == VersionState.APPROVED
    return version


@pytest.fixture
def two_approved(actors, draft):
    """bert v1 (a draft), v2 and v3 approved with different bytes."""
    model = draft.model
    return (
        approved_version(actors, model, b'{"w": 2}'),
        approved_version(actors, model, b'{"w": 3}'),
    )


def put_alias(actors, who: str, alias: str, version: int):
    return actors.client(who).put(f"{ALIASES}/{alias}", {"version": version}, format="json")


def test_protected_alias_needs_an_admin(actors, two_approved):
    response = put_alias(actors, "bob", "production", 2)
    assert response.status_code == 403 and response.json()["code"] == "alias_protected"
    response = put_alias(actors, "root", "production", 2)
    assert response.status_code == 200, response.content
    assert response.json()["version"] == 2 and response.json()["updated_by"] == "root"
    # An unprotected alias: reviewers may move it; contributors and viewers may not.
    assert put_alias(actors, "bob", "staging", 3).status_code == 200
    assert put_alias(actors, "alice", "staging", 2).status_code == 403
    assert put_alias(actors, "carol", "staging", 2).status_code == 403
    # Once the policy protects staging too, bob is refused; once it no longer protects
    # production, bob may move it.
    policy = actors.client("root").patch(
        f"{API}/namespaces/acme/policy", {"protected_aliases": ["staging"]}, format="json"
    )
    assert policy.status_code == 200 and policy.json()["protected_aliases"] == ["staging"]
    assert put_alias(actors, "bob", "staging", 2).status_code == 403
    assert put_alias(actors, "bob", "production", 3).status_code == 200


def test_alias_to_an_unapproved_version_is_409(actors, two_approved):
    response = put_alias(actors, "root", "production", 1)  # v1 is a draft
    assert response.status_code == 409 and response.json()["code"] == "version_not_approved"
    assert put_alias(actors, "root", "production", 99).status_code == 404


def test_download_through_an_alias_serves_the_aliased_bytes(actors, two_approved):
    url = f"{MODEL}/versions/production/files/weights.json"
    carol = actors.client("carol")
    assert carol.get(url).status_code == 404  # no such alias yet
    assert put_alias(actors, "root", "production", 2).status_code == 200
    response = carol.get(url)
    assert response.status_code == 200 and b"".join(response.streaming_content) == b'{"w": 2}'
    assert put_alias(actors, "root", "production", 3).status_code == 200
    response = carol.get(url)
    assert response.status_code == 200 and b"".join(response.streaming_content) == b'{"w": 3}'
    download = AuditEvent.objects.filter(action="artifact.download").order_by("-seq").first()
    assert download is not None and download.target == "acme/bert/v3/weights.json"
    moves = AuditEvent.objects.filter(action="alias.set").order_by("seq")
    assert [(e.details["from"], e.details["to"]) for e in moves] == [(None, 2), (2, 3)]
    # The version detail resolves the alias too and shows which aliases point at it.
    detail = carol.get(f"{MODEL}/versions/production").json()
    assert detail["number"] == 3 and detail["aliases"] == ["production"]
    assert carol.get(MODEL).json()["aliases"] == {"production": 3}


def test_alias_list_and_delete(actors, two_approved):
    assert put_alias(actors, "bob", "staging", 2).status_code == 200
    assert put_alias(actors, "root", "production", 3).status_code == 200
    listing = actors.client("carol").get(ALIASES).json()["results"]
    assert [(a["name"], a["version"]) for a in listing] == [("production", 3), ("staging", 2)]
    assert actors.client("bob").delete(f"{ALIASES}/production").status_code == 403
    assert actors.client("bob").delete(f"{ALIASES}/staging").status_code == 204
    assert actors.client("bob").delete(f"{ALIASES}/staging").status_code == 404
    assert actors.client("carol").get(f"{MODEL}/versions/staging").status_code == 404
    event = AuditEvent.objects.get(action="alias.delete")
    assert event.details == {"alias": "staging", "from": 2, "to": None}


@pytest.mark.parametrize("name", ["123", "1abc", "Prod", "a" * 64, "-x"])
def test_alias_names_that_are_not_aliases_are_refused(actors, two_approved, name):
    response = put_alias(actors, "root", name, 2)
    assert response.status_code == 400 and response.json()["code"] == "invalid_input"


def test_aliases_are_invisible_to_other_namespaces(actors, two_approved):
    assert put_alias(actors, "root", "production", 2).status_code == 200
    mallory = actors.client("mallory")
    assert put_alias(actors, "mallory", "production", 3).status_code == 404
    assert mallory.delete(f"{ALIASES}/production").status_code == 404
    assert mallory.get(ALIASES).status_code == 404
    assert mallory.get(f"{MODEL}/versions/production/files/weights.json").status_code == 404
    assert actors.client("carol").get(f"{MODEL}/versions/production").json()["number"] == 2
