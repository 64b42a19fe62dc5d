"""Key service outages through the API: moto's KMS behind a TCP proxy the test cuts."""

from __future__ import annotations

import pytest

from registry.models import Artifact, AuditAction, AuditEvent, PendingObject, UploadPart
from tests.conftest import FILES, use_kms
from tests.support.http import OCTET, body, put
from tests.support.netproxy import TcpProxy

VERSION = FILES.rsplit("/files", 1)[0]
MIB = 1 << 20
SECRET = b"weights that must not leak " * 1000


@pytest.fixture
def kms_proxy(settings, moto_endpoint, kms_key_id):
    port = int(moto_endpoint.rsplit(":", 1)[1])
    with TcpProxy("127.0.0.1", port) as proxy:
        use_kms(settings, f"http://127.0.0.1:{proxy.port}", kms_key_id)
        yield proxy


def stored_files(settings) -> list[str]:
    root = settings.SMR_OBJECTS_DIR
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def assert_key_service_unavailable(response) -> None:
    assert response.status_code == 503, getattr(response, "content", b"")[:300]
    assert not response.streaming  # an error document, never a started download
    assert response.json()["code"] == "key_service_unavailable"


def test_kms_down_put_and_get_are_503_and_nothing_is_stored(actors, draft, settings, kms_proxy):
    alice = actors.client("alice")
    # Control: with KMS reachable the same calls work, and the key really is KMS's.
    assert put(alice, "a.bin", SECRET).status_code == 201
    assert Artifact.objects.get(path="a.bin").kek_id.startswith("aws-kms:")
    assert body(alice.get(f"{FILES}/a.bin")) == SECRET
    before = stored_files(settings)
    downloads = AuditEvent.objects.filter(action=AuditAction.ARTIFACT_DOWNLOAD).count()

    kms_proxy.cut()
    r = put(alice, "b.bin", b"new bytes")
    assert_key_service_unavailable(r)
    assert list(Artifact.objects.values_list("path", flat=True)) == ["a.bin"]
    assert stored_files(settings) == before
    assert not PendingObject.objects.exists()

    r = alice.get(f"{FILES}/a.bin")
    assert_key_service_unavailable(r)
    assert SECRET[:64] not in r.content
    # Nothing was sent, so no download is on record.
    assert AuditEvent.objects.filter(action=AuditAction.ARTIFACT_DOWNLOAD).count() == downloads

    kms_proxy.restore()
    assert body(alice.get(f"{FILES}/a.bin")) == SECRET


def test_kms_down_resumable_upload_is_503_and_nothing_is_stored(actors, draft, settings, kms_proxy):
    alice = actors.client("alice")
    r = alice.post(
        f"{VERSION}/uploads", {"path": "x.bin", "size": MIB + 1, "part_size": MIB}, format="json"
    )
    assert r.status_code == 201, r.content
    sid = r.json()["id"]

    kms_proxy.cut()
    r = alice.put(f"{VERSION}/uploads/{sid}/parts/2", b"x", content_type=OCTET)
    assert_key_service_unavailable(r)
    assert not UploadPart.objects.exists()
    r = alice.post(f"{VERSION}/uploads", {"path": "y.bin", "size": 10}, format="json")
    assert_key_service_unavailable(r)
    assert stored_files(settings) == []
    assert not PendingObject.objects.exists()

    # Control: the same part goes through once KMS is back.
    kms_proxy.restore()
    r = alice.put(f"{VERSION}/uploads/{sid}/parts/2", b"x", content_type=OCTET)
    assert r.status_code == 200, r.content
    assert UploadPart.objects.count() == 1
