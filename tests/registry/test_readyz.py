"""/readyz reports the database and the object store; /healthz only that the process runs."""

from __future__ import annotations

import pytest
from django.test import Client

from registry import storage
from tests.conftest import free_port, use_s3


def ready(expected: int) -> dict:
    response = Client().get("/readyz")
    assert response.status_code == expected, response.content
    if expected == 503:
        assert int(response["Retry-After"]) > 0
    else:
        assert not response.has_header("Retry-After")
    return response.json()


def test_ready_when_database_and_store_answer(db):
    assert ready(200) == {"status": "ok", "checks": {"database": "ok", "storage": "ok"}}


def test_unready_when_the_object_folder_is_unusable(db, settings, tmp_path):
    # A file where the folder should be: unusable even for root, whom permissions don't stop.
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    settings.SMR_OBJECTS_DIR = blocker / "objects"
    storage.get_object_store.cache_clear()
    body = ready(503)
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["storage"] != "ok"
    assert str(tmp_path) not in str(body)  # says what is down, not where it lives


@pytest.mark.parametrize("bucket", ["dead-endpoint", "missing-bucket"])
def test_unready_when_s3_is_unreachable_or_the_bucket_is_gone(
    db, settings, moto_endpoint, s3_bucket, bucket
):
    if bucket == "dead-endpoint":
        use_s3(settings, f"http://127.0.0.1:{free_port()}", s3_bucket)
    else:
        use_s3(settings, moto_endpoint, "no-such-bucket")
    body = ready(503)
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["storage"] != "ok"
    # Control: the same store with its real endpoint and bucket is ready.
    use_s3(settings, moto_endpoint, s3_bucket)
    assert ready(200)["checks"]["storage"] == "ok"


def test_healthz_does_not_touch_the_database(settings, tmp_path):
    assert Client().get("/healthz").json() == {"status": "ok"}
