"""Resumable uploads and broken connections, through a real HTTP server."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import pytest
import requests

from registry.models import Artifact, PendingObject, UploadPart
from tests.conftest import FILES
from tests.support.objects import IterBody, pattern, pattern_sha256

VERSION = FILES.rsplit("/files", 1)[0]
MIB = 1 << 20


def auth(actors, name: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {actors.tokens[name]}"}


def part_chunks(total: int, part_size: int, number: int, seed: int):
    """The bytes of part `number` of pattern(total, seed), streamed."""
    start = (number - 1) * part_size
    end = min(start + part_size, total)
    pos = 0
    for chunk in pattern(total, seed):
        lo, hi = pos, pos + len(chunk)
        pos = hi
        if hi <= start:
            continue
        if lo >= end:
            break
        yield chunk[max(start - lo, 0) : min(end - lo, len(chunk))]


def send_partial(url: str, headers: dict[str, str], declared: int, chunks, send: int) -> bytes:
    """Open a raw connection, declare `declared` bytes, send only `send`, then hang up."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port))
    head = [f"PUT {parts.path} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {declared}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    sent = 0
    for chunk in chunks:
        piece = chunk[: send - sent]
        sock.sendall(piece)
        sent += len(piece)
        if sent >= send:
            break
    sock.shutdown(socket.SHUT_WR)  # the client "disconnects" mid-body
    sock.settimeout(30)
    reply = b""
    try:
        while data := sock.recv(65536):
            reply += data
    except OSError:
        pass
    sock.close()
    return reply


@pytest.mark.slow
def test_resumable_1_gib_with_a_resent_part(actors, draft, live_server):
    size = 1 << 30
    part_size = 64 * MIB
    seed = 42
    expected = pattern_sha256(size, seed)
    base = f"{live_server.url}{VERSION}/uploads"
    r = requests.post(
        base,
        json={
            "path": "llm/model.safetensors",
            "size": size,
            "sha256": expected,
            "part_size": part_size,
        },
        headers=auth(actors),
        timeout=30,
    )
    assert r.status_code == 201, r.text
    session = r.json()
    assert session["part_count"] == 16
    assert session["missing_parts"] == list(range(1, 17))
    url = f"{base}/{session['id']}"

    broken = 5
    for number in range(1, 17):
        part_url = f"{url}/parts/{number}"
        n = min(part_size, size - (number - 1) * part_size)
        if number == broken:
            # The connection drops halfway through part 5: nothing of it is kept.
            reply = send_partial(
                part_url, auth(actors), n, part_chunks(size, part_size, number, seed), n // 2
            )
            assert not reply or b" 400 " in reply.split(b"\r\n", 1)[0]
            continue
        r = requests.put(
            part_url,
            data=IterBody(part_chunks(size, part_size, number, seed), n),
            headers=auth(actors),
            timeout=120,
        )
        assert r.status_code == 200, r.text

    status = requests.get(url, headers=auth(actors), timeout=30).json()
    assert status["missing_parts"] == [broken]
    r = requests.post(f"{url}/complete", headers=auth(actors), timeout=30)
    assert r.status_code == 409  # not yet: part 5 is missing
    assert r.json()["extra"]["missing"] == [broken]

    n = part_size
    r = requests.put(
        f"{url}/parts/{broken}",
        data=IterBody(part_chunks(size, part_size, broken, seed), n),
        headers=auth(actors),
        timeout=120,
    )
    assert r.status_code == 200, r.text
    r = requests.post(f"{url}/complete", headers=auth(actors), timeout=600)
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == expected
    assert r.json()["size"] == size
    # Staged parts are gone once the artifact exists.
    assert not UploadPart.objects.exists()
    assert not PendingObject.objects.exists()

    # And the assembled file reads back: check a range across a part boundary.
    r = requests.get(
        f"{live_server.url}{FILES}/llm/model.safetensors",
        headers={**auth(actors), "Range": f"bytes={part_size - 10}-{part_size + 9}"},
        timeout=30,
    )
    assert r.status_code == 206
    whole = (
        b"".join(part_chunks(size, part_size, 1, seed))[-10:]
        + b"".join(part_chunks(size, part_size, 2, seed))[:10]
    )
    assert r.content == whole


def test_upload_session_digest_mismatch_and_abort(actors, draft, settings):
    alice = actors.client("alice")
    data = b"a" * (3 * MIB + 5)
    r = alice.post(
        f"{VERSION}/uploads",
        {"path": "x.bin", "size": len(data), "sha256": "0" * 64, "part_size": MIB},
        format="json",
    )
    assert r.status_code == 201
    sid = r.json()["id"]
    for k in range(1, 5):
        chunk = data[(k - 1) * MIB : k * MIB]
        r = alice.put(
            f"{VERSION}/uploads/{sid}/parts/{k}", chunk, content_type="application/octet-stream"
        )
        assert r.status_code == 200, r.content
    r = alice.post(f"{VERSION}/uploads/{sid}/complete")
    assert r.status_code == 400
    assert r.json()["code"] == "digest_mismatch"
    assert not Artifact.objects.exists()
    # The session stays open, so the client can abort it; staged parts are removed.
    r = alice.delete(f"{VERSION}/uploads/{sid}")
    assert r.status_code == 200
    assert r.json()["state"] == "aborted"
    assert not UploadPart.objects.exists()
    leftovers = [p for p in settings.SMR_OBJECTS_DIR.rglob("*") if p.is_file()]
    assert leftovers == []


def test_upload_part_size_rules(actors, draft):
    alice = actors.client("alice")
    r = alice.post(
        f"{VERSION}/uploads",
        {"path": "x.bin", "size": 2 * MIB + 1, "part_size": MIB},
        format="json",
    )
    sid = r.json()["id"]
    wrong = alice.put(
        f"{VERSION}/uploads/{sid}/parts/1", b"x" * 10, content_type="application/octet-stream"
    )
    assert wrong.status_code == 400
    assert wrong.json()["extra"]["expected"] == MIB
    assert (
        alice.put(
            f"{VERSION}/uploads/{sid}/parts/4", b"x", content_type="application/octet-stream"
        ).status_code
        == 400
    )
    assert (
        alice.put(
            f"{VERSION}/uploads/{sid}/parts/3", b"x", content_type="application/octet-stream"
        ).status_code
        == 200
    )
    bad = alice.post(f"{VERSION}/uploads", {"path": "../x", "size": 1}, format="json")
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_path"
    # Edge spaces are refused as on PUT .../files/{path}, not trimmed into another name.
    for path in ("notes ", " notes"):
        bad = alice.post(f"{VERSION}/uploads", {"path": path, "size": 1}, format="json")
        assert bad.status_code == 400 and bad.json()["code"] == "invalid_path", path
    assert actors.client("mallory").get(f"{VERSION}/uploads/{sid}").status_code == 404
    assert actors.client("carol").get(f"{VERSION}/uploads/{sid}").status_code == 403


def test_body_shorter_than_content_length_is_400_and_nothing_stored(
    actors, draft, settings, live_server
):
    url = f"{live_server.url}{FILES}/short.bin"
    reply = send_partial(url, auth(actors), 3 * MIB, pattern(3 * MIB), MIB + 17)
    status_line = reply.split(b"\r\n", 1)[0]
    assert b" 400 " in status_line, reply[:300]
    assert b'"incomplete_body"' in reply
    assert not Artifact.objects.exists()
    assert not PendingObject.objects.exists()
    assert [p for p in settings.SMR_OBJECTS_DIR.rglob("*") if p.is_file()] == []
    # Control: the same upload sent whole is accepted.
    r = requests.put(
        url, data=IterBody(pattern(3 * MIB), 3 * MIB), headers=auth(actors), timeout=30
    )
    assert r.status_code == 201
