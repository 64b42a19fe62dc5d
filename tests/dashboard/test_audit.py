"""The audit page (registry/dashboard/views/audit.py): who may read it, filters parsed by the
API's rules, cursor pages, verify now, and an export link with the same filters."""

from __future__ import annotations

import json
import re
from html import unescape

import pytest
from django.test import Client

from registry.models import AuditEvent
from registry.services import audit
from tests.conftest import FILES
from tests.registry.services.test_approvals import pending

pytestmark = pytest.mark.django_db


def signed_in(actors, name: str) -> Client:
    client = Client()
    client.force_login(actors.users[name])
    return client


def seqs(html: str) -> list[int]:
    return [int(s) for s in re.findall(r'<tr data-seq="(\d+)">', html)]


def link(html: str, rel: str) -> str:
    found = re.search(rf'<a href="([^"]+)" rel="{rel}">', html)
    assert found, f"no {rel} link"
    return unescape(found.group(1))


@pytest.fixture
def downloaded(actors, draft):
    """acme/bert v1 pending review, and bob's audited download of its config.json."""
    version = pending(draft, actors.users["alice"], {"config.json": b'{"layers": 12}'})
    response = actors.client("bob").get(f"{FILES}/config.json")
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == b'{"layers": 12}'
    return version.artifacts.get(path="config.json")


def test_an_auditor_filters_to_downloads_and_sees_bobs_with_its_digest(actors, downloaded):
    dave = signed_in(actors, "dave")
    page = dave.get("/audit", {"action": "artifact.download", "actor": "", "since": ""})
    assert page.status_code == 200
    html = page.content.decode()
    rows = AuditEvent.objects.filter(action="artifact.download")
    assert [e.actor_user for e in rows] == ["bob"]
    assert seqs(html) == [rows[0].seq]
    assert downloaded.sha256 in html
    assert "artifact.upload</code>" not in html  # the filter narrowed the rows, not only a column
    # The same filter by digest finds the upload and the download of that file.
    html = dave.get("/audit", {"sha256": downloaded.sha256}).content.decode()
    by_digest = AuditEvent.objects.filter(target_sha256=downloaded.sha256).order_by("-seq")
    assert seqs(html) == [e.seq for e in by_digest] and len(by_digest) >= 2


def test_the_export_link_carries_the_same_filters_and_works_with_the_session(actors, downloaded):
    dave = signed_in(actors, "dave")
    html = dave.get(
        "/audit", {"action": "artifact.download", "since": "2000-01-01T00:00"}
    ).content.decode()
    export = unescape(re.search(r'<a href="(/api/v1/audit/events/export\?[^"]+)"', html).group(1))
    assert "action=artifact.download" in export and "since=2000-01-01T00%3A00%3A00Z" in export
    response = dave.get(export)
    assert response.status_code == 200
    lines = [json.loads(line) for line in b"".join(response.streaming_content).splitlines()]
    assert [(e["action"], e["actor"]["user"]) for e in lines] == [("artifact.download", "bob")]


def test_times_are_utc_and_a_bad_one_is_the_apis_invalid_input(actors, downloaded):
    dave = signed_in(actors, "dave")
    event = AuditEvent.objects.get(action="artifact.download")
    after = event.created_at.strftime("%Y-%m-%dT%H:%M:%S")
    html = dave.get("/audit", {"action": "artifact.download", "until": after}).content.decode()
    assert seqs(html) == []  # until is exclusive and the event has sub-second time after it
    html = dave.get("/audit", {"action": "artifact.download", "since": after}).content.decode()
    assert seqs(html) == [event.seq]
    page = dave.get("/audit", {"since": "yesterday"})
    html = page.content.decode()
    assert page.status_code == 200
    assert "(invalid_input)" in html and "since must be an RFC 3339 time" in html
    assert seqs(html) == []
    html = dave.get("/audit", {"action": "no.such"}).content.decode()
    assert "(invalid_input)" in html and "action must be one of" in html


def test_pages_go_back_in_time_by_sequence_without_gaps_or_repeats(actors):
    for i in range(120):
        audit.audit_record(action="model.update", namespace="acme", target=f"acme/m{i}")
    dave = signed_in(actors, "dave")
    expected = list(
        AuditEvent.objects.filter(action="model.update")
        .order_by("-seq")
        .values_list("seq", flat=True)
    )
    html = dave.get("/audit", {"action": "model.update"}).content.decode()
    first = seqs(html)
    assert 'rel="prev"' not in html
    html = dave.get(link(html, "next")).content.decode()
    second = seqs(html)
    html3 = dave.get(link(html, "next")).content.decode()
    third = seqs(html3)
    assert first + second + third == expected
    assert 'rel="next"' not in html3
    back = dave.get(link(html3, "prev")).content.decode()
    assert seqs(back) == second
    assert "action=model.update" in link(back, "prev")


def test_others_get_the_selectors_refusal_and_admins_see_only_their_namespace(actors):
    audit.audit_record(action="model.update", namespace="evil", target="evil/secret-model")
    audit.audit_record(action="model.update", namespace="acme", target="acme/bert")
    for name in ("alice", "bob", "carol"):
        page = signed_in(actors, name).get("/audit")
        assert page.status_code == 403
        assert "(permission_denied)" in page.content.decode()
    assert Client().get("/audit").status_code == 302
    html = signed_in(actors, "mallory").get("/audit").content.decode()
    assert "evil/secret-model" in html and "acme/bert" not in html
    html = signed_in(actors, "root").get("/audit").content.decode()
    assert "acme/bert" in html and "evil/secret-model" not in html
    assert "Verify now" not in html  # admins read their namespace's events, auditors verify


def test_verify_now_shows_the_log_intact_and_is_audited(actors, downloaded):
    dave = signed_in(actors, "dave")
    assert "Verify now" in dave.get("/audit").content.decode()
    page = dave.post("/audit/verify")
    assert page.status_code == 200
    assert "<strong>intact</strong>" in page.content.decode()
    fragment = dave.post("/audit/verify", HTTP_HX_REQUEST="true").content.decode()
    assert "<strong>intact</strong>" in fragment and "<html" not in fragment
    assert AuditEvent.objects.filter(action="audit.verify", actor_user="dave").count() == 2


def test_verify_now_names_the_first_bad_entry(actors, downloaded):
    from django.db import connection

    victim = AuditEvent.objects.get(action="artifact.download")
    with connection.cursor() as cursor:
        # The table is append-only by trigger; a tamperer with the database owner's rights
        # switches triggers off, which is what the chain exists to catch.
        cursor.execute("SET session_replication_role = replica")
        cursor.execute(
            "UPDATE registry_auditevent SET actor_user = 'carol' WHERE id = %s", [victim.pk]
        )
        cursor.execute("SET session_replication_role = DEFAULT")
    html = signed_in(actors, "dave").post("/audit/verify").content.decode()
    assert "<strong>broken</strong>" in html
    assert f"<dd>#{victim.seq}</dd>" in html


def test_a_forged_verify_from_an_admin_is_refused(actors):
    page = signed_in(actors, "root").post("/audit/verify")
    assert page.status_code == 403
    assert "(permission_denied)" in page.content.decode()
    assert not AuditEvent.objects.filter(action="audit.verify").exists()


def test_verify_shares_the_apis_throttle(actors):
    dave = signed_in(actors, "dave")
    for _ in range(6):
        assert "intact" in dave.post("/audit/verify").content.decode()
    refused = dave.post("/audit/verify", follow=True).content.decode()
    assert "(throttled)" in refused
    assert AuditEvent.objects.filter(action="audit.verify").count() == 6


def test_an_empty_result_says_what_to_do(actors):
    html = signed_in(actors, "dave").get("/audit", {"actor": "nobody"}).content.decode()
    assert "No events match these filters" in html


def test_the_audit_page_reads_in_a_bounded_number_of_queries(actors):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    dave = signed_in(actors, "dave")

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert dave.get("/audit").status_code == 200
        return len(captured)

    audit.audit_record(action="model.update", namespace="acme", target="acme/m")
    before = queries()
    for i in range(80):
        audit.audit_record(action="model.update", namespace="acme", target=f"acme/m{i}")
    assert queries() == before
