"""KEK rotation as a background job: every data key re-wrapped under one KEK, with progress.

The job names its target KEK when it is created (`rewrap_keys --job`). A worker re-wraps the
artifacts' data keys in pk order, in batches that each commit on their own
(`artifacts_rewrap_batch`), then the keys of open upload sessions and the webhook secrets.
Whatever is already under the target is skipped and every write is conditional on the old
kek_id, so a run killed midway (or a message delivered twice) resumes where the last commit
left off and never wraps a key twice.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction

from registry.crypto import keys
from registry.keyconfig import provider_for
from registry.models import Artifact, AuditAction, Job, JobKind
from registry.services import audit, jobs
from registry.services.artifacts import SHREDDED_KEK_ID, artifacts_rewrap_batch
from registry.services.envelope import key_provider_call
from registry.services.uploads import upload_sessions_rewrap_all
from registry.services.webhooks import webhook_secrets_rewrap_all
from registry.signing.keys import signing_keys_rewrap_all

logger = logging.getLogger(__name__)


def rewrap_job_create(*, to_kek_id: str, created_by: User | None = None) -> Job:
    """Queue a job that re-wraps every data key (artifacts, open uploads) and webhook secret
    under `to_kek_id` (audited).

    `to_kek_id` must be the primary KEK of its provider when the job runs (the local keyring's
    primary, or the KMS key itself), or the job fails saying so.
    """
    with transaction.atomic():
        job = jobs.job_create(
            kind=JobKind.REWRAP,
            namespace=None,
            created_by=created_by,
            params={"to_kek_id": to_kek_id},
        )
        audit.audit_record(
            action=AuditAction.JOB_CREATE,
            target=f"jobs/{job.pk}",
            details={"kind": JobKind.REWRAP, "to_kek_id": to_kek_id},
        )
    return job


def _target(to_kek: str) -> keys.KeyProvider:
    provider = key_provider_call(provider_for, to_kek)
    primary = key_provider_call(provider.primary_kek_id)
    if primary != to_kek:
        # The local keyring moved on since the job was made: wrapping under its new primary
        # would not be what the operator asked for, and under an old one would undo a rotation.
        raise keys.KeyProviderError(
            f"{to_kek} is no longer the primary KEK of its provider ({primary} is); start a new "
            "job with `manage.py rewrap_keys --job --to-local`."
        )
    return provider


def rewrap_progress(*, to_kek: str) -> tuple[int, int]:
    """(data keys under `to_kek`, data keys in all): shredded ones have none."""
    live = Artifact.objects.exclude(kek_id=SHREDDED_KEK_ID)
    return live.filter(kek_id=to_kek).count(), live.count()


def rewrap_job_run(*, job_id: uuid.UUID) -> dict[str, Any] | None:
    """Run (or resume) a rewrap job to the end; returns its result, None if not ours to run."""
    audit.context_set_system("worker:keys_rewrap")
    job = jobs.job_start(job_id=job_id)
    if job is None:
        return None
    to_kek = str(job.params.get("to_kek_id", ""))
    try:
        target = _target(to_kek)
    except keys.KeyProviderError as exc:
        jobs.job_fail(job_id=job_id, code="kek_unavailable", message=str(exc))
        return None
    done, total = rewrap_progress(to_kek=to_kek)
    moved = 0
    after: uuid.UUID | None = None
    while True:
        jobs.job_progress(
            job_id=job_id,
            progress=done / total if total else 1.0,
            message=f"re-wrapped {done}/{total} data keys",
        )
        after, count = artifacts_rewrap_batch(
            target=target, after=after, limit=settings.SMR_REWRAP_BATCH_SIZE
        )
        if after is None:
            break
        moved += count
        done += count
    uploads_moved, _ = upload_sessions_rewrap_all(target=target)
    secrets_moved, _ = webhook_secrets_rewrap_all(target=target)
    signing_moved, _ = signing_keys_rewrap_all(target=target)
    done, total = rewrap_progress(to_kek=to_kek)
    result = {
        "to_kek_id": to_kek,
        "data_keys_moved": moved,
        "data_keys_done": done,
        "data_keys_total": total,
        "upload_keys_moved": uploads_moved,
        "webhook_secrets_moved": secrets_moved,
        "signing_keys_moved": signing_moved,
    }
    with transaction.atomic():
        jobs.job_progress(
            job_id=job_id, progress=1.0, message=f"re-wrapped {done}/{total} data keys"
        )
        jobs.job_finish(job_id=job_id, result=result)
    logger.info("rewrap job %s: %s", job_id, result)
    return result
