"""Domain tables: namespaces, members, models, versions, artifacts, uploads, tokens, jobs.

Models hold fields and constraints only; every state change lives in registry/services/.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone

from registry.paths import validate_visible_text

# \Z, not $: '$' also matches before a trailing newline, which let "bert\n" through.
NAMESPACE_NAME_RE = r"^[a-z0-9](?:[a-z0-9-]{0,62})\Z"
MODEL_NAME_RE = r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,127})\Z"
# registry.scanners.Severity names, lowercase (the scanners import no Django, and models
# import no scanner).
SEVERITY_CHOICES = [(s, s) for s in ("info", "low", "medium", "high", "critical")]


class Role(models.TextChoices):
    VIEWER = "viewer"
    CONTRIBUTOR = "contributor"
    REVIEWER = "reviewer"
    ADMIN = "admin"
    AUDITOR = "auditor"


def default_required_gates() -> list[str]:
    return ["scan_clean"]


def default_protected_aliases() -> list[str]:
    return ["production"]


# Alias names start with a letter, so an alias can never be read as a version number.
ALIAS_NAME_RE = r"^[a-z][a-z0-9_-]{0,62}\Z"


class Namespace(models.Model):
    name = models.CharField(
        max_length=63,
        unique=True,
        validators=[
            validate_visible_text,
            RegexValidator(NAMESPACE_NAME_RE, "lowercase letters, digits and '-'"),
        ],
    )
    description = models.TextField(blank=True, default="")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    # The approval policy (admin-editable through registry.services.approvals.policy_update).
    # A scan finding at or above this severity quarantines a version (a Severity name).
    scan_quarantine_severity = models.CharField(
        max_length=16, choices=SEVERITY_CHOICES, default="medium"
    )
    # Distinct approving reviewers a version needs.
    approvals_required = models.PositiveSmallIntegerField(default=1)
    # Whether a version's uploader, creator or submitter may review it.
    allow_self_review = models.BooleanField(default=False)
    # Names of registry.services.approvals.GATES that must hold for a version to be approved.
    required_gates = models.JSONField(default=default_required_gates)
    # Alias names only namespace admins may move or delete (registry.services.aliases).
    protected_aliases = models.JSONField(default=default_protected_aliases)

    class Meta:
        constraints = [
            # Names are lowercase by rule; this keeps rows written around the rule from clashing.
            models.UniqueConstraint(Lower("name"), name="namespace_unique_name_ci"),
            models.CheckConstraint(
                condition=models.Q(approvals_required__gte=1),
                name="namespace_approvals_required_min",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    namespace = models.ForeignKey(Namespace, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["namespace", "user"], name="membership_unique_user"),
            models.CheckConstraint(
                condition=models.Q(role__in=Role.values), name="membership_role_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.user_id}@{self.namespace_id}:{self.role}"


class RegisteredModel(models.Model):
    namespace = models.ForeignKey(Namespace, on_delete=models.PROTECT, related_name="models")
    name = models.CharField(
        max_length=128,
        validators=[
            validate_visible_text,
            RegexValidator(MODEL_NAME_RE, "letters, digits, '.', '_' and '-'"),
        ],
    )
    description = models.TextField(blank=True, default="")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # Free key/value labels {str: str}, bounded by registry.services.catalog.tags_validate.
    tags = models.JSONField(default=dict, blank=True)
    # The highest version number ever given under this name, carried over from a deleted
    # model of the same name (ModelTombstone): numbers are never handed out twice.
    last_version_number = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            # `BERT` and `bert` would be one model to a person, and lookups ignore case.
            models.UniqueConstraint(Lower("name"), "namespace", name="model_unique_name_ci")
        ]

    def __str__(self) -> str:
        return self.name


class ModelTombstone(models.Model):
    """What remains of a deleted model: its name and the last version number it reached.

    A model created again under the name (in any letter case) numbers its versions after
    that, so a pinned `.../versions/N` URL never comes to serve other bytes.
    """

    namespace = models.ForeignKey(Namespace, on_delete=models.CASCADE, related_name="+")
    name = models.CharField(max_length=128)
    last_version_number = models.PositiveIntegerField()
    deleted_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                Lower("name"), "namespace", name="model_tombstone_unique_name_ci"
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} (deleted after v{self.last_version_number})"


class VersionState(models.TextChoices):
    DRAFT = "draft"
    SCANNING = "scanning"
    QUARANTINED = "quarantined"
    PENDING_REVIEW = "pending_review"
    APPROVED = "approved"
    REJECTED = "rejected"
    DEPRECATED = "deprecated"
    REVOKED = "revoked"


class ModelVersion(models.Model):
    model = models.ForeignKey(RegisteredModel, on_delete=models.PROTECT, related_name="versions")
    number = models.PositiveIntegerField()
    state = models.CharField(
        max_length=16, choices=VersionState.choices, default=VersionState.DRAFT
    )
    description = models.TextField(blank=True, default="")
    tags = models.JSONField(default=dict, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    submitted_at = models.DateTimeField(null=True, blank=True)
    submitted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # The scan job whose result decides this version's state: the conditional UPDATE that
    # ends a scan matches on it, so a stale or duplicated job can never move the version.
    scan_job = models.ForeignKey(
        "Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    approved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["model", "number"], name="version_unique_number"),
            models.CheckConstraint(
                condition=models.Q(state__in=VersionState.values), name="version_state_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model_id}/v{self.number} ({self.state})"


class ModelAlias(models.Model):
    """A named pointer (`production`, `staging`) at one approved version of a model."""

    model = models.ForeignKey(RegisteredModel, on_delete=models.CASCADE, related_name="aliases")
    name = models.CharField(
        max_length=63, validators=[RegexValidator(ALIAS_NAME_RE, "lowercase alias name")]
    )
    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="aliases")
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["model", "name"], name="alias_unique_name"),
        ]

    def __str__(self) -> str:
        return f"{self.model_id}@{self.name} -> {self.version_id}"


class ReviewDecision(models.TextChoices):
    APPROVE = "approve"
    REJECT = "reject"


class Review(models.Model):
    """One reviewer's decision on a version (registry.services.approvals.review_record)."""

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="reviews")
    reviewer = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    decision = models.CharField(max_length=16, choices=ReviewDecision.choices)
    comment = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            # A reviewer counts once towards the approvals a version needs.
            models.UniqueConstraint(fields=["version", "reviewer"], name="review_unique_reviewer"),
            models.CheckConstraint(
                condition=models.Q(decision__in=ReviewDecision.values),
                name="review_decision_valid",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.decision} of {self.version_id} by {self.reviewer_id}"


class Artifact(models.Model):
    """One encrypted file of a version. The id is bound into the ciphertext (associated data)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="artifacts")
    path = models.CharField(max_length=1024)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    object_key = models.CharField(max_length=256, unique=True)
    wrapped_dek = models.BinaryField()
    kek_id = models.CharField(max_length=512)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["version", "path"], name="artifact_unique_path"),
            models.CheckConstraint(condition=models.Q(size__gte=0), name="artifact_size_nonneg"),
        ]

    def __str__(self) -> str:
        return f"{self.path} ({self.sha256[:12]})"


class UploadState(models.TextChoices):
    OPEN = "open"
    COMPLETED = "completed"
    ABORTED = "aborted"


class UploadSession(models.Model):
    """A resumable upload: parts are staged (encrypted) and assembled by `complete`."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="uploads")
    path = models.CharField(max_length=1024)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64, blank=True, default="")
    part_size = models.BigIntegerField()
    state = models.CharField(max_length=16, choices=UploadState.choices, default=UploadState.OPEN)
    # Staged parts are encrypted under a session DEK; the artifact gets its own on completion.
    wrapped_dek = models.BinaryField()
    kek_id = models.CharField(max_length=512)
    artifact = models.ForeignKey(
        Artifact, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"upload {self.id} of {self.path}"

    @property
    def part_count(self) -> int:
        return max(1, -(-self.size // self.part_size))


class UploadPart(models.Model):
    session = models.ForeignKey(UploadSession, on_delete=models.CASCADE, related_name="parts")
    number = models.PositiveIntegerField()
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    object_key = models.CharField(max_length=256, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["session", "number"], name="upload_part_unique")
        ]

    def __str__(self) -> str:
        return f"part {self.number} of {self.session_id}"


class PendingObject(models.Model):
    """Write-ahead record of an object key that may hold unreferenced bytes.

    Written (committed) before bytes go to the store and removed once the object is either
    referenced by a committed row or deleted. Whatever survives a crash or an outage is cleaned
    by `registry.services.janitor.objects_cleanup` (`manage.py storage_janitor`).
    """

    object_key = models.CharField(max_length=256, unique=True)
    reason = models.CharField(max_length=32, default="upload")
    created_at = models.DateTimeField(auto_now_add=True)
    # Set when a request gave up on the object and could not delete it (store down): the
    # janitor may then clean it at once instead of waiting out the in-flight grace period.
    abandoned_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return self.object_key


class TokenScope(models.TextChoices):
    READ = "read"
    WRITE = "write"
    REVIEW = "review"
    ADMIN = "admin"


class ApiToken(models.Model):
    """A personal access token. Only a SHA-256 of the secret part is stored."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="tokens"
    )
    name = models.CharField(max_length=100, blank=True, default="")
    key_id = models.CharField(max_length=16, unique=True)
    secret_hash = models.CharField(max_length=64)
    scopes = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"smr_{self.key_id}_…"


class AuditAction(models.TextChoices):
    AUTH_FAILED = "auth.failed"
    LOGIN_FAILED = "auth.login_failed"
    LOGIN = "auth.login"
    LOGOUT = "auth.logout"
    # A password login refused because its username+address is locked out (django-axes).
    LOCKED_OUT = "auth.locked_out"
    TOKEN_CREATE = "token.create"  # noqa: S105 - an action name, not a secret
    TOKEN_REVOKE = "token.revoke"  # noqa: S105
    NAMESPACE_CREATE = "namespace.create"
    NAMESPACE_UPDATE = "namespace.update"
    MEMBER_SET = "member.set"
    MEMBER_REMOVE = "member.remove"
    MODEL_CREATE = "model.create"
    MODEL_UPDATE = "model.update"
    MODEL_DELETE = "model.delete"
    VERSION_CREATE = "version.create"
    VERSION_SUBMIT = "version.submit"
    VERSION_SCAN = "version.scan"
    VERSION_RESCAN = "version.rescan"
    VERSION_APPROVE = "version.approve"
    VERSION_REJECT = "version.reject"
    VERSION_DEPRECATE = "version.deprecate"
    VERSION_REVOKE = "version.revoke"
    REVIEW_RECORD = "review.record"
    POLICY_UPDATE = "policy.update"
    VERSION_UPDATE = "version.update"
    ALIAS_SET = "alias.set"
    ALIAS_DELETE = "alias.delete"
    JOB_CREATE = "job.create"
    JOB_FAIL = "job.fail"
    ARTIFACT_UPLOAD = "artifact.upload"
    ARTIFACT_DOWNLOAD = "artifact.download"
    # Follow-up to a download the client cut short: what was actually sent.
    ARTIFACT_DOWNLOAD_INCOMPLETE = "artifact.download_incomplete"
    ARTIFACT_DELETE = "artifact.delete"
    ARTIFACT_INTEGRITY_FAILURE = "artifact.integrity_failure"
    UPLOAD_CREATE = "upload.create"
    UPLOAD_PART = "upload.part"
    UPLOAD_COMPLETE = "upload.complete"
    UPLOAD_ABORT = "upload.abort"
    KEY_REWRAP = "key.rewrap"
    ACCESS_DENIED = "access.denied"
    AUDIT_CHECKPOINT = "audit.checkpoint"
    AUDIT_VERIFY = "audit.verify"
    AUDIT_EXPORT = "audit.export"
    WEBHOOK_CREATE = "webhook.create"
    WEBHOOK_DELETE = "webhook.delete"
    SIGNING_KEY_CREATE = "signing_key.create"
    VERSION_SIGN = "version.sign"
    # An approved version whose files no longer match its registry signature: not served.
    SIGNATURE_MISMATCH = "signature.mismatch"
    SIGNATURE_RECORD = "signature.record"
    PUBLISHER_KEY_ADD = "publisher_key.add"
    PUBLISHER_KEY_DELETE = "publisher_key.delete"
    DATASET_CREATE = "dataset.create"
    DATA_BLOCK_CREATE = "data_block.create"
    # Ledger changes (registry.services.ledger): one event per entry written.
    LEDGER_CLAIM = "ledger.claim"
    LEDGER_COMMIT = "ledger.commit"
    LEDGER_RELEASE = "ledger.release"
    JOB_CANCEL = "job.cancel"


class JobKind(models.TextChoices):
    SCAN = "scan"
    # KEK rotation: every data key re-wrapped under one KEK (namespace-less, operator-started).
    REWRAP = "rewrap"
    # The registry's OMS signature of a version that was just approved.
    SIGN = "sign"
    # DP-SGD training of a new draft version on a registered dataset (registry.services.dp).
    DP_RETRAIN = "dp_retrain"
    # A membership-inference attack on a version trained on a registered dataset.
    PRIVACY_AUDIT = "privacy_audit"


class JobState(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


JOB_ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)


class Job(models.Model):
    """One unit of background work. The row is also the outbox: a job still `queued` whose
    message may have been lost is sent again by `registry.services.jobs.jobs_dispatch`."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=16, choices=JobKind.choices)
    state = models.CharField(max_length=16, choices=JobState.choices, default=JobState.QUEUED)
    progress = models.FloatField(default=0.0)
    progress_message = models.CharField(max_length=300, blank=True, default="")
    attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error_code = models.CharField(max_length=64, blank=True, default="")
    error_message = models.TextField(blank=True, default="")
    # Null for system-wide work (KEK rotation): only superusers see such a job.
    namespace = models.ForeignKey(
        Namespace, null=True, blank=True, on_delete=models.CASCADE, related_name="jobs"
    )
    version = models.ForeignKey(
        "ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # What the job was asked to do, fixed at creation (a rewrap job's target KEK).
    params = models.JSONField(default=dict, blank=True)
    result = models.JSONField(default=dict, blank=True)
    # Set by a cancel of a running job: its worker stops at the next step it checks.
    cancel_requested_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=models.Q(kind__in=JobKind.values), name="job_kind"),
            models.CheckConstraint(
                condition=models.Q(state__in=JobState.values), name="job_state_valid"
            ),
            models.CheckConstraint(
                condition=models.Q(progress__gte=0) & models.Q(progress__lte=1),
                name="job_progress_range",
            ),
        ]
        indexes = [
            # jobs_dispatch looks for queued jobs by age.
            models.Index(fields=["state", "enqueued_at"], name="job_state_enqueued_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} job {self.id} ({self.state})"


class ScanVerdict(models.TextChoices):
    CLEAN = "clean"
    FINDINGS = "findings"
    UNANALYSABLE = "unanalysable"


class ScanReport(models.Model):
    """What one scan run found in one artifact, tied to the artifact's digest."""

    artifact = models.ForeignKey(Artifact, on_delete=models.CASCADE, related_name="scan_reports")
    sha256 = models.CharField(max_length=64)
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="scan_reports")
    scanner_version = models.CharField(max_length=32)
    formats = models.JSONField(default=list)
    # [{rule, severity (name), message, member, offset, reference}]
    findings = models.JSONField(default=list)
    max_severity = models.CharField(max_length=16, blank=True, default="")
    verdict = models.CharField(max_length=16, choices=ScanVerdict.choices)
    # Plaintext bytes decrypted to scan the file (analysers read headers, not whole blobs).
    bytes_read = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            # One report per file per scan run: a duplicated task cannot write a second set.
            models.UniqueConstraint(fields=["job", "artifact"], name="scan_report_unique_run"),
            models.CheckConstraint(
                condition=models.Q(verdict__in=ScanVerdict.values), name="scan_verdict_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"scan of {self.artifact_id} by {self.job_id}: {self.verdict}"


class AuditOutcome(models.TextChoices):
    SUCCESS = "success"
    FAILURE = "failure"
    DENIED = "denied"


class AuditEvent(models.Model):
    """One entry of the tamper-evident, append-only access log (hash chain).

    `canonical` holds the exact bytes hashed: entry_hash = SHA-256(0x00 || prev_hash || seq ||
    canonical). The other columns are a queryable copy, checked against `canonical` on verify.
    """

    seq = models.BigIntegerField(unique=True)
    created_at = models.DateTimeField()
    actor_kind = models.CharField(max_length=16)  # user, system, anonymous
    actor_user = models.CharField(max_length=150, blank=True, default="", db_index=True)
    actor_token = models.CharField(max_length=16, blank=True, default="")
    action = models.CharField(max_length=40, choices=AuditAction.choices, db_index=True)
    namespace = models.CharField(max_length=63, blank=True, default="", db_index=True)
    target = models.CharField(max_length=1400, blank=True, default="")
    target_sha256 = models.CharField(max_length=64, blank=True, default="")
    request_id = models.CharField(max_length=64, blank=True, default="")
    client_ip = models.CharField(max_length=64, blank=True, default="")
    outcome = models.CharField(max_length=16, choices=AuditOutcome.choices)
    details = models.JSONField(default=dict)
    canonical = models.BinaryField()
    prev_hash = models.CharField(max_length=64)
    entry_hash = models.CharField(max_length=64)

    class Meta:
        indexes = [models.Index(fields=["created_at"], name="audit_created_idx")]

    def __str__(self) -> str:
        return f"#{self.seq} {self.action} {self.outcome}"


class AuditCheckpoint(models.Model):
    """A signed statement of the log's size, head hash and Merkle root at one moment."""

    size = models.BigIntegerField(unique=True)
    head_hash = models.CharField(max_length=64)
    merkle_root = models.CharField(max_length=64)
    # Roots of the perfect subtrees at this size (signed, in `body`): the next checkpoint
    # extends the tree from here instead of re-reading the whole log.
    frontier = models.JSONField(default=list)
    prev_checkpoint_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField()
    body = models.BinaryField()  # the exact signed bytes (canonical JSON of the fields above)
    checkpoint_hash = models.CharField(max_length=64)
    key_id = models.CharField(max_length=64)
    signature = models.CharField(max_length=128)  # hex Ed25519 signature over `body`

    def __str__(self) -> str:
        return f"checkpoint @{self.size}"


class WebhookEvent(models.TextChoices):
    VERSION_SUBMITTED = "version.submitted"
    VERSION_SCANNED = "version.scanned"
    VERSION_QUARANTINED = "version.quarantined"
    VERSION_APPROVED = "version.approved"
    VERSION_REJECTED = "version.rejected"
    VERSION_REVOKED = "version.revoked"
    ALIAS_MOVED = "alias.moved"


class Webhook(models.Model):
    """A namespace's receiver of signed event deliveries (registry.services.webhooks).

    The HMAC-SHA256 signing secret must be read back to sign every delivery, so it cannot be
    hashed: its 32 random bytes are wrapped under the key provider's KEK like an artifact's
    data key (`secret_wrapped`, `secret_kek_id`, bound to this webhook's id), so a copy of the
    database alone cannot forge deliveries. It is shown once at creation, never again.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    namespace = models.ForeignKey(Namespace, on_delete=models.CASCADE, related_name="webhooks")
    url = models.CharField(max_length=2000)
    secret_wrapped = models.BinaryField()
    secret_kek_id = models.CharField(max_length=512)
    events = models.JSONField(default=list)
    active = models.BooleanField(default=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"webhook {self.id} -> {self.url}"


class WebhookDeliveryState(models.TextChoices):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class WebhookDelivery(models.Model):
    """One attempt to deliver one event to one webhook: the history is one row per attempt.

    Attempts of the same event share `delivery_id` (sent as X-SMR-Delivery, so a receiver can
    drop duplicates); a failed attempt that may be retried is followed by a pending row with
    the next attempt number and the time it is due.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="deliveries")
    delivery_id = models.UUIDField(default=uuid.uuid4, db_index=True)
    event = models.CharField(max_length=40, choices=WebhookEvent.choices)
    payload = models.JSONField(default=dict)
    attempt = models.PositiveIntegerField(default=1)
    state = models.CharField(
        max_length=16, choices=WebhookDeliveryState.choices, default=WebhookDeliveryState.PENDING
    )
    response_status = models.PositiveIntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True, default="")
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    # The outbox (registry.services.webhooks.webhooks_dispatch): when a message for this
    # attempt was last published (null: never, the broker was down), and when a worker took it
    # (it POSTs only after winning this claim, so a duplicate message never POSTs concurrently).
    enqueued_at = models.DateTimeField(null=True, blank=True)
    claimed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["delivery_id", "attempt"], name="webhook_delivery_attempt_unique"
            ),
            models.CheckConstraint(
                condition=models.Q(state__in=WebhookDeliveryState.values),
                name="webhook_delivery_state_valid",
            ),
        ]
        indexes = [
            models.Index(fields=["webhook", "created_at"], name="webhook_delivery_created_idx"),
            # The dispatcher's scan: only pending attempts, a small set however long the history.
            models.Index(
                fields=["next_attempt_at"],
                condition=models.Q(state="pending"),
                name="webhook_delivery_pending_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event} delivery {self.delivery_id} attempt {self.attempt} ({self.state})"


class SigningKeyProvider(models.TextChoices):
    LOCAL = "local"  # the private key in this table, wrapped under the KEK
    KMS = "kms"  # an asymmetric KMS key; the private key never leaves KMS


class SigningKey(models.Model):
    """A registry signing key (ECDSA P-256) for the OMS bundles of approved versions.

    `key_id` is the hint model_signing puts in a key-based bundle (SHA-256 of the public key's
    PEM), so a bundle names its key. A `local` key's 32-byte private scalar is wrapped under
    the key provider's KEK like a data key (bound to the key id); a `kms` key is only named.
    Exactly one key is current (`retired_at` null); retired keys stay, so their public keys
    keep verifying the bundles they signed.
    """

    key_id = models.CharField(max_length=64, primary_key=True)
    algorithm = models.CharField(max_length=32, default="ecdsa-p256-sha256")
    public_key_pem = models.TextField()
    provider = models.CharField(max_length=8, choices=SigningKeyProvider.choices)
    private_key_wrapped = models.BinaryField(blank=True, default=b"")
    private_key_kek_id = models.CharField(max_length=512, blank=True, default="")
    kms_key_id = models.CharField(max_length=2048, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    retired_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            # A unique index on a constant over the current rows: at most one current key
            # (NULLS NOT DISTINCT would do on PostgreSQL 15+, but not on embedded SQLite).
            models.UniqueConstraint(
                models.Value(True),
                condition=models.Q(retired_at__isnull=True),
                name="signing_key_one_current",
            ),
            models.CheckConstraint(
                condition=(
                    models.Q(provider="local", kms_key_id="") & ~models.Q(private_key_kek_id="")
                )
                | models.Q(provider="kms", private_key_kek_id="", private_key_wrapped=b"")
                & ~models.Q(kms_key_id=""),
                name="signing_key_material",
            ),
        ]

    def __str__(self) -> str:
        state = "current" if self.retired_at is None else "retired"
        return f"signing key {self.key_id[:16]} ({self.provider}, {state})"


class SignatureKind(models.TextChoices):
    REGISTRY = "registry"  # made by the registry when the version was approved
    PUBLISHER = "publisher"  # made by the publisher, checked against trusted keys


class SignatureResult(models.TextChoices):
    VALID = "valid"
    INVALID = "invalid"
    UNKNOWN_KEY = "unknown_key"


class Signature(models.Model):
    """An OMS bundle (Sigstore bundle v0.3 JSON) over a version's files, as recorded at
    upload: the registry's own, or one a publisher sent, with the result of its check."""

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="signatures")
    kind = models.CharField(max_length=16, choices=SignatureKind.choices)
    key_id = models.CharField(max_length=128)
    bundle = models.JSONField()
    result = models.CharField(max_length=16, choices=SignatureResult.choices)
    reason = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            # One registry signature per version (the sign job may run twice).
            models.UniqueConstraint(
                fields=["version"],
                condition=models.Q(kind="registry"),
                name="signature_one_registry_per_version",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} signature of version {self.version_id} ({self.result})"


class PublisherKey(models.Model):
    """A public key a namespace trusts for its publishers' OMS signatures (admin-managed).

    `key_id` is the hint `model_signing sign key` writes into its bundles (SHA-256 of the
    key's SubjectPublicKeyInfo PEM), so a bundle names the key that must check it.
    """

    namespace = models.ForeignKey(
        Namespace, on_delete=models.CASCADE, related_name="publisher_keys"
    )
    key_id = models.CharField(max_length=64)
    name = models.CharField(max_length=100, blank=True, default="")
    public_key_pem = models.TextField()
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["namespace", "key_id"], name="publisher_key_unique"),
        ]

    def __str__(self) -> str:
        return f"publisher key {self.key_id[:16]} of namespace {self.namespace_id}"


class Sensitivity(models.TextChoices):
    PUBLIC = "public"
    INTERNAL = "internal"
    # The two levels the DP gate protects (registry.services.ledger.SENSITIVE).
    CONFIDENTIAL = "confidential"
    RESTRICTED = "restricted"


class PrivacyUnit(models.TextChoices):
    RECORD = "record"  # one row of the data
    USER = "user"  # all rows of one person (the data must hold one row per person)


class Accountant(models.TextChoices):
    RDP = "rdp"
    PLD = "pld"


class Dataset(models.Model):
    """Training data whose privacy budget the ledger tracks (DESIGN section 7)."""

    namespace = models.ForeignKey(Namespace, on_delete=models.PROTECT, related_name="datasets")
    name = models.CharField(
        max_length=128,
        validators=[validate_visible_text, RegexValidator(MODEL_NAME_RE, "letters, digits, ._-")],
    )
    description = models.TextField(blank=True, default="")
    sensitivity = models.CharField(max_length=16, choices=Sensitivity.choices)
    privacy_unit = models.CharField(
        max_length=16, choices=PrivacyUnit.choices, default=PrivacyUnit.RECORD
    )
    # Every ledger entry reports its epsilon at this delta.
    delta = models.FloatField()
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            # Like models: `Digits` and `digits` are one dataset to a person; lookups ignore case.
            models.UniqueConstraint(Lower("name"), "namespace", name="dataset_unique_name_ci"),
            models.CheckConstraint(
                condition=models.Q(delta__gt=0) & models.Q(delta__lt=1), name="dataset_delta"
            ),
            models.CheckConstraint(
                condition=models.Q(sensitivity__in=Sensitivity.values),
                name="dataset_sensitivity_valid",
            ),
        ]

    def __str__(self) -> str:
        return f"dataset {self.name} ({self.sensitivity})"


class DataBlock(models.Model):
    """An append-only part of a dataset with its own budget cap and its one accountant.

    Rows are never updated or deleted (database triggers, migration 0018): a cap or an
    accountant cannot be changed after the fact. The block's data, when the registry trains
    on it, is one file of a submitted model version (encrypted, scanned and audited like any
    artifact, and immutable since submit); `records` is how many privacy units it holds.
    """

    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="blocks")
    name = models.CharField(
        max_length=128,
        validators=[validate_visible_text, RegexValidator(MODEL_NAME_RE, "letters, digits, ._-")],
    )
    epsilon = models.FloatField()
    delta = models.FloatField()
    accountant = models.CharField(max_length=8, choices=Accountant.choices)
    artifact = models.ForeignKey(
        Artifact, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    records = models.PositiveIntegerField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["dataset", "name"], name="data_block_unique_name"),
            models.CheckConstraint(condition=models.Q(epsilon__gt=0), name="data_block_epsilon"),
            models.CheckConstraint(
                condition=models.Q(delta__gt=0) & models.Q(delta__lt=1), name="data_block_delta"
            ),
            models.CheckConstraint(
                condition=models.Q(accountant__in=Accountant.values),
                name="data_block_accountant_valid",
            ),
        ]

    def __str__(self) -> str:
        return f"block {self.name} of dataset {self.dataset_id} (eps {self.epsilon})"


class LedgerKind(models.TextChoices):
    CLAIM = "claim"  # budget reserved for a planned run (counts until settled)
    COMMIT = "commit"  # what the run actually spent (settles the claim)
    RELEASE = "release"  # what it did not spend (settles the claim; counts for nothing)


class LedgerSource(models.TextChoices):
    JOB = "job"  # a dp_retrain job of this registry
    DECLARED = "declared"  # a run elsewhere, registered with POST .../dp-record


class LedgerEntry(models.Model):
    """One immutable line of a block's privacy ledger (triggers reject UPDATE and DELETE).

    A run claims every block it reads (one entry per block, sharing `claim`); settling it
    writes a commit with the event actually spent and, if steps were left, a release. The
    budget spent on a block is the composition of its commits and of its unsettled claims.
    """

    id = models.BigAutoField(primary_key=True)
    claim = models.UUIDField(db_index=True)
    kind = models.CharField(max_length=8, choices=LedgerKind.choices)
    source = models.CharField(max_length=8, choices=LedgerSource.choices)
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="ledger")
    block = models.ForeignKey(DataBlock, on_delete=models.PROTECT, related_name="ledger")
    job = models.ForeignKey(
        Job, null=True, blank=True, on_delete=models.PROTECT, related_name="ledger"
    )
    version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="dp_ledger"
    )
    sampling_rate = models.FloatField()
    noise_multiplier = models.FloatField()
    steps = models.PositiveIntegerField()
    max_grad_norm = models.FloatField()
    accountant = models.CharField(max_length=8, choices=Accountant.choices)
    library_versions = models.JSONField(default=dict)
    # This entry's own event alone, at the dataset's delta.
    epsilon = models.FloatField()
    delta = models.FloatField()
    note = models.CharField(max_length=500, blank=True, default="")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            # A claim is settled at most once per block by each kind.
            models.UniqueConstraint(
                fields=["claim", "block", "kind"], name="ledger_entry_claim_block_kind"
            ),
            models.CheckConstraint(
                condition=models.Q(kind__in=LedgerKind.values), name="ledger_entry_kind_valid"
            ),
        ]
        indexes = [models.Index(fields=["block", "id"], name="ledger_entry_block_idx")]

    def __str__(self) -> str:
        return f"ledger {self.kind} {self.claim} on block {self.block_id}"
