"""Background jobs: create, enqueue, claim, report progress, finish.

The Job row is the outbox. `job_create` inserts it in the caller's transaction and enqueues
its task only after that transaction commits (`transaction.on_commit`): a worker never sees
a job whose row does not exist yet, and a rolled-back request leaves nothing queued. If the
broker is down at that moment the publish fails, is logged, and the job stays `queued` with
no `enqueued_at`; the periodic `jobs_dispatch` (beat) sends every such job again once the
broker answers, and also re-sends jobs queued for too long (a message lost by the broker).

A message may therefore arrive twice, and a worker may die in mid-run (acks_late redelivers
it): every transition here is a conditional UPDATE, and the services that run jobs make
their final write conditional too, so duplicates change nothing twice.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from registry.models import (
    JOB_ACTIVE_STATES,
    AuditAction,
    AuditOutcome,
    Job,
    JobKind,
    JobState,
    ModelVersion,
    Namespace,
)
from registry.services import audit

logger = logging.getLogger(__name__)

# Task name and queue per kind: one queue per kind, so a flood of one cannot starve another.
# Names, not imports: services sit below workers/ and never import it.
JOB_TASKS: dict[str, tuple[str, str]] = {
    JobKind.SCAN: ("workers.tasks.version_scan", "scan"),
    # Operator-started maintenance: the housekeeping queue.
    JobKind.REWRAP: ("workers.tasks.keys_rewrap", "celery"),
    # Digests only, no artifact bytes: small and quick, beside the housekeeping.
    JobKind.SIGN: ("workers.tasks.version_sign", "celery"),
    # Training holds its worker for long: its own queue, served by GPU workers where any.
    JobKind.DP_RETRAIN: ("workers.tasks.dp_retrain", "dp"),
    JobKind.PRIVACY_AUDIT: ("workers.tasks.privacy_audit", "dp"),
}


def job_create(
    *,
    kind: JobKind,
    namespace: Namespace | None,
    version: ModelVersion | None = None,
    created_by: User | None = None,
    params: dict[str, Any] | None = None,
) -> Job:
    """Insert a queued job in the caller's transaction; enqueue it once that commits.

    Call inside `transaction.atomic()` together with the change that needs the job: the job
    exists if and only if the change committed.
    """
    job = Job.objects.create(
        kind=kind, namespace=namespace, version=version, created_by=created_by, params=params or {}
    )
    # No event of its own: the change that needs the job (version.submit, version.rescan)
    # is audited by the caller in this transaction and names the job.
    job_id = job.pk
    transaction.on_commit(lambda: job_enqueue(job_id=job_id))
    return job


def _publish(task: str, queue: str, job_id: uuid.UUID) -> None:
    # Imported here: the Celery app is the worker layer's, above the services. The broker URL
    # is read on every publish (not cached by the app), so settings changes take effect.
    from workers.app import app

    with app.connection_for_write(settings.CELERY_BROKER_URL) as conn:
        # Fail fast: a request must not hang on a dead broker; jobs_dispatch retries later.
        conn.ensure_connection(max_retries=0)
        app.send_task(task, args=[str(job_id)], queue=queue, connection=conn, retry=False)


def job_enqueue(*, job_id: uuid.UUID) -> bool:
    """Send a queued job's task to its queue. Never raises for a broker outage: the job stays
    queued and `jobs_dispatch` sends it later. Returns whether a message was published."""
    job = Job.objects.filter(pk=job_id, state=JobState.QUEUED).only("kind").first()
    if job is None:
        return False
    task, queue = JOB_TASKS[job.kind]
    try:
        _publish(task, queue, job_id)
    except Exception as exc:
        # kombu's OperationalError, redis' ConnectionError, OSError: whatever the transport
        # raises, the commit stands and the outbox keeps the job.
        logger.warning(
            "could not enqueue job %s (%s); jobs_dispatch will retry: %s", job_id, task, exc
        )
        return False
    Job.objects.filter(pk=job_id, state=JobState.QUEUED).update(enqueued_at=timezone.now())
    return True


def jobs_dispatch(
    *, unsent_after: timedelta | None = None, stale_after: timedelta | None = None
) -> int:
    """Send again every queued job whose message may be lost; returns how many were sent.

    A job never enqueued (publish failed) is sent once it is older than `unsent_after`; one
    enqueued but still queued after `stale_after` is sent again (the broker may have lost it;
    a duplicate is harmless); one `running` for longer than SMR_JOB_LOST_AFTER is queued and
    sent again. Defaults come from settings.
    """
    now = timezone.now()
    unsent = unsent_after if unsent_after is not None else _seconds("SMR_JOB_UNSENT_AFTER")
    stale = stale_after if stale_after is not None else _seconds("SMR_JOB_REDISPATCH_AFTER")
    due = Job.objects.filter(state=JobState.QUEUED).filter(
        Q(enqueued_at__isnull=True, created_at__lte=now - unsent) | Q(enqueued_at__lte=now - stale)
    )
    # A job running for longer than any run can (the hard time limit, plus the broker's
    # redelivery delay) lost its worker and its message: queue it again. Its attempts count
    # keeps a job that kills every worker from coming back forever.
    lost_before = now - _seconds("SMR_JOB_LOST_AFTER")
    lost = Job.objects.filter(state=JobState.RUNNING, started_at__lte=lost_before)
    requeued = []
    for job_id in lost.values_list("pk", flat=True)[:1000]:
        if Job.objects.filter(
            pk=job_id, state=JobState.RUNNING, started_at__lte=lost_before
        ).update(state=JobState.QUEUED, enqueued_at=None):
            logger.warning("job %s was running since before %s: queued again", job_id, lost_before)
            requeued.append(job_id)
    sent = 0
    for job_id in [*requeued, *due.order_by("created_at").values_list("pk", flat=True)[:1000]]:
        if job_enqueue(job_id=job_id):
            sent += 1
        else:
            break  # the broker is still down: the next run tries again
    return sent


def _seconds(name: str) -> timedelta:
    return timedelta(seconds=int(getattr(settings, name)))


def job_start(*, job_id: uuid.UUID) -> Job | None:
    """Claim a job for this delivery: queued or running -> running, attempts + 1.

    A running job is claimed again on purpose: that is a delivery after a worker died
    mid-run. A finished or cancelled job returns None (a duplicate delivery: do nothing).
    A job that used up SMR_JOB_MAX_ATTEMPTS fails instead (a file that kills its worker
    every time must not loop forever).
    """
    now = timezone.now()
    with transaction.atomic():
        claimed = Job.objects.filter(
            pk=job_id,
            state__in=JOB_ACTIVE_STATES,
            attempts__lt=settings.SMR_JOB_MAX_ATTEMPTS,
        ).update(state=JobState.RUNNING, attempts=F("attempts") + 1, started_at=now)
    if not claimed:
        job_fail(
            job_id=job_id,
            code="attempts_exhausted",
            message=f"Gave up after {settings.SMR_JOB_MAX_ATTEMPTS} attempts.",
        )
        return None
    return Job.objects.select_related("namespace", "version__model__namespace").get(pk=job_id)


def job_progress(*, job_id: uuid.UUID, progress: float, message: str = "") -> None:
    """Record how far a running job is (0-1); ignored once the job has finished."""
    Job.objects.filter(pk=job_id, state=JobState.RUNNING).update(
        progress=min(1.0, max(0.0, progress)), progress_message=message[:300]
    )


def job_finish(*, job_id: uuid.UUID, result: dict[str, Any] | None = None) -> bool:
    """Mark an active job succeeded; False if it had already finished (the caller lost).

    Call inside the transaction that writes the job's effects, so both commit together.
    """
    return bool(
        Job.objects.filter(pk=job_id, state__in=JOB_ACTIVE_STATES).update(
            state=JobState.SUCCEEDED,
            progress=1.0,
            finished_at=timezone.now(),
            result=result or {},
            error_code="",
            error_message="",
        )
    )


def job_fail(
    *,
    job_id: uuid.UUID,
    code: str,
    message: str = "",
    state: JobState = JobState.FAILED,
) -> bool:
    """Mark an active job failed (or cancelled), audited; False if it had already finished."""
    with transaction.atomic():
        job = (
            # of=self: the namespace is an outer join now (system jobs have none).
            Job.objects.select_for_update(of=("self",))
            .filter(pk=job_id, state__in=JOB_ACTIVE_STATES)
            .select_related("namespace")
            .first()
        )
        if job is None:
            return False
        job.state = state
        job.finished_at = timezone.now()
        job.error_code = code[:64]
        job.error_message = message[:2000]
        job.save(update_fields=["state", "finished_at", "error_code", "error_message"])
        audit.audit_record(
            action=AuditAction.JOB_FAIL,
            outcome=AuditOutcome.FAILURE,
            namespace=job.namespace.name if job.namespace else "",
            target=f"jobs/{job.pk}",
            details={"kind": job.kind, "state": str(state), "code": code, "message": message[:500]},
        )
    return True
