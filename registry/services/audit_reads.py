"""People reading the audit log: exports and verifications, each itself an audited event."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict

from registry import selectors
from registry.access import Principal
from registry.models import AuditAction, AuditEvent, AuditOutcome
from registry.services.audit import VerifyReport, audit_record_now, audit_verify


def audit_export(
    *, principal: Principal, filters: selectors.AuditFilters, query: Mapping[str, str]
) -> Iterator[AuditEvent]:
    """The caller's visible events matching `filters`, oldest first, streamed from the DB.

    The export is recorded (with the query as asked, truncated) before any event is read.
    """
    qs = selectors.audit_event_list_for_user(principal=principal, filters=filters).order_by("seq")
    audit_record_now(
        action=AuditAction.AUDIT_EXPORT,
        target="audit/events",
        details={"filters": {k: v[:200] for k, v in query.items()}},
    )
    return qs.iterator(chunk_size=2000)


def audit_verify_for_user(*, principal: Principal) -> VerifyReport:
    """Verify the whole log (chain, Merkle roots, checkpoints) for an auditor; audited."""
    selectors.audit_log_verifier_check(principal=principal)
    report = audit_verify()
    first = report.first
    audit_record_now(
        action=AuditAction.AUDIT_VERIFY,
        outcome=AuditOutcome.SUCCESS if report.ok else AuditOutcome.FAILURE,
        target="audit/log",
        details={"entries": report.entries, "first_bad": asdict(first) if first else None},
    )
    return report
