"""The tamper-evident audit log: append, checkpoint, verify.

Appends take a PostgreSQL advisory transaction lock, read the head and insert seq+1 in the
caller's transaction, so a rolled-back change leaves no event and sequence numbers have no gaps
(a DB sequence would leave gaps on rollback, indistinguishable from deletions). The lock is held
until the caller commits, which serialises audited writes: keep the audit call at the end of
short transactions.
"""

from __future__ import annotations

import contextvars
import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from registry import storage
from registry.auditchain import (
    GENESIS,
    MerkleAccumulator,
    canonical_bytes,
    entry_hash,
    format_time,
)
from registry.models import AuditAction, AuditCheckpoint, AuditEvent, AuditOutcome

logger = logging.getLogger(__name__)

# pg_advisory_xact_lock keys ("SMRAUDIT" / "SMRCHKPT" as 64-bit integers).
APPEND_LOCK = int.from_bytes(b"SMRAUDIT", "big") - (1 << 63)
CHECKPOINT_LOCK = int.from_bytes(b"SMRCHKPT", "big") - (1 << 63)
CHECKPOINT_PREFIX = "audit/checkpoints/"


# --- Who is acting: set per request by middleware and authentication, per task by workers ---


@dataclass
class AuditContext:
    request_id: str = ""
    client_ip: str = ""
    actor_kind: str = "anonymous"  # user, system, anonymous
    user: str = ""
    token: str = ""


_context: contextvars.ContextVar[AuditContext | None] = contextvars.ContextVar(
    "smr_audit_context", default=None
)


def context() -> AuditContext:
    ctx = _context.get()
    if ctx is None:
        ctx = AuditContext(actor_kind="system", user="system")
        _context.set(ctx)
    return ctx


def context_begin(*, request_id: str = "", client_ip: str = "") -> contextvars.Token:
    return _context.set(AuditContext(request_id=request_id, client_ip=client_ip))


def context_end(token: contextvars.Token) -> None:
    _context.reset(token)


def context_set_actor(*, user: str, token: str = "") -> None:
    ctx = context()
    ctx.actor_kind = "user"
    ctx.user = user
    ctx.token = token


def context_snapshot() -> AuditContext:
    """A copy of the current context, for work that outlives the request (streamed bodies)."""
    return AuditContext(**vars(context()))


def context_set_system(name: str = "system") -> None:
    ctx = context()
    ctx.actor_kind = "system"
    ctx.user = name
    ctx.token = ""


# --- Append --------------------------------------------------------------------------------


def _clean(value: str) -> str:
    # PostgreSQL text and jsonb cannot hold NUL; attacker-supplied strings may contain it.
    return value.replace("\x00", "\ufffd")


def _clean_details(value: Any) -> Any:
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, dict):
        return {_clean(str(k)): _clean_details(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean_details(v) for v in value]
    return value


def record_of(
    *,
    seq: int,
    created_at: datetime,
    actor_kind: str,
    actor_user: str,
    actor_token: str,
    action: str,
    namespace: str,
    target: str,
    target_sha256: str,
    request_id: str,
    client_ip: str,
    outcome: str,
    details: dict,
) -> dict[str, Any]:
    """The canonical record of an event: what is hashed, rebuilt the same way by verify."""
    return {
        "v": 1,
        "seq": seq,
        "time": format_time(created_at),
        "actor": {"kind": actor_kind, "user": actor_user, "token": actor_token},
        "action": action,
        "namespace": namespace,
        "target": target,
        "target_sha256": target_sha256,
        "request_id": request_id,
        "client_ip": client_ip,
        "outcome": outcome,
        "details": details,
    }


def _lock(key: int) -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [key])
    # SQLite (embedded mode) runs every transaction as BEGIN IMMEDIATE: writers are serial.


def audit_record(
    *,
    action: str,
    outcome: str = AuditOutcome.SUCCESS,
    namespace: str = "",
    target: str = "",
    target_sha256: str = "",
    details: dict | None = None,
    serialize: bool = True,
) -> AuditEvent:
    """Append one event to the log, inside the caller's transaction (or its own).

    `serialize=False` skips the advisory lock; it exists only so a test can show that the lock
    is what keeps the chain intact under concurrency.
    """
    if action not in AuditAction.values:
        raise ValueError(f"unknown audit action {action!r}")
    ctx = context()
    clean_details = _clean_details(details or {})
    with transaction.atomic():
        if serialize:
            _lock(APPEND_LOCK)
        head = AuditEvent.objects.order_by("-seq").values_list("seq", "entry_hash").first()
        seq, prev = (head[0] + 1, head[1]) if head else (1, GENESIS)
        now = timezone.now()
        fields = {
            "actor_kind": ctx.actor_kind,
            "actor_user": _clean(ctx.user),
            "actor_token": _clean(ctx.token),
            "action": action,
            "namespace": _clean(namespace),
            "target": _clean(target),
            "target_sha256": target_sha256,
            "request_id": _clean(ctx.request_id),
            "client_ip": _clean(ctx.client_ip),
            "outcome": outcome,
        }
        canonical = canonical_bytes(
            record_of(seq=seq, created_at=now, details=clean_details, **fields)
        )
        return AuditEvent.objects.create(
            seq=seq,
            created_at=now,
            details=clean_details,
            canonical=canonical,
            prev_hash=prev,
            entry_hash=entry_hash(prev, seq, canonical),
            **fields,
        )


def audit_record_now(*, ctx: AuditContext | None = None, **kwargs: Any) -> AuditEvent | None:
    """Record an event that must survive the failure being reported (its own transaction).

    Never raises: failing to log a failure must not hide the original error. `ctx` replays a
    request's context captured earlier (the body of a streamed download runs after the view).
    """
    reset = _context.set(ctx) if ctx is not None else None
    try:
        with transaction.atomic():
            return audit_record(**kwargs)
    except Exception:
        logger.exception("could not write audit event %s", kwargs.get("action"))
        return None
    finally:
        if reset is not None:
            _context.reset(reset)


# --- Checkpoint signing key (a file, never the database) ------------------------------------


def _key_path() -> Path:
    return Path(settings.SMR_AUDIT_SIGNING_KEY_FILE)


def signing_key() -> Ed25519PrivateKey:
    path = _key_path()
    if not path.exists():
        if settings.SMR_PRODUCTION:
            raise RuntimeError(
                f"audit signing key {path} is missing; mount it (SMR_AUDIT_SIGNING_KEY_FILE)"
            )
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        try:
            os.link(tmp, path)  # exclusive: two processes starting together agree on one key
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        logger.warning("generated an embedded audit signing key at %s; back it up", path)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise RuntimeError(f"{path} is not an Ed25519 private key")
    return key


def public_key_pem() -> str:
    return (
        signing_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def key_id_of(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


# --- Checkpoints ---------------------------------------------------------------------------


class AuditChainBroken(Exception):
    """The entries since the last checkpoint do not form a valid chain: refuse to sign."""


def checkpoint_body(
    *,
    size: int,
    head_hash: str,
    merkle_root: str,
    frontier: list[list],
    prev_checkpoint_hash: str,
    created_at: str,
) -> bytes:
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
                return prev.size, doc["head_hash"], acc
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
    key = signing_key()
    with transaction.atomic():
        _lock(CHECKPOINT_LOCK)
        prev = AuditCheckpoint.objects.order_by("-size").first()
        size = AuditEvent.objects.order_by("-seq").values_list("seq", flat=True).first() or 0
        if size == 0 or (prev is not None and prev.size >= size):
            return None
        done, head, acc = _resume_from(prev, key.public_key())
        rows = (
            AuditEvent.objects.filter(seq__gt=done, seq__lte=size)
            .order_by("seq")
            .values_list("seq", "prev_hash", "entry_hash", "canonical")
            .iterator(chunk_size=5000)
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
            key_id=key_id_of(key.public_key()),
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
    return json.dumps(
        {
            "body": bytes(checkpoint.body).decode(),
            "key_id": checkpoint.key_id,
            "signature": checkpoint.signature,
        },
        sort_keys=True,
    ).encode()


def checkpoint_publish(checkpoint: AuditCheckpoint) -> bool:
    """Write the checkpoint to the object store once (If-None-Match: *). Outside any transaction."""
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


# --- Verification --------------------------------------------------------------------------


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


def _parse_checkpoint(body: bytes, signature_hex: str, public: Ed25519PublicKey, source: str):
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
    public = public_key or signing_key().public_key()
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
    rows = AuditEvent.objects.order_by("seq").values_list(*columns).iterator(chunk_size=5000)
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
