"""Pending objects: an object key is recorded before any byte of it is written, so whatever a
failed write, delete or replace leaves in the store is found and removed (here, or later by the
janitor) and never orphaned."""

from __future__ import annotations

import logging

from django.utils import timezone

from registry import storage
from registry.models import PendingObject

logger = logging.getLogger(__name__)


def pending_begin(*, key: str, reason: str = "upload") -> None:
    """Record `key` as pending before writing it (committed on its own, before the write)."""
    PendingObject.objects.get_or_create(object_key=key, defaults={"reason": reason})


def pending_discard(store: storage.ObjectStore, key: str) -> None:
    """Delete whatever may exist under `key`; keep the pending record if the store is down."""
    try:
        store.abort_incomplete(key)
        store.delete(key)
    except storage.StorageError:
        logger.warning("could not delete %s now; left for the janitor", key)
        PendingObject.objects.filter(object_key=key).update(abandoned_at=timezone.now())
        return
    PendingObject.objects.filter(object_key=key).delete()
