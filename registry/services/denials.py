"""Refused accesses in the audit log, folded so that a flood cannot grow the log without bound.

Each actor may add SMR_DENIED_AUDIT_BURST `access.denied` events per namespace per window;
further refusals in that window are only counted, and the next recorded event carries the
count (`details.folded`). The counters live in Django's cache: per process with the default
local-memory cache, shared with a shared cache (Redis) in production. Either way the log grows
by at most burst x processes events per actor, namespace and window.
"""

from __future__ import annotations

from django.conf import settings
from django.core.cache import cache

from registry.models import AuditAction, AuditOutcome
from registry.services.audit import audit_record_now


def access_denied_record(
    *, user: str, namespace: str, target: str, operation: str, reason: str
) -> bool:
    """Record one refused access (in its own transaction); False if it was folded."""
    burst, window = settings.SMR_DENIED_AUDIT_BURST, settings.SMR_DENIED_AUDIT_WINDOW
    key = f"smr:denied:{user}:{namespace}"
    cache.add(f"{key}:n", 0, timeout=window)
    try:
        seen = cache.incr(f"{key}:n")
    except ValueError:  # the window expired between add and incr
        cache.set(f"{key}:n", 1, timeout=window)
        seen = 1
    if seen > burst:
        cache.add(f"{key}:folded", 0, timeout=None)
        try:
            cache.incr(f"{key}:folded")
        except ValueError:
            cache.set(f"{key}:folded", 1, timeout=None)
        return False
    folded = cache.get(f"{key}:folded", 0)
    if folded:
        cache.delete(f"{key}:folded")
    details: dict[str, object] = {"operation": operation, "reason": reason}
    if folded:
        details["folded"] = folded
    audit_record_now(
        action=AuditAction.ACCESS_DENIED,
        outcome=AuditOutcome.DENIED,
        namespace=namespace,
        target=target,
        details=details,
    )
    return True
