"""The scan stage on real Celery workers (Redis broker, PostgreSQL): end to end, a worker
SIGKILLed mid-scan, a message delivered twice, the broker down when the submit commits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psycopg
import pytest
import redis
from django.db import connection

from registry.models import AuditEvent, Job, JobState, ModelVersion, ScanReport, VersionState
from registry.services import audit
from registry.services.artifacts import artifact_upload
from tests.conftest import free_port

BROKER = "redis://127.0.0.1:6379/14"  # test_tasks.py uses /15
API = "/api/v1/namespaces/acme/models/bert/versions/1"
WAIT = 90


class Workers:
    """Starts real `celery worker` processes against the test database and store."""

    def __init__(self, settings, tmp_path) -> None:
        db = connection.settings_dict
        self.env = {
            **os.environ,
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
            "CELERY_BROKER_URL": BROKER,
            "SMR_VAR_DIR": str(tmp_path / "var"),
            "SMR_OBJECTS_DIR": str(settings.SMR_OBJECTS_DIR),
            "SMR_KEYRING_FILE": str(settings.SMR_KEYRING_FILE),
            "SMR_AUDIT_SIGNING_KEY_FILE": str(settings.SMR_AUDIT_SIGNING_KEY_FILE),
            # Redeliver a dead worker's message quickly (the default waits out hours).
            "SMR_BROKER_VISIBILITY_TIMEOUT": "2",
            "SMR_BROKER_RESTORE_INTERVAL": "1",
            "SMR_JOB_DISPATCH_INTERVAL": "1",
            "SMR_JOB_UNSENT_AFTER": "0",
        }
        self.schedule = tmp_path / "beat-schedule"
        self.procs: list[subprocess.Popen] = []

    def start(self, *, beat: bool = False) -> subprocess.Popen:
        args = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--pool", "solo"]
        args += ["-Q", "celery,scan", "--loglevel", "warning", "--without-heartbeat"]
        args += ["--without-gossip", "--without-mingle"]
        if beat:
            args += ["--beat", "--schedule", str(self.schedule)]
        proc = subprocess.Popen(
            args, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def workers(settings, tmp_path) -> Iterator[Workers]:
    redis.Redis.from_url(BROKER).flushdb()
    settings.CELERY_BROKER_URL = BROKER
    w = Workers(settings, tmp_path)
    yield w
    w.stop()
    redis.Redis.from_url(BROKER).flushdb()


def wait_until(predicate, what: str, procs=()) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"worker exited: {proc.stderr.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def state_of(version_pk: int) -> str:
    return ModelVersion.objects.get(pk=version_pk).state


def put(draft, actors, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        artifact_upload(
            version=draft,
            path=path,
            chunks=[data],
            expected_sha256=None,
            expected_size=len(data),
            creator=actors.users["alice"],
        )


def scan_events(draft) -> int:
    return AuditEvent.objects.filter(action="version.scan", target="acme/bert/v1").count()


@pytest.mark.django_db(transaction=True)
def test_submit_scan_pending_review_through_a_worker(actors, draft, workers):
    put(draft, actors, {"config.json": b'{"hidden": 8}', "notes.txt": b"hello\n" * 100})
    alice = actors.client("alice")
    response = alice.post(f"{API}/submit")
    assert response.status_code == 202, response.content
    job_id = response.json()["job"]["id"]
    assert response.json()["version"]["state"] == "scanning"
    # The submit's commit enqueued the job (nothing else will: no beat runs here).
    assert Job.objects.get(pk=job_id).enqueued_at is not None

    proc = workers.start()
    wait_until(lambda: state_of(draft.pk) == VersionState.PENDING_REVIEW, "the scan", [proc])

    job = alice.get(f"/api/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and job["progress"] == 1.0
    assert job["attempts"] == 1
    assert job["created_at"] <= job["enqueued_at"] <= job["started_at"] <= job["finished_at"]
    assert job["progress_message"] == "scanned 2/2 files"
    assert job["result"]["state"] == "pending_review"
    assert job_id in [j["id"] for j in alice.get("/api/v1/jobs").json()["results"]]
    # mallory belongs to another team: neither the job nor its listing shows.
    mallory = actors.client("mallory")
    assert mallory.get(f"/api/v1/jobs/{job_id}").status_code == 404
    assert mallory.get("/api/v1/jobs").json()["results"] == []

    version = alice.get(API).json()
    assert version["state"] == "pending_review"
    assert sorted(s["path"] for s in version["scans"]) == ["config.json", "notes.txt"]
    assert {s["verdict"] for s in version["scans"]} == {"clean"}
    scans = alice.get(f"{API}/scans").json()["results"]
    assert len(scans) == 2 and all(s["job"] == job_id for s in scans)
    assert scan_events(draft) == 1
    assert AuditEvent.objects.get(action="version.scan").actor_user == "worker:version_scan"


@pytest.mark.django_db(transaction=True)
def test_worker_killed_mid_scan_the_next_one_finishes_exactly_once(actors, draft, workers):
    """The first worker scans both files and blocks on the version row (held by the test)
    inside its concluding transaction; it is SIGKILLed there. Its transaction dies with it,
    the message (acks_late) goes back to the queue, and a second worker redoes the scan.
    Bug caught: reports written outside the deciding transaction, or a job_start that refuses
    a job already `running`, would leave two report sets or a version stuck in scanning."""
    put(draft, actors, {"a.txt": b"a" * 1000, "b.txt": b"b" * 1000})
    assert actors.client("alice").post(f"{API}/submit").status_code == 202
    job = Job.objects.get(version=draft)

    db = connection.settings_dict
    with psycopg.connect(
        host=db["HOST"], port=db["PORT"], user=db["USER"], dbname=db["NAME"]
    ) as locker:
        locker.execute("SELECT id FROM registry_modelversion WHERE id = %s FOR UPDATE", [draft.pk])
        first = workers.start()
        wait_until(lambda: lock_waiters() >= 1, "the worker to block in its final UPDATE", [first])
        job.refresh_from_db()
        assert (job.state, job.progress, job.attempts) == (JobState.RUNNING, 1.0, 1)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        locker.rollback()

    assert state_of(draft.pk) == VersionState.SCANNING
    second = workers.start()
    wait_until(lambda: state_of(draft.pk) == VersionState.PENDING_REVIEW, "the rescan", [second])

    job.refresh_from_db()
    assert job.state == JobState.SUCCEEDED and job.attempts == 2
    assert ScanReport.objects.filter(artifact__version=draft).count() == 2
    assert set(ScanReport.objects.values_list("job_id", flat=True)) == {job.pk}
    assert scan_events(draft) == 1
    assert audit.audit_verify().ok


def lock_waiters() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database() AND query LIKE 'UPDATE \"registry_modelversion\"%%'"
        )
        return cursor.fetchone()[0]


@pytest.mark.django_db(transaction=True)
def test_a_message_delivered_twice_gives_one_result(actors, draft, workers):
    put(draft, actors, {"a.json": b"{}"})
    assert actors.client("alice").post(f"{API}/submit").status_code == 202
    job = Job.objects.get(version=draft)
    from workers.app import app

    with app.connection_for_write(BROKER) as conn:  # the same job, twice more
        for _ in range(2):
            app.send_task(
                "workers.tasks.version_scan", args=[str(job.pk)], queue="scan", connection=conn
            )
    proc = workers.start()
    wait_until(lambda: state_of(draft.pk) == VersionState.PENDING_REVIEW, "the scan", [proc])
    wait_until(lambda: redis.Redis.from_url(BROKER).llen("scan") == 0, "the queue to drain")
    # The last message is taken off the list before it runs: wait for the worker to be idle.
    wait_until(lambda: not redis.Redis.from_url(BROKER).hlen("unacked"), "the last ack")

    job.refresh_from_db()
    assert job.state == JobState.SUCCEEDED and job.attempts == 1
    assert ScanReport.objects.filter(artifact__version=draft).count() == 1
    assert scan_events(draft) == 1


@pytest.mark.django_db(transaction=True)
def test_broker_down_at_commit_the_job_runs_once_it_is_back(actors, draft, workers, settings):
    put(draft, actors, {"a.json": b"{}"})
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{free_port()}/14"  # nothing listens
    response = actors.client("alice").post(f"{API}/submit")
    # The submit stands: the outbox (the Job row) keeps the job for later.
    assert response.status_code == 202, response.content
    job = Job.objects.get(version=draft)
    assert job.state == JobState.QUEUED and job.enqueued_at is None
    assert redis.Redis.from_url(BROKER).llen("scan") == 0

    settings.CELERY_BROKER_URL = BROKER  # the broker is back; beat's jobs_dispatch resends
    proc = workers.start(beat=True)
    wait_until(lambda: state_of(draft.pk) == VersionState.PENDING_REVIEW, "the scan", [proc])
    job.refresh_from_db()
    assert job.state == JobState.SUCCEEDED and job.enqueued_at is not None
    assert ScanReport.objects.filter(artifact__version=draft).count() == 1
    assert scan_events(draft) == 1
