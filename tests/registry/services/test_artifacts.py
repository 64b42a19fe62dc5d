"""Encryption at rest, tampering, key rotation and storage outages, on real stores and keys."""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import uuid
from datetime import timedelta

import boto3
import pytest
from django.core.management import call_command
from django.db import connection

from registry import keyconfig, storage
from registry.crypto.stream import (
    FIRST_SEGMENT_PLAINTEXT,
    HEADER_SIZE,
    SEGMENT_PLAINTEXT,
    SEGMENT_SIZE,
)
from registry.errors import IntegrityFailure, StorageUnavailable
from registry.models import Artifact, PendingObject
from registry.services import janitor
from registry.services.artifacts import artifact_unwrap_dek, artifact_upload
from tests.conftest import FILES, REGION, s3_client, use_kms, use_s3
from tests.support.netproxy import TcpProxy
from tests.support.objects import pattern, pattern_bytes, read_object, write_object
from tests.support.tinkutil import tink_decrypt, tink_encrypt, tink_streaming_aead

OCTET = "application/octet-stream"
THREE_SEGMENTS = FIRST_SEGMENT_PLAINTEXT + SEGMENT_PLAINTEXT + 1000


def upload(actors, path: str, data: bytes) -> Artifact:
    r = actors.client("alice").put(f"{FILES}/{path}", data, content_type=OCTET)
    assert r.status_code == 201, r.content
    return Artifact.objects.select_related("version__model__namespace").get(path=path)


def download(actors, path: str):
    return actors.client("alice").get(f"{FILES}/{path}")


def all_stored_bytes(settings) -> list[bytes]:
    if settings.SMR_STORAGE == "fs":
        return [p.read_bytes() for p in settings.SMR_OBJECTS_DIR.rglob("*") if p.is_file()]
    s3 = s3_client(settings.S3_ENDPOINT_URL)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=settings.S3_BUCKET).get("Contents", [])]
    return [s3.get_object(Bucket=settings.S3_BUCKET, Key=k)["Body"].read() for k in keys]


def all_db_bytes() -> bytes:
    """Every value of every table, as bytes (bytea raw, everything else as text)."""
    out = bytearray()
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f'SELECT * FROM "{table}"')
            for row in cursor.fetchall():
                for value in row:
                    if isinstance(value, memoryview | bytes):
                        out += bytes(value)
                    else:
                        out += str(value).encode()
    return bytes(out)


def test_no_plaintext_or_data_key_at_rest(actors, draft, store_kind, settings):
    marker = f"SMR-MARKER-{uuid.uuid4().hex}".encode()
    data = (marker + b"\n") * 50_000  # ~2.5 MiB: several segments all full of the marker
    artifact = upload(actors, "secret.txt", data)
    assert b"".join(download(actors, "secret.txt").streaming_content) == data  # control

    stored = all_stored_bytes(settings)
    assert len(stored) == 1
    db = all_db_bytes()
    dek = artifact_unwrap_dek(artifact)
    forms = [dek, dek.hex().encode(), base64.b64encode(dek), base64.urlsafe_b64encode(dek)]
    keyring = settings.SMR_KEYRING_FILE.read_bytes()
    for blob in [*stored, db, keyring]:
        assert marker not in blob
        for form in forms:
            assert form not in blob
    # Control: the marker search would have found plaintext.
    assert marker in data


# --- Interop with Tink, at the artifact level -------------------------------------------------


def test_stored_object_decrypts_with_tink(actors, draft, store_kind):
    data = pattern_bytes(THREE_SEGMENTS, seed=11)
    artifact = upload(actors, "m.bin", data)
    primitive = tink_streaming_aead(artifact_unwrap_dek(artifact))
    ad = f"smr:artifact:v1:{artifact.id}".encode()
    assert tink_decrypt(primitive, read_object(artifact.object_key), ad) == data


def test_tink_written_object_is_served_by_registry(actors, draft):
    data = pattern_bytes(SEGMENT_SIZE * 2 + 5, seed=12)
    artifact = upload(actors, "m.bin", b"placeholder of another size")
    primitive = tink_streaming_aead(artifact_unwrap_dek(artifact))
    ad = f"smr:artifact:v1:{artifact.id}".encode()
    write_object(artifact.object_key, tink_encrypt(primitive, data, ad))
    Artifact.objects.filter(pk=artifact.pk).update(
        size=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    r = download(actors, "m.bin")
    assert b"".join(r.streaming_content) == data
    r = actors.client("alice").get(f"{FILES}/m.bin", HTTP_RANGE="bytes=1048000-1049000")
    assert b"".join(r.streaming_content) == data[1048000:1049001]


# --- Tampering -----------------------------------------------------------------------------


def tamper(artifact: Artifact, change) -> None:
    write_object(artifact.object_key, change(bytearray(read_object(artifact.object_key))))


def flip(offset: int):
    def change(buf: bytearray) -> bytes:
        buf[offset] ^= 0x01
        return bytes(buf)

    return change


def swap_segments(buf: bytearray) -> bytes:
    s1 = buf[SEGMENT_SIZE : 2 * SEGMENT_SIZE]
    s2 = buf[2 * SEGMENT_SIZE : 3 * SEGMENT_SIZE]
    assert len(s1) == len(s2)
    return bytes(buf[:SEGMENT_SIZE] + s2 + s1 + buf[3 * SEGMENT_SIZE :])


FOUR_SEGMENTS = FIRST_SEGMENT_PLAINTEXT + 3 * SEGMENT_PLAINTEXT  # exactly 4 full segments


@pytest.mark.parametrize(
    ("change", "good_prefix"),
    [
        (flip(HEADER_SIZE + 10), 0),  # segment 0
        (flip(5), 0),  # salt in the header
        (flip(2 * SEGMENT_SIZE + 100), FIRST_SEGMENT_PLAINTEXT + SEGMENT_PLAINTEXT),  # segment 2
        (lambda b: bytes(b[: 3 * SEGMENT_SIZE]), FIRST_SEGMENT_PLAINTEXT + 2 * SEGMENT_PLAINTEXT),
        (swap_segments, FIRST_SEGMENT_PLAINTEXT),
        (lambda b: bytes(b[:-1]), FIRST_SEGMENT_PLAINTEXT + 2 * SEGMENT_PLAINTEXT),
    ],
    ids=[
        "flip-seg0",
        "flip-header",
        "flip-seg2",
        "truncate-at-boundary",
        "swap-segments",
        "truncate-one-byte",
    ],
)
def test_tampered_object_never_served(actors, draft, store_kind, caplog, change, good_prefix):
    data = pattern_bytes(FOUR_SEGMENTS, seed=5)
    artifact = upload(actors, "m.bin", data)
    tamper(artifact, change)
    caplog.set_level(logging.ERROR)
    r = download(actors, "m.bin")
    if good_prefix == 0:
        # Detected before any byte was sent: a clean error response.
        assert r.status_code == 502
        assert r.json()["code"] == "integrity_error"
    else:
        assert r.status_code == 200
        received = bytearray()
        with pytest.raises(IntegrityFailure):
            for chunk in r.streaming_content:
                received += chunk
        # Only authenticated segments before the bad one were sent (the decryptor may stop
        # earlier, e.g. once it sees the object is short), never a byte from the bad one.
        assert data.startswith(bytes(received))
        assert len(received) <= good_prefix
    assert any("integrity failure" in rec.getMessage() for rec in caplog.records)


def test_object_swapped_with_another_artifacts_fails(actors, draft, store_kind):
    data_a = pattern_bytes(THREE_SEGMENTS, seed=1)
    data_b = pattern_bytes(THREE_SEGMENTS, seed=2)
    a = upload(actors, "a.bin", data_a)
    b = upload(actors, "b.bin", data_b)
    write_object(a.object_key, read_object(b.object_key))
    r = download(actors, "a.bin")
    assert r.status_code == 502
    assert r.json()["code"] == "integrity_error"
    # Control: b itself is intact and still served.
    assert b"".join(download(actors, "b.bin").streaming_content) == data_b


def test_wrong_kek_fails(actors, draft, settings):
    upload(actors, "a.bin", b"model bytes")
    # Replace the keyring with a different one: same key id, different key material.
    settings.SMR_KEYRING_FILE.unlink()
    keyconfig.reset()
    keyconfig.local_keyring()
    r = download(actors, "a.bin")
    assert r.status_code == 502
    assert r.json()["code"] == "integrity_error"


def test_range_inside_intact_segments_of_tampered_object_is_served(actors, draft):
    data = pattern_bytes(FOUR_SEGMENTS, seed=6)
    artifact = upload(actors, "m.bin", data)
    tamper(artifact, flip(3 * SEGMENT_SIZE + 7))  # last segment
    r = actors.client("alice").get(f"{FILES}/m.bin", HTTP_RANGE="bytes=10-2000")
    assert r.status_code == 206
    assert b"".join(r.streaming_content) == data[10:2001]
    r = actors.client("alice").get(f"{FILES}/m.bin", HTTP_RANGE="bytes=-10")
    assert r.status_code == 502


# --- Key rotation --------------------------------------------------------------------------


def stored_digests() -> dict[str, str]:
    return {
        a.object_key: hashlib.sha256(read_object(a.object_key)).hexdigest()
        for a in Artifact.objects.all()
    }


def assert_all_download(actors, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        r = download(actors, path)
        assert r.status_code == 200
        assert b"".join(r.streaming_content) == data


def test_rewrap_local_to_new_local_key(actors, draft):
    files = {f"f{i}.bin": pattern_bytes(1000 * i + 1, seed=i) for i in range(5)}
    for path, data in files.items():
        upload(actors, path, data)
    before = stored_digests()
    wrapped_before = {a.pk: bytes(a.wrapped_dek) for a in Artifact.objects.all()}
    assert set(Artifact.objects.values_list("kek_id", flat=True)) == {"local:k1"}

    call_command("rewrap_keys", "--new-local-key", stdout=open("/dev/null", "w"))  # noqa: SIM115

    assert set(Artifact.objects.values_list("kek_id", flat=True)) == {"local:k2"}
    for a in Artifact.objects.all():
        assert bytes(a.wrapped_dek) != wrapped_before[a.pk]
    assert stored_digests() == before
    assert_all_download(actors, files)
    # Idempotent: a second run moves nothing and breaks nothing.
    call_command("rewrap_keys", "--to-local", stdout=open("/dev/null", "w"))  # noqa: SIM115
    assert_all_download(actors, files)


def test_rewrap_kms_to_new_kms_key_and_local_to_kms(
    actors, draft, settings, moto_endpoint, kms_key_id
):
    local_files = {"old.bin": b"wrapped locally"}
    upload(actors, "old.bin", local_files["old.bin"])
    use_kms(settings, moto_endpoint, kms_key_id)
    kms_files = {"new.bin": pattern_bytes(SEGMENT_SIZE + 3, seed=9)}
    upload(actors, "new.bin", kms_files["new.bin"])
    files = {**local_files, **kms_files}
    assert Artifact.objects.get(path="new.bin").kek_id == f"aws-kms:{kms_key_id}"
    before = stored_digests()

    kms = boto3.client("kms", endpoint_url=moto_endpoint, region_name=REGION)
    second = kms.create_key(Description="rotated KEK")["KeyMetadata"]["Arn"]
    call_command("rewrap_keys", "--to-kms-key", second, stdout=open("/dev/null", "w"))  # noqa: SIM115

    assert set(Artifact.objects.values_list("kek_id", flat=True)) == {f"aws-kms:{second}"}
    assert stored_digests() == before
    assert_all_download(actors, files)
    # Disabling the old key proves nothing still depends on it.
    kms.disable_key(KeyId=kms_key_id.rsplit("/", 1)[1])
    assert_all_download(actors, files)


# --- Storage outage ------------------------------------------------------------------------


@pytest.fixture
def s3_behind_proxy(settings, moto_endpoint, s3_bucket):
    port = int(moto_endpoint.rsplit(":", 1)[1])
    proxy = TcpProxy("127.0.0.1", port, bytes_per_second=8 << 20)
    proxy.start()
    use_s3(settings, f"http://127.0.0.1:{proxy.port}", s3_bucket)
    yield proxy
    proxy.stop()
    storage.get_object_store.cache_clear()


def multipart_uploads(moto_endpoint: str, bucket: str) -> list:
    return s3_client(moto_endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def test_outage_mid_upload_leaves_nothing(
    actors, draft, settings, moto_endpoint, s3_bucket, s3_behind_proxy
):
    proxy = s3_behind_proxy
    size = 24 << 20

    def cut_mid_stream():
        sent = 0
        for chunk in pattern(size):
            yield chunk
            sent += len(chunk)
            if sent == 12 << 20:
                proxy.cut()

    with pytest.raises(StorageUnavailable):
        artifact_upload(
            version=draft,
            path="big.bin",
            chunks=cut_mid_stream(),
            expected_sha256=None,
            expected_size=size,
            creator=actors.users["alice"],
        )
    assert not Artifact.objects.exists()
    # The store was down for the abort too: the pending record remembers what to clean.
    assert PendingObject.objects.count() == 1
    assert PendingObject.objects.get().abandoned_at is not None
    proxy.restore()
    # The request gave up on it, so the janitor cleans it at once, without the grace period
    # that protects uploads still in flight.
    cleaned, left = janitor.objects_cleanup(older_than=timedelta(days=1))
    assert (cleaned, left) == (1, 0)
    assert multipart_uploads(moto_endpoint, s3_bucket) == []
    assert s3_client(moto_endpoint).list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0


def test_outage_during_api_upload_is_503(actors, draft, moto_endpoint, s3_bucket, s3_behind_proxy):
    proxy = s3_behind_proxy
    timer = threading.Timer(0.5, proxy.cut)  # the throttled proxy makes this land mid-upload
    timer.start()
    try:
        r = actors.client("alice").put(
            f"{FILES}/big.bin", pattern_bytes(40 << 20), content_type=OCTET
        )
    finally:
        timer.cancel()
    assert r.status_code == 503
    assert r.json()["code"] == "storage_unavailable"
    assert actors.client("alice").get(FILES).json()["results"] == []
    proxy.restore()
    janitor.objects_cleanup(older_than=timedelta(days=1))
    assert multipart_uploads(moto_endpoint, s3_bucket) == []
    assert not PendingObject.objects.exists()


def test_store_down_before_upload_is_503_and_download_503(actors, draft, s3_behind_proxy):
    data = b"x" * 1000
    upload(actors, "a.bin", data)
    s3_behind_proxy.cut()
    r = actors.client("alice").put(f"{FILES}/b.bin", b"y", content_type=OCTET)
    assert r.status_code == 503
    r = download(actors, "a.bin")
    assert r.status_code == 503
    assert r.json()["code"] == "storage_unavailable"
    s3_behind_proxy.restore()
    assert b"".join(download(actors, "a.bin").streaming_content) == data
