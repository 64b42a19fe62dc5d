"""Streamed, encrypted file upload and download through the REST API, on both stores."""

from __future__ import annotations

import hashlib

import pytest
import requests

from registry.crypto.stream import FIRST_SEGMENT_PLAINTEXT, SEGMENT_PLAINTEXT
from registry.models import Artifact, PendingObject
from tests.conftest import FILES
from tests.support.http import OCTET, body, digest_header, put
from tests.support.objects import IterBody, pattern, pattern_bytes, pattern_sha256


@pytest.mark.parametrize(
    "size",
    [
        0,
        1,
        FIRST_SEGMENT_PLAINTEXT,
        FIRST_SEGMENT_PLAINTEXT + 1,
        FIRST_SEGMENT_PLAINTEXT + SEGMENT_PLAINTEXT,
    ],
    ids=["empty", "one-byte", "one-segment", "segment-plus-one", "two-segments"],
)
def test_round_trip(actors, draft, store_kind, size):
    data = pattern_bytes(size, seed=size)
    alice = actors.client("alice")
    r = put(alice, "weights/model.bin", data, HTTP_CONTENT_DIGEST=digest_header(data))
    assert r.status_code == 201, r.content
    assert r.json()["size"] == size
    assert r.json()["sha256"] == hashlib.sha256(data).hexdigest()

    r = alice.get(f"{FILES}/weights/model.bin")
    assert r.status_code == 200
    assert body(r) == data
    assert r["Content-Length"] == str(size)
    assert r["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert r["Content-Digest"] == digest_header(data)

    head = alice.head(f"{FILES}/weights/model.bin")
    assert head.status_code == 200
    assert head["Content-Length"] == str(size)
    assert head["Content-Digest"] == digest_header(data)


@pytest.mark.slow
def test_round_trip_200_mib_streamed(actors, draft, store_kind, live_server):
    """200 MiB through a real HTTP server, streamed both ways, digest checked by the client."""
    size = 200 << 20
    expected = pattern_sha256(size, seed=7)
    headers = {"Authorization": f"Bearer {actors.tokens['alice']}", "Content-Type": OCTET}
    url = f"{live_server.url}{FILES}/big/model.safetensors"
    r = requests.put(url, data=IterBody(pattern(size, seed=7), size), headers=headers, timeout=300)
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == expected

    h = hashlib.sha256()
    got = 0
    with requests.get(url, headers=headers, stream=True, timeout=300) as r:
        assert r.status_code == 200
        for chunk in r.iter_content(1 << 20):
            h.update(chunk)
            got += len(chunk)
    assert got == size
    assert h.hexdigest() == expected


def test_upload_replaces_file_in_draft_and_deletes_old_object(actors, draft, settings):
    alice = actors.client("alice")
    assert put(alice, "a.bin", b"first").status_code == 201
    old_key = Artifact.objects.get(path="a.bin").object_key
    assert put(alice, "a.bin", b"second").status_code == 201
    assert body(alice.get(f"{FILES}/a.bin")) == b"second"
    assert not (settings.SMR_OBJECTS_DIR / old_key).exists()
    assert Artifact.objects.filter(path="a.bin").count() == 1


def test_list_files(actors, draft):
    alice = actors.client("alice")
    for name in ["b.bin", "a/c.json"]:
        put(alice, name, name.encode())
    r = alice.get(FILES)
    assert r.status_code == 200
    paths = [f["path"] for f in r.json()["results"]]
    assert paths == ["a/c.json", "b.bin"]
    detail = alice.get(FILES.rsplit("/files", 1)[0]).json()
    assert {f["path"] for f in detail["files"]} == {"a/c.json", "b.bin"}
    assert detail["number"] == 1 and detail["state"] == "draft"


# --- Range ---------------------------------------------------------------------------------

RANGE_SIZE = FIRST_SEGMENT_PLAINTEXT + 2 * SEGMENT_PLAINTEXT + 1000


@pytest.fixture
def ranged(actors, draft, store_kind):
    data = pattern_bytes(RANGE_SIZE, seed=3)
    assert put(actors.client("alice"), "r.bin", data).status_code == 201
    return data


B0 = FIRST_SEGMENT_PLAINTEXT  # first byte of segment 1
B1 = FIRST_SEGMENT_PLAINTEXT + SEGMENT_PLAINTEXT  # first byte of segment 2


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-0", 0, 1),
        (f"bytes={RANGE_SIZE - 1}-{RANGE_SIZE - 1}", RANGE_SIZE - 1, RANGE_SIZE),
        (f"bytes={B0 - 10}-{B0 + 9}", B0 - 10, B0 + 10),
        (f"bytes={B0 - 1}-{B1}", B0 - 1, B1 + 1),
        (f"bytes=100-{B1 + 5000}", 100, B1 + 5001),
        ("bytes=-500", RANGE_SIZE - 500, RANGE_SIZE),
        (f"bytes=-{RANGE_SIZE + 10}", 0, RANGE_SIZE),
        (f"bytes={B1 + 3}-", B1 + 3, RANGE_SIZE),
        (f"bytes=5-{RANGE_SIZE + 100}", 5, RANGE_SIZE),
    ],
    ids=[
        "first",
        "last",
        "across-0-1",
        "two-boundaries",
        "three-segments",
        "suffix",
        "suffix-too-long",
        "open",
        "end-past-eof",
    ],
)
def test_range(actors, ranged, header, start, end):
    r = actors.client("alice").get(f"{FILES}/r.bin", HTTP_RANGE=header)
    assert r.status_code == 206
    assert body(r) == ranged[start:end]
    assert r["Content-Range"] == f"bytes {start}-{end - 1}/{RANGE_SIZE}"
    assert r["Content-Length"] == str(end - start)
    assert "Content-Digest" not in r  # the partial body's digest is not the file's
    assert r["Repr-Digest"] == digest_header(ranged)


@pytest.mark.parametrize(
    "header", [f"bytes={RANGE_SIZE}-", f"bytes={RANGE_SIZE + 5}-{RANGE_SIZE + 9}", "bytes=-0"]
)
def test_range_unsatisfiable(actors, ranged, header):
    r = actors.client("alice").get(f"{FILES}/r.bin", HTTP_RANGE=header)
    assert r.status_code == 416
    assert r.json()["code"] == "range_not_satisfiable"
    assert r["Content-Range"] == f"bytes */{RANGE_SIZE}"


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "items=0-5", "bytes=9-3", "bytes=abc"])
def test_unsupported_or_malformed_range_sends_whole_file(actors, ranged, header):
    r = actors.client("alice").get(f"{FILES}/r.bin", HTTP_RANGE=header)
    assert r.status_code == 200
    assert hashlib.sha256(body(r)).digest() == hashlib.sha256(ranged).digest()


def test_range_on_empty_file_is_416(actors, draft):
    alice = actors.client("alice")
    put(alice, "empty", b"")
    assert alice.get(f"{FILES}/empty", HTTP_RANGE="bytes=0-").status_code == 416


def test_if_none_match_gives_304(actors, draft):
    alice = actors.client("alice")
    etag = put(alice, "x", b"abc")["ETag"]
    r = alice.get(f"{FILES}/x", HTTP_IF_NONE_MATCH=etag)
    assert r.status_code == 304


# --- Bad input -----------------------------------------------------------------------------


def nothing_stored(settings) -> None:
    assert not Artifact.objects.exists()
    assert not PendingObject.objects.exists()
    objects = settings.SMR_OBJECTS_DIR
    leftovers = [p for p in objects.rglob("*") if p.is_file()] if objects.exists() else []
    assert leftovers == []


def test_no_token_is_401(actors, draft):
    from rest_framework.test import APIClient

    r = APIClient().put(f"{FILES}/a.bin", b"x", content_type=OCTET)
    assert r.status_code == 401
    assert r.json()["code"] == "not_authenticated"
    assert r["WWW-Authenticate"].startswith("Bearer")


def test_bad_token_is_401(actors, draft):
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer smr_0123456789ab_notthesecret")
    r = client.get(f"{FILES}/a.bin")
    assert r.status_code == 401
    assert r.json()["code"] == "authentication_failed"


def test_other_namespace_is_404_not_403(actors, draft):
    mallory = actors.client("mallory")
    put(actors.client("alice"), "a.bin", b"secret")
    for r in [
        mallory.get(f"{FILES}/a.bin"),
        mallory.head(f"{FILES}/a.bin"),
        put(mallory, "b.bin", b"x"),
        mallory.get(FILES),
    ]:
        assert r.status_code == 404
    # Control: the same requests by a member succeed, so the 404 is the permission check.
    assert actors.client("alice").get(f"{FILES}/a.bin").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "../etc/passwd",
        "a/../../b",
        "a/./b",
        "/abs/path",
        "a\\b",
        "a%00b",
        "a//b",
        "a/",
        "x" * 1025,
        "dir/" + "é" * 511,  # 1026 bytes in UTF-8
        "a%0Ab",
    ],
    ids=[
        "dotdot",
        "dotdot-inner",
        "dot",
        "absolute",
        "backslash",
        "nul",
        "empty-segment",
        "trailing-slash",
        "too-long",
        "too-long-utf8",
        "newline",
    ],
)
def test_odd_paths_are_400(actors, draft, settings, path):
    r = put(actors.client("alice"), path, b"data")
    assert r.status_code == 400, r.content
    assert r.json()["code"] == "invalid_path"
    nothing_stored(settings)


def test_longest_allowed_path_works(actors, draft):
    path = "d/" + "x" * 1022
    assert put(actors.client("alice"), path, b"ok").status_code == 201


def test_digest_mismatch_is_400_and_nothing_stored(actors, draft, store_kind, settings):
    r = put(
        actors.client("alice"), "a.bin", b"real bytes", HTTP_CONTENT_DIGEST=digest_header(b"other")
    )
    assert r.status_code == 400
    assert r.json()["code"] == "digest_mismatch"
    nothing_stored(settings)
    if store_kind == "s3":
        from tests.conftest import s3_client

        s3 = s3_client(settings.S3_ENDPOINT_URL)
        assert s3.list_objects_v2(Bucket=settings.S3_BUCKET).get("KeyCount", 0) == 0
        assert not s3.list_multipart_uploads(Bucket=settings.S3_BUCKET).get("Uploads")


@pytest.mark.parametrize("header", ["sha-256=abc", "sha-256=:!!!:", "sha-256=:AAAA:"])
def test_malformed_content_digest_is_400(actors, draft, settings, header):
    r = put(actors.client("alice"), "a.bin", b"x", HTTP_CONTENT_DIGEST=header)
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_input"
    nothing_stored(settings)


def test_upload_to_submitted_version_is_409(actors, draft, settings):
    alice = actors.client("alice")
    put(alice, "a.bin", b"x")
    assert alice.post(f"{FILES.rsplit('/files', 1)[0]}/submit").status_code == 202
    r = put(alice, "b.bin", b"y")
    assert r.status_code == 409
    assert r.json()["code"] == "version_not_draft"
    assert alice.delete(f"{FILES}/a.bin").status_code == 409
    assert list(Artifact.objects.values_list("path", flat=True)) == ["a.bin"]


def test_over_max_size_is_413(actors, draft, settings):
    settings.SMR_MAX_ARTIFACT_SIZE = 1000
    r = put(actors.client("alice"), "a.bin", b"x" * 1001)
    assert r.status_code == 413
    assert r.json()["code"] == "too_large"
    assert r.json()["extra"]["limit"] == 1000
    nothing_stored(settings)
    assert put(actors.client("alice"), "a.bin", b"x" * 1000).status_code == 201


def test_viewer_and_auditor_cannot_upload_or_read_draft_bytes(actors, draft):
    put(actors.client("alice"), "a.bin", b"x")
    assert put(actors.client("carol"), "b.bin", b"x").status_code == 403
    assert actors.client("carol").get(f"{FILES}/a.bin").status_code == 403
    assert actors.client("dave").get(f"{FILES}/a.bin").status_code == 403
    # Both may read the metadata.
    assert actors.client("carol").get(FILES).status_code == 200
    assert actors.client("dave").get(FILES).status_code == 200


def test_delete_file_in_draft(actors, draft, settings):
    alice = actors.client("alice")
    put(alice, "a.bin", b"x")
    assert alice.delete(f"{FILES}/a.bin").status_code == 204
    assert alice.get(f"{FILES}/a.bin").status_code == 404
    nothing_stored(settings)
