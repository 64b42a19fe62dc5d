"""Periodic and on-demand tasks. Each is idempotent: running twice changes nothing more.

Tasks are thin: they take ids, call one service, and retry only transient errors (database,
object store or key service unavailable) with exponential backoff.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from types import ModuleType
from typing import Any

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import OperationalError

from registry import errors, storage
from registry.services import (
    audit,
    dp,
    janitor,
    jobs,
    rotation,
    scanning,
    signatures,
    webhooks,
)

# What a retry can fix. Anything else is a bug or bad input: retrying would not help.
TRANSIENT = (OperationalError, errors.StorageUnavailable, errors.KeyServiceUnavailable)


class JobTask(Task):
    """A task whose first argument is a Job id: a final failure fails the job (audited).

    A worker killed mid-task never gets here: with acks_late and reject_on_worker_lost the
    message goes back to the queue and the next delivery claims the job again.
    """

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        job_id = args[0] if args else kwargs.get("job_id")
        if job_id is None:
            return
        if isinstance(exc, SoftTimeLimitExceeded):
            code, message = "time_limit", "The job ran past its time limit."
        elif isinstance(exc, errors.RegistryError):
            code, message = exc.code, exc.message
        else:
            # Details stay in the worker log; the job names only the kind of failure.
            code, message = "internal_error", f"The job failed ({type(exc).__name__})."
        audit.context_set_system(f"worker:{self.name.rsplit('.', 1)[-1]}")
        jobs.job_fail(job_id=uuid.UUID(str(job_id)), code=code, message=message)


def _training_loop() -> ModuleType | None:
    """The DP training loop, or None on a worker without the dp extra (the job then fails
    with a message saying what to install)."""
    try:
        from workers import training
    except ImportError:
        return None
    return training


def _job_uuid(job_id: str) -> uuid.UUID | None:
    """The job id a message carries; None for one that is not a UUID (nothing to run)."""
    try:
        return uuid.UUID(job_id)
    except ValueError:
        return None


@shared_task(
    base=JobTask,
    bind=True,
    autoretry_for=TRANSIENT,
    retry_backoff=True,
    retry_backoff_max=600,
    # Fewer than SMR_JOB_MAX_ATTEMPTS (each retry is an attempt), leaving room for a crash.
    max_retries=3,
    soft_time_limit=settings.SMR_SCAN_SOFT_TIME_LIMIT,
    time_limit=settings.SMR_SCAN_TIME_LIMIT,
    acks_late=True,
    reject_on_worker_lost=True,
)
def version_scan(self: Task, job_id: str) -> str | None:
    """Scan a submitted version's files and move it to pending_review or quarantined."""
    job = _job_uuid(job_id)
    if job is None:
        return None
    return scanning.version_scan(job_id=job)


@shared_task(
    base=JobTask,
    bind=True,
    autoretry_for=TRANSIENT,
    retry_backoff=True,
    retry_backoff_max=600,
    max_retries=3,
    soft_time_limit=settings.SMR_REWRAP_SOFT_TIME_LIMIT,
    time_limit=settings.SMR_REWRAP_TIME_LIMIT,
    acks_late=True,
    reject_on_worker_lost=True,
)
def keys_rewrap(self: Task, job_id: str) -> dict[str, Any] | None:
    """Re-wrap every data key under the job's KEK; a retry or redelivery resumes, never redoes."""
    job = _job_uuid(job_id)
    if job is None:
        return None
    return rotation.rewrap_job_run(job_id=job)


@shared_task(
    base=JobTask,
    bind=True,
    autoretry_for=TRANSIENT,
    retry_backoff=True,
    retry_backoff_max=600,
    max_retries=3,
    acks_late=True,
)
def version_sign(self: Task, job_id: str) -> str | None:
    """Sign a just-approved version with the registry's key (its recorded digests only)."""
    job = _job_uuid(job_id)
    if job is None:
        return None
    signature = signatures.version_sign(job_id=job)
    return None if signature is None else str(signature.pk)


@shared_task(
    base=JobTask,
    bind=True,
    # No autoretry: a run that failed has settled its budget claim; a new job starts over.
    soft_time_limit=settings.SMR_DP_SOFT_TIME_LIMIT,
    time_limit=settings.SMR_DP_TIME_LIMIT,
    acks_late=True,
    reject_on_worker_lost=True,
)
def dp_retrain(self: Task, job_id: str) -> str | None:
    """DP-SGD training of a new draft version on a dataset's blocks (the `dp` queue)."""
    job = _job_uuid(job_id)
    if job is None:
        return None
    return dp.dp_retrain_run(job_id=job, training=_training_loop())


@shared_task(
    base=JobTask,
    bind=True,
    autoretry_for=TRANSIENT,
    retry_backoff=True,
    max_retries=3,
    soft_time_limit=settings.SMR_DP_SOFT_TIME_LIMIT,
    time_limit=settings.SMR_DP_TIME_LIMIT,
    acks_late=True,
    reject_on_worker_lost=True,
)
def privacy_audit(self: Task, job_id: str) -> dict[str, Any] | None:
    """Membership-inference audit of a version against its dataset (spends no budget)."""
    job = _job_uuid(job_id)
    if job is None:
        return None
    return dp.privacy_audit_run(job_id=job, training=_training_loop())


@shared_task(
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    max_retries=3,
    soft_time_limit=settings.SMR_WEBHOOK_TIMEOUT + 30,
    time_limit=settings.SMR_WEBHOOK_TIMEOUT + 60,
    acks_late=True,
    reject_on_worker_lost=True,
)
def webhook_deliver(attempt_id: str) -> str | None:
    """Make one webhook delivery attempt; a failed one schedules the next (its own message)."""
    try:
        attempt = uuid.UUID(attempt_id)
    except ValueError:
        return None
    following = webhooks.webhook_deliver(attempt_id=attempt)
    return str(following) if following else None


@shared_task(autoretry_for=(OperationalError,), retry_backoff=True, max_retries=3)
def jobs_dispatch() -> int:
    """Send again queued jobs whose message was lost (the broker was down at commit)."""
    audit.context_set_system("worker:jobs_dispatch")
    return jobs.jobs_dispatch()


@shared_task(autoretry_for=(OperationalError,), retry_backoff=True, max_retries=3)
def webhooks_dispatch() -> int:
    """Send webhook attempts whose message was lost (the broker was down at commit, it lost
    the message, or the worker died mid-attempt)."""
    return webhooks.webhooks_dispatch()


@shared_task(
    autoretry_for=(OperationalError, storage.StorageUnavailable),
    retry_backoff=True,
    max_retries=5,
)
def audit_checkpoint() -> int | None:
    """Sign the audit log's current head (no-op if nothing was appended since the last one)."""
    audit.context_set_system("worker:audit_checkpoint")
    checkpoint = audit.audit_checkpoint_create()
    return checkpoint.size if checkpoint else None


@shared_task(autoretry_for=(OperationalError,), retry_backoff=True, max_retries=3)
def storage_janitor(older_than_seconds: int = 24 * 3600) -> dict[str, int]:
    """Abort expired uploads and delete objects left behind by failed writes."""
    audit.context_set_system("worker:storage_janitor")
    expired = janitor.uploads_expire()
    cleaned, left = janitor.objects_cleanup(older_than=timedelta(seconds=older_than_seconds))
    return {"expired_uploads": expired, "objects_cleaned": cleaned, "still_pending": left}
