"""The one error family of the registry.

Every failure a client can cause or see is a RegistryError with a stable `code`; api/errors.py
maps it to an HTTP status and `{"code", "message", "extra"}` in one place.
"""

from __future__ import annotations

from typing import Any


class RegistryError(Exception):
    code = "error"
    status = 400
    default_message = "The request could not be processed."

    def __init__(self, message: str | None = None, **extra: Any) -> None:
        self.message = message or self.default_message
        self.extra = extra
        super().__init__(self.message)

    def response_headers(self) -> dict[str, str]:
        """HTTP headers an error response should carry (none by default)."""
        return {}


class InvalidInput(RegistryError):
    code = "invalid_input"
    default_message = "The request is malformed."


class InvalidPath(RegistryError):
    code = "invalid_path"
    default_message = "The artifact path is not allowed."


class UnsupportedDigest(RegistryError):
    code = "unsupported_digest"
    default_message = (
        "Content-Digest names no algorithm this registry checks; send sha-256=:BASE64: "
        "(see Want-Content-Digest)."
    )

    def response_headers(self) -> dict[str, str]:
        return {"Want-Content-Digest": "sha-256=1"}


class IncompleteBody(RegistryError):
    code = "incomplete_body"
    default_message = (
        "The request body ended before Content-Length bytes arrived; nothing was stored."
    )


class LengthRequired(RegistryError):
    code = "length_required"
    status = 411
    default_message = "Send a Content-Length header with the exact size of the file."


class DigestMismatch(RegistryError):
    code = "digest_mismatch"
    default_message = "The uploaded bytes do not match the digest you sent; nothing was stored."


class TooLarge(RegistryError):
    code = "too_large"
    status = 413
    default_message = "The file is larger than this registry accepts."


class NotFound(RegistryError):
    code = "not_found"
    status = 404
    default_message = "Not found, or you do not have access to it."


class PermissionDenied(RegistryError):
    code = "permission_denied"
    status = 403
    default_message = "Your role or token scope does not allow this."


class InvalidCredentials(RegistryError):
    code = "invalid_credentials"
    status = 401
    # One message for an unknown user and a wrong password: no username enumeration.
    default_message = "Wrong username or password."


class LockedOut(RegistryError):
    code = "locked_out"
    status = 429
    default_message = (
        "Too many failed logins for this username from your address; try again after "
        "Retry-After seconds, or ask an admin to unlock it (manage.py axes_reset_username)."
    )

    def response_headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.extra.get("retry_after", 1))}


class Conflict(RegistryError):
    code = "conflict"
    status = 409
    default_message = "The request conflicts with the current state."


class VersionNotDraft(Conflict):
    code = "version_not_draft"
    default_message = "Files can only change while the version is a draft; create a new version."


class LastAdmin(Conflict):
    code = "last_admin"
    default_message = "A namespace must keep at least one admin; add another admin first."


class EmptyVersion(Conflict):
    code = "empty_version"
    default_message = "Upload at least one file before submitting."


class AlreadyExists(Conflict):
    code = "already_exists"
    default_message = "An object with that name already exists."


class RangeNotSatisfiable(RegistryError):
    code = "range_not_satisfiable"
    status = 416
    default_message = "The requested range is outside the file."


class StorageUnavailable(RegistryError):
    code = "storage_unavailable"
    status = 503
    default_message = "The object store is unavailable; nothing was stored. Retry later."


class KeyServiceUnavailable(RegistryError):
    code = "key_service_unavailable"
    status = 503
    default_message = "The key service is unavailable. Retry later."


class IntegrityFailure(RegistryError):
    # Deliberately vague to the client: details (segment, cause) go to the server log/audit.
    code = "integrity_error"
    status = 502
    default_message = "A stored object failed its integrity check; the incident was recorded."


class DatabaseUnavailable(RegistryError):
    code = "database_unavailable"
    status = 503
    default_message = "The database is unavailable; nothing was changed. Retry later."


class VersionNotScannable(Conflict):
    code = "version_not_rescannable"
    default_message = (
        "Only a version that is pending review or quarantined (or whose scan failed) can be "
        "scanned again; wait for the running scan to finish."
    )


class GateNotMet(Conflict):
    """A gate of the namespace policy does not hold; each gate's subclass names it in `code`
    (registry.services.approvals.GATES)."""

    code = "gate_not_met"
    default_message = "A gate the namespace policy requires does not hold for this version."


class ScanGateNotClean(GateNotMet):
    # Stable: the review endpoint names this gate when it refuses.
    code = "gate_scan_not_clean"
    default_message = (
        "The version has no clean scan: it is still being scanned or was quarantined. "
        "Fix the files in a new version, or ask an admin to re-scan after a scanner update."
    )


class PublisherSignatureMissing(GateNotMet):
    code = "gate_publisher_signature"
    default_message = (
        "The namespace policy requires a valid publisher signature: sign the files with "
        "`model_signing sign key` using a key the namespace trusts, and POST the bundle to "
        "the version's signatures."
    )


class VersionQuarantined(PermissionDenied):
    code = "version_quarantined"
    default_message = (
        "This version was quarantined by the scanner; only its owner and the namespace's "
        "admins can read its files and findings."
    )


class VersionNotReviewable(Conflict):
    code = "version_not_reviewable"
    default_message = "Only a version pending review can be reviewed."


class SelfReviewForbidden(PermissionDenied):
    code = "self_review_forbidden"
    default_message = (
        "You uploaded, created or submitted this version; the namespace policy needs someone "
        "else to review it."
    )


class AlreadyReviewed(Conflict):
    code = "already_reviewed"
    default_message = "You already reviewed this version; a reviewer counts once."


class VersionNotApproved(Conflict):
    code = "version_not_approved"
    default_message = "Only an approved version can be deprecated."


class VersionAlreadyRevoked(Conflict):
    code = "version_already_revoked"
    default_message = "The version is already revoked."


class VersionRevoked(RegistryError):
    code = "version_revoked"
    status = 410
    default_message = "This version was revoked by a namespace admin; its files are gone for good."


class PublisherKeyExists(Conflict):
    code = "publisher_key_exists"
    default_message = "The namespace already trusts this public key."


class SignatureMismatch(RegistryError):
    code = "signature_mismatch"
    status = 409
    default_message = (
        "This approved version's files no longer match the registry's signature of them; it "
        "is not served. The event is in the audit log: tell the namespace's admins."
    )


class WebhookUrlNotAllowed(RegistryError):
    code = "webhook_url_not_allowed"
    default_message = (
        "The webhook URL must be http(s), carry no credentials, and resolve only to public "
        "addresses (loopback, private, link-local and reserved ones are refused unless the "
        "operator sets SMR_WEBHOOK_ALLOW_PRIVATE=1)."
    )


class AliasProtected(PermissionDenied):
    code = "alias_protected"
    default_message = (
        "This alias is protected by the namespace policy (protected_aliases): only namespace "
        "admins can move or delete it."
    )


class BudgetExceeded(Conflict):
    code = "budget_exceeded"
    default_message = "The run would spend more privacy budget than a block it reads has left."


class AccountantMismatch(Conflict):
    code = "accountant_mismatch"
    default_message = (
        "A block's budget is accounted with one accountant for its whole life; a run over "
        "blocks with different accountants, or naming another accountant, is refused."
    )


class DpRecordExists(Conflict):
    code = "dp_record_exists"
    default_message = "This version already has a DP record; the ledger is append-only."


class DpBudgetGateNotMet(GateNotMet):
    code = "gate_dp_budget"
    default_message = (
        "The namespace policy requires versions trained on sensitive data to carry a "
        "committed DP record within budget: register the run with POST "
        ".../versions/{n}/dp-record, or train it with a dp_retrain job."
    )


class InUse(Conflict):
    code = "in_use"
    default_message = (
        "The DP ledger refers to this object; the ledger is append-only, so it cannot be "
        "deleted. Deprecate it instead."
    )


class JobNotCancellable(Conflict):
    code = "job_not_cancellable"
    default_message = "Only a queued or running job can be cancelled."


class VersionNotRecordable(Conflict):
    code = "version_not_recordable"
    default_message = "A rejected, deprecated or revoked version takes no DP record."
