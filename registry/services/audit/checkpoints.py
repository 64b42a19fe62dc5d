"""Signed checkpoints: the log's head and RFC 9162 Merkle root, signed with Ed25519.

Each checkpoint is stored in the database and, write-once, in the object store, where a copy
survives someone editing or deleting the database rows. The signing key is a file, never a
database row (registry.keyconfig).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Generator
from typing import Any, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.db import transaction
from django.utils import timezone

from registry import storage
from registry.auditchain import GENESIS, MerkleAccumulator, canonical_bytes, entry_hash, format_time
from registry.keyconfig import audit_key_id, audit_signing_key
from registry.models import AuditAction, AuditCheckpoint, AuditEvent, AuditOutcome
from registry.services.audit.append import advisory_lock, audit_record, audit_record_now

logger = logging.getLogger(__name__)

# pg_advisory_xact_lock key ("SMRCHKPT" as a signed 64-bit integer).
CHECKPOINT_LOCK = int.from_bytes(b"SMRCHKPT", "big") - (1 << 63)
CHECKPOINT_PREFIX = "audit/checkpoints/"


class AuditChainBroken(Exception):
    """The entries since the last checkpoint do not form a valid chain: refuse to sign."""


def checkpoint_body(
    *,
    size: int,
    head_hash: str,
    merkle_root: str,
    frontier: list[list[Any]],
    prev_checkpoint_hash: str,
    created_at: str,
) -> bytes:
    """The canonical bytes a checkpoint signs: log size, head hash, Merkle root and frontier.

    `prev_checkpoint_hash` links each checkpoint to the one before, so a verifier can tell a
    rewritten history from a continued one.
    """
    return canonical_bytes(
        {
            "v": 1,
            "log": "smr-audit",
            "size": size,
            "head_hash": head_hash,
            "merkle_root": merkle_root,
            "frontier": frontier,
            "prev_checkpoint_hash": prev_checkpoint_hash,
            "time": created_at,
        }
    )


def _resume_from(
    prev: AuditCheckpoint | None, public: Ed25519PublicKey
) -> tuple[int, str, MerkleAccumulator]:
    """Where the last checkpoint left the tree: (size, head hash, accumulator).

    Only a checkpoint whose signature verifies is trusted to resume from; otherwise the tree
    is rebuilt from the first entry.
    """
    if prev is not None and prev.frontier:
        try:
            public.verify(bytes.fromhex(prev.signature), bytes(prev.body))
            doc = json.loads(bytes(prev.body))
            acc = MerkleAccumulator.restore(doc["frontier"])
            if acc.size == doc["size"] == prev.size and acc.root() == doc["merkle_root"]:
                return prev.size, str(doc["head_hash"]), acc
        except (InvalidSignature, ValueError, KeyError, TypeError):
            pass
        logger.warning("checkpoint at %s is not trustworthy; rebuilding the Merkle tree", prev.size)
    return 0, GENESIS, MerkleAccumulator()


def audit_checkpoint_create() -> AuditCheckpoint | None:
    """Sign the current log head; store it in the DB and, write-once, in the object store.

    Extends the previous checkpoint's tree with the new entries only, after checking that they
    chain onto it: a tampered tail is refused (AuditChainBroken), never signed, and the refusal
    is itself logged. Returns None when nothing was appended since the last checkpoint.
    """
    try:
        return _checkpoint_create()
    except AuditChainBroken as exc:
        logger.error("audit checkpoint refused: %s", exc)
        # Its own transaction: the checkpoint's was rolled back, the refusal must stay.
        audit_record_now(
            action=AuditAction.AUDIT_CHECKPOINT,
            outcome=AuditOutcome.FAILURE,
            target="audit/log",
            details={"refused": str(exc)},
        )
        raise


def _checkpoint_create() -> AuditCheckpoint | None:
    key = audit_signing_key()
    with transaction.atomic():
        advisory_lock(CHECKPOINT_LOCK)
        prev = AuditCheckpoint.objects.order_by("-size").first()
        size = AuditEvent.objects.order_by("-seq").values_list("seq", flat=True).first() or 0
        if size == 0 or (prev is not None and prev.size >= size):
            return None
        done, head, acc = _resume_from(prev, key.public_key())
        # iterator() returns a generator (the stubs say Iterator): closed explicitly below.
        rows = cast(
            Generator[tuple[int, str, str, bytes | memoryview], None, None],
            AuditEvent.objects.filter(seq__gt=done, seq__lte=size)
            .order_by("seq")
            .values_list("seq", "prev_hash", "entry_hash", "canonical")
            .iterator(chunk_size=5000),
        )
        expected = done + 1
        problem = None
        for seq, prev_hash, stored_hash, canonical in rows:
            if seq != expected or prev_hash != head:
                problem = f"entry {expected} is missing or does not chain on"
                break
            if entry_hash(head, seq, bytes(canonical)) != stored_hash:
                problem = f"entry {seq} does not match its hash"
                break
            acc.add(bytes.fromhex(stored_hash))
            head = stored_hash
            expected += 1
        # Close the server-side cursor now, while its transaction is still alive.
        rows.close()
        if problem is None and expected != size + 1:
            problem = f"entries {expected}..{size} are missing"
        if problem is not None:
            raise AuditChainBroken(problem)
        prev_hash_cp = prev.checkpoint_hash if prev else GENESIS
        body = checkpoint_body(
            size=size,
            head_hash=head,
            merkle_root=acc.root(),
            frontier=acc.frontier(),
            prev_checkpoint_hash=prev_hash_cp,
            created_at=format_time(timezone.now()),
        )
        checkpoint = AuditCheckpoint.objects.create(
            size=size,
            head_hash=head,
            merkle_root=acc.root(),
            frontier=acc.frontier(),
            prev_checkpoint_hash=prev_hash_cp,
            created_at=timezone.now(),
            body=body,
            checkpoint_hash=hashlib.sha256(body).hexdigest(),
            key_id=audit_key_id(key.public_key()),
            signature=key.sign(body).hex(),
        )
        audit_record(
            action=AuditAction.AUDIT_CHECKPOINT,
            target=f"checkpoint@{size}",
            details={"size": size, "merkle_root": checkpoint.merkle_root},
        )
    checkpoint_publish(checkpoint)
    return checkpoint


def checkpoint_document(checkpoint: AuditCheckpoint) -> bytes:
    """The JSON published for a checkpoint: its signed body, key id and signature."""
    return json.dumps(
        {
            "body": bytes(checkpoint.body).decode(),
            "key_id": checkpoint.key_id,
            "signature": checkpoint.signature,
        },
        sort_keys=True,
    ).encode()


def checkpoint_publish(checkpoint: AuditCheckpoint) -> bool:
    """Write the checkpoint to the object store once (If-None-Match: *). Outside any transaction.

    Returns False when the object already exists or the store failed; in the latter case the
    checkpoint stays in the database only.
    """
    key = f"{CHECKPOINT_PREFIX}{checkpoint.size:020d}.json"
    try:
        storage.get_object_store().put_bytes(
            key, checkpoint_document(checkpoint), if_none_match=True
        )
    except storage.ObjectExists:
        return False
    except storage.StorageError:
        logger.warning("could not publish audit checkpoint %s; it stays in the database", key)
        return False
    return True
