"""Cleanup of what a crash or an outage left behind: pending objects and expired uploads."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.utils import timezone

from registry import storage
from registry.models import Artifact, PendingObject, UploadPart, UploadSession, UploadState
from registry.services.artifacts import pending_discard
from registry.services.uploads import upload_session_abort

logger = logging.getLogger(__name__)


def objects_cleanup(*, older_than: timedelta) -> tuple[int, int]:
    """Delete unreferenced objects recorded as pending before `now - older_than`.

    The grace period protects uploads still in flight. Returns (cleaned, still pending).
    """
    store = storage.get_object_store()
    cutoff = timezone.now() - older_than
    cleaned = 0
    for pending in PendingObject.objects.filter(created_at__lte=cutoff).iterator():
        key = pending.object_key
        referenced = (
            Artifact.objects.filter(object_key=key).exists()
            or UploadPart.objects.filter(object_key=key).exists()
        )
        if referenced:
            pending.delete()
            continue
        pending_discard(store, key)
        if not PendingObject.objects.filter(pk=pending.pk).exists():
            cleaned += 1
    return cleaned, PendingObject.objects.filter(created_at__lte=cutoff).count()


def uploads_expire() -> int:
    """Abort open upload sessions past their expiry, deleting their staged parts."""
    count = 0
    expired = UploadSession.objects.filter(state=UploadState.OPEN, expires_at__lte=timezone.now())
    for session in expired.iterator():
        upload_session_abort(session=session)
        count += 1
    return count
