"""The scan stage of the version lifecycle: submit -> scanning -> pending_review | quarantined.

`version_scan` runs on a worker (workers.tasks.version_scan). It feeds each artifact to the
analysers in registry.scanners through a `Source` over the segment-addressable decryption, so
an analyser that reads only headers decrypts only the segments holding them. Reading and
scanning happen outside any transaction; the outcome is written in one transaction whose
conditional UPDATE (version still scanning, for this very job) decides which run wins: a
duplicated or redelivered task, or a run that crashed half-way, leaves exactly one set of
reports and one state change.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.contrib.auth.models import User
from django.db import transaction

from registry import scanners, storage
from registry.crypto import stream
from registry.errors import (
    IntegrityFailure,
    ScanGateNotClean,
    StorageUnavailable,
    VersionNotScannable,
)
from registry.models import (
    Artifact,
    AuditAction,
    AuditOutcome,
    Job,
    JobKind,
    JobState,
    ModelVersion,
    ScanReport,
    ScanVerdict,
    VersionState,
    WebhookEvent,
)
from registry.scanners import Finding, Severity, is_unanalysable
from registry.services import audit, jobs, webhooks
from registry.services.artifacts import artifact_unwrap_dek, associated_data

logger = logging.getLogger(__name__)

# Decrypted segments kept per file: analysers jump between a header, a directory at the end
# and the members it names; a few segments cover that without re-decrypting.
SEGMENT_CACHE = 8


class DecryptingSource:
    """A scanners.Source over an artifact's ciphertext: random-access, authenticated plaintext.

    Reads decrypt whole segments (the unit of authentication) through ranged object reads and
    keep the last few; `bytes_read` counts the plaintext bytes decrypted.
    """

    def __init__(self, *, artifact: Artifact, dek: bytes, store: storage.ObjectStore) -> None:
        self._size = artifact.size
        self._dek = dek
        self._ad = associated_data(artifact.id)
        self._key = artifact.object_key
        self._store = store
        self._segments: OrderedDict[int, bytes] = OrderedDict()
        self.bytes_read = 0

    @property
    def size(self) -> int:
        return self._size

    def _segment(self, index: int) -> bytes:
        cached = self._segments.get(index)
        if cached is not None:
            self._segments.move_to_end(index)
            return cached
        start = (
            0
            if index == 0
            else stream.FIRST_SEGMENT_PLAINTEXT + (index - 1) * stream.SEGMENT_PLAINTEXT
        )
        end = min(
            self._size,
            stream.FIRST_SEGMENT_PLAINTEXT + index * stream.SEGMENT_PLAINTEXT,
        )
        data = b"".join(
            stream.decrypt_range(
                self._dek,
                self._ad,
                self._size,
                start,
                end,
                lambda a, b: self._store.read(self._key, a, b),
            )
        )
        self.bytes_read += len(data)
        self._segments[index] = data
        if len(self._segments) > SEGMENT_CACHE:
            self._segments.popitem(last=False)
        return data

    def read(self, start: int, end: int) -> bytes:
        start, end = max(0, start), min(end, self._size)
        if start >= end:
            return b""
        first = _segment_of(start)
        last = _segment_of(end - 1)
        parts = []
        for index in range(first, last + 1):
            seg_start = _segment_start(index)
            data = self._segment(index)
            parts.append(data[max(0, start - seg_start) : end - seg_start])
        return b"".join(parts)


def _segment_start(index: int) -> int:
    return (
        0 if index == 0 else stream.FIRST_SEGMENT_PLAINTEXT + (index - 1) * stream.SEGMENT_PLAINTEXT
    )


def _segment_of(offset: int) -> int:
    if offset < stream.FIRST_SEGMENT_PLAINTEXT:
        return 0
    return 1 + (offset - stream.FIRST_SEGMENT_PLAINTEXT) // stream.SEGMENT_PLAINTEXT


@dataclass
class FileScan:
    """What scanning one artifact produced (not yet stored)."""

    artifact: Artifact
    formats: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    bytes_read: int = 0

    def finding_dicts(self) -> list[dict[str, Any]]:
        return [
            {
                "rule": f.rule,
                "severity": Severity(f.severity).name.lower(),
                "message": f.message,
                "member": f.member,
                "offset": f.offset,
                "reference": f.reference,
            }
            for f in self.findings
        ]

    @property
    def max_severity(self) -> Severity | None:
        return max((Severity(f.severity) for f in self.findings), default=None)

    def verdict(self) -> ScanVerdict:
        if any(is_unanalysable(f) for f in self.findings):
            return ScanVerdict.UNANALYSABLE
        # INFO findings are notes ("no known model format"), not problems.
        if any(Severity(f.severity) > Severity.INFO for f in self.findings):
            return ScanVerdict.FINDINGS
        return ScanVerdict.CLEAN

    def blocks(self, threshold: Severity) -> bool:
        """Whether this file keeps the version from review (quarantines it)."""
        worst = self.max_severity
        return self.verdict() == ScanVerdict.UNANALYSABLE or (
            worst is not None and worst >= threshold
        )


def artifact_scan(*, artifact: Artifact, store: storage.ObjectStore) -> FileScan:
    """Run the analysers over one artifact's decrypted content (no transaction held).

    Storage and key-service outages propagate (the task retries them). A stored object that
    fails authentication, is missing, or an analyser that crashes is a finding that makes the
    file unanalysable: never a pass.
    """
    result = FileScan(artifact=artifact)
    if artifact.size == 0:
        result.formats = ["empty"]
        return result
    dek = artifact_unwrap_dek(artifact)  # IntegrityFailure if the wrapped key is bad
    source = DecryptingSource(artifact=artifact, dek=dek, store=store)
    try:
        # Authenticate the first segment whatever the analysers read: a file whose header was
        # tampered with is reported as such rather than analysed.
        source.read(0, 1)
        scanned = scanners.scan(source, name=artifact.path)
        result.formats = list(scanned.formats)
        result.findings = list(scanned.findings)
    except storage.StorageUnavailable as exc:
        raise StorageUnavailable() from exc
    except SoftTimeLimitExceeded:
        raise  # the task's time limit, not the file's fault: the job fails as timed out
    except (stream.StreamIntegrityError, storage.ObjectNotFound) as exc:
        logger.error("artifact %s failed its integrity check during a scan: %s", artifact.id, exc)
        result.findings = [
            Finding(
                rule="registry.integrity.unanalysable",
                severity=Severity.CRITICAL,
                message="The stored object failed its integrity check; it was not analysed.",
            )
        ]
    except Exception as exc:
        # The analysers turn every parse problem into a finding; anything still escaping is a
        # bug or a hostile input we did not foresee. Either way the file is not clean.
        logger.exception("scanner crashed on artifact %s", artifact.id)
        result.findings = [
            Finding(
                rule="registry.scanner.error",
                severity=Severity.HIGH,
                message=f"The scanner could not analyse this file ({type(exc).__name__}).",
            )
        ]
    result.bytes_read = source.bytes_read
    return result


def version_scan(*, job_id: uuid.UUID) -> str | None:
    """Run scan job `job_id`: scan every file of its version, then decide its state.

    Returns the state the version moved to, or None when this run changed nothing (a
    duplicate delivery, a finished job, a version that moved on). Idempotent.
    """
    audit.context_set_system("worker:version_scan")
    job = jobs.job_start(job_id=job_id)
    if job is None:
        return None
    version = job.version
    if version is None or version.state != VersionState.SCANNING or version.scan_job_id != job.pk:
        jobs.job_fail(
            job_id=job_id,
            code="version_changed",
            message="The version is no longer waiting for this scan.",
            state=JobState.CANCELLED,
        )
        return None
    threshold = Severity.parse(version.model.namespace.scan_quarantine_severity)
    artifacts = list(Artifact.objects.filter(version=version).order_by("path"))
    store = storage.get_object_store()
    scans: list[FileScan] = []
    for index, artifact in enumerate(artifacts):
        jobs.job_progress(
            job_id=job_id,
            progress=index / len(artifacts),
            message=f"scanning {artifact.path} ({index + 1}/{len(artifacts)})",
        )
        artifact.version = version
        try:
            scans.append(artifact_scan(artifact=artifact, store=store))
        except IntegrityFailure:
            scans.append(
                FileScan(
                    artifact=artifact,
                    findings=[
                        Finding(
                            rule="registry.key.unanalysable",
                            severity=Severity.CRITICAL,
                            message="The file's data key could not be unwrapped.",
                        )
                    ],
                )
            )
        jobs.job_progress(
            job_id=job_id,
            progress=(index + 1) / len(artifacts),
            message=f"scanned {index + 1}/{len(artifacts)} files",
        )
    return _scan_conclude(job=job, version=version, scans=scans, threshold=threshold)


def _scan_conclude(
    *, job: Job, version: ModelVersion, scans: list[FileScan], threshold: Severity
) -> str | None:
    blocked = [s for s in scans if s.blocks(threshold)]
    new_state = VersionState.QUARANTINED if blocked else VersionState.PENDING_REVIEW
    summary = {
        "state": str(new_state),
        "scanner_version": scanners.SCANNER_VERSION,
        "threshold": threshold.name.lower(),
        "files": len(scans),
        "blocked_files": [s.artifact.path for s in blocked][:100],
        "findings": sum(len(s.findings) for s in scans),
        "bytes_read": sum(s.bytes_read for s in scans),
    }
    namespace = version.model.namespace.name
    with transaction.atomic():
        # The version row first (it orders us against other writers of the version), then the
        # job: both conditional, so only one run of this job ever gets past here.
        won = ModelVersion.objects.filter(
            pk=version.pk, state=VersionState.SCANNING, scan_job=job
        ).update(state=new_state)
        if not won or not jobs.job_finish(job_id=job.pk, result=summary):
            transaction.set_rollback(True)
            moved = False
        else:
            moved = True
            ScanReport.objects.bulk_create(
                ScanReport(
                    artifact=s.artifact,
                    sha256=s.artifact.sha256,
                    job=job,
                    scanner_version=scanners.SCANNER_VERSION,
                    formats=s.formats,
                    findings=s.finding_dicts(),
                    max_severity=s.max_severity.name.lower() if s.max_severity is not None else "",
                    verdict=s.verdict(),
                    bytes_read=s.bytes_read,
                )
                for s in scans
            )
            webhooks.webhooks_emit(
                namespace=version.model.namespace,
                event=WebhookEvent.VERSION_QUARANTINED if blocked else WebhookEvent.VERSION_SCANNED,
                payload=webhooks.version_payload(version, state=str(new_state), job=str(job.pk)),
            )
            # Last: the audit append lock is held until commit.
            audit.audit_record(
                action=AuditAction.VERSION_SCAN,
                outcome=AuditOutcome.SUCCESS if not blocked else AuditOutcome.FAILURE,
                namespace=namespace,
                target=audit.audit_target(namespace, version.model.name, version.number),
                details={
                    **summary,
                    "job": str(job.pk),
                    "reports": [
                        {
                            "path": s.artifact.path,
                            "sha256": s.artifact.sha256,
                            "verdict": str(s.verdict()),
                            "rules": sorted({f.rule for f in s.findings})[:50],
                        }
                        for s in scans
                    ][:200],
                },
            )
    if not moved:
        # The version moved on without us (revoked, deleted, or another run won): say so on
        # the job unless it already finished.
        jobs.job_fail(
            job_id=job.pk,
            code="version_changed",
            message="The version is no longer waiting for this scan.",
            state=JobState.CANCELLED,
        )
        return None
    return str(new_state)


def scan_schedule(*, version: ModelVersion, user: User | None) -> Job:
    """Move a locked version to `scanning` with a new scan job (caller's transaction)."""
    job = jobs.job_create(
        kind=JobKind.SCAN, namespace=version.model.namespace, version=version, created_by=user
    )
    version.state = VersionState.SCANNING
    version.scan_job = job
    version.save(update_fields=["state", "scan_job"])
    return job


RESCANNABLE = frozenset({VersionState.PENDING_REVIEW, VersionState.QUARANTINED})


def version_rescan(*, version: ModelVersion, requested_by: User) -> tuple[ModelVersion, Job]:
    """Scan a version again (admins; e.g. after the scanner's rules changed).

    Allowed from pending_review or quarantined, or from scanning when the scan job failed
    or was cancelled. The version goes back to `scanning` with a new job.
    """
    with transaction.atomic():
        locked = (
            ModelVersion.objects.select_for_update(of=("self",))
            .select_related("model__namespace", "scan_job")
            .get(pk=version.pk)
        )
        stuck = locked.state == VersionState.SCANNING and (
            locked.scan_job is None
            or locked.scan_job.state in (JobState.FAILED, JobState.CANCELLED)
        )
        if locked.state not in RESCANNABLE and not stuck:
            raise VersionNotScannable(
                f"Version {locked.number} is {locked.state}; it cannot be re-scanned now.",
                state=locked.state,
            )
        previous = locked.state
        job = scan_schedule(version=locked, user=requested_by)
        namespace = locked.model.namespace.name
        audit.audit_record(
            action=AuditAction.VERSION_RESCAN,
            namespace=namespace,
            target=audit.audit_target(namespace, locked.model.name, locked.number),
            details={"previous_state": previous, "job": str(job.pk)},
        )
    return locked, job


def version_review_gate(version: ModelVersion) -> None:
    """Raise ScanGateNotClean unless the version passed its scan (review's scan gate)."""
    if version.state in (VersionState.SCANNING, VersionState.QUARANTINED):
        raise ScanGateNotClean(state=version.state)
    if version.state == VersionState.PENDING_REVIEW and version.scan_job_id is None:
        # Submitted before scanning existed: never scanned, so not clean.
        raise ScanGateNotClean(state=version.state)
