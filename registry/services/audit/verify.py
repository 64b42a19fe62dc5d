"""Verification: recompute the chain and compare it with every signed checkpoint."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from registry import storage
from registry.auditchain import GENESIS, MerkleAccumulator, canonical_bytes, entry_hash
from registry.keyconfig import audit_signing_key
from registry.models import AuditCheckpoint, AuditEvent
from registry.services.audit.append import record_of
from registry.services.audit.checkpoints import CHECKPOINT_PREFIX

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finding:
    seq: int
    kind: str  # GAP, HASH, LINK, TRUNCATED, REWRITTEN, BADSIG
    message: str


@dataclass
class VerifyReport:
    entries: int = 0
    checkpoints: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def first(self) -> Finding | None:
        return min(self.findings, key=lambda f: f.seq) if self.findings else None


@dataclass(frozen=True)
class _Checkpoint:
    size: int
    head_hash: str
    merkle_root: str
    prev_checkpoint_hash: str
    checkpoint_hash: str
    source: str


def _parse_checkpoint(
    body: bytes, signature_hex: str, public: Ed25519PublicKey, source: str
) -> _Checkpoint | None:
    try:
        public.verify(bytes.fromhex(signature_hex), body)
        doc = json.loads(body)
        return _Checkpoint(
            size=int(doc["size"]),
            head_hash=doc["head_hash"],
            merkle_root=doc["merkle_root"],
            prev_checkpoint_hash=doc["prev_checkpoint_hash"],
            checkpoint_hash=hashlib.sha256(body).hexdigest(),
            source=source,
        )
    except (InvalidSignature, ValueError, KeyError, TypeError):
        return None


def _load_checkpoints(public: Ed25519PublicKey, report: VerifyReport) -> list[_Checkpoint]:
    found: dict[tuple[int, str], _Checkpoint] = {}
    for row in AuditCheckpoint.objects.order_by("size").iterator():
        cp = _parse_checkpoint(bytes(row.body), row.signature, public, "db")
        if cp is None or cp.size != row.size or cp.head_hash != row.head_hash:
            report.findings.append(
                Finding(
                    row.size,
                    "BADSIG",
                    f"checkpoint at size {row.size} (database) fails its signature",
                )
            )
            continue
        found[(cp.size, cp.checkpoint_hash)] = cp
    # Copies in the object store survive someone deleting or editing the database rows.
    store = storage.get_object_store()
    try:
        keys = list(store.list_keys(CHECKPOINT_PREFIX))
    except storage.StorageError:
        keys = []
        logger.warning("object store unavailable: verifying against database checkpoints only")
    for key in keys:
        try:
            doc = json.loads(b"".join(store.read(key)))
            body = doc["body"].encode()
            cp = _parse_checkpoint(body, doc["signature"], public, "store")
        except (storage.StorageError, ValueError, KeyError, TypeError):
            cp = None
        if cp is None:
            report.findings.append(
                Finding(0, "BADSIG", f"checkpoint object {key} fails its signature")
            )
            continue
        found.setdefault((cp.size, cp.checkpoint_hash), cp)
    checkpoints = sorted(found.values(), key=lambda c: c.size)
    for a, b in itertools.pairwise(checkpoints):
        if a.size == b.size:
            report.findings.append(
                Finding(a.size, "BADSIG", f"two different signed checkpoints claim size {a.size}")
            )
        elif b.prev_checkpoint_hash != a.checkpoint_hash:
            report.findings.append(
                Finding(
                    b.size,
                    "BADSIG",
                    f"checkpoint at size {b.size} does not extend the one at {a.size}",
                )
            )
    return checkpoints


def audit_verify(*, public_key: Ed25519PublicKey | None = None) -> VerifyReport:
    """Recompute the chain and compare it with every signed checkpoint, streaming the table.

    Reports the first bad sequence number and its kind: GAP (an entry deleted), LINK (reordered
    or inserted), HASH (an entry edited), TRUNCATED (shorter than a signed checkpoint),
    REWRITTEN (consistently re-chained, but no longer what was signed), BADSIG.
    """
    public = public_key or audit_signing_key().public_key()
    report = VerifyReport()
    checkpoints = _load_checkpoints(public, report)
    report.checkpoints = len(checkpoints)
    by_size: dict[int, list[_Checkpoint]] = {}
    for cp in checkpoints:
        by_size.setdefault(cp.size, []).append(cp)
    last_good_size = 0

    columns = (
        "seq", "created_at", "actor_kind", "actor_user", "actor_token", "action", "namespace",
        "target", "target_sha256", "request_id", "client_ip", "outcome", "details",
        "canonical", "prev_hash", "entry_hash",
    )  # fmt: skip
    # iterator() returns a generator (the stubs say Iterator): closed explicitly below.
    rows = cast(
        Generator[tuple[Any, ...], None, None],
        AuditEvent.objects.order_by("seq").values_list(*columns).iterator(chunk_size=5000),
    )
    expected, prev, acc = 1, GENESIS, MerkleAccumulator()
    for row in rows:
        seq = row[0]
        stored_canonical, prev_hash, stored_hash = bytes(row[13]), row[14], row[15]
        if seq != expected:
            report.findings.append(
                Finding(expected, "GAP", f"entries {expected}..{seq - 1} are missing (deleted)")
            )
            break
        if prev_hash != prev:
            report.findings.append(
                Finding(
                    seq,
                    "LINK",
                    f"entry {seq} does not follow entry {seq - 1} (reordered or inserted)",
                )
            )
            break
        rebuilt = canonical_bytes(record_of(**dict(zip(columns[:13], row[:13], strict=True))))
        if rebuilt != stored_canonical or entry_hash(prev, seq, stored_canonical) != stored_hash:
            report.findings.append(Finding(seq, "HASH", f"entry {seq} was edited"))
            break
        acc.add(bytes.fromhex(stored_hash))
        prev = stored_hash
        report.entries = seq
        for cp in by_size.get(seq, []):
            if cp.head_hash != stored_hash or cp.merkle_root != acc.root():
                report.findings.append(
                    Finding(
                        last_good_size + 1,
                        "REWRITTEN",
                        f"the log up to {seq} no longer matches its signed checkpoint: entries "
                        f"{last_good_size + 1}..{seq} were rewritten and re-chained",
                    )
                )
                break
            last_good_size = seq
        if report.findings and report.findings[-1].kind == "REWRITTEN":
            break
        expected += 1
    else:
        longest = checkpoints[-1].size if checkpoints else 0
        if longest > report.entries:
            report.findings.append(
                Finding(
                    report.entries + 1,
                    "TRUNCATED",
                    f"the log ends at {report.entries} but a signed checkpoint covers {longest}",
                )
            )
    rows.close()  # release the server-side cursor at once after an early stop
    return report
