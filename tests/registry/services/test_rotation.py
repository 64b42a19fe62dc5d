"""KEK rotation as a job, through the service a worker runs (tests/workers/test_rewrap_worker.py
runs it on a real worker): every data key moves, a run that dies midway resumes without
touching what it already did, progress is recorded, and shredded keys stay shredded."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command

from registry import keyconfig
from registry.errors import IntegrityFailure
from registry.models import Artifact, AuditEvent, Job, JobState, UploadSession
from registry.services import approvals, catalog, rotation, uploads
from registry.services.artifacts import artifact_open, artifact_upload, artifacts_rewrap_batch

FILES = {f"shard-{i}.bin": f"weights {i}".encode() * 100 for i in range(7)}


@pytest.fixture
def stored(actors, draft) -> dict[str, bytes]:
    """acme/bert v1 with seven files, and a revoked v2 whose one file is shredded."""
    for path, data in FILES.items():
        upload(actors, draft, path, data)
    v2 = catalog.version_create(model=draft.model, creator=actors.users["alice"])
    upload(actors, v2, "old.bin", b"revoked")
    approvals.version_revoke(version=v2)
    return FILES


def upload(actors, version, path: str, data: bytes) -> None:
    artifact_upload(
        version=version,
        path=path,
        chunks=[data],
        expected_sha256=None,
        expected_size=len(data),
        creator=actors.users["alice"],
    )


def plaintext(artifact: Artifact) -> bytes:
    return b"".join(artifact_open(artifact=artifact))


def rewrap_events() -> int:
    return AuditEvent.objects.filter(action="key.rewrap").count()


def test_a_job_moves_every_key_resuming_after_a_crash_without_touching_done_ones(stored, settings):
    settings.SMR_REWRAP_BATCH_SIZE = 2
    ring = keyconfig.local_keyring()
    old_kek = ring.primary_kek_id()
    new_kek = ring.add_key()
    live = Artifact.objects.exclude(kek_id="").order_by("pk")
    # An earlier run died after its first batch of three had committed.
    after, moved = artifacts_rewrap_batch(target=ring, limit=3)
    assert moved == 3
    done_before = {a.pk: bytes(a.wrapped_dek) for a in live.filter(kek_id=new_kek)}
    assert list(done_before) == [a.pk for a in live[:3]] and after == live[2].pk

    out = io.StringIO()
    call_command("rewrap_keys", "--to-local", "--job", stdout=out, stderr=io.StringIO())
    job = Job.objects.get(pk=out.getvalue().strip())
    assert job.kind == "rewrap" and job.namespace is None and job.params == {"to_kek_id": new_kek}
    assert AuditEvent.objects.get(action="job.create").details == {
        "kind": "rewrap",
        "to_kek_id": new_kek,
    }

    result = rotation.rewrap_job_run(job_id=job.pk)

    assert result == {
        "to_kek_id": new_kek,
        "data_keys_moved": 4,
        "data_keys_done": 7,
        "data_keys_total": 7,
        "upload_keys_moved": 0,
        "webhook_secrets_moved": 0,
        "signing_keys_moved": 0,
    }
    job.refresh_from_db()
    assert job.state == JobState.SUCCEEDED and job.progress == 1.0
    assert job.progress_message == "re-wrapped 7/7 data keys"
    assert set(live.values_list("kek_id", flat=True)) == {new_kek}
    # The three done before were not wrapped again (a re-wrap draws a fresh nonce).
    for pk, blob in done_before.items():
        assert bytes(Artifact.objects.get(pk=pk).wrapped_dek) == blob
    assert rewrap_events() == 7
    for artifact in live.select_related("version__model__namespace"):
        assert plaintext(artifact) == stored[artifact.path]
    # The revoked version's key stays destroyed: rotation brings nothing back.
    shredded = Artifact.objects.get(path="old.bin")
    assert shredded.kek_id == "" and bytes(shredded.wrapped_dek) == b""
    assert old_kek != new_kek

    # A second job (or a message delivered twice) finds nothing to do and audits nothing.
    again = rotation.rewrap_job_create(to_kek_id=new_kek)
    assert rotation.rewrap_job_run(job_id=again.pk)["data_keys_moved"] == 0
    assert rotation.rewrap_job_run(job_id=job.pk) is None  # finished: a duplicate does nothing
    assert rewrap_events() == 7


def test_progress_survives_a_run_that_dies_midway_and_the_redelivery_finishes(stored, settings):
    settings.SMR_REWRAP_BATCH_SIZE = 2
    ring = keyconfig.local_keyring()
    new_kek = ring.add_key()
    live = list(Artifact.objects.exclude(kek_id="").order_by("pk"))
    # The fifth key in pk order cannot be unwrapped: the run dies in its third batch.
    bad = live[4]
    good_blob = bytes(bad.wrapped_dek)
    Artifact.objects.filter(pk=bad.pk).update(
        wrapped_dek=good_blob[:-1] + bytes([good_blob[-1] ^ 1])
    )
    job = rotation.rewrap_job_create(to_kek_id=new_kek)

    with pytest.raises(IntegrityFailure):
        rotation.rewrap_job_run(job_id=job.pk)

    job.refresh_from_db()
    assert job.state == JobState.RUNNING
    assert job.progress == pytest.approx(4 / 7)
    assert job.progress_message == "re-wrapped 4/7 data keys"
    assert Artifact.objects.filter(kek_id=new_kek).count() == 4
    done = {a.pk: bytes(a.wrapped_dek) for a in Artifact.objects.filter(kek_id=new_kek)}

    # The operator restores the key from a backup; the message is delivered again.
    Artifact.objects.filter(pk=bad.pk).update(wrapped_dek=good_blob)
    result = rotation.rewrap_job_run(job_id=job.pk)
    assert result is not None and result["data_keys_moved"] == 3
    job.refresh_from_db()
    assert job.state == JobState.SUCCEEDED and job.attempts == 2
    for pk, blob in done.items():
        assert bytes(Artifact.objects.get(pk=pk).wrapped_dek) == blob
    assert rewrap_events() == 7


def test_a_job_whose_kek_is_no_longer_primary_fails_and_moves_nothing(stored):
    ring = keyconfig.local_keyring()
    first = ring.add_key()
    job = rotation.rewrap_job_create(to_kek_id=first)
    ring.add_key()  # rotated again before a worker took the job
    assert rotation.rewrap_job_run(job_id=job.pk) is None
    job.refresh_from_db()
    assert job.state == JobState.FAILED and job.error_code == "kek_unavailable"
    assert "no longer the primary" in job.error_message
    assert not Artifact.objects.filter(kek_id=first).exists()
    (failed,) = AuditEvent.objects.filter(action="job.fail")
    assert failed.namespace == "" and failed.target == f"jobs/{job.pk}"


def test_the_synchronous_command_skips_shredded_keys(stored):
    call_command("rewrap_keys", "--new-local-key", stdout=io.StringIO())
    primary = keyconfig.local_keyring().primary_kek_id()
    assert set(Artifact.objects.exclude(path="old.bin").values_list("kek_id", flat=True)) == {
        primary
    }
    assert Artifact.objects.get(path="old.bin").kek_id == ""


def test_an_open_upload_keeps_its_staged_parts_across_a_rotation(actors, draft):
    """Bug caught: a rotation that left upload-session keys under the old KEK would strand
    every staged part once that KEK is retired."""
    part = b"a" * (1 << 20)
    session = uploads.upload_session_create(
        version=draft, path="big.bin", size=(1 << 20) + 5, sha256=None, part_size=1 << 20,
        creator=actors.users["alice"],
    )  # fmt: skip
    uploads.upload_part_put(session=session, number=1, chunks=[part], length=1 << 20)
    done = uploads.upload_session_create(
        version=draft, path="gone.bin", size=1, sha256=None, part_size=1 << 20,
        creator=actors.users["alice"],
    )  # fmt: skip
    uploads.upload_session_abort(session=done)
    ring = keyconfig.local_keyring()
    old_kek = ring.primary_kek_id()
    job = rotation.rewrap_job_create(to_kek_id=ring.add_key())

    result = rotation.rewrap_job_run(job_id=job.pk)

    assert result is not None and result["upload_keys_moved"] == 1
    session.refresh_from_db()
    assert session.kek_id == job.params["to_kek_id"]
    assert UploadSession.objects.get(pk=done.pk).kek_id == old_kek  # finished: left alone
    uploads.upload_part_put(session=session, number=2, chunks=[b"tail!"], length=5)
    artifact = uploads.upload_session_complete(session=session, creator=actors.users["alice"])
    assert plaintext(Artifact.objects.get(pk=artifact.pk)) == part + b"tail!"
    assert AuditEvent.objects.filter(action="key.rewrap", details__upload=str(session.pk)).exists()


def test_the_job_also_moves_the_registry_signing_key(stored):
    from registry.models import SigningKey
    from registry.signing.keys import sign, signing_key_current

    key = signing_key_current()
    ring = keyconfig.local_keyring()
    new_kek = ring.add_key()
    job = rotation.rewrap_job_create(to_kek_id=new_kek)
    result = rotation.rewrap_job_run(job_id=job.pk)
    assert result is not None and result["signing_keys_moved"] == 1
    moved = SigningKey.objects.get(pk=key.pk)
    assert moved.private_key_kek_id == new_kek != key.private_key_kek_id
    assert sign(b"still signs", key=moved)  # the same key, now under the new KEK
