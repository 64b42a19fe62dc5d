"""Bad input and rough edges found by trying the API as a new user and as an attacker would.

Each test here failed before its fix (the closing note of the hardening issue lists them).
"""

from __future__ import annotations

import hashlib

import pytest

from registry.crypto.stream import FIRST_SEGMENT_PLAINTEXT, SEGMENT_PLAINTEXT
from registry.models import Artifact, AuditAction, AuditEvent, AuditOutcome
from tests.conftest import FILES
from tests.support.http import body, digest_header, put
from tests.support.objects import pattern_bytes

API = "/api/v1"
AUDIT = f"{API}/audit"
BERT = f"{API}/namespaces/acme/models/bert"


def last_seq() -> int:
    return AuditEvent.objects.order_by("-seq").values_list("seq", flat=True).first() or 0


def events_after(seq: int, **filters) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(seq__gt=seq, **filters).order_by("seq"))


@pytest.fixture
def stored(actors, draft) -> bytes:
    data = pattern_bytes(FIRST_SEGMENT_PLAINTEXT + SEGMENT_PLAINTEXT + 10, seed=7)
    assert put(actors.client("alice"), "w.bin", data).status_code == 201
    return data


# --- Range ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        f"bytes={'9' * 5000}-",
        f"bytes=0-{'9' * 5000}",
        f"bytes=-{'1' * 5000}",
        "bytes=0-" + "9" * 19,
    ],
    ids=["start", "end", "suffix", "19-digits"],
)
def test_range_with_thousands_of_digits_is_ignored(actors, stored, header):
    # Python refuses int() of over 4300 digits (ValueError): that was a 500.
    r = actors.client("alice").get(f"{FILES}/w.bin", HTTP_RANGE=header)
    assert r.status_code == 200
    assert body(r) == stored


def test_content_length_with_thousands_of_digits_is_a_clean_error(actors, draft):
    r = actors.client("alice").put(
        f"{FILES}/x.bin", b"", content_type="application/octet-stream", CONTENT_LENGTH="9" * 5000
    )
    assert r.status_code == 413
    assert r.json()["code"] == "too_large"
    assert not Artifact.objects.exists()


# --- If-Range ------------------------------------------------------------------------------------


def test_if_range_with_the_current_etag_serves_the_range(actors, stored):
    etag = f'"{hashlib.sha256(stored).hexdigest()}"'
    r = actors.client("alice").get(f"{FILES}/w.bin", HTTP_RANGE="bytes=10-19", HTTP_IF_RANGE=etag)
    assert r.status_code == 206
    assert body(r) == stored[10:20]


@pytest.mark.parametrize(
    "if_range",
    ['"' + "0" * 64 + '"', 'W/"{etag}"', "Sat, 29 Oct 2094 19:43:31 GMT"],
    ids=["other-file", "weak-etag", "date"],
)
def test_if_range_that_does_not_match_sends_the_whole_file(actors, stored, if_range):
    # A resumed download whose file changed must restart, never splice two files together.
    etag = hashlib.sha256(stored).hexdigest()
    r = actors.client("alice").get(
        f"{FILES}/w.bin", HTTP_RANGE="bytes=10-19", HTTP_IF_RANGE=if_range.format(etag=etag)
    )
    assert r.status_code == 200
    assert body(r) == stored
    assert "Content-Range" not in r


# --- Content-Digest ------------------------------------------------------------------------------


def test_content_digest_with_no_supported_algorithm_is_refused(actors, draft):
    data = b"weights"
    r = put(
        actors.client("alice"), "a.bin", data, HTTP_CONTENT_DIGEST="md5=:AAAAAAAAAAAAAAAAAAAAAA==:"
    )
    assert r.status_code == 400
    assert r.json()["code"] == "unsupported_digest"
    assert r["Want-Content-Digest"] == "sha-256=1"
    assert not Artifact.objects.exists()
    # Control: an unknown member beside a good sha-256 member is ignored.
    header = "md5=:AAAAAAAAAAAAAAAAAAAAAA==:, " + digest_header(data)
    assert put(actors.client("alice"), "a.bin", data, HTTP_CONTENT_DIGEST=header).status_code == 201


def test_every_sha256_member_of_content_digest_is_checked(actors, draft):
    data = b"weights"
    wrong = digest_header(b"other bytes")
    for header in (f"{digest_header(data)}, {wrong}", f"{wrong}, {digest_header(data)}"):
        r = put(actors.client("alice"), "a.bin", data, HTTP_CONTENT_DIGEST=header)
        assert r.status_code == 400
        assert r.json()["code"] == "digest_mismatch"
    assert not Artifact.objects.exists()
    # Control: the same member twice is fine.
    header = f"{digest_header(data)}, {digest_header(data)}"
    assert put(actors.client("alice"), "a.bin", data, HTTP_CONTENT_DIGEST=header).status_code == 201


# --- PATCH and JSON input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [{"name": "renamed"}, {"created_at": "2020-01-01T00:00:00Z"}, {"descripton": "typo"}],
    ids=["read-only-name", "read-only-created", "unknown"],
)
def test_patch_with_unknown_or_read_only_fields_is_400(actors, draft, payload):
    r = actors.client("alice").patch(BERT, payload, format="json")
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_input"
    assert r.json()["extra"]["fields"] == sorted(payload)
    assert actors.client("alice").get(BERT).json()["name"] == "bert"
    # Control: a known field is applied.
    r = actors.client("alice").patch(BERT, {"description": "ok"}, format="json")
    assert r.status_code == 200
    assert r.json()["description"] == "ok"


def test_create_with_an_unknown_field_is_400(actors):
    r = actors.client("alice").post(
        f"{API}/namespaces/acme/models", {"name": "m", "owner": "mallory"}, format="json"
    )
    assert r.status_code == 400
    assert r.json()["extra"]["fields"] == ["owner"]


# --- Refused access is audited, and folded -------------------------------------------------------


def test_a_non_member_refused_with_the_hiding_404_is_audited(actors, stored):
    mallory = actors.client("mallory")
    before = last_seq()
    r = mallory.get(f"{FILES}/w.bin")
    assert r.status_code == 404
    denied = events_after(before)
    assert [e.action for e in denied] == [AuditAction.ACCESS_DENIED]
    assert denied[0].outcome == AuditOutcome.DENIED
    assert (denied[0].actor_user, denied[0].namespace) == ("mallory", "acme")
    assert denied[0].target == "acme/bert/v1/w.bin"
    assert denied[0].details["operation"] == "download"
    # The answer is the same as for a namespace that does not exist, which is not audited
    # (there is nothing there to protect, and the log would record any string anyone sends).
    before = last_seq()
    missing = mallory.get(f"{API}/namespaces/nosuch/models/bert/versions/1/files/w.bin")
    assert missing.status_code == 404
    assert missing.json()["message"].replace("nosuch", "acme") == r.json()["message"]
    assert events_after(before) == []


def test_refusals_of_a_member_are_audited_too(actors, draft):
    before = last_seq()
    r = actors.client("carol").delete(BERT)  # a viewer cannot delete
    assert r.status_code == 403
    [event] = events_after(before)
    assert (event.action, event.actor_user, event.target) == ("access.denied", "carol", "acme/bert")


def test_a_flood_of_refusals_is_folded(actors, draft, settings):
    settings.SMR_DENIED_AUDIT_BURST = 3
    mallory = actors.client("mallory")
    before = last_seq()
    for i in range(50):
        assert mallory.get(f"{API}/namespaces/acme/models/m{i}").status_code == 404
    recorded = events_after(before, action=AuditAction.ACCESS_DENIED)
    assert len(recorded) == 3
    # When the window has passed, the next refusal is recorded with the count it folded.
    from django.core.cache import cache

    cache.delete("smr:denied:mallory:acme:n")
    assert mallory.get(f"{BERT}").status_code == 404
    latest = events_after(recorded[-1].seq, action=AuditAction.ACCESS_DENIED)
    assert [e.details.get("folded") for e in latest] == [47]


# --- Audit checkpoints and verification: auditors only -------------------------------------------


@pytest.mark.parametrize("who", ["root", "mallory"])
def test_namespace_admins_cannot_verify_the_whole_log_or_list_checkpoints(actors, who):
    client = actors.client(who)
    assert client.post(f"{AUDIT}/verify").status_code == 403
    assert client.get(f"{AUDIT}/checkpoints").status_code == 403
    # They still read their own namespace's events.
    assert client.get(f"{AUDIT}/events").status_code == 200
    # Control: the auditor may do both.
    dave = actors.client("dave")
    assert dave.post(f"{AUDIT}/verify").status_code == 200
    assert dave.get(f"{AUDIT}/checkpoints").status_code == 200


def test_verify_is_throttled(actors):
    dave = actors.client("dave")
    codes = [dave.post(f"{AUDIT}/verify").status_code for _ in range(8)]
    assert codes[:6] == [200] * 6
    assert codes[6:] == [429, 429]
    r = dave.post(f"{AUDIT}/verify")
    assert r.json()["code"] == "throttled"
    assert int(r["Retry-After"]) > 0


# --- Downloads cut short -------------------------------------------------------------------------


def test_a_download_cut_short_records_what_was_sent(actors, stored):
    # What the WSGI server does when the client goes away: it stops iterating the response
    # and closes it (the test client's own close would also close the test's DB connection).
    from registry.access import Action, Principal
    from registry.selectors import artifact_get_for_user
    from registry.services.artifacts import artifact_open

    artifact = artifact_get_for_user(
        principal=Principal(user=actors.users["alice"]), namespace="acme", model="bert",
        number=1, path="w.bin", action=Action.DOWNLOAD,
    )  # fmt: skip
    before = last_seq()
    stream = artifact_open(artifact=artifact)
    stream.prefetch()
    chunks = iter(stream)
    first = next(chunks)
    next(chunks)  # the server asked for more: the first chunk went out
    stream.close()
    events = events_after(before)
    assert [e.action for e in events] == [
        AuditAction.ARTIFACT_DOWNLOAD,
        AuditAction.ARTIFACT_DOWNLOAD_INCOMPLETE,
    ]
    download, cut = events
    assert download.details["bytes"] == len(stored)
    assert cut.details == {
        "download_seq": download.seq,
        "bytes_sent": len(first),
        "bytes_expected": len(stored),
    }
    stream.close()  # closing twice records nothing more
    assert len(events_after(before)) == 2


def test_a_complete_download_has_no_follow_up(actors, stored):
    before = last_seq()
    r = actors.client("alice").get(f"{FILES}/w.bin")
    assert body(r) == stored  # the test client closes the response at the end
    assert [e.action for e in events_after(before)] == [AuditAction.ARTIFACT_DOWNLOAD]


@pytest.mark.parametrize(
    "query",
    [{"action": "artifact.steal"}, {"outcome": "maybe"}, {"since": ""}, {"until": "2026-01-01"}],
)
def test_audit_filters_outside_their_type_are_400(actors, query):
    # They used to match nothing (or nothing was filtered), which hides typos in an audit query.
    r = actors.client("dave").get(f"{AUDIT}/events", query)
    assert r.status_code == 400
    assert r.json()["extra"] == {"param": next(iter(query))}


def test_an_unusable_object_folder_is_a_503_not_a_500(actors, draft, settings, tmp_path):
    # Found by hand under `make run`: a store folder that is a file raised a bare StorageError.
    from registry import storage

    blocked = tmp_path / "not-a-folder"
    blocked.write_bytes(b"")
    settings.SMR_OBJECTS_DIR = blocked
    storage.get_object_store.cache_clear()
    r = put(actors.client("alice"), "x.bin", b"weights")
    assert r.status_code == 503
    assert r.json()["code"] == "storage_unavailable"
    assert "Retry-After" in r
    assert not Artifact.objects.exists()
