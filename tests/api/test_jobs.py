"""GET /jobs and /jobs/{id}: scoped to the caller's namespaces, cursor-paginated."""

from __future__ import annotations

import uuid

from rest_framework.test import APIClient

from registry.models import Job, JobKind, Namespace
from registry.services.tokens import token_create

API = "/api/v1"
VERSION = f"{API}/namespaces/acme/models/bert/versions/1"


def submit(actors) -> str:
    alice = actors.client("alice")
    alice.put(f"{VERSION}/files/a.json", b"{}", content_type="application/octet-stream")
    return alice.post(f"{VERSION}/submit").json()["job"]["id"]


def test_job_detail_for_members_only(actors, draft):
    job_id = submit(actors)
    for name in ("alice", "bob", "carol", "dave", "root"):
        body = actors.client(name).get(f"{API}/jobs/{job_id}").json()
        assert body["id"] == job_id and body["kind"] == "scan", name
        assert (body["namespace"], body["model"], body["version"]) == ("acme", "bert", 1)
        assert body["created_by"] == "alice" and body["state"] == "queued"
    response = actors.client("mallory").get(f"{API}/jobs/{job_id}")
    assert response.status_code == 404 and response.json()["code"] == "not_found"
    assert actors.client("alice").get(f"{API}/jobs/{uuid.uuid4()}").status_code == 404
    assert actors.client("alice").get(f"{API}/jobs/not-a-uuid").status_code == 404
    assert APIClient().get(f"{API}/jobs/{job_id}").status_code == 401


def test_job_list_is_scoped_and_cursor_paginated(actors, draft):
    first = submit(actors)
    evil_job = Job.objects.create(kind=JobKind.SCAN, namespace=Namespace.objects.get(name="evil"))
    extra = [Job.objects.create(kind=JobKind.SCAN, namespace=actors.acme) for _ in range(2)]
    alice = actors.client("alice")
    page = alice.get(f"{API}/jobs", {"limit": 2}).json()
    assert len(page["results"]) == 2 and page["next"]
    rest = alice.get(page["next"]).json()
    seen = [j["id"] for j in page["results"] + rest["results"]]
    assert sorted(seen) == sorted([first, *(str(j.pk) for j in extra)])
    assert seen[0] == str(extra[-1].pk)  # newest first
    assert str(evil_job.pk) not in seen
    assert [j["id"] for j in actors.client("mallory").get(f"{API}/jobs").json()["results"]] == [
        str(evil_job.pk)
    ]
    bad = alice.get(f"{API}/jobs", {"cursor": "%%%"})
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_input"


def test_job_list_needs_the_read_scope(actors, draft):
    token = token_create(user=actors.users["alice"], scopes=["write"]).plaintext
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    assert client.get(f"{API}/jobs").status_code == 403


def test_operators_see_registry_wide_jobs_without_a_namespace(actors, draft):
    from django.contrib.auth import get_user_model

    from registry import keyconfig
    from registry.services import rotation

    job = rotation.rewrap_job_create(to_kek_id=keyconfig.local_keyring().primary_kek_id())
    su = get_user_model().objects.create(username="su", is_superuser=True)
    client = APIClient()
    client.credentials(
        HTTP_AUTHORIZATION=f"Bearer {token_create(user=su, scopes=['read']).plaintext}"
    )
    listed = client.get(f"{API}/jobs")
    assert listed.status_code == 200, listed.content
    assert [j["namespace"] for j in listed.json()["results"] if j["id"] == str(job.pk)] == [None]
    assert client.get(f"{API}/jobs/{job.pk}").json()["kind"] == "rewrap"
