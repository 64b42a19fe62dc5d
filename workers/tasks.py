"""Periodic and on-demand tasks. Each is idempotent: running twice changes nothing more."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.db import OperationalError

from registry import storage
from registry.services import audit, janitor


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
