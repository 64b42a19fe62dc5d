"""The registry's signature of approved versions, and its check before they are served.

When a version becomes approved, `signature_schedule` queues a `sign` job in the approval's
transaction; a worker runs `version_sign`, which builds the OMS bundle from the digests
recorded at upload (registry.signing: no artifact byte is read) and stores it. Before an
approved version's file is served, `signature_check` compares the stored bundle with the
recorded digests and refuses (audited) when they differ.
"""

from __future__ import annotations

import uuid

from django.db import IntegrityError, transaction

from registry.errors import SignatureMismatch
from registry.models import (
    Artifact,
    AuditAction,
    AuditOutcome,
    Job,
    JobKind,
    JobState,
    ModelVersion,
    Signature,
    SignatureKind,
    SignatureResult,
    VersionState,
)
from registry.services import audit, jobs
from registry.services.audit import audit_record, audit_record_now, audit_target
from registry.signing import bundles, oms
from registry.signing.keys import signing_key_current

# States in which a version's registry signature is checked before its bytes are served.
SIGNED_STATES = frozenset({VersionState.APPROVED, VersionState.DEPRECATED})


def _files(version: ModelVersion) -> list[oms.FileDigest]:
    rows = Artifact.objects.filter(version=version).order_by("path")
    return [
        oms.FileDigest(path, sha256, size)
        for path, sha256, size in rows.values_list("path", "sha256", "size")
    ]


def _model_name(version: ModelVersion) -> str:
    return f"{version.model.namespace.name}/{version.model.name}/v{version.number}"


def signature_schedule(*, version: ModelVersion) -> Job:
    """Queue the signing of a just-approved version (call in the approval's transaction)."""
    return jobs.job_create(kind=JobKind.SIGN, namespace=version.model.namespace, version=version)


def version_sign(*, job_id: uuid.UUID) -> Signature | None:
    """Run sign job `job_id`: the registry's bundle over the version's recorded digests.

    Idempotent: a version keeps its first registry signature (a duplicate run finds it).
    """
    audit.context_set_system("worker:version_sign")
    job = jobs.job_start(job_id=job_id)
    if job is None:
        return None
    version = job.version
    if version is None or version.state not in SIGNED_STATES:
        jobs.job_fail(
            job_id=job_id,
            code="version_changed",
            message="The version is no longer approved.",
            state=JobState.CANCELLED,
        )
        return None
    existing = Signature.objects.filter(version=version, kind=SignatureKind.REGISTRY).first()
    if existing is not None:
        jobs.job_finish(job_id=job_id, result={"signature": existing.pk, "duplicate": True})
        return existing
    # Outside the transaction: with KMS, signing is a network call.
    key = signing_key_current()
    bundle = bundles.bundle_build(_files(version), _model_name(version), key=key)
    ns = version.model.namespace.name
    try:
        with transaction.atomic():
            signature = Signature.objects.create(
                version=version,
                kind=SignatureKind.REGISTRY,
                key_id=key.key_id,
                bundle=bundle,
                result=SignatureResult.VALID,
            )
            audit_record(
                action=AuditAction.VERSION_SIGN,
                namespace=ns,
                target=audit_target(ns, version.model.name, version.number),
                details={"key_id": key.key_id, "signature": signature.pk, "job": str(job_id)},
            )
    except IntegrityError:  # a concurrent duplicate run signed it first
        signature = Signature.objects.get(version=version, kind=SignatureKind.REGISTRY)
    jobs.job_finish(job_id=job_id, result={"signature": signature.pk, "key_id": key.key_id})
    return signature


def signature_check(*, version: ModelVersion) -> None:
    """Refuse to serve an approved version whose registry signature does not match the
    digests recorded for its files (SignatureMismatch, audited). Versions not yet signed
    (the sign job still queued) are served: their digests are checked on every read anyway.
    """
    if version.state not in SIGNED_STATES:
        return
    signature = Signature.objects.filter(version=version, kind=SignatureKind.REGISTRY).first()
    if signature is None:
        return
    try:
        bundles.bundle_verify_registry(signature.bundle, _files(version))
    except oms.BundleInvalid as exc:
        ns = version.model.namespace.name
        audit_record_now(
            action=AuditAction.SIGNATURE_MISMATCH,
            outcome=AuditOutcome.FAILURE,
            namespace=ns,
            target=audit_target(ns, version.model.name, version.number),
            details={"signature": signature.pk, "reason": exc.reason},
        )
        raise SignatureMismatch(reason=exc.reason) from exc
