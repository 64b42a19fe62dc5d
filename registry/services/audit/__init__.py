"""The tamper-evident audit log: append, checkpoint, verify.

context.py says who is acting; append.py adds hash-chained events under an advisory lock;
checkpoints.py signs the log head and Merkle root; verify.py recomputes everything and names
the first bad entry. The checkpoint signing key lives in registry.keyconfig.
"""

from registry.keyconfig import audit_public_key_pem as public_key_pem
from registry.services.audit.append import (
    APPEND_LOCK,
    advisory_lock,
    audit_record,
    audit_record_now,
    audit_target,
    record_of,
)
from registry.services.audit.checkpoints import (
    CHECKPOINT_LOCK,
    CHECKPOINT_PREFIX,
    AuditChainBroken,
    audit_checkpoint_create,
    checkpoint_body,
    checkpoint_document,
    checkpoint_publish,
)
from registry.services.audit.context import (
    AuditContext,
    ContextToken,
    context,
    context_begin,
    context_end,
    context_replay,
    context_set_actor,
    context_set_system,
    context_snapshot,
)
from registry.services.audit.verify import Finding, VerifyReport, audit_verify

__all__ = [
    "APPEND_LOCK",
    "CHECKPOINT_LOCK",
    "CHECKPOINT_PREFIX",
    "AuditChainBroken",
    "AuditContext",
    "ContextToken",
    "Finding",
    "VerifyReport",
    "advisory_lock",
    "audit_checkpoint_create",
    "audit_record",
    "audit_record_now",
    "audit_target",
    "audit_verify",
    "checkpoint_body",
    "checkpoint_document",
    "checkpoint_publish",
    "context",
    "context_begin",
    "context_end",
    "context_replay",
    "context_set_actor",
    "context_set_system",
    "context_snapshot",
    "public_key_pem",
    "record_of",
]
