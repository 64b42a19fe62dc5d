"""Appending to the log: one hash-chained row per event, in the caller's transaction.

Appends take a PostgreSQL advisory transaction lock, read the head and insert seq+1, so a
rolled-back change leaves no event and sequence numbers have no gaps (a DB sequence would leave
gaps on rollback, indistinguishable from deletions). The lock is held until the caller commits,
which serialises audited writes: keep the audit call at the end of short transactions.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, cast

from django.db import connection, transaction
from django.utils import timezone

from registry.auditchain import GENESIS, canonical_bytes, entry_hash, format_time
from registry.models import AuditAction, AuditEvent, AuditOutcome
from registry.services.audit.context import AuditContext, context, context_end, context_replay

logger = logging.getLogger(__name__)

# pg_advisory_xact_lock key ("SMRAUDIT" as a signed 64-bit integer).
APPEND_LOCK = int.from_bytes(b"SMRAUDIT", "big") - (1 << 63)


def advisory_lock(key: int) -> None:
    """Take a PostgreSQL transaction-level advisory lock, held until the transaction ends.

    On SQLite (embedded mode) this does nothing: every transaction there runs as
    BEGIN IMMEDIATE, so writers are serial already.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [key])


def _head() -> tuple[int, str] | None:
    """(seq, entry_hash) of the last event, or None: one fixed statement, built once.

    Every audited write reads the head; as an ORM query (order_by().values_list().first())
    compiling it cost ~0.11 ms per event, eight times the query itself on SQLite.
    """
    sql = _HEAD_SQL.get(connection.vendor)
    if sql is None:
        meta = AuditEvent._meta
        quote = connection.ops.quote_name
        seq = quote(cast(str, meta.get_field("seq").column))
        digest = quote(cast(str, meta.get_field("entry_hash").column))
        sql = f"SELECT {seq}, {digest} FROM {quote(meta.db_table)} ORDER BY {seq} DESC LIMIT 1"  # noqa: S608 - names from the model, no input
        _HEAD_SQL[connection.vendor] = sql
    with connection.cursor() as cursor:
        cursor.execute(sql)
        row = cursor.fetchone()
    return (int(row[0]), str(row[1])) if row else None


_HEAD_SQL: dict[str, str] = {}


def audit_target(
    namespace: str, model: str | None = None, version: int | None = None, path: str | None = None
) -> str:
    """How the log names what an event is about: ns, ns/model, ns/model/vN or ns/model/vN/path.

    Each part counts only when the ones before it are given, so every event about the same
    object carries the same target string and an auditor can filter on its prefix.
    """
    parts = [namespace]
    if model is not None:
        parts.append(model)
        if version is not None:
            parts.append(f"v{version}")
            if path is not None:
                parts.append(path)
    return "/".join(parts)


def _clean(value: str) -> str:
    # PostgreSQL text and jsonb cannot hold NUL; attacker-supplied strings may contain it.
    return value.replace("\x00", "\ufffd")


def _clean_details(value: Any) -> Any:
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, dict):
        return {_clean(str(k)): _clean_details(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean_details(v) for v in value]
    return value


def record_of(
    *,
    seq: int,
    created_at: datetime,
    actor_kind: str,
    actor_user: str,
    actor_token: str,
    action: str,
    namespace: str,
    target: str,
    target_sha256: str,
    request_id: str,
    client_ip: str,
    outcome: str,
    details: dict[str, Any],
) -> dict[str, Any]:
    """The canonical record of an event: what is hashed, rebuilt the same way by verify.

    canonical_bytes() of this dict is stored with the event and chained by entry_hash(); an
    auditor re-implementing the verifier rebuilds exactly this from the row's columns.
    """
    return {
        "v": 1,
        "seq": seq,
        "time": format_time(created_at),
        "actor": {"kind": actor_kind, "user": actor_user, "token": actor_token},
        "action": action,
        "namespace": namespace,
        "target": target,
        "target_sha256": target_sha256,
        "request_id": request_id,
        "client_ip": client_ip,
        "outcome": outcome,
        "details": details,
    }


def audit_record(
    *,
    action: str,
    outcome: str = AuditOutcome.SUCCESS,
    namespace: str = "",
    target: str = "",
    target_sha256: str = "",
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event to the log, inside the caller's transaction (or its own).

    The actor, request id and client IP come from the current audit context. The append lock
    is held until the outermost transaction commits, so the event and the change it describes
    become visible together, or not at all.
    """
    if action not in AuditAction.values:
        raise ValueError(f"unknown audit action {action!r}")
    ctx = context()
    clean_details = _clean_details(details or {})
    # No savepoint of its own: an append that fails fails the caller's transaction anyway
    # (audit_record_now wraps its call in one), and two statements fewer per audited write.
    with transaction.atomic(savepoint=False):
        advisory_lock(APPEND_LOCK)
        head = _head()
        seq, prev = (head[0] + 1, head[1]) if head else (1, GENESIS)
        now = timezone.now()
        fields = {
            "actor_kind": ctx.actor_kind,
            "actor_user": _clean(ctx.user),
            "actor_token": _clean(ctx.token),
            "action": action,
            "namespace": _clean(namespace),
            "target": _clean(target),
            "target_sha256": target_sha256,
            "request_id": _clean(ctx.request_id),
            "client_ip": _clean(ctx.client_ip),
            "outcome": outcome,
        }
        canonical = canonical_bytes(
            record_of(seq=seq, created_at=now, details=clean_details, **fields)
        )
        return AuditEvent.objects.create(
            seq=seq,
            created_at=now,
            details=clean_details,
            canonical=canonical,
            prev_hash=prev,
            entry_hash=entry_hash(prev, seq, canonical),
            **fields,
        )


def audit_record_now(*, ctx: AuditContext | None = None, **kwargs: Any) -> AuditEvent | None:
    """Record an event that must survive the failure being reported (its own transaction).

    Never raises: failing to log a failure must not hide the original error. `ctx` replays a
    request's context captured earlier (the body of a streamed download runs after the view).
    """
    reset = context_replay(ctx) if ctx is not None else None
    try:
        with transaction.atomic():
            return audit_record(**kwargs)
    except Exception:
        logger.exception("could not write audit event %s", kwargs.get("action"))
        return None
    finally:
        if reset is not None:
            context_end(reset)
