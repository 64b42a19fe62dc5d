"""The approval stage of the version lifecycle: the namespace policy, reviews, and the
transitions after review (pending_review -> approved | rejected, approved -> deprecated,
any -> revoked).

Every transition happens with the version row locked, in the transaction that writes its
audit event: two final approvals racing produce one `approved` transition, decided by the lock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from registry import selectors
from registry.access import Action, Principal, principal_allows
from registry.errors import (
    AlreadyReviewed,
    InvalidInput,
    SelfReviewForbidden,
    VersionAlreadyRevoked,
    VersionNotApproved,
    VersionNotReviewable,
)
from registry.models import (
    SEVERITY_CHOICES,
    Artifact,
    AuditAction,
    ModelVersion,
    Namespace,
    PendingObject,
    Review,
    ReviewDecision,
    UploadPart,
    UploadSession,
    UploadState,
    VersionState,
    WebhookEvent,
)
from registry.services import ledger, scanning, signatures, webhooks
from registry.services.aliases import alias_name_validate
from registry.services.artifacts import SHREDDED_KEK_ID
from registry.services.audit import audit_record, audit_target

# Gates a namespace policy may require. Each raises a GateNotMet subclass whose code names
# it; publisher signatures (`publisher_signature`) and DP budgets (`dp_budget`) plug in here.
GATES: dict[str, Callable[[ModelVersion], None]] = {
    "scan_clean": scanning.version_review_gate,
    "publisher_signature": signatures.publisher_signature_gate,
    "dp_budget": ledger.dp_budget_gate,
}

POLICY_FIELDS = (
    "approvals_required",
    "allow_self_review",
    "scan_quarantine_severity",
    "required_gates",
    "protected_aliases",
)


def policy_of(namespace: Namespace) -> dict[str, Any]:
    return {name: getattr(namespace, name) for name in POLICY_FIELDS}


def policy_update(
    *,
    namespace: Namespace,
    approvals_required: int | None = None,
    allow_self_review: bool | None = None,
    scan_quarantine_severity: str | None = None,
    required_gates: list[str] | None = None,
    protected_aliases: list[str] | None = None,
) -> Namespace:
    """Change a namespace's approval policy (audited with the policy before and after).

    Fields left as None keep their value. Unknown gates and severities are an InvalidInput.
    """
    if approvals_required is not None and approvals_required < 1:
        raise InvalidInput("approvals_required must be at least 1.", field="approvals_required")
    severities = [value for value, _label in SEVERITY_CHOICES]
    if scan_quarantine_severity is not None and scan_quarantine_severity not in severities:
        raise InvalidInput(f"scan_quarantine_severity must be one of {severities}.")
    if required_gates is not None:
        unknown = sorted(set(required_gates) - set(GATES))
        if unknown:
            raise InvalidInput(f"Unknown gate(s) {unknown}; known: {sorted(GATES)}.")
        required_gates = sorted(set(required_gates))
    if protected_aliases is not None:
        protected_aliases = sorted({alias_name_validate(name) for name in protected_aliases})
    changes = {
        "approvals_required": approvals_required,
        "allow_self_review": allow_self_review,
        "scan_quarantine_severity": scan_quarantine_severity,
        "required_gates": required_gates,
        "protected_aliases": protected_aliases,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    with transaction.atomic():
        locked = Namespace.objects.select_for_update(no_key=True).get(pk=namespace.pk)
        before = policy_of(locked)
        for name, value in changes.items():
            setattr(locked, name, value)
        if changes:
            locked.save(update_fields=list(changes))
        audit_record(
            action=AuditAction.POLICY_UPDATE,
            namespace=locked.name,
            target=audit_target(locked.name, "policy"),
            details={"before": before, "after": policy_of(locked)},
        )
    return locked


def gates_check(*, version: ModelVersion, namespace: Namespace) -> None:
    """Raise the first failing gate's GateNotMet among those the namespace requires."""
    for name in namespace.required_gates:
        GATES[name](version)


def _is_uploader(version: ModelVersion, user: User) -> bool:
    if user.pk in (version.created_by_id, version.submitted_by_id):
        return True
    return Artifact.objects.filter(version=version, created_by=user).exists()


def review_record(
    *, version: ModelVersion, reviewer: User, decision: str, comment: str = ""
) -> Review:
    """Record `reviewer`'s decision on a version pending review and apply its consequence.

    One rejection moves the version to `rejected`; an approval that brings the distinct
    approvals to the policy's number moves it to `approved`, provided every required gate
    holds. Each review and each transition is audited in the same transaction.
    """
    if decision not in ReviewDecision.values:
        raise InvalidInput(f"decision must be one of {ReviewDecision.values}.")
    with transaction.atomic():
        # The row lock serialises reviews of one version: the second of two racing final
        # approvals sees the version already approved.
        locked = (
            ModelVersion.objects.select_for_update(of=("self",))
            .select_related("model__namespace")
            .get(pk=version.pk)
        )
        namespace = locked.model.namespace
        gates_check(version=locked, namespace=namespace)
        if locked.state != VersionState.PENDING_REVIEW:
            raise VersionNotReviewable(
                f"Version {locked.number} is {locked.state}; only versions pending review "
                "can be reviewed.",
                state=locked.state,
            )
        if not namespace.allow_self_review and _is_uploader(locked, reviewer):
            raise SelfReviewForbidden()
        if Review.objects.filter(version=locked, reviewer=reviewer).exists():
            raise AlreadyReviewed()
        review = Review.objects.create(
            version=locked, reviewer=reviewer, decision=decision, comment=comment
        )
        target = audit_target(namespace.name, locked.model.name, locked.number)
        approvals = Review.objects.filter(version=locked, decision=ReviewDecision.APPROVE).count()
        audit_record(
            action=AuditAction.REVIEW_RECORD,
            namespace=namespace.name,
            target=target,
            details={"decision": decision, "review": review.pk, "approvals": approvals},
        )
        if decision == ReviewDecision.REJECT:
            _transition(locked, VersionState.REJECTED, AuditAction.VERSION_REJECT, target)
        elif approvals >= namespace.approvals_required:
            locked.approved_at = timezone.now()
            _transition(locked, VersionState.APPROVED, AuditAction.VERSION_APPROVE, target)
            signatures.signature_schedule(version=locked)
    version.state, version.approved_at = locked.state, locked.approved_at
    return review


# Transitions receivers hear about (deprecation is not an event).
WEBHOOK_EVENTS: dict[str, WebhookEvent] = {
    AuditAction.VERSION_APPROVE: WebhookEvent.VERSION_APPROVED,
    AuditAction.VERSION_REJECT: WebhookEvent.VERSION_REJECTED,
    AuditAction.VERSION_REVOKE: WebhookEvent.VERSION_REVOKED,
}


def _transition(
    version: ModelVersion,
    state: str,
    action: str,
    target: str,
    details: dict[str, Any] | None = None,
) -> None:
    previous = version.state
    version.state = state
    version.save(update_fields=["state", "approved_at"])
    if action in WEBHOOK_EVENTS:
        webhooks.webhooks_emit(
            namespace=version.model.namespace,
            event=WEBHOOK_EVENTS[action],
            payload=webhooks.version_payload(version, previous_state=previous),
        )
    audit_record(
        action=action,
        namespace=version.model.namespace.name,
        target=target,
        details={"previous_state": previous, "state": state, **(details or {})},
    )


def version_deprecate(*, version: ModelVersion) -> ModelVersion:
    """approved -> deprecated (still downloadable, flagged as superseded); audited."""
    with transaction.atomic():
        locked = _lock(version)
        if locked.state != VersionState.APPROVED:
            raise VersionNotApproved(
                f"Version {locked.number} is {locked.state}; only approved versions can be "
                "deprecated.",
                state=locked.state,
            )
        _transition(locked, VersionState.DEPRECATED, AuditAction.VERSION_DEPRECATE, _target(locked))
    return locked


def version_revoke(*, version: ModelVersion) -> ModelVersion:
    """Any state -> revoked, crypto-shredding its files: from the commit on they answer 410 to
    everyone and no key anywhere can decrypt them; audited.

    In the transaction of the state change, the wrapped data keys of every artifact and upload
    session of the version are destroyed (the revoke event counts them), open uploads are
    aborted, and every ciphertext object is handed to the janitor (a PendingObject), which
    deletes it after the commit. The plaintext DEKs existed only wrapped, so once the rows
    commit the objects are noise, backups of the store included. A scan still running for it
    finds the version no longer scanning and changes nothing.
    """
    with transaction.atomic():
        locked = _lock(version)
        if locked.state == VersionState.REVOKED:
            raise VersionAlreadyRevoked(state=locked.state)
        shredded = _shred(locked)
        _transition(
            locked, VersionState.REVOKED, AuditAction.VERSION_REVOKE, _target(locked), shredded
        )
    return locked


def _shred(version: ModelVersion) -> dict[str, int]:
    # The version row is locked, so no artifact is registered behind this. The sessions are
    # locked before their parts are read: a part being stored either committed first (and is
    # listed here) or waits, then finds its session aborted and discards its object. A
    # concurrent re-wrap's UPDATE is conditional on the old kek_id: it cannot bring a key back.
    artifacts = Artifact.objects.filter(version=version)
    sessions = UploadSession.objects.filter(version=version)
    list(sessions.select_for_update().values_list("pk", flat=True))
    parts = UploadPart.objects.filter(session__version=version)
    object_keys = [
        *artifacts.values_list("object_key", flat=True),
        *parts.values_list("object_key", flat=True),
    ]
    PendingObject.objects.bulk_create(
        [PendingObject(object_key=key, reason="shred") for key in object_keys],
        ignore_conflicts=True,
    )
    # Staged parts have no row left to name them afterwards: only the janitor's record does.
    parts.delete()
    aborted = sessions.filter(state=UploadState.OPEN).update(state=UploadState.ABORTED)
    destroyed = artifacts.exclude(kek_id=SHREDDED_KEK_ID).update(
        wrapped_dek=b"", kek_id=SHREDDED_KEK_ID
    )
    destroyed += sessions.exclude(kek_id=SHREDDED_KEK_ID).update(
        wrapped_dek=b"", kek_id=SHREDDED_KEK_ID
    )
    return {"keys_destroyed": destroyed, "uploads_aborted": aborted, "objects": len(object_keys)}


def _lock(version: ModelVersion) -> ModelVersion:
    return (
        ModelVersion.objects.select_for_update(of=("self",))
        .select_related("model__namespace", "created_by", "submitted_by")
        .get(pk=version.pk)
    )


def _target(version: ModelVersion) -> str:
    return audit_target(version.model.namespace.name, version.model.name, version.number)


def uploader_q(user: User) -> Q:
    """The versions `user` counts as an uploader of, as a ModelVersion filter: the rule of
    `_is_uploader` (creator, submitter, or the uploader of any of its files), for listings
    such as the review queue."""
    return (
        Q(created_by=user)
        | Q(submitted_by=user)
        | Q(Exists(Artifact.objects.filter(version=OuterRef("pk"), created_by=user)))
    )


def review_allowed(*, principal: Principal, version: ModelVersion) -> bool:
    """Whether the caller may review `version` now, by the rules `review_record` and the
    `review` action check in front of it apply: their role and token allow reviewing in its
    namespace, it is pending review, they have not reviewed it yet, and it is not their own
    upload unless the policy allows self-review. For showing a review control only: the
    service decides (gates included) when the review is recorded."""
    namespace = version.model.namespace
    role = selectors.role_for(principal=principal, namespace=namespace)
    if not principal_allows(principal, role, Action.REVIEW):
        return False
    if version.state != VersionState.PENDING_REVIEW:
        return False
    if not namespace.allow_self_review and _is_uploader(version, principal.user):
        return False
    return not Review.objects.filter(version=version, reviewer=principal.user).exists()
