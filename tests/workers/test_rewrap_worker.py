"""KEK rotation on real Celery workers (Redis broker, PostgreSQL): `rewrap_keys --job` runs to
the end on a worker, and a worker SIGKILLed midway leaves its committed batches and progress
behind, for the redelivered message to finish without wrapping any key twice."""

from __future__ import annotations

import io
import signal
from collections.abc import Iterator

import psycopg
import pytest
from django.core.management import call_command
from django.db import connection

from registry import keyconfig
from registry.models import Artifact, AuditEvent, Job, JobState
from registry.services import audit, rotation
from registry.services.artifacts import artifact_open
from tests.support.broker import redis_broker
from tests.workers.test_scan_worker import Workers, put, wait_until

BROKER = "redis://127.0.0.1:6379/9"  # 11-15 belong to the other worker and outbox tests
FILES = {f"shard-{i}.bin": f"weights {i}".encode() * 1000 for i in range(5)}


@pytest.fixture
def workers(settings, tmp_path) -> Iterator[Workers]:
    with redis_broker(settings, BROKER):
        w = Workers(settings, tmp_path)
        w.env["CELERY_BROKER_URL"] = BROKER
        w.env["SMR_REWRAP_BATCH_SIZE"] = "2"
        try:
            yield w
        finally:
            w.stop()


def state_of(job: Job) -> str:
    job.refresh_from_db()
    return job.state


def plaintexts() -> dict[str, bytes]:
    qs = Artifact.objects.select_related("version__model__namespace")
    return {a.path: b"".join(artifact_open(artifact=a)) for a in qs}


@pytest.mark.django_db(transaction=True)
def test_rewrap_keys_job_runs_to_the_end_on_a_worker(actors, draft, workers):
    put(draft, actors, FILES)
    old_kek = keyconfig.local_keyring().primary_kek_id()
    out = io.StringIO()
    call_command("rewrap_keys", "--new-local-key", "--job", stdout=out, stderr=io.StringIO())
    job = Job.objects.get(pk=out.getvalue().strip())
    new_kek = job.params["to_kek_id"]
    assert new_kek != old_kek and job.enqueued_at is not None
    # Control: nothing moves until a worker takes the job.
    assert set(Artifact.objects.values_list("kek_id", flat=True)) == {old_kek}

    proc = workers.start()
    wait_until(lambda: state_of(job) == JobState.SUCCEEDED, "the rewrap job", [proc])

    assert (job.progress, job.attempts) == (1.0, 1)
    assert job.progress_message == "re-wrapped 5/5 data keys"
    assert job.result["data_keys_moved"] == 5 and job.result["data_keys_total"] == 5
    assert set(Artifact.objects.values_list("kek_id", flat=True)) == {new_kek}
    assert plaintexts() == FILES
    assert AuditEvent.objects.filter(action="key.rewrap").count() == 5


@pytest.mark.django_db(transaction=True)
def test_worker_killed_midway_the_redelivery_finishes_without_wrapping_twice(
    actors, draft, workers
):
    """Batches of two: the first worker commits batch one (two keys), then blocks in batch two
    on a row the test holds, and is SIGKILLed there. Its progress shows 2/5; the second worker
    (the message comes back: acks_late) moves the other three. Bug caught: a run that started
    over would wrap the first two again (fresh nonces, a second key.rewrap event each); one
    whose batches shared a transaction would have nothing committed to resume from."""
    put(draft, actors, FILES)
    ring = keyconfig.local_keyring()
    job = rotation.rewrap_job_create(to_kek_id=ring.add_key())
    new_kek = job.params["to_kek_id"]
    ordered = list(Artifact.objects.order_by("pk").values_list("pk", flat=True))

    db = connection.settings_dict
    with psycopg.connect(
        host=db["HOST"], port=db["PORT"], user=db["USER"], dbname=db["NAME"]
    ) as locker:
        locker.execute("SELECT id FROM registry_artifact WHERE id = %s FOR UPDATE", [ordered[3]])
        first = workers.start()
        wait_until(lambda: lock_waiters() >= 1, "the worker to block in batch two", [first])
        job.refresh_from_db()
        assert (job.state, job.attempts) == (JobState.RUNNING, 1)
        assert job.progress == pytest.approx(2 / 5)
        assert job.progress_message == "re-wrapped 2/5 data keys"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        locker.rollback()

    done = {a.pk: bytes(a.wrapped_dek) for a in Artifact.objects.filter(kek_id=new_kek)}
    assert set(done) == set(ordered[:2])  # batch two died with its worker

    second = workers.start()
    wait_until(lambda: state_of(job) == JobState.SUCCEEDED, "the resumed job", [second])

    assert job.attempts == 2 and job.result["data_keys_moved"] == 3
    assert set(Artifact.objects.values_list("kek_id", flat=True)) == {new_kek}
    for pk, blob in done.items():
        assert bytes(Artifact.objects.get(pk=pk).wrapped_dek) == blob
    events = AuditEvent.objects.filter(action="key.rewrap")
    assert events.count() == 5 and len({e.target for e in events}) == 5
    assert plaintexts() == FILES
    assert audit.audit_verify().ok


def lock_waiters() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database() AND query LIKE 'UPDATE \"registry_artifact\"%%'"
        )
        return cursor.fetchone()[0]
