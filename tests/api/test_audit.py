"""The audit log end to end: what gets recorded, what never does, who may read it, and that the
database itself refuses to rewrite it (PostgreSQL's triggers, so run against PostgreSQL).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from datetime import timedelta, timezone

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from django.contrib.auth import authenticate
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.db.models import Max
from django.db.utils import DatabaseError
from django.utils import timezone as django_timezone
from rest_framework.test import APIClient

from registry import keyconfig, storage
from registry.crypto.stream import (
    FIRST_SEGMENT_PLAINTEXT,
    HEADER_SIZE,
    SEGMENT_PLAINTEXT,
    SEGMENT_SIZE,
)
from registry.errors import IntegrityFailure
from registry.models import (
    ApiToken,
    Artifact,
    AuditAction,
    AuditCheckpoint,
    AuditEvent,
    AuditOutcome,
    RegisteredModel,
)
from registry.services import audit
from registry.services.tokens import token_create, token_revoke
from tests.conftest import FILES, use_s3
from tests.support.http import OCTET, body, digest_header, put
from tests.support.netproxy import TcpProxy
from tests.support.objects import pattern_bytes, read_object, write_object

API = "/api/v1"
AUDIT = f"{API}/audit"
VERSION = FILES.rsplit("/files", 1)[0]
FOUR_SEGMENTS = FIRST_SEGMENT_PLAINTEXT + 3 * SEGMENT_PLAINTEXT
STORED_SIZE = FIRST_SEGMENT_PLAINTEXT + SEGMENT_PLAINTEXT + 1000  # three segments


# --- Helpers -------------------------------------------------------------------------------


def bearer(raw: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


def key_id(token: str) -> str:
    return token.removeprefix("smr_").partition("_")[0]


def secret_of(token: str) -> str:
    return token.removeprefix("smr_").partition("_")[2]


def last_seq() -> int:
    return AuditEvent.objects.aggregate(m=Max("seq"))["m"] or 0


def events_after(seq: int, action: str | None = None) -> list[AuditEvent]:
    qs = AuditEvent.objects.filter(seq__gt=seq).order_by("seq")
    return list(qs.filter(action=action) if action else qs)


def run(call, status: int):
    """Make one request; return the response and exactly the events it appended."""
    before = last_seq()
    response = call()
    assert response.status_code == status, getattr(response, "content", b"")
    return response, events_after(before)


def seqs(qs) -> list[int]:
    return list(qs.order_by("-seq").values_list("seq", flat=True))


def listed(client, **params) -> list[dict]:
    """Every event the list endpoint returns, following the cursor page by page."""
    out: list[dict] = []
    response = client.get(f"{AUDIT}/events", params)
    while True:
        assert response.status_code == 200, response.content
        out += response.json()["results"]
        if not response.json()["next"]:
            return out
        response = client.get(response.json()["next"])


def export_lines(response) -> list[dict]:
    assert response.status_code == 200
    assert response["Content-Type"] == "application/x-ndjson"
    raw = body(response)
    assert raw == b"" or raw.endswith(b"\n")
    return [json.loads(line) for line in raw.splitlines()]


def leaks(event: AuditEvent, secret: str) -> bool:
    """Whether `secret` appears anywhere in what the log keeps of an event."""
    row = AuditEvent.objects.filter(pk=event.pk).values().get()
    stored = [
        bytes(v) if isinstance(v, memoryview | bytes) else str(v).encode() for v in row.values()
    ]
    stored.append(json.dumps(event.details).encode())
    return any(secret.encode() in blob for blob in stored)


def tamper(key: str, offset: int) -> None:
    buf = bytearray(read_object(key))
    buf[offset] ^= 0x01
    write_object(key, bytes(buf))


def table_rows(table: str) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {table} ORDER BY id")
        return [
            tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
            for row in cursor.fetchall()
        ]


def edit_bypassing_triggers(sql: str, params: list) -> None:
    # Stands in for an operator with DDL rights: as a superuser, replica mode skips ordinary
    # triggers. What must catch this is the hash chain, not the trigger.
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute(sql, params)
        cursor.execute("SET LOCAL session_replication_role = DEFAULT")


@pytest.fixture
def stored(actors, draft, store_kind) -> bytes:
    """A three-segment file in acme/bert v1, uploaded by alice."""
    data = pattern_bytes(STORED_SIZE, seed=21)
    assert put(actors.client("alice"), "m.bin", data).status_code == 201
    return data


@pytest.fixture
def activity(actors, draft) -> str:
    """Events in both namespaces; returns the digest of the file alice put into acme."""
    alice = actors.client("alice")
    data = b"acme weights"
    assert put(alice, "w.bin", data).status_code == 201
    assert body(alice.get(f"{FILES}/w.bin")) == data
    assert actors.client("carol").get(f"{FILES}/w.bin").status_code == 403
    assert bearer(f"smr_0123456789ab_{'x' * 43}").get(f"{API}/namespaces").status_code == 401
    mallory = actors.client("mallory")
    r = mallory.post(f"{API}/namespaces/evil/models", {"name": "trojan"}, format="json")
    assert r.status_code == 201
    assert mallory.post(f"{API}/namespaces/evil/models/trojan/versions").status_code == 201
    return hashlib.sha256(data).hexdigest()


# --- 1. Uploads: one event on success, none when the change rolls back --------------------------


def test_upload_records_one_event_naming_alice_her_token_and_the_digest(actors, draft, store_kind):
    data = pattern_bytes(FIRST_SEGMENT_PLAINTEXT + 10, seed=1)
    alice = actors.client("alice")
    r, new = run(
        lambda: put(alice, "w/model.bin", data, HTTP_CONTENT_DIGEST=digest_header(data)), 201
    )
    assert len(new) == 1
    event = new[0]
    assert event.action == AuditAction.ARTIFACT_UPLOAD
    assert event.outcome == AuditOutcome.SUCCESS
    assert event.namespace == "acme"
    assert event.target == "acme/bert/v1/w/model.bin"
    assert event.target_sha256 == hashlib.sha256(data).hexdigest() == r.json()["sha256"]
    assert event.details["path"] == "w/model.bin"
    assert event.details["size"] == len(data)
    assert (event.actor_kind, event.actor_user) == ("user", "alice")
    assert event.actor_token == key_id(actors.tokens["alice"])
    assert event.actor_token != key_id(actors.tokens["bob"])


@pytest.mark.parametrize("case", ["digest-mismatch", "too-large", "submitted-version"])
def test_rejected_upload_leaves_no_event(actors, draft, settings, case):
    alice = actors.client("alice")
    headers = {}
    if case == "digest-mismatch":
        headers["HTTP_CONTENT_DIGEST"] = digest_header(b"other bytes")
        status = 400
    elif case == "too-large":
        settings.SMR_MAX_ARTIFACT_SIZE = 4
        status = 413
    else:
        assert put(alice, "first.bin", b"x").status_code == 201
        assert alice.post(f"{VERSION}/submit").status_code == 202
        status = 409
    _r, new = run(lambda: put(alice, "a.bin", b"real bytes", **headers), status)
    assert [e for e in new if e.action == AuditAction.ARTIFACT_UPLOAD] == []
    assert not AuditEvent.objects.filter(target="acme/bert/v1/a.bin").exists()


@pytest.fixture
def s3_proxy(settings, moto_endpoint, s3_bucket):
    proxy = TcpProxy("127.0.0.1", int(moto_endpoint.rsplit(":", 1)[1]))
    proxy.start()
    use_s3(settings, f"http://127.0.0.1:{proxy.port}", s3_bucket)
    yield proxy
    proxy.stop()
    storage.get_object_store.cache_clear()


def test_upload_during_storage_outage_leaves_no_event(actors, draft, s3_proxy):
    alice = actors.client("alice")
    s3_proxy.cut()
    r, new = run(lambda: put(alice, "a.bin", b"model bytes"), 503)
    assert r.json()["code"] == "storage_unavailable"
    assert [e for e in new if e.action == AuditAction.ARTIFACT_UPLOAD] == []
    # Control: the same upload once the store is back is recorded.
    s3_proxy.restore()
    _r, new = run(lambda: put(alice, "a.bin", b"model bytes"), 201)
    assert [e.action for e in new] == [AuditAction.ARTIFACT_UPLOAD]


# --- 2. Integrity failures ---------------------------------------------------------------------


def test_integrity_failure_before_headers_is_audited(actors, draft, store_kind):
    data = pattern_bytes(FOUR_SEGMENTS, seed=2)
    assert put(actors.client("alice"), "m.bin", data).status_code == 201
    tamper(Artifact.objects.get(path="m.bin").object_key, HEADER_SIZE + 10)  # segment 0
    r, new = run(lambda: actors.client("alice").get(f"{FILES}/m.bin"), 502)
    assert r.json()["code"] == "integrity_error"
    # The attempt is logged before any byte is read, then the failure it ran into.
    assert [e.action for e in new] == [
        AuditAction.ARTIFACT_DOWNLOAD,
        AuditAction.ARTIFACT_INTEGRITY_FAILURE,
    ]
    failure = new[1]
    assert failure.outcome == AuditOutcome.FAILURE
    assert (failure.namespace, failure.target) == ("acme", "acme/bert/v1/m.bin")
    assert failure.target_sha256 == hashlib.sha256(data).hexdigest()
    assert (failure.actor_user, failure.actor_token) == ("alice", key_id(actors.tokens["alice"]))
    assert failure.request_id == r["X-Request-ID"]
    assert failure.details["reason"]


def test_integrity_failure_mid_stream_is_audited_with_the_requests_context(
    actors, draft, store_kind
):
    data = pattern_bytes(FOUR_SEGMENTS, seed=3)
    assert put(actors.client("alice"), "m.bin", data).status_code == 201
    tamper(Artifact.objects.get(path="m.bin").object_key, 2 * SEGMENT_SIZE + 100)  # segment 2
    before = last_seq()
    r = actors.client("alice").get(f"{FILES}/m.bin", HTTP_X_REQUEST_ID="stream-42")
    assert r.status_code == 200  # headers left before the bad segment was reached
    assert events_after(before, AuditAction.ARTIFACT_INTEGRITY_FAILURE) == []
    with pytest.raises(IntegrityFailure):
        for _chunk in r.streaming_content:
            pass
    failures = events_after(before, AuditAction.ARTIFACT_INTEGRITY_FAILURE)
    assert len(failures) == 1
    failure = failures[0]
    assert failure.outcome == AuditOutcome.FAILURE
    assert failure.target == "acme/bert/v1/m.bin"
    assert failure.target_sha256 == hashlib.sha256(data).hexdigest()
    # The body runs after the view returned: the event still names who asked, and how.
    assert (failure.actor_user, failure.actor_token) == ("alice", key_id(actors.tokens["alice"]))
    assert failure.request_id == "stream-42" == r["X-Request-ID"]
    assert failure.client_ip == "127.0.0.1"
    assert len(events_after(before, AuditAction.ARTIFACT_DOWNLOAD)) == 1


def test_unwrap_failure_is_audited(actors, draft, settings):
    assert put(actors.client("alice"), "a.bin", b"model bytes").status_code == 201
    # A different keyring under the same key id: the wrapped data key no longer opens.
    settings.SMR_KEYRING_FILE.unlink()
    keyconfig.reset()
    keyconfig.local_keyring()
    r, new = run(lambda: actors.client("alice").get(f"{FILES}/a.bin"), 502)
    assert r.json()["code"] == "integrity_error"
    assert [(e.action, e.outcome) for e in new] == [
        (AuditAction.ARTIFACT_INTEGRITY_FAILURE, AuditOutcome.FAILURE)
    ]
    assert new[0].details["reason"] == "the data key could not be unwrapped"


# --- 3. Downloads ----------------------------------------------------------------------------


B0 = FIRST_SEGMENT_PLAINTEXT  # first byte of segment 1


@pytest.mark.parametrize(
    ("who", "header", "span"),
    [
        ("alice", None, None),
        # root (an admin): a reviewer may fetch a draft's bytes only once it is pending review.
        ("root", None, None),
        ("alice", "bytes=10-99", (10, 99)),
        ("alice", f"bytes={B0 - 5}-{B0 + 5}", (B0 - 5, B0 + 5)),
        ("root", "bytes=-500", (STORED_SIZE - 500, STORED_SIZE - 1)),
        ("alice", f"bytes={B0}-", (B0, STORED_SIZE - 1)),
    ],
    ids=["full-alice", "full-root", "range", "range-across-segments", "suffix", "open-ended"],
)
def test_every_download_records_one_event(actors, stored, who, header, span):
    extra = {"HTTP_RANGE": header} if header else {}
    before = last_seq()
    r = actors.client(who).get(f"{FILES}/m.bin", **extra)
    assert r.status_code == (206 if span else 200)
    first, last = span or (0, STORED_SIZE - 1)
    assert body(r) == stored[first : last + 1]
    new = events_after(before)
    assert [e.action for e in new] == [AuditAction.ARTIFACT_DOWNLOAD]
    event = new[0]
    assert (event.actor_user, event.actor_token) == (who, key_id(actors.tokens[who]))
    assert event.target_sha256 == hashlib.sha256(stored).hexdigest()
    assert event.target == "acme/bert/v1/m.bin"
    assert event.namespace == "acme"
    assert event.details["range"] == (list(span) if span else None)
    assert event.details["bytes"] == last - first + 1


def test_head_and_304_record_nothing(actors, stored):
    alice = actors.client("alice")
    etag = f'"{hashlib.sha256(stored).hexdigest()}"'
    _r, new = run(lambda: alice.head(f"{FILES}/m.bin"), 200)
    assert new == []
    _r, new = run(lambda: alice.get(f"{FILES}/m.bin", HTTP_IF_NONE_MATCH=etag), 304)
    assert new == []
    # Control: a GET that does send the bytes is recorded.
    r, new = run(lambda: alice.get(f"{FILES}/m.bin", HTTP_IF_NONE_MATCH='"stale"'), 200)
    body(r)
    assert [e.action for e in new] == [AuditAction.ARTIFACT_DOWNLOAD]


def test_unsatisfiable_range_records_no_download(actors, stored):
    _r, new = run(
        lambda: actors.client("alice").get(f"{FILES}/m.bin", HTTP_RANGE=f"bytes={len(stored)}-"),
        416,
    )
    assert new == []


# --- 4. Append-only in the database ------------------------------------------------------------


@pytest.fixture
def checkpointed(actors):
    assert audit.audit_checkpoint_create() is not None
    return AuditCheckpoint.objects.get()


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE {table} SET created_at = created_at + interval '1 day' WHERE id = {id}",
        "DELETE FROM {table} WHERE id = {id}",
        "DELETE FROM {table}",
        "TRUNCATE {table}",
    ],
    ids=["update", "delete-one", "delete-all", "truncate"],
)
@pytest.mark.parametrize("table", ["registry_auditevent", "registry_auditcheckpoint"])
def test_audit_tables_refuse_changes_from_the_application(checkpointed, table, sql):
    rows = table_rows(table)
    assert rows  # there is something to destroy
    statement = sql.format(table=table, id=rows[0][0])
    with (
        pytest.raises(DatabaseError, match="append-only"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(statement)
    assert table_rows(table) == rows
    assert audit.audit_verify().ok


def test_orm_cannot_rewrite_the_log_either(checkpointed):
    rows = table_rows("registry_auditevent")
    event = AuditEvent.objects.order_by("seq").first()
    event.target = "rewritten"
    attempts = [
        event.save,
        lambda: AuditEvent.objects.filter(pk=event.pk).update(outcome="failure"),
        lambda: AuditEvent.objects.all().delete(),
        lambda: AuditCheckpoint.objects.all().delete(),
    ]
    for attempt in attempts:
        with pytest.raises(DatabaseError), transaction.atomic():
            attempt()
    assert table_rows("registry_auditevent") == rows


def test_appending_still_works_and_other_tables_stay_writable(checkpointed):
    head = last_seq()
    event = audit.audit_record(action=AuditAction.AUDIT_VERIFY, target="audit/log")
    assert event.seq == head + 1
    assert event.prev_hash == AuditEvent.objects.get(seq=head).entry_hash
    # Control: the refusal is specific to the audit tables, not to this way of writing.
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("UPDATE registry_namespace SET description = 'x' WHERE name = 'acme'")
        assert cursor.rowcount == 1
    assert audit.audit_verify().ok


# --- 5. Reading the log: auditors and admins, each only their namespaces ------------------------


def test_auditor_lists_every_acme_event_by_cursor_pages(actors, activity):
    dave = actors.client("dave")
    r = dave.get(f"{AUDIT}/events", {"limit": 2})
    assert r.status_code == 200
    assert len(r.json()["results"]) == 2
    assert r.json()["next"]
    events = listed(dave, limit=2)
    got = [e["seq"] for e in events]
    assert got == seqs(AuditEvent.objects.filter(namespace="acme"))  # newest first, no repeats
    assert len(got) > 4
    assert {e["namespace"] for e in events} == {"acme"}
    upload = next(e for e in events if e["action"] == AuditAction.ARTIFACT_UPLOAD)
    assert upload["actor"] == {
        "kind": "user",
        "user": "alice",
        "token": key_id(actors.tokens["alice"]),
    }
    assert upload["target_sha256"] == activity
    assert len(upload["entry_hash"]) == len(upload["prev_hash"]) == 64


@pytest.mark.parametrize(
    ("param", "column"),
    [
        ("actor", "actor_user"),
        ("token", "actor_token"),
        ("action", "action"),
        ("namespace", "namespace"),
        ("target", "target__startswith"),
        ("sha256", "target_sha256"),
        ("outcome", "outcome"),
    ],
)
def test_auditor_filters(actors, activity, param, column):
    value = {
        "actor": "alice",
        "token": key_id(actors.tokens["alice"]),
        "action": AuditAction.ARTIFACT_UPLOAD,
        "namespace": "acme",
        "target": "acme/bert/v1/",
        "sha256": activity,
        "outcome": AuditOutcome.DENIED,
    }[param]
    expected = seqs(AuditEvent.objects.filter(namespace="acme").filter(**{column: value}))
    assert expected  # the filter has something to find
    got = [e["seq"] for e in listed(actors.client("dave"), **{param: value})]
    assert got == expected
    # Control: a value nothing matches finds nothing, so the filter is applied at all.
    other = {"sha256": "0" * 64, "action": AuditAction.AUDIT_CHECKPOINT}.get(
        param, "nobody-matches"
    )
    if param == "outcome":
        # Outcomes are an enum: a value outside it is refused rather than matching nothing.
        r = actors.client("dave").get(f"{AUDIT}/events", {param: other})
        assert r.status_code == 400
        assert r.json()["extra"] == {"param": "outcome"}
    else:
        assert listed(actors.client("dave"), **{param: other}) == []


def test_auditor_filters_by_time(actors, activity):
    dave = actors.client("dave")
    acme = AuditEvent.objects.filter(namespace="acme")
    middle = acme.order_by("seq")[acme.count() // 2]
    moment = middle.created_at.isoformat()
    since = [e["seq"] for e in listed(dave, since=moment)]
    until = [e["seq"] for e in listed(dave, until=moment)]
    assert since == seqs(acme.filter(created_at__gte=middle.created_at))
    assert until == seqs(acme.filter(created_at__lt=middle.created_at))
    assert middle.seq in since and middle.seq not in until
    assert since and until
    assert sorted(since + until, reverse=True) == seqs(acme)


@pytest.mark.parametrize(
    "value",
    [
        "yesterday",
        "2024-01-01T00:00:00",  # no timezone
        "2024-13-45T00:00:00Z",  # well formed, no such day
        "2024-02-30T10:00:00+00:00",
        "2024\x00-01-01T00:00:00Z",
        "9999-12-31T23:59:59-23:59",  # year 10000 in UTC
    ],
    ids=["words", "naive", "bad-month", "bad-day", "nul", "past-9999"],
)
@pytest.mark.parametrize("param", ["since", "until"])
def test_bad_time_filter_is_400(actors, activity, param, value):
    dave = actors.client("dave")
    r = dave.get(f"{AUDIT}/events", {param: value})
    assert r.status_code == 400, r.content
    assert r.json()["code"] == "invalid_input"
    assert dave.get(f"{AUDIT}/events/export", {param: value}).status_code == 400
    # Control: a proper time is accepted.
    assert dave.get(f"{AUDIT}/events", {param: "2024-01-01T00:00:00Z"}).status_code == 200


def test_time_filter_accepts_any_offset_python_does(actors, activity):
    # PostgreSQL itself refuses offsets beyond 15:59; the filter must not pass them through.
    dave = actors.client("dave")
    middle = AuditEvent.objects.filter(namespace="acme").order_by("seq")[2]
    far_east = middle.created_at.astimezone(timezone(timedelta(hours=20))).isoformat()
    assert far_east.endswith("+20:00")
    got = [e["seq"] for e in listed(dave, since=far_east)]
    assert got == [e["seq"] for e in listed(dave, since=middle.created_at.isoformat())]
    assert middle.seq in got


def test_auditor_exports_json_lines_oldest_first_and_the_export_is_audited(actors, activity):
    before = last_seq()
    r = actors.client("dave").get(f"{AUDIT}/events/export")
    lines = export_lines(r)
    assert [e["seq"] for e in lines] == sorted(seqs(AuditEvent.objects.filter(namespace="acme")))
    assert {e["namespace"] for e in lines} == {"acme"}
    assert {"seq", "time", "actor", "action", "target", "details", "entry_hash"} <= set(lines[0])
    exports = events_after(before, AuditAction.AUDIT_EXPORT)
    assert len(exports) == 1
    assert (exports[0].actor_user, exports[0].actor_token) == (
        "dave",
        key_id(actors.tokens["dave"]),
    )
    # Filters apply to the export too, and are recorded with it.
    before = last_seq()
    r = actors.client("dave").get(f"{AUDIT}/events/export", {"action": "artifact.upload"})
    lines = export_lines(r)
    assert [e["action"] for e in lines] == [AuditAction.ARTIFACT_UPLOAD]
    assert events_after(before, AuditAction.AUDIT_EXPORT)[0].details == {
        "filters": {"action": "artifact.upload"}
    }


def test_superuser_export_is_the_whole_chain_ending_with_the_export(actors, activity):
    from django.contrib.auth import get_user_model

    sue = get_user_model().objects.create(username="sue", is_superuser=True)
    lines = export_lines(
        bearer(token_create(user=sue, scopes=["read"]).plaintext).get(f"{AUDIT}/events/export")
    )
    assert [e["seq"] for e in lines] == list(range(1, last_seq() + 1))
    for prev, line in itertools.pairwise(lines):
        assert line["prev_hash"] == prev["entry_hash"]
    assert lines[-1]["action"] == AuditAction.AUDIT_EXPORT
    assert lines[-1]["actor"]["user"] == "sue"


def test_auditor_verifies_the_log(actors, activity):
    dave = actors.client("dave")
    entries = last_seq()
    r, new = run(lambda: dave.post(f"{AUDIT}/verify"), 200)
    assert r.json() == {"ok": True, "entries": entries, "checkpoints": 0, "first_bad": None}
    assert [(e.action, e.outcome, e.actor_user) for e in new] == [
        (AuditAction.AUDIT_VERIFY, AuditOutcome.SUCCESS, "dave")
    ]
    # Control: an edited entry (triggers bypassed, as only a DB superuser could) is caught.
    upload = AuditEvent.objects.get(action=AuditAction.ARTIFACT_UPLOAD)
    edit_bypassing_triggers(
        "UPDATE registry_auditevent SET actor_user = 'mallory' WHERE seq = %s", [upload.seq]
    )
    r, new = run(lambda: dave.post(f"{AUDIT}/verify"), 200)
    assert r.json()["ok"] is False
    assert r.json()["first_bad"]["seq"] == upload.seq
    assert r.json()["first_bad"]["kind"] == "HASH"
    assert [(e.action, e.outcome) for e in new] == [
        (AuditAction.AUDIT_VERIFY, AuditOutcome.FAILURE)
    ]
    with pytest.raises(CommandError, match=f"HASH at seq {upload.seq}"):
        call_command("verify_audit", stdout=io.StringIO())


def test_auditor_lists_checkpoints_that_verify_with_the_public_key(actors, activity):
    first = audit.audit_checkpoint_create()
    actors.client("alice").get(f"{FILES}/w.bin")
    second = audit.audit_checkpoint_create()
    r = actors.client("dave").get(f"{AUDIT}/checkpoints")
    assert r.status_code == 200
    got = r.json()["results"]
    assert [c["size"] for c in got] == [second.size, first.size]
    assert got[0]["prev_checkpoint_hash"] == got[1]["checkpoint_hash"]

    pem = APIClient().get(f"{AUDIT}/checkpoint-key")  # public: no credentials at all
    assert pem.status_code == 200
    assert pem["Content-Type"] == "application/x-pem-file"
    assert pem.content.startswith(b"-----BEGIN PUBLIC KEY-----")
    public = load_pem_public_key(pem.content)
    for checkpoint in got:
        public.verify(bytes.fromhex(checkpoint["signature"]), checkpoint["body"].encode())
        assert json.loads(checkpoint["body"])["size"] == checkpoint["size"]
    # Control: the signature does not cover a different body.
    forged = got[0]["body"].replace(f'"size":{second.size}', f'"size":{second.size + 1}')
    assert forged != got[0]["body"]
    with pytest.raises(InvalidSignature):
        public.verify(bytes.fromhex(got[0]["signature"]), forged.encode())


AUDIT_ENDPOINTS = [
    ("get", f"{AUDIT}/events"),
    ("get", f"{AUDIT}/events/export"),
    ("get", f"{AUDIT}/checkpoints"),
    ("post", f"{AUDIT}/verify"),
]


@pytest.mark.parametrize("who", ["alice", "bob", "carol"])
def test_contributors_reviewers_and_viewers_are_refused_every_audit_endpoint(actors, activity, who):
    client = actors.client(who)
    for method, url in AUDIT_ENDPOINTS:
        r, new = run(lambda m=method, u=url: getattr(client, m)(u), 403)
        assert r.json()["code"] == "permission_denied"
        assert "seq" not in r.content.decode()
        assert not any(
            e.action in {AuditAction.AUDIT_EXPORT, AuditAction.AUDIT_VERIFY} for e in new
        )
    # Control: the auditor is let in everywhere, and nobody without credentials is.
    for method, url in AUDIT_ENDPOINTS:
        assert getattr(actors.client("dave"), method)(url).status_code == 200
        assert getattr(APIClient(), method)(url).status_code == 401


def test_mallory_sees_only_evils_events(actors, activity):
    mallory = actors.client("mallory")
    events = listed(mallory)
    assert events  # she does see her own namespace's events
    assert {e["namespace"] for e in events} == {"evil"}
    assert [e["seq"] for e in events] == seqs(AuditEvent.objects.filter(namespace="evil"))
    for params in [
        {"namespace": "acme"},
        {"sha256": activity},
        {"target": "acme/"},
        {"actor": "alice"},
    ]:
        assert listed(mallory, **params) == []
    exported = export_lines(mallory.get(f"{AUDIT}/events/export"))
    assert {e["namespace"] for e in exported} == {"evil"}
    assert activity not in json.dumps(exported)
    # Control: the acme events she cannot see exist, and the auditor sees them (and not evil's).
    dave_sees = listed(actors.client("dave"), sha256=activity)
    assert len(dave_sees) == 2  # the upload and the download
    assert {e["namespace"] for e in listed(actors.client("dave"))} == {"acme"}


def test_auditor_cannot_download_and_the_denial_is_audited(actors, activity):
    dave = actors.client("dave")
    r, new = run(lambda: dave.get(f"{FILES}/w.bin"), 403)
    assert r.json()["code"] == "permission_denied"
    assert [e.action for e in new] == [AuditAction.ACCESS_DENIED]
    denied = new[0]
    assert denied.outcome == AuditOutcome.DENIED
    assert (denied.actor_user, denied.actor_token) == ("dave", key_id(actors.tokens["dave"]))
    assert (denied.namespace, denied.target) == ("acme", "acme/bert/v1/w.bin")
    assert denied.details["operation"] == "download"
    _r, new = run(lambda: dave.head(f"{FILES}/w.bin"), 403)
    assert [e.action for e in new] == [AuditAction.ACCESS_DENIED]
    # dave can find his own denial in the log he audits.
    mine = listed(dave, action=AuditAction.ACCESS_DENIED, actor="dave")
    assert [e["seq"] for e in mine] == [new[0].seq, denied.seq]
    # Control: alice, allowed, downloads and is recorded as a download.
    r, new = run(lambda: actors.client("alice").get(f"{FILES}/w.bin"), 200)
    assert [e.action for e in new] == [AuditAction.ARTIFACT_DOWNLOAD]


def test_auditor_needs_the_read_scope(actors, activity):
    issued = token_create(user=actors.users["dave"], scopes=["write"])
    r = bearer(issued.plaintext).get(f"{AUDIT}/events")
    assert r.status_code == 403
    assert (
        bearer(token_create(user=actors.users["dave"], scopes=["read"]).plaintext)
        .get(f"{AUDIT}/events")
        .status_code
        == 200
    )


# --- 6. Authentication failures -----------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["unknown-id", "wrong-secret", "expired", "revoked", "malformed", "inactive"]
)
def test_failed_bearer_authentication_is_audited_without_the_secret(actors, case):
    alice = actors.users["alice"]
    issued = token_create(user=alice, scopes=["read"])
    raw = issued.plaintext
    reason = {"expired": "expired", "revoked": "revoked", "inactive": "inactive_user"}.get(
        case, "unknown_or_bad_secret"
    )
    target = f"token:{issued.token.key_id}"
    if case == "unknown-id":
        raw = f"smr_0123456789ab_{secret_of(raw)}"
        target = "token:0123456789ab"
    elif case == "wrong-secret":
        raw = f"smr_{issued.token.key_id}_{'Q' * 43}"
    elif case == "expired":
        ApiToken.objects.filter(pk=issued.token.pk).update(
            expires_at=django_timezone.now() - timedelta(seconds=1)
        )
    elif case == "revoked":
        token_revoke(user=alice, key_id=issued.token.key_id)
    elif case == "inactive":
        alice.is_active = False
        alice.save()
    elif case == "malformed":
        raw = f"tok_{secret_of(raw)}"
        reason, target = "malformed", ""
    r, new = run(lambda: bearer(raw).get(f"{API}/namespaces", HTTP_X_REQUEST_ID="probe-1"), 401)
    assert r.json()["code"] == "authentication_failed"
    assert [e.action for e in new] == [AuditAction.AUTH_FAILED]
    event = new[0]
    assert event.outcome == AuditOutcome.FAILURE
    assert event.details == {"method": "bearer", "reason": reason}
    assert event.target == target
    assert (event.actor_kind, event.actor_user, event.actor_token) == ("anonymous", "", "")
    assert (event.request_id, event.client_ip) == ("probe-1", "127.0.0.1")
    secret = secret_of(raw) if case != "malformed" else raw.removeprefix("tok_")
    assert len(secret) >= 40
    assert not leaks(event, secret)
    assert secret.encode() not in bytes(event.canonical)
    # Control: the leak check finds what is in the event.
    assert leaks(event, reason)


def test_good_token_records_no_auth_failure(actors):
    _r, new = run(lambda: actors.client("alice").get(f"{API}/namespaces"), 200)
    assert new == []


def test_malformed_bearer_header_is_audited(actors):
    _r, new = run(lambda: bearer("smr_0123 secret").get(f"{API}/namespaces"), 401)
    assert [e.action for e in new] == [AuditAction.AUTH_FAILED]


def test_failed_password_login_is_audited_without_the_password(actors):
    password = "correct-horse-battery-staple-9"
    before = last_seq()
    assert authenticate(request=None, username="alice", password=password) is None
    new = events_after(before)
    assert [e.action for e in new] == [AuditAction.LOGIN_FAILED]
    event = new[0]
    assert event.outcome == AuditOutcome.FAILURE
    assert event.target == "user:alice"
    assert event.details == {"method": "session"}
    assert not leaks(event, password)
    # Control: the right password logs in and records no failure.
    alice = actors.users["alice"]
    alice.set_password(password)
    alice.save()
    before = last_seq()
    assert authenticate(request=None, username="alice", password=password) == alice
    assert events_after(before, AuditAction.LOGIN_FAILED) == []


# --- 7. Metadata changes ------------------------------------------------------------------------


def summary(events: list[AuditEvent]) -> list[tuple[str, str, str, str]]:
    return [(e.action, e.namespace, e.target, e.actor_user) for e in events]


def test_every_metadata_change_is_audited(actors):
    alice, root = actors.client("alice"), actors.client("root")
    acme = f"{API}/namespaces/acme"
    gpt = f"{acme}/models/gpt"
    steps = [
        (lambda: alice.post(f"{API}/namespaces", {"name": "labs"}, format="json"), 201,
         ("namespace.create", "labs", "labs", "alice")),
        (lambda: root.patch(acme, {"description": "ours"}, format="json"), 200,
         ("namespace.update", "acme", "acme", "root")),
        (lambda: root.post(f"{acme}/members", {"username": "carol", "role": "reviewer"},
                           format="json"), 200,
         ("member.set", "acme", "acme/members/carol", "root")),
        (lambda: root.delete(f"{acme}/members/carol"), 204,
         ("member.remove", "acme", "acme/members/carol", "root")),
        (lambda: alice.post(f"{acme}/models", {"name": "gpt"}, format="json"), 201,
         ("model.create", "acme", "acme/gpt", "alice")),
        (lambda: alice.patch(gpt, {"description": "v2"}, format="json"), 200,
         ("model.update", "acme", "acme/gpt", "alice")),
        (lambda: alice.post(f"{gpt}/versions", {}, format="json"), 201,
         ("version.create", "acme", "acme/gpt/v1", "alice")),
        (lambda: alice.put(f"{gpt}/versions/1/files/a.bin", b"x", content_type=OCTET), 201,
         ("artifact.upload", "acme", "acme/gpt/v1/a.bin", "alice")),
        (lambda: alice.post(f"{gpt}/versions/1/submit"), 202,
         ("version.submit", "acme", "acme/gpt/v1", "alice")),
        (lambda: root.delete(gpt), 204,
         ("model.delete", "acme", "acme/gpt", "root")),
    ]  # fmt: skip
    for call, status, expected in steps:
        _r, new = run(call, status)
        assert summary(new) == [expected]
        assert new[0].outcome == AuditOutcome.SUCCESS
    assert AuditEvent.objects.get(action="member.set").details == {
        "role": "reviewer",
        "previous_role": "viewer",
    }
    assert not RegisteredModel.objects.filter(name="gpt").exists()

    r, new = run(lambda: alice.post(f"{API}/tokens", {"scopes": ["read"]}, format="json"), 201)
    minted = r.json()
    assert summary(new) == [("token.create", "", f"token:{minted['id']}", "alice")]
    assert new[0].details["owner"] == "alice"
    assert not leaks(new[0], secret_of(minted["token"]))
    _r, new = run(lambda: alice.delete(f"{API}/tokens/{minted['id']}"), 204)
    assert summary(new) == [("token.revoke", "", f"token:{minted['id']}", "alice")]
    assert audit.audit_verify().ok


def test_failed_metadata_changes_leave_no_event(actors, draft):
    alice, root = actors.client("alice"), actors.client("root")
    models = f"{API}/namespaces/acme/models"
    r, new = run(lambda: alice.post(models, {"name": "bert"}, format="json"), 409)
    assert r.json()["code"] == "already_exists"
    assert new == []
    assert RegisteredModel.objects.filter(name="bert").count() == 1
    _r, new = run(
        lambda: root.post(
            f"{API}/namespaces/acme/members",
            {"username": "nobody", "role": "viewer"},
            format="json",
        ),
        404,
    )
    assert new == []
    _r, new = run(lambda: root.delete(f"{API}/namespaces/acme/members/root"), 409)  # last admin
    assert new == []
    _r, new = run(lambda: alice.post(f"{API}/namespaces", {"name": "acme"}, format="json"), 409)
    assert new == []
    # Control: a model that does not exist yet is created and recorded.
    _r, new = run(lambda: alice.post(models, {"name": "bert2"}, format="json"), 201)
    assert summary(new) == [("model.create", "acme", "acme/bert2", "alice")]


# --- 8. Request id and client address --------------------------------------------------------


def test_request_id_is_echoed_and_recorded_on_every_event_of_the_request(actors, draft):
    alice = actors.client("alice")
    r, new = run(lambda: put(alice, "a.bin", b"abc", HTTP_X_REQUEST_ID="abc-123"), 201)
    assert r["X-Request-ID"] == "abc-123"
    assert [(e.action, e.request_id, e.client_ip) for e in new] == [
        (AuditAction.ARTIFACT_UPLOAD, "abc-123", "127.0.0.1")
    ]
    # A resumable upload's completion writes two events in one request: both carry the id.
    r = alice.post(f"{VERSION}/uploads", {"path": "b.bin", "size": 3}, format="json")
    assert r.status_code == 201
    upload = f"{VERSION}/uploads/{r.json()['id']}"
    assert alice.put(f"{upload}/parts/1", b"xyz", content_type=OCTET).status_code == 200
    r, new = run(lambda: alice.post(f"{upload}/complete", HTTP_X_REQUEST_ID="req.77_b"), 201)
    assert r["X-Request-ID"] == "req.77_b"
    assert [(e.action, e.request_id) for e in new] == [
        (AuditAction.UPLOAD_COMPLETE, "req.77_b"),
        (AuditAction.ARTIFACT_UPLOAD, "req.77_b"),
    ]


@pytest.mark.parametrize(
    "supplied",
    [None, "", "has space", "x" * 65, 'inject"}\n{"seq":1', "é"],
    ids=["missing", "empty", "space", "too-long", "injection", "non-ascii"],
)
def test_missing_or_unsafe_request_id_is_replaced_by_a_generated_one(actors, draft, supplied):
    alice = actors.client("alice")
    headers = {} if supplied is None else {"HTTP_X_REQUEST_ID": supplied}
    r, new = run(lambda: put(alice, "a.bin", b"abc", **headers), 201)
    generated = r["X-Request-ID"]
    assert generated != supplied
    assert len(generated) == 32
    assert set(generated) <= set("0123456789abcdef")
    assert new[0].request_id == generated
    r2 = alice.get(f"{FILES}/a.bin", **headers)
    assert r2["X-Request-ID"] != generated  # one id per request


def test_client_ip_is_recorded_and_x_forwarded_for_is_not_trusted_by_default(
    actors, draft, settings
):
    alice = actors.client("alice")
    spoof = {"REMOTE_ADDR": "198.51.100.7", "HTTP_X_FORWARDED_FOR": "203.0.113.9"}
    _r, new = run(lambda: put(alice, "a.bin", b"abc", **spoof), 201)
    assert new[0].client_ip == "198.51.100.7"
    # Control: behind a trusted proxy, the forwarded address is the client's.
    settings.SMR_TRUST_X_FORWARDED_FOR = True
    _r, new = run(lambda: put(alice, "b.bin", b"abc", **spoof), 201)
    assert new[0].client_ip == "203.0.113.9"


# --- 9. After all of it, the log verifies -------------------------------------------------------


def test_log_verifies_after_all_that_activity(actors, activity, settings):
    alice, dave = actors.client("alice"), actors.client("dave")
    assert audit.audit_checkpoint_create() is not None
    assert bearer(f"{actors.tokens['alice']}x").get(f"{API}/namespaces").status_code == 401
    assert authenticate(request=None, username="bob", password="nope") is None
    assert dave.get(f"{FILES}/w.bin").status_code == 403
    assert put(alice, "w.bin", b"\x00 odd bytes \x00", HTTP_X_REQUEST_ID="r-1").status_code == 201
    assert alice.get(f"{FILES}/w.bin", HTTP_RANGE="bytes=1-3").status_code == 206
    assert alice.post(f"{VERSION}/submit").status_code == 202
    assert export_lines(dave.get(f"{AUDIT}/events/export"))
    assert dave.post(f"{AUDIT}/verify").json()["ok"] is True
    assert audit.audit_checkpoint_create() is not None

    report = audit.audit_verify()
    assert report.ok, report.findings
    assert report.entries == last_seq() == AuditEvent.objects.count()
    assert report.checkpoints == 2
    out = io.StringIO()
    call_command("verify_audit", stdout=out)
    assert f"audit log OK: {report.entries} entries, 2 signed checkpoints" in out.getvalue()
    out = io.StringIO()
    call_command("verify_audit", "--json", stdout=out)
    assert json.loads(out.getvalue())["ok"] is True
