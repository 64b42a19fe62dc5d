"""Cleanup of what a crash or an outage left behind: pending objects and expired uploads."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.db.models import Q
from django.utils import timezone

from registry import storage
from registry.models import Artifact, PendingObject, UploadPart, UploadSession, UploadState
from registry.services.artifacts import SHREDDED_KEK_ID
from registry.services.pending import pending_discard
from registry.services.uploads import upload_session_abort

logger = logging.getLogger(__name__)


# Objects that are no longer referenced by anything, or that a request already gave up on,
# can go at once; only uploads may still be in flight and get the grace period.
IN_FLIGHT_REASONS = ("upload", "upload-part")


def objects_cleanup(*, older_than: timedelta) -> tuple[int, int]:
    """Delete unreferenced objects left by failed writes, deletes and replacements.

    Objects of uploads that may still be running are only touched once older than
    `older_than`. Returns (cleaned, still pending).
    """
    store = storage.get_object_store()
    cutoff = timezone.now() - older_than
    due = (
        Q(created_at__lte=cutoff) | Q(abandoned_at__isnull=False) | ~Q(reason__in=IN_FLIGHT_REASONS)
    )
    cleaned = 0
    for pending in PendingObject.objects.filter(due).iterator():
        key = pending.object_key
        # A revoked version's artifacts keep their rows (the metadata stays) but lost their
        # keys: their objects are noise, referenced by nothing that can read them.
        referenced = (
            Artifact.objects.filter(object_key=key).exclude(kek_id=SHREDDED_KEK_ID).exists()
            or UploadPart.objects.filter(object_key=key).exists()
        )
        if referenced:
            pending.delete()
            continue
        pending_discard(store, key)
        if not PendingObject.objects.filter(pk=pending.pk).exists():
            cleaned += 1
    return cleaned, PendingObject.objects.filter(due).count()


def uploads_expire() -> int:
    """Abort open upload sessions past their expiry, deleting their staged parts."""
    count = 0
    expired = UploadSession.objects.filter(state=UploadState.OPEN, expires_at__lte=timezone.now())
    for session in expired.iterator():
        upload_session_abort(session=session)
        count += 1
    return count
