"""Signatures of versions: the registry's own on approval, the publishers' checked against the
keys their namespace trusts, and the check of the registry's before a version is served.

When a version becomes approved, `signature_schedule` queues a `sign` job in the approval's
transaction; a worker runs `version_sign`, which builds the OMS bundle from the digests
recorded at upload (registry.signing: no artifact byte is read) and stores it. Before an
approved version's file is served, `signature_check` compares the stored bundle with the
recorded digests and refuses (audited) when they differ.

A publisher signs the folder with `model_signing sign key` and sends the bundle
(`signature_record`): it is checked against the namespace's trusted publisher keys and the
digests recorded at upload, and the result is kept, whatever it is. The `publisher_signature`
gate of the review workflow holds when a valid one exists.
"""

from __future__ import annotations

import uuid
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction

from registry.errors import (
    InvalidInput,
    NotFound,
    PublisherKeyExists,
    PublisherSignatureMissing,
    SignatureMismatch,
)
from registry.models import (
    Artifact,
    AuditAction,
    AuditOutcome,
    Job,
    JobKind,
    JobState,
    ModelVersion,
    Namespace,
    PublisherKey,
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


# --- Publisher signatures ------------------------------------------------------------------

# The curves `model_signing sign key` signs with (ECDSA with SHA-256/384/512).
PUBLISHER_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


def publisher_key_add(
    *, namespace: Namespace, public_key_pem: str, name: str = "", creator: User | None
) -> PublisherKey:
    """Trust an EC public key (PEM) for the namespace's publisher signatures (audited)."""
    try:
        key = serialization.load_pem_public_key(public_key_pem.encode())
    except (ValueError, TypeError, UnicodeEncodeError):
        raise InvalidInput(
            "public_key_pem is not a PEM public key.", field="public_key_pem"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
        key.curve, PUBLISHER_CURVES
    ):
        raise InvalidInput(
            "Publisher keys are EC keys on P-256, P-384 or P-521 (what `model_signing sign "
            "key` uses).",
            field="public_key_pem",
        )
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    key_id = oms.public_key_hint(pem.encode())
    try:
        with transaction.atomic():
            trusted = PublisherKey.objects.create(
                namespace=namespace,
                key_id=key_id,
                name=name,
                public_key_pem=pem,
                created_by=creator,
            )
            audit_record(
                action=AuditAction.PUBLISHER_KEY_ADD,
                namespace=namespace.name,
                target=audit_target(namespace.name, f"publisher-keys/{key_id}"),
                details={"key_id": key_id, "name": name},
            )
    except IntegrityError:
        raise PublisherKeyExists(key_id=key_id) from None
    return trusted


def publisher_key_delete(*, namespace: Namespace, key_id: str) -> None:
    """Stop trusting a publisher key (audited). Signatures already checked keep their result."""
    with transaction.atomic():
        deleted, _ = PublisherKey.objects.filter(namespace=namespace, key_id=key_id).delete()
        if not deleted:
            raise NotFound("The namespace trusts no publisher key with this id.")
        audit_record(
            action=AuditAction.PUBLISHER_KEY_DELETE,
            namespace=namespace.name,
            target=audit_target(namespace.name, f"publisher-keys/{key_id}"),
            details={"key_id": key_id},
        )


def signature_record(*, version: ModelVersion, bundle: dict[str, Any]) -> Signature:
    """Check a publisher's OMS bundle against the namespace's trusted keys and the version's
    recorded digests, and keep it with the result (valid, invalid with the reason, or
    unknown_key); audited. A bundle that cannot be read at all is an InvalidInput."""
    namespace = version.model.namespace
    hint = oms.bundle_key_hint(bundle)
    if hint is None:
        raise InvalidInput(
            "bundle is not a key-based OMS bundle (no verificationMaterial.publicKey.hint); "
            "send the file `model_signing sign key` wrote.",
            field="bundle",
        )
    try:
        oms.bundle_parse(bundle)  # junk is refused whatever key it names
    except oms.BundleInvalid as exc:
        raise InvalidInput(f"bundle: {exc}", field="bundle") from None
    trusted = PublisherKey.objects.filter(namespace=namespace, key_id=hint).first()
    result, reason = SignatureResult.VALID, ""
    if trusted is None:
        result, reason = SignatureResult.UNKNOWN_KEY, "the namespace trusts no key with this id"
    else:
        try:
            bundles.bundle_verify(bundle, _files(version), trusted.public_key_pem)
        except oms.BundleInvalid as exc:
            if exc.reason == "malformed":
                raise InvalidInput(f"bundle: {exc}", field="bundle") from None
            result, reason = SignatureResult.INVALID, f"{exc.reason}: {exc}"
    with transaction.atomic():
        signature = Signature.objects.create(
            version=version,
            kind=SignatureKind.PUBLISHER,
            key_id=hint[:128],
            bundle=bundle,
            result=result,
            reason=reason[:2000],
        )
        audit_record(
            action=AuditAction.SIGNATURE_RECORD,
            namespace=namespace.name,
            target=audit_target(namespace.name, version.model.name, version.number),
            details={"signature": signature.pk, "key_id": hint[:128], "result": result},
        )
    return signature


def publisher_signature_gate(version: ModelVersion) -> None:
    """The `publisher_signature` gate: a valid publisher signature of the version exists."""
    valid = Signature.objects.filter(
        version=version, kind=SignatureKind.PUBLISHER, result=SignatureResult.VALID
    )
    if not valid.exists():
        raise PublisherSignatureMissing()
