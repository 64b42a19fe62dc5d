"""The janitor cleans what failed writes left, and never an upload still in flight."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from registry import storage
from registry.models import PendingObject, UploadSession
from registry.services import janitor, uploads
from tests.support.objects import write_object


def test_in_flight_upload_is_left_alone_until_the_grace_period(db):
    write_object("artifacts/in-flight", b"ciphertext being written")
    PendingObject.objects.create(object_key="artifacts/in-flight", reason="upload")
    assert janitor.objects_cleanup(older_than=timedelta(hours=1)) == (0, 0)
    assert storage.get_object_store().exists("artifacts/in-flight")
    # Control: once old enough it is considered dead and removed.
    PendingObject.objects.update(created_at=timezone.now() - timedelta(hours=2))
    assert janitor.objects_cleanup(older_than=timedelta(hours=1)) == (1, 0)
    assert not storage.get_object_store().exists("artifacts/in-flight")


def test_replaced_and_abandoned_objects_go_at_once(db):
    for key, reason, abandoned in [
        ("artifacts/old", "replace", None),
        ("artifacts/dead", "upload", timezone.now()),
    ]:
        write_object(key, b"x")
        PendingObject.objects.create(object_key=key, reason=reason, abandoned_at=abandoned)
    assert janitor.objects_cleanup(older_than=timedelta(days=1)) == (2, 0)
    assert not PendingObject.objects.exists()


def test_referenced_object_is_never_deleted(actors, draft):
    from tests.support.http import put

    assert put(actors.client("alice"), "a.bin", b"keep me").status_code == 201
    key = draft.artifacts.get().object_key
    PendingObject.objects.create(object_key=key, reason="delete")  # a stale record
    janitor.objects_cleanup(older_than=timedelta(0))
    assert storage.get_object_store().exists(key)
    assert not PendingObject.objects.exists()


def test_expired_upload_sessions_are_aborted_with_their_parts(actors, draft, settings):
    session = uploads.upload_session_create(
        version=draft, path="x.bin", size=2 << 20, sha256=None, part_size=1 << 20,
        creator=actors.users["alice"],
    )  # fmt: skip
    uploads.upload_part_put(session=session, number=1, chunks=[b"a" * (1 << 20)], length=1 << 20)
    UploadSession.objects.filter(pk=session.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert janitor.uploads_expire() == 1
    assert UploadSession.objects.get(pk=session.pk).state == "aborted"
    files = [p for p in settings.SMR_OBJECTS_DIR.rglob("*") if p.is_file()]
    assert files == []
