"""registry/services/jobs.py: the outbox, the conditional transitions, enqueue failures.

Publishing goes to a real Redis (a db of its own); a dead broker is a port nothing listens on.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from registry.models import AuditEvent, Job, JobKind, JobState
from registry.services import jobs
from tests.conftest import free_port
from tests.support.broker import redis_broker

BROKER = "redis://127.0.0.1:6379/12"  # 13: benchmarks, 14: worker tests, 15: test_tasks


@pytest.fixture
def broker(settings):
    with redis_broker(settings, BROKER) as client:
        yield client


@pytest.fixture
def dead_broker(settings):
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{free_port()}/12"


def new_job(actors, draft) -> Job:
    return Job.objects.create(kind=JobKind.SCAN, namespace=actors.acme, version=draft)


def queued_ids(client) -> list[str]:
    return [json.loads(m)["headers"]["argsrepr"] for m in client.lrange("scan", 0, -1)]


def test_job_create_enqueues_after_commit_only(
    actors, draft, broker, django_capture_on_commit_callbacks
):
    capture = django_capture_on_commit_callbacks(execute=True)
    with capture as callbacks, transaction.atomic():
        job = jobs.job_create(kind=JobKind.SCAN, namespace=actors.acme, version=draft)
        assert broker.llen("scan") == 0  # nothing leaves before the commit
    assert len(callbacks) == 1
    assert broker.llen("scan") == 1
    assert str(job.pk) in queued_ids(broker)[0]
    job.refresh_from_db()
    assert job.state == JobState.QUEUED and job.enqueued_at is not None


def test_a_rolled_back_job_is_never_enqueued(
    actors, draft, broker, django_capture_on_commit_callbacks
):
    capture = django_capture_on_commit_callbacks(execute=True)
    with capture as callbacks, pytest.raises(RuntimeError), transaction.atomic():
        jobs.job_create(kind=JobKind.SCAN, namespace=actors.acme, version=draft)
        raise RuntimeError("the request failed after creating the job")
    assert callbacks == []
    assert not Job.objects.exists()
    assert broker.llen("scan") == 0


def test_enqueue_with_the_broker_down_keeps_the_job_queued(actors, draft, dead_broker):
    job = new_job(actors, draft)
    assert jobs.job_enqueue(job_id=job.pk) is False
    job.refresh_from_db()
    assert job.state == JobState.QUEUED and job.enqueued_at is None


def test_dispatch_sends_unsent_and_stale_jobs_only(actors, draft, broker):
    now = timezone.now()
    unsent = new_job(actors, draft)
    fresh_unsent = new_job(actors, draft)
    stale = new_job(actors, draft)
    recent = new_job(actors, draft)
    running = new_job(actors, draft)
    Job.objects.filter(pk=unsent.pk).update(created_at=now - timedelta(minutes=5))
    Job.objects.filter(pk=stale.pk).update(enqueued_at=now - timedelta(hours=3))
    Job.objects.filter(pk=recent.pk).update(enqueued_at=now - timedelta(seconds=5))
    Job.objects.filter(pk=running.pk).update(
        state=JobState.RUNNING, created_at=now - timedelta(hours=1)
    )

    sent = jobs.jobs_dispatch(unsent_after=timedelta(minutes=1), stale_after=timedelta(hours=2))

    assert sent == 2
    sent_ids = " ".join(queued_ids(broker))
    assert str(unsent.pk) in sent_ids and str(stale.pk) in sent_ids
    for other in (fresh_unsent, recent, running):
        assert str(other.pk) not in sent_ids
    # Sent once: the next run leaves them alone.
    assert (
        jobs.jobs_dispatch(unsent_after=timedelta(minutes=1), stale_after=timedelta(hours=2)) == 0
    )


def test_dispatch_with_the_broker_still_down_sends_nothing(actors, draft, dead_broker):
    job = new_job(actors, draft)
    assert jobs.jobs_dispatch(unsent_after=timedelta(0)) == 0
    job.refresh_from_db()
    assert job.enqueued_at is None


def test_start_claims_queued_and_running_jobs_but_not_finished_ones(actors, draft, settings):
    job = new_job(actors, draft)
    assert jobs.job_start(job_id=job.pk).attempts == 1
    # Delivered again after the worker died: claimed again, one more attempt.
    again = jobs.job_start(job_id=job.pk)
    assert again.state == JobState.RUNNING and again.attempts == 2
    assert jobs.job_finish(job_id=job.pk, result={"ok": True})
    assert jobs.job_start(job_id=job.pk) is None
    assert not jobs.job_finish(job_id=job.pk)  # finished once only
    assert not jobs.job_fail(job_id=job.pk, code="late")
    job.refresh_from_db()
    assert (job.state, job.attempts, job.result) == (JobState.SUCCEEDED, 2, {"ok": True})


def test_a_job_that_keeps_killing_its_worker_fails(actors, draft, settings):
    settings.SMR_JOB_MAX_ATTEMPTS = 2
    job = new_job(actors, draft)
    assert jobs.job_start(job_id=job.pk) is not None
    assert jobs.job_start(job_id=job.pk) is not None
    assert jobs.job_start(job_id=job.pk) is None
    job.refresh_from_db()
    assert (job.state, job.error_code) == (JobState.FAILED, "attempts_exhausted")
    event = AuditEvent.objects.get(action="job.fail")
    assert event.outcome == "failure" and event.details["code"] == "attempts_exhausted"


def test_progress_is_clamped_and_ignored_once_finished(actors, draft):
    job = new_job(actors, draft)
    jobs.job_progress(job_id=job.pk, progress=0.5, message="queued jobs do not move")
    job.refresh_from_db()
    assert job.progress == 0.0
    jobs.job_start(job_id=job.pk)
    jobs.job_progress(job_id=job.pk, progress=7, message="x" * 1000)
    job.refresh_from_db()
    assert job.progress == 1.0 and len(job.progress_message) == 300
    jobs.job_fail(job_id=job.pk, code="boom", state=JobState.CANCELLED)
    jobs.job_progress(job_id=job.pk, progress=0.1)
    job.refresh_from_db()
    assert (job.state, job.progress) == (JobState.CANCELLED, 1.0)


def test_dispatch_queues_again_a_job_running_past_every_limit(actors, draft, broker, settings):
    settings.SMR_JOB_LOST_AFTER = 3600
    now = timezone.now()
    lost = new_job(actors, draft)
    alive = new_job(actors, draft)
    Job.objects.filter(pk=lost.pk).update(
        state=JobState.RUNNING, attempts=1, started_at=now - timedelta(hours=2)
    )
    Job.objects.filter(pk=alive.pk).update(
        state=JobState.RUNNING, attempts=1, started_at=now - timedelta(minutes=10)
    )
    assert jobs.jobs_dispatch() == 1
    assert str(lost.pk) in " ".join(queued_ids(broker))
    lost.refresh_from_db()
    alive.refresh_from_db()
    assert lost.state == JobState.QUEUED and lost.enqueued_at is not None
    assert lost.attempts == 1  # the next claim counts it
    assert alive.state == JobState.RUNNING


def test_every_job_kind_has_a_registered_task_on_a_routed_queue():
    """A kind without a task (or a misspelt task name) would be queued and never run."""
    from registry.services.jobs import JOB_TASKS
    from workers.app import app

    assert set(JOB_TASKS) == set(JobKind.values)
    app.loader.import_default_modules()
    for kind, (task, queue) in JOB_TASKS.items():
        assert task in app.tasks, (kind, task)
        assert queue in {"celery", "scan", "webhooks", "dp"}, (kind, queue)
