"""Revoke = crypto-shredding: the wrapped data keys of a revoked version are destroyed in the
revoke's transaction, its stored ciphertext can no longer be decrypted with any key the
registry holds (the attack), and the janitor deletes the objects."""

from __future__ import annotations

import base64
import contextlib
import json
from datetime import timedelta

import pytest
from django.conf import settings

from registry import keyconfig, storage
from registry.crypto import keys, stream
from registry.errors import VersionRevoked
from registry.models import Artifact, AuditEvent, PendingObject, UploadSession
from registry.services import approvals, artifacts, janitor, uploads
from registry.services.artifacts import artifact_open, artifact_upload, associated_data
from tests.support.objects import read_object

FILES = {"weights.bin": b"\x00secret weights\xff" * 5000, "config.json": b'{"hidden": 8}'}
PART = b"p" * (1 << 20)


def stage(actors, draft) -> tuple[UploadSession, str]:
    """Two finished files and one open resumable upload with a staged part."""
    for path, data in FILES.items():
        artifact_upload(
            version=draft,
            path=path,
            chunks=[data],
            expected_sha256=None,
            expected_size=len(data),
            creator=actors.users["alice"],
        )
    session = uploads.upload_session_create(
        version=draft, path="big.bin", size=2 << 20, sha256=None, part_size=1 << 20,
        creator=actors.users["alice"],
    )  # fmt: skip
    part = uploads.upload_part_put(session=session, number=1, chunks=[PART], length=1 << 20)
    return session, part.object_key


def held_keys() -> list[bytes]:
    """Every key the registry holds: each KEK of the keyring file, and every data key that any
    wrapped key left in the database opens to under any of those KEKs."""
    ring = keyconfig.local_keyring()
    doc = json.loads(settings.SMR_KEYRING_FILE.read_text())
    keks = {f"local:{kid}": base64.b64decode(e["key"]) for kid, e in doc["keys"].items()}
    wrapped: list[tuple[bytes, dict[str, str]]] = [
        (bytes(a.wrapped_dek), artifacts.artifact_context(a))
        for a in Artifact.objects.select_related("version__model__namespace")
    ]
    wrapped += [
        (bytes(s.wrapped_dek), uploads._session_context(s.id, s.version))
        for s in UploadSession.objects.select_related("version__model__namespace")
    ]
    found = list(keks.values())
    for blob, context in wrapped:
        for kek_id in keks:
            with contextlib.suppress(keys.KeyProviderError):
                found.append(ring.unwrap(keys.WrappedKey(kek_id=kek_id, blob=blob), context))
    return found


def decrypts(ciphertext: bytes, ad: bytes, candidates: list[bytes]) -> bytes | None:
    for key in candidates:
        try:
            return b"".join(stream.decrypt_iter(key, ad, [ciphertext]))
        except (stream.StreamIntegrityError, ValueError):
            continue
    return None


@pytest.mark.usefixtures("store_kind")
def test_revoke_shreds_keys_so_no_held_key_decrypts_and_the_janitor_deletes(actors, draft):
    session, part_key = stage(actors, draft)
    stored = {a.object_key: (associated_data(a.id), FILES[a.path]) for a in draft.artifacts.all()}
    stored[part_key] = (uploads._part_ad(session, 1), PART)
    # What an attacker with a copy of the bucket holds: the ciphertext as stored.
    copied = {key: read_object(key) for key in stored}

    # Control: before the revoke, the procedure below recovers every plaintext.
    candidates = held_keys()
    for key, (ad, plaintext) in stored.items():
        assert decrypts(copied[key], ad, candidates) == plaintext

    approvals.version_revoke(version=draft)

    for row in [*Artifact.objects.filter(version=draft), *UploadSession.objects.all()]:
        assert bytes(row.wrapped_dek) == b"" and row.kek_id == ""
    assert UploadSession.objects.get(pk=session.pk).state == "aborted"
    # Even a KEK added later (what a rotation would bring) opens nothing.
    keyconfig.local_keyring().add_key()
    candidates = held_keys()
    assert len(candidates) == 2  # the two KEKs; no wrapped key opens any more
    store = storage.get_object_store()
    for key, (ad, _) in stored.items():
        assert store.exists(key)  # still there until the janitor runs, and noise
        assert decrypts(read_object(key), ad, candidates) is None
        assert decrypts(copied[key], ad, candidates) is None

    (event,) = AuditEvent.objects.filter(action="version.revoke")
    assert event.details == {
        "previous_state": "draft",
        "state": "revoked",
        "keys_destroyed": 3,
        "uploads_aborted": 1,
        "objects": 3,
    }
    assert set(PendingObject.objects.values_list("object_key", flat=True)) == set(stored)

    # The janitor's next run (the grace period is for uploads in flight, not for these).
    assert janitor.objects_cleanup(older_than=timedelta(hours=1)) == (3, 0)
    for key in stored:
        assert not store.exists(key)
    assert not PendingObject.objects.exists()
    # The metadata stays: the version still lists its files, digests included.
    assert set(draft.artifacts.values_list("path", flat=True)) == set(FILES)


def test_revoked_files_answer_410_over_http_and_a_download_in_flight_gets_no_key(actors, draft):
    from tests.support.http import put

    alice = actors.client("alice")
    assert put(alice, "config.json", b'{"a": 1}').status_code == 201
    url = "/api/v1/namespaces/acme/models/bert/versions/1/files/config.json"
    assert alice.get(url).status_code == 200  # control
    artifact = draft.artifacts.get()  # a download that passed its checks before the revoke
    revoke = actors.client("root").post("/api/v1/namespaces/acme/models/bert/versions/1/revoke")
    assert revoke.status_code == 200
    assert alice.get(url).status_code == 410
    artifact.refresh_from_db()
    with pytest.raises(VersionRevoked):
        artifact_open(artifact=artifact)
    with pytest.raises(VersionRevoked):
        artifacts.artifact_unwrap_dek(artifact)


def test_the_janitor_keeps_objects_whose_keys_still_exist(actors, draft):
    """A stale record naming a live artifact's object never deletes it; only shredding does."""
    stage(actors, draft)
    live = draft.artifacts.first()
    PendingObject.objects.create(object_key=live.object_key, reason="shred")
    janitor.objects_cleanup(older_than=timedelta(0))
    assert storage.get_object_store().exists(live.object_key)
    assert not PendingObject.objects.exists()
