"""Input and output shapes, one pair per view where they differ. No business logic here."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.db.models import F, QuerySet
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from registry import selectors
from registry.models import (
    ALIAS_NAME_RE,
    MODEL_NAME_RE,
    NAMESPACE_NAME_RE,
    SEVERITY_CHOICES,
    Accountant,
    JobKind,
    JobState,
    LedgerKind,
    LedgerSource,
    ModelVersion,
    PrivacyUnit,
    ReviewDecision,
    Role,
    ScanVerdict,
    Sensitivity,
    SignatureKind,
    SignatureResult,
    TokenScope,
    VersionState,
    WebhookDeliveryState,
    WebhookEvent,
)
from registry.services.approvals import GATES
from registry.services.uploads import upload_session_missing_parts


class TextField(serializers.CharField):
    """A CharField that takes only JSON strings (DRF's would turn 0 into "0")."""

    def to_internal_value(self, data: object) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return str(super().to_internal_value(data))


class NameField(serializers.RegexField):
    """A name matching `regex`, given as a JSON string (not a number that would match)."""

    def to_internal_value(self, data: object) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return str(super().to_internal_value(data))


class NamespaceIn(serializers.Serializer):
    name = NameField(NAMESPACE_NAME_RE, max_length=63)
    description = TextField(required=False, allow_blank=True, default="")


class NamespacePatch(serializers.Serializer):
    description = TextField(required=False, allow_blank=True)


class NamespaceOut(serializers.Serializer):
    name = serializers.CharField()
    description = serializers.CharField()
    created_at = serializers.DateTimeField()


class MemberIn(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    role = serializers.ChoiceField(choices=Role.choices)


class MemberOut(serializers.Serializer):
    username = serializers.CharField(source="user.username")
    role = serializers.CharField()
    created_at = serializers.DateTimeField()


class ModelIn(serializers.Serializer):
    name = NameField(MODEL_NAME_RE, max_length=128)
    description = TextField(required=False, allow_blank=True, default="")


class TagsField(serializers.DictField):
    """{key: value} strings; the bounds are checked by registry.services.catalog.tags_validate."""

    def __init__(self, **kwargs):
        super().__init__(
            child=TextField(max_length=256),
            help_text="Key/value labels, replaced as a whole: at most 50; a key is 1 to 64 "
            "letters, digits, '_', '.', '-' or '/'; a value at most 256 printable characters.",
            **kwargs,
        )


class ModelPatch(serializers.Serializer):
    description = TextField(required=False, allow_blank=True)
    tags = TagsField(required=False)


class ModelOut(serializers.Serializer):
    namespace = serializers.CharField(source="namespace.name")
    name = serializers.CharField()
    description = serializers.CharField()
    tags = serializers.DictField(child=serializers.CharField())
    aliases = serializers.SerializerMethodField(help_text="Alias name -> version number.")
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()

    def get_aliases(self, obj) -> dict[str, int]:
        return {a.name: a.version.number for a in obj.aliases.all()}


class VersionPatch(serializers.Serializer):
    description = TextField(required=False, allow_blank=True)
    tags = TagsField(required=False)


class AliasOut(serializers.Serializer):
    name = serializers.CharField()
    version = serializers.IntegerField(source="version.number")
    updated_by = serializers.CharField(source="updated_by.username", default=None, allow_null=True)
    updated_at = serializers.DateTimeField()


class VersionIn(serializers.Serializer):
    description = TextField(required=False, allow_blank=True, default="")


class ArtifactOut(serializers.Serializer):
    path = serializers.CharField()
    size = serializers.IntegerField()
    sha256 = serializers.CharField()
    kek_id = serializers.CharField()
    created_at = serializers.DateTimeField()


def iso_time(value: datetime | None) -> str | None:
    """A time as DRF's DateTimeField writes it (ISO 8601 in UTC, `Z` for +00:00), without its
    per-value settings lookups: a page of 1,000 versions formats 2,000 of them."""
    if value is None:
        return None
    text = value.astimezone(UTC).isoformat()
    return text.removesuffix("+00:00") + "Z" if text.endswith("+00:00") else text


class VersionListOut(serializers.ListSerializer):
    """A page of versions from database rows (`VersionOut.rows`) rather than model instances.

    Profiled on a page of 1,000: building a version, its model, namespace and creator per row,
    then walking ten DRF fields for each, was 4/5 of the request. The field list of VersionOut
    stays the contract (and the schema); tests check both paths give the same JSON.
    """

    def to_representation(self, data):
        rows = list(data)
        if not rows or not isinstance(rows[0], dict):
            return super().to_representation(rows)
        aliases = selectors.alias_names_by_version(
            version_ids=[r["id"] for r in rows if r["state"] != VersionState.DRAFT]
        )
        return [
            {
                "namespace": r["namespace_name"],
                "model": r["model_name"],
                "number": r["number"],
                "state": r["state"],
                "description": r["description"],
                "tags": {str(k): str(v) for k, v in r["tags"].items()},
                "aliases": sorted(aliases.get(r["id"], ())),
                "created_by": r["created_by_name"],
                "created_at": iso_time(r["created_at"]),
                "submitted_at": iso_time(r["submitted_at"]),
            }
            for r in rows
        ]


class VersionOut(serializers.Serializer):
    namespace = serializers.CharField(source="model.namespace.name")
    model = serializers.CharField(source="model.name")
    number = serializers.IntegerField()
    state = serializers.CharField()
    description = serializers.CharField()
    tags = serializers.DictField(child=serializers.CharField())
    aliases = serializers.SerializerMethodField(help_text="Names of aliases pointing here.")
    created_by = serializers.CharField(source="created_by.username", default=None)
    created_at = serializers.DateTimeField()
    submitted_at = serializers.DateTimeField(allow_null=True)

    class Meta:
        list_serializer_class = VersionListOut

    @staticmethod
    def rows(qs: QuerySet[ModelVersion]) -> QuerySet:
        """`qs` as the rows VersionListOut writes (ordering fields included, for cursors)."""
        return qs.prefetch_related(None).values(
            "id",
            "number",
            "state",
            "description",
            "tags",
            "created_at",
            "submitted_at",
            namespace_name=F("model__namespace__name"),
            model_name=F("model__name"),
            created_by_name=F("created_by__username"),
        )

    def get_aliases(self, obj) -> list[str]:
        return sorted(a.name for a in obj.aliases.all())


class ScanFindingOut(serializers.Serializer):
    rule = serializers.CharField()
    severity = serializers.ChoiceField(choices=[c for c, _ in SEVERITY_CHOICES])
    message = serializers.CharField()
    member = serializers.CharField()
    offset = serializers.IntegerField(allow_null=True)
    reference = serializers.CharField()


class ScanSummaryOut(serializers.Serializer):
    """The latest scan of one file, as shown in the version's JSON."""

    path = serializers.CharField(source="artifact.path")
    sha256 = serializers.CharField()
    verdict = serializers.ChoiceField(choices=ScanVerdict.choices)
    max_severity = serializers.CharField()
    finding_count = serializers.SerializerMethodField()
    scanner_version = serializers.CharField()
    job = serializers.UUIDField(source="job_id")
    created_at = serializers.DateTimeField()

    def get_finding_count(self, obj) -> int:
        return len(obj.findings)


class VersionScanOut(ScanSummaryOut):
    findings = ScanFindingOut(many=True, allow_null=True)


class ScanReportOut(ScanSummaryOut):
    id = serializers.IntegerField()
    formats = serializers.ListField(child=serializers.CharField())
    findings = ScanFindingOut(many=True)
    bytes_read = serializers.IntegerField()


class ReviewIn(serializers.Serializer):
    decision = serializers.ChoiceField(choices=ReviewDecision.choices)
    comment = TextField(required=False, allow_blank=True, default="", max_length=10000)


class ReviewOut(serializers.Serializer):
    reviewer = serializers.CharField(source="reviewer.username", default=None, allow_null=True)
    decision = serializers.CharField()
    comment = serializers.CharField()
    created_at = serializers.DateTimeField()


class PolicyOut(serializers.Serializer):
    approvals_required = serializers.IntegerField()
    allow_self_review = serializers.BooleanField()
    scan_quarantine_severity = serializers.CharField()
    required_gates = serializers.ListField(child=serializers.CharField())
    protected_aliases = serializers.ListField(child=serializers.CharField())


class StrictBooleanField(serializers.BooleanField):
    """JSON true/false only (DRF's would take 0, "yes" or "off")."""

    def to_internal_value(self, data: object) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer only (DRF's would take "2" or 2.0)."""

    def to_internal_value(self, data: object) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return int(super().to_internal_value(data))


class PolicyPatch(serializers.Serializer):
    approvals_required = StrictIntegerField(required=False, min_value=1, max_value=100)
    allow_self_review = StrictBooleanField(required=False)
    scan_quarantine_severity = serializers.ChoiceField(
        choices=[c for c, _ in SEVERITY_CHOICES],
        required=False,
        help_text="A finding at or above this severity quarantines a version.",
    )
    required_gates = serializers.ListField(
        child=serializers.ChoiceField(choices=sorted(GATES)), required=False, max_length=20
    )
    protected_aliases = serializers.ListField(
        child=NameField(ALIAS_NAME_RE, max_length=63),
        required=False,
        max_length=50,
        help_text="Aliases only namespace admins may move or delete.",
    )


class DpEventIO(serializers.Serializer):
    """One DP-SGD run: Poisson-sampled Gaussian steps."""

    sampling_rate = serializers.FloatField(help_text="q, the expected batch over the records.")
    noise_multiplier = serializers.FloatField(help_text="sigma.")
    steps = serializers.IntegerField(min_value=1, max_value=100_000_000)
    max_grad_norm = serializers.FloatField(
        required=False, default=1.0, help_text="The clipping norm (1.0 if left out)."
    )


class DpRecordOut(serializers.Serializer):
    dataset = serializers.CharField()
    sensitivity = serializers.CharField()
    blocks = serializers.ListField(child=serializers.CharField())
    origin = serializers.ChoiceField(
        choices=LedgerSource.choices, help_text="job: trained here; declared: trained elsewhere."
    )
    job = serializers.UUIDField(allow_null=True)
    event = DpEventIO()
    accountant = serializers.CharField()
    epsilon = serializers.FloatField(help_text="At the dataset's delta.")
    delta = serializers.FloatField()
    library_versions = serializers.DictField(child=serializers.CharField())
    committed_at = serializers.DateTimeField()


class VersionDetailOut(VersionOut):
    """A version with its files, scans and reviews: from a version loaded by
    selectors.version_related_load (its `loaded_*` lists), every view that answers with one.

    `to_representation` is written out by hand: DRF deep-copies a serializer's fields for
    every instance (two nested list serializers here), which was a fifth of a version read.
    The declared fields stay the contract and the schema; tests check both give one JSON.
    """

    files = ArtifactOut(many=True, source="loaded_files")
    total_size = serializers.SerializerMethodField()
    submitted_by = serializers.CharField(
        source="submitted_by.username", default=None, allow_null=True
    )
    scan_job = serializers.UUIDField(source="scan_job_id", allow_null=True)
    scans = serializers.SerializerMethodField(
        help_text="The latest scan of each file. `findings` is null for callers who may not "
        "see why a quarantined version was quarantined (only its owner and admins may)."
    )

    approved_at = serializers.DateTimeField(allow_null=True)
    reviews = ReviewOut(many=True, source="loaded_reviews")
    approvals = serializers.SerializerMethodField(help_text="Distinct approving reviewers.")
    dp_record = serializers.SerializerMethodField(
        help_text="The committed DP record of the run that trained it (null if none)."
    )

    def to_representation(self, instance) -> dict[str, Any]:
        v = instance
        return {
            "namespace": v.model.namespace.name,
            "model": v.model.name,
            "number": v.number,
            "state": v.state,
            "description": v.description,
            "tags": {str(k): str(value) for k, value in v.tags.items()},
            "aliases": self.get_aliases(v),
            "created_by": v.created_by.username if v.created_by is not None else None,
            "created_at": iso_time(v.created_at),
            "submitted_at": iso_time(v.submitted_at),
            "files": [
                {
                    "path": a.path,
                    "size": a.size,
                    "sha256": a.sha256,
                    "kek_id": a.kek_id,
                    "created_at": iso_time(a.created_at),
                }
                for a in v.loaded_files
            ],
            "total_size": self.get_total_size(v),
            "submitted_by": v.submitted_by.username if v.submitted_by is not None else None,
            "scan_job": str(v.scan_job_id) if v.scan_job_id is not None else None,
            "scans": self.get_scans(v),
            "approved_at": iso_time(v.approved_at),
            "reviews": [
                {
                    "reviewer": r.reviewer.username if r.reviewer is not None else None,
                    "decision": r.decision,
                    "comment": r.comment,
                    "created_at": iso_time(r.created_at),
                }
                for r in v.loaded_reviews
            ],
            "approvals": self.get_approvals(v),
            "dp_record": self.get_dp_record(v),
        }

    def get_aliases(self, obj) -> list[str]:
        return list(obj.loaded_aliases)

    def get_total_size(self, obj) -> int:
        return sum(a.size for a in obj.loaded_files)

    def get_approvals(self, obj) -> int:
        return sum(1 for r in obj.loaded_reviews if r.decision == ReviewDecision.APPROVE)

    @extend_schema_field(DpRecordOut(allow_null=True))
    def get_dp_record(self, obj) -> dict | None:
        record = obj.loaded_dp_record
        return None if record is None else dict(DpRecordOut(record).data)

    @extend_schema_field(VersionScanOut(many=True))
    def get_scans(self, obj) -> list[dict]:
        principal = self.context.get("principal")
        visible = principal is not None and selectors.scan_findings_visible(
            principal=principal, version=obj
        )
        out = []
        for report in selectors.scan_reports_latest(version=obj):
            item = dict(ScanSummaryOut(report).data)
            item["findings"] = ScanFindingOut(report.findings, many=True).data if visible else None
            out.append(item)
        return out


class ReviewResultOut(serializers.Serializer):
    review = ReviewOut()
    version = VersionDetailOut()


class JobOut(serializers.Serializer):
    id = serializers.UUIDField()
    kind = serializers.ChoiceField(choices=JobKind.choices)
    state = serializers.ChoiceField(choices=JobState.choices)
    progress = serializers.FloatField(min_value=0, max_value=1)
    progress_message = serializers.CharField()
    attempts = serializers.IntegerField()
    # None for operator jobs of the whole registry (KEK rotation).
    namespace = serializers.CharField(source="namespace.name", default=None, allow_null=True)
    model = serializers.CharField(source="version.model.name", default=None, allow_null=True)
    version = serializers.IntegerField(source="version.number", default=None, allow_null=True)
    created_by = serializers.CharField(source="created_by.username", default=None, allow_null=True)
    created_at = serializers.DateTimeField()
    enqueued_at = serializers.DateTimeField(allow_null=True)
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    error_code = serializers.CharField()
    error_message = serializers.CharField()
    result = serializers.JSONField()


class VersionJobOut(serializers.Serializer):
    """A version that has just been handed to a job (202 Accepted): poll the job."""

    version = VersionDetailOut()
    job = JobOut()


class UploadIn(serializers.Serializer):
    # Untrimmed: a path with edge spaces is refused (invalid_path), not silently renamed.
    path = serializers.CharField(max_length=4096, trim_whitespace=False)
    size = serializers.IntegerField(min_value=0)
    sha256 = serializers.RegexField(r"^[0-9a-f]{64}$", required=False)
    part_size = serializers.IntegerField(required=False, min_value=1)


class UploadPartOut(serializers.Serializer):
    number = serializers.IntegerField()
    size = serializers.IntegerField()
    sha256 = serializers.CharField()


class UploadOut(serializers.Serializer):
    id = serializers.UUIDField()
    path = serializers.CharField()
    size = serializers.IntegerField()
    sha256 = serializers.CharField()
    part_size = serializers.IntegerField()
    part_count = serializers.IntegerField()
    state = serializers.CharField()
    expires_at = serializers.DateTimeField()
    parts = UploadPartOut(many=True, source="parts.all")
    missing_parts = serializers.SerializerMethodField()

    def get_missing_parts(self, obj) -> list[int]:
        return upload_session_missing_parts(obj)


class TokenIn(serializers.Serializer):
    name = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")
    scopes = serializers.ListField(
        child=serializers.ChoiceField(choices=TokenScope.choices), min_length=1
    )
    expires_at = serializers.DateTimeField(required=False, allow_null=True)


class TokenOut(serializers.Serializer):
    id = serializers.CharField(source="key_id")
    name = serializers.CharField()
    scopes = serializers.ListField(child=serializers.CharField())
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField(allow_null=True)
    last_used_at = serializers.DateTimeField(allow_null=True)
    revoked_at = serializers.DateTimeField(allow_null=True)


class TokenCreatedOut(TokenOut):
    token = serializers.CharField(help_text="Shown once; store it now.")


# --- The audit log ------------------------------------------------------------------------------


class AuditEventOut(serializers.Serializer):
    seq = serializers.IntegerField()
    time = serializers.DateTimeField(source="created_at")
    actor = serializers.SerializerMethodField()
    action = serializers.CharField()
    namespace = serializers.CharField()
    target = serializers.CharField()
    target_sha256 = serializers.CharField()
    request_id = serializers.CharField()
    client_ip = serializers.CharField()
    outcome = serializers.CharField()
    details = serializers.JSONField()
    prev_hash = serializers.CharField()
    entry_hash = serializers.CharField()

    def get_actor(self, obj) -> dict:
        return {"kind": obj.actor_kind, "user": obj.actor_user, "token": obj.actor_token}


class CheckpointOut(serializers.Serializer):
    size = serializers.IntegerField()
    head_hash = serializers.CharField()
    merkle_root = serializers.CharField()
    prev_checkpoint_hash = serializers.CharField()
    checkpoint_hash = serializers.CharField()
    created_at = serializers.DateTimeField()
    key_id = serializers.CharField()
    signature = serializers.CharField()
    body = serializers.SerializerMethodField()

    def get_body(self, obj) -> str:
        return bytes(obj.body).decode()


class VerifyOut(serializers.Serializer):
    ok = serializers.BooleanField()
    entries = serializers.IntegerField()
    checkpoints = serializers.IntegerField()
    first_bad = serializers.DictField(allow_null=True)


# --- Webhooks -------------------------------------------------------------------------------------


class WebhookIn(serializers.Serializer):
    url = serializers.URLField(max_length=2000, help_text="http(s) URL of a public receiver.")
    events = serializers.ListField(
        child=serializers.ChoiceField(choices=WebhookEvent.choices), min_length=1, max_length=20
    )


class WebhookOut(serializers.Serializer):
    id = serializers.UUIDField()
    url = serializers.CharField()
    events = serializers.ListField(child=serializers.CharField())
    active = serializers.BooleanField()
    created_by = serializers.CharField(source="created_by.username", default=None, allow_null=True)
    created_at = serializers.DateTimeField()


class WebhookCreatedOut(WebhookOut):
    secret = serializers.CharField(
        help_text="The HMAC-SHA256 signing key. Shown once; store it now."
    )


class WebhookDeliveryOut(serializers.Serializer):
    id = serializers.UUIDField()
    delivery_id = serializers.UUIDField(help_text="Sent as X-SMR-Delivery; shared by retries.")
    event = serializers.CharField()
    payload = serializers.JSONField()
    attempt = serializers.IntegerField()
    state = serializers.ChoiceField(choices=WebhookDeliveryState.choices)
    response_status = serializers.IntegerField(allow_null=True)
    error = serializers.CharField()
    duration_ms = serializers.IntegerField(allow_null=True)
    created_at = serializers.DateTimeField()
    next_attempt_at = serializers.DateTimeField(allow_null=True)


class AliasIn(serializers.Serializer):
    version = StrictIntegerField(min_value=1, max_value=999_999_999)


class SigningKeyOut(serializers.Serializer):
    key_id = serializers.CharField(help_text="The key hint of the bundles it signed.")
    algorithm = serializers.CharField()
    public_key_pem = serializers.CharField(help_text="For `model_signing verify key`.")
    current = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()
    retired_at = serializers.DateTimeField(allow_null=True)

    def get_current(self, obj) -> bool:
        return obj.retired_at is None


class SignatureOut(serializers.Serializer):
    id = serializers.IntegerField()
    kind = serializers.ChoiceField(choices=SignatureKind.choices)
    key_id = serializers.CharField()
    result = serializers.ChoiceField(choices=SignatureResult.choices)
    reason = serializers.CharField()
    created_at = serializers.DateTimeField()
    bundle = serializers.JSONField(
        help_text="The Sigstore bundle (v0.3) `model_signing verify` reads; also at "
        "`.../signatures/{id}.sig`."
    )


class SignatureIn(serializers.Serializer):
    bundle = serializers.DictField(
        help_text="The bundle `model_signing sign key` wrote (the JSON of its .sig file)."
    )


class PublisherKeyIn(serializers.Serializer):
    public_key_pem = TextField(max_length=10000, help_text="An EC public key (P-256/384/521).")
    name = TextField(required=False, allow_blank=True, default="", max_length=100)


class PublisherKeyOut(serializers.Serializer):
    key_id = serializers.CharField(help_text="The key hint its bundles carry.")
    name = serializers.CharField()
    public_key_pem = serializers.CharField()
    created_by = serializers.CharField(source="created_by.username", default=None, allow_null=True)
    created_at = serializers.DateTimeField()


class DatasetIn(serializers.Serializer):
    name = NameField(MODEL_NAME_RE, max_length=128)
    sensitivity = serializers.ChoiceField(
        choices=Sensitivity.choices,
        help_text="confidential and restricted data are what the dp_budget gate protects.",
    )
    privacy_unit = serializers.ChoiceField(choices=PrivacyUnit.choices, default=PrivacyUnit.RECORD)
    delta = serializers.FloatField(help_text="Every ledger entry reports epsilon at this delta.")
    description = TextField(required=False, allow_blank=True, default="", max_length=10000)


class DatasetOut(serializers.Serializer):
    name = serializers.CharField()
    sensitivity = serializers.CharField()
    privacy_unit = serializers.CharField()
    delta = serializers.FloatField()
    description = serializers.CharField()
    created_by = serializers.CharField(source="created_by.username", default=None, allow_null=True)
    created_at = serializers.DateTimeField()


class BlockFileIn(serializers.Serializer):
    """A file of a submitted version of the same namespace: the block's data."""

    model = NameField(MODEL_NAME_RE, max_length=128)
    version = serializers.IntegerField(min_value=1, max_value=999_999_999)
    path = TextField(max_length=4096)


class BlockIn(serializers.Serializer):
    name = NameField(MODEL_NAME_RE, max_length=128)
    epsilon = serializers.FloatField(help_text="The block's budget cap.")
    delta = serializers.FloatField(required=False, help_text="Defaults to the dataset's delta.")
    accountant = serializers.ChoiceField(choices=Accountant.choices)
    file = BlockFileIn(required=False, help_text="The block's data (.npz with X and y, or CSV).")
    records = serializers.IntegerField(
        required=False, min_value=1, help_text="Privacy units (rows) in the file."
    )


class BlockOut(serializers.Serializer):
    name = serializers.CharField()
    epsilon = serializers.FloatField()
    delta = serializers.FloatField()
    accountant = serializers.CharField()
    records = serializers.IntegerField(allow_null=True)
    file = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()

    @extend_schema_field(BlockFileIn(allow_null=True))
    def get_file(self, obj) -> dict | None:
        artifact = obj.artifact
        if artifact is None:
            return None
        return {
            "model": artifact.version.model.name,
            "version": artifact.version.number,
            "path": artifact.path,
            "sha256": artifact.sha256,
        }


class BlockBudgetOut(serializers.Serializer):
    block = serializers.CharField()
    accountant = serializers.CharField()
    cap_epsilon = serializers.FloatField()
    cap_delta = serializers.FloatField()
    spent_epsilon = serializers.FloatField(help_text="Committed runs, composed.")
    reserved_epsilon = serializers.FloatField(help_text="What unsettled claims add.")
    remaining_epsilon = serializers.FloatField()
    runs = serializers.IntegerField(help_text="Committed runs.")


class BudgetOut(serializers.Serializer):
    dataset = serializers.CharField()
    delta = serializers.FloatField()
    blocks = BlockBudgetOut(many=True)


class LedgerEntryOut(serializers.Serializer):
    id = serializers.IntegerField()
    claim = serializers.UUIDField()
    kind = serializers.ChoiceField(choices=LedgerKind.choices)
    origin = serializers.ChoiceField(choices=LedgerSource.choices, source="source")
    block = serializers.CharField(source="block.name")
    job = serializers.UUIDField(source="job_id", allow_null=True)
    model = serializers.CharField(source="version.model.name", default=None, allow_null=True)
    version = serializers.IntegerField(source="version.number", default=None, allow_null=True)
    event = serializers.SerializerMethodField()
    accountant = serializers.CharField()
    epsilon = serializers.FloatField(help_text="This entry's event alone, at `delta`.")
    delta = serializers.FloatField()
    library_versions = serializers.DictField(child=serializers.CharField())
    note = serializers.CharField()
    created_by = serializers.CharField(source="created_by.username", default=None, allow_null=True)
    created_at = serializers.DateTimeField()

    @extend_schema_field(DpEventIO)
    def get_event(self, obj) -> dict:
        return {
            "sampling_rate": obj.sampling_rate,
            "noise_multiplier": obj.noise_multiplier,
            "steps": obj.steps,
            "max_grad_norm": obj.max_grad_norm,
        }


class PreviewIn(serializers.Serializer):
    blocks = serializers.ListField(
        child=NameField(MODEL_NAME_RE, max_length=128), min_length=1, max_length=100
    )
    event = DpEventIO()
    accountant = serializers.ChoiceField(choices=Accountant.choices, required=False)


class PreviewBlockOut(BlockBudgetOut):
    epsilon = serializers.FloatField(help_text="The event alone, at the block's delta.")
    epsilon_after = serializers.FloatField(help_text="Everything used so far composed with it.")
    remaining_after = serializers.FloatField()
    used_epsilon = serializers.FloatField(help_text="Committed and reserved, composed.")
    fits = serializers.BooleanField()


class PreviewOut(serializers.Serializer):
    accountant = serializers.CharField()
    delta = serializers.FloatField()
    epsilon = serializers.FloatField(help_text="The event alone, at the dataset's delta.")
    fits = serializers.BooleanField()
    blocks = PreviewBlockOut(many=True)


class DpRecordIn(PreviewIn):
    dataset = NameField(MODEL_NAME_RE, max_length=128)
    note = TextField(required=False, allow_blank=True, default="", max_length=500)


class JobIn(serializers.Serializer):
    """A job to start: `dp_retrain` (a new draft version trained with DP-SGD) or
    `privacy_audit` (a membership-inference attack on a version). Other kinds start from
    their own endpoints (submit, rescan) or commands (rewrap_keys)."""

    kind = serializers.ChoiceField(choices=[JobKind.DP_RETRAIN, JobKind.PRIVACY_AUDIT])
    namespace = NameField(NAMESPACE_NAME_RE, max_length=63)
    dataset = NameField(MODEL_NAME_RE, max_length=128)
    blocks = serializers.ListField(
        child=NameField(MODEL_NAME_RE, max_length=128),
        required=False,
        max_length=100,
        help_text="Blocks to read; all of the dataset's by default.",
    )
    model = NameField(
        MODEL_NAME_RE,
        max_length=128,
        help_text="dp_retrain: the model that gets the new version (created if missing); "
        "privacy_audit: the model of the version to audit.",
    )
    base_version = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    version = serializers.IntegerField(required=False, min_value=1, help_text="privacy_audit.")
    target_epsilon = serializers.FloatField(required=False)
    noise_multiplier = serializers.FloatField(required=False)
    epochs = serializers.IntegerField(required=False)
    batch_size = serializers.IntegerField(required=False)
    max_grad_norm = serializers.FloatField(required=False)
    learning_rate = serializers.FloatField(required=False)
    family = serializers.ChoiceField(choices=["logreg", "mlp"], required=False)
    hidden = serializers.ListField(child=serializers.IntegerField(), required=False, max_length=4)
    holdout_fraction = serializers.FloatField(required=False)
    seed = serializers.IntegerField(required=False)
    label_column = TextField(required=False, max_length=128)
    accountant = serializers.ChoiceField(choices=Accountant.choices, required=False)
