"""Tamper-evidence of the audit log, on PostgreSQL, attacked with raw SQL as a superuser."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError, connection, connections, transaction
from django.utils import timezone

from registry import storage
from registry.auditchain import GENESIS, canonical_bytes, entry_hash
from registry.models import AuditCheckpoint, AuditEvent
from registry.services import audit

EVENTS = "registry_auditevent"
CHECKPOINTS = "registry_auditcheckpoint"


def append(n: int, *, start: int = 0) -> None:
    for i in range(start, start + n):
        audit.audit_record(
            action="model.create", namespace="acme", target=f"acme/m{i}", details={"i": i}
        )


def sql(statement: str, params=None) -> None:
    with connection.cursor() as cursor:
        cursor.execute(statement, params)


def drop_triggers() -> None:
    # DDL is transactional on PostgreSQL: the test's rollback puts the triggers back.
    for table in (EVENTS, CHECKPOINTS):
        sql(f"DROP TRIGGER {table}_no_change ON {table}")
        sql(f"DROP TRIGGER {table}_no_truncate ON {table}")


def first_bad():
    report = audit.audit_verify()
    return (report.first.kind, report.first.seq) if report.first else None


@pytest.fixture
def log(db):
    """Signed checkpoints at sizes 9 and 20 (each checkpoint's own event lands after the head
    it signs), then 10 more events."""
    append(9)
    audit.audit_checkpoint_create()
    append(10, start=9)
    audit.audit_checkpoint_create()
    append(10, start=19)
    sizes = list(AuditCheckpoint.objects.order_by("size").values_list("size", flat=True))
    assert sizes == [9, 20]
    assert first_bad() is None
    return sizes


def test_untouched_log_verifies(log):
    report = audit.audit_verify()
    assert report.ok
    assert report.entries == AuditEvent.objects.count()
    assert report.checkpoints == 2
    call_command("verify_audit", stdout=open(os.devnull, "w"))  # noqa: SIM115


def test_edit_is_hash(log):
    drop_triggers()
    sql(f"UPDATE {EVENTS} SET details = %s WHERE seq = 12", [json.dumps({"i": 999})])
    assert first_bad() == ("HASH", 12)
    with pytest.raises(CommandError, match="HASH at seq 12"):
        call_command("verify_audit")


def test_edit_of_the_hashed_bytes_is_hash(log):
    drop_triggers()
    sql(
        f"UPDATE {EVENTS} SET canonical = "
        "convert_to(replace(convert_from(canonical, 'UTF8'), 'm3', 'mX'), 'UTF8') WHERE seq = 4"
    )
    row = AuditEvent.objects.get(seq=4)
    assert b"mX" in bytes(row.canonical)  # control: the edit happened
    assert first_bad() == ("HASH", 4)


def test_delete_is_gap(log):
    drop_triggers()
    sql(f"DELETE FROM {EVENTS} WHERE seq = 7")
    assert first_bad() == ("GAP", 7)


def test_swapped_rows_are_link(log):
    drop_triggers()
    cols = [f.column for f in AuditEvent._meta.concrete_fields if f.column not in {"id", "seq"}]
    assignments = ", ".join(f"{c} = other.{c}" for c in cols)
    sql(
        f"UPDATE {EVENTS} AS t SET {assignments} FROM {EVENTS} AS other "
        f"WHERE (t.seq, other.seq) IN ((5, 8), (8, 5))"
    )
    assert AuditEvent.objects.get(seq=5).details == {"i": 7}  # control: contents moved
    assert first_bad() == ("LINK", 5)


def test_deleted_tail_after_checkpoint_is_truncated(log):
    drop_triggers()
    sql(f"DELETE FROM {EVENTS} WHERE seq >= 15")
    assert first_bad() == ("TRUNCATED", 15)


def test_truncation_detected_even_if_db_checkpoints_are_deleted_too(log):
    # The attacker also removes the checkpoint rows; the write-once copies in the object
    # store still prove how long the log was.
    drop_triggers()
    sql(f"DELETE FROM {EVENTS} WHERE seq >= 15")
    sql(f"DELETE FROM {CHECKPOINTS}")
    keys = list(storage.get_object_store().list_keys(audit.CHECKPOINT_PREFIX))
    assert len(keys) == 2
    assert first_bad() == ("TRUNCATED", 15)


def test_consistently_rewritten_tail_is_rewritten(log):
    drop_triggers()
    # Change entry 12 and recompute every later hash so the chain itself is flawless.
    rows = list(AuditEvent.objects.filter(seq__gte=12).order_by("seq"))
    prev = AuditEvent.objects.get(seq=11).entry_hash
    for row in rows:
        record = json.loads(bytes(row.canonical))
        if row.seq == 12:
            record["details"] = {"i": 12345}
        canonical = canonical_bytes(record)
        new_hash = entry_hash(prev, row.seq, canonical)
        sql(
            f"UPDATE {EVENTS} SET details = %s, canonical = %s, prev_hash = %s, entry_hash = %s "
            "WHERE seq = %s",
            [json.dumps(record["details"]), canonical, prev, new_hash, row.seq],
        )
        prev = new_hash
    kind, seq = first_bad()
    assert kind == "REWRITTEN"
    assert seq == 10  # somewhere after the last checkpoint that still matches (size 9)


def test_rewrite_after_last_checkpoint_is_not_detectable_until_next_checkpoint(log):
    # Honest limit: entries newer than the last signed checkpoint can be re-chained
    # undetected; checkpoint often. This pins the boundary of the guarantee.
    drop_triggers()
    last = AuditEvent.objects.order_by("-seq").first()
    record = json.loads(bytes(last.canonical))
    record["details"] = {"i": -1}
    canonical = canonical_bytes(record)
    sql(
        f"UPDATE {EVENTS} SET details = %s, canonical = %s, entry_hash = %s WHERE seq = %s",
        [
            json.dumps({"i": -1}),
            canonical,
            entry_hash(last.prev_hash, last.seq, canonical),
            last.seq,
        ],
    )
    assert first_bad() is None
    audit.audit_checkpoint_create()
    assert first_bad() is None  # the rewrite is now part of what was signed


def test_corrupt_checkpoint_signature_is_badsig(log):
    drop_triggers()
    cp = AuditCheckpoint.objects.get(size=20)
    bad = ("00" if cp.signature[:2] != "00" else "11") + cp.signature[2:]
    sql(f"UPDATE {CHECKPOINTS} SET signature = %s WHERE size = 20", [bad])
    # Remove the store copy too, so only the corrupted database row speaks for size 19.
    os.remove(storage.get_object_store().root / f"{audit.CHECKPOINT_PREFIX}{20:020d}.json")
    assert first_bad() == ("BADSIG", 20)


def test_forged_checkpoint_with_another_key_is_badsig(log, tmp_path, settings):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    drop_triggers()
    cp = AuditCheckpoint.objects.get(size=20)
    forged = Ed25519PrivateKey.generate().sign(bytes(cp.body)).hex()
    sql(f"UPDATE {CHECKPOINTS} SET signature = %s WHERE size = 20", [forged])
    assert first_bad() == ("BADSIG", 20)


def test_triggers_block_the_application(log):
    for statement in (
        f"UPDATE {EVENTS} SET outcome = 'failure' WHERE seq = 1",
        f"DELETE FROM {EVENTS} WHERE seq = 1",
        f"TRUNCATE {EVENTS}",
        f"UPDATE {CHECKPOINTS} SET size = 1",
        f"DELETE FROM {CHECKPOINTS}",
    ):
        with pytest.raises(Exception, match="append-only"), transaction.atomic():
            sql(statement)
    assert first_bad() is None


def test_checkpoint_objects_are_write_once(log):
    cp = AuditCheckpoint.objects.get(size=20)
    assert audit.checkpoint_publish(cp) is False  # already there: If-None-Match refuses
    key = f"{audit.CHECKPOINT_PREFIX}{20:020d}.json"
    doc = json.loads(b"".join(storage.get_object_store().read(key)))
    assert doc["signature"] == cp.signature


def test_nothing_new_means_no_checkpoint(db):
    # Nothing to sign: no checkpoint, and nothing written anywhere (row, object or event).
    assert audit.audit_checkpoint_create() is None
    assert not AuditCheckpoint.objects.exists()
    assert not AuditEvent.objects.exists()
    assert list(storage.get_object_store().list_keys(audit.CHECKPOINT_PREFIX)) == []

    append(3)
    first = audit.audit_checkpoint_create()
    assert first is not None
    assert first.size == 3
    # The checkpoint records its own event (seq 4), which is new to the next run: that run
    # signs exactly that one entry more, not the whole log again.
    second = audit.audit_checkpoint_create()
    assert second is not None
    assert second.size == first.size + 1 == AuditEvent.objects.count() - 1
    assert second.prev_checkpoint_hash == first.checkpoint_hash


def test_audit_target_names_each_level():
    assert audit.audit_target("acme") == "acme"
    assert audit.audit_target("acme", "resnet") == "acme/resnet"
    assert audit.audit_target("acme", "resnet", 3) == "acme/resnet/v3"
    assert audit.audit_target("acme", "resnet", 3, "w/model.bin") == "acme/resnet/v3/w/model.bin"
    # A level counts only under the one above it, so targets stay prefixes of each other.
    assert audit.audit_target("acme", None, 3, "x") == "acme"
    assert audit.audit_target("acme", "resnet", None, "x") == "acme/resnet"


# --- Concurrency ---------------------------------------------------------------------------


def locked_append(target: str) -> None:
    audit.audit_record(action="model.create", namespace="acme", target=target)


def unlocked_append(target: str) -> None:
    """audit_record's append without its advisory lock, built from the same public pieces."""
    with transaction.atomic():
        head = AuditEvent.objects.order_by("-seq").values_list("seq", "entry_hash").first()
        seq, prev = (head[0] + 1, head[1]) if head else (1, GENESIS)
        now = timezone.now()
        fields = {
            "actor_kind": "system", "actor_user": "system", "actor_token": "",
            "action": "model.create", "namespace": "acme", "target": target,
            "target_sha256": "", "request_id": "", "client_ip": "", "outcome": "success",
        }  # fmt: skip
        canonical = canonical_bytes(audit.record_of(seq=seq, created_at=now, details={}, **fields))
        AuditEvent.objects.create(
            seq=seq,
            created_at=now,
            details={},
            canonical=canonical,
            prev_hash=prev,
            entry_hash=entry_hash(prev, seq, canonical),
            **fields,
        )


def hammer(
    threads: int, per_thread: int, *, append_one: Callable[[str], None]
) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def work(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                with transaction.atomic():
                    append_one(f"t{t}/{i}")
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return errors


@pytest.mark.django_db(transaction=True)
def test_concurrent_appends_are_gapless_and_chained():
    errors = hammer(16, 200, append_one=locked_append)
    assert errors == []
    seqs = list(AuditEvent.objects.order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, 3201))
    assert audit.audit_verify().ok


@pytest.mark.django_db(transaction=True)
def test_control_without_the_advisory_lock_the_chain_breaks():
    # The lock-free append is otherwise right: one writer at a time gets a valid chain...
    for i in range(3):
        unlocked_append(f"solo/{i}")
    assert audit.audit_verify().ok
    # ...but concurrent writers read the same head: a duplicate seq is refused by the unique
    # constraint, or the chain forks. Either way the invariant shown above does not hold.
    errors = hammer(16, 50, append_one=unlocked_append)
    report = audit.audit_verify()
    assert all(isinstance(e, IntegrityError) for e in errors), errors
    assert errors or not report.ok


def test_checkpoints_extend_incrementally_and_match_a_full_recompute(db):
    from registry.auditchain import merkle_root

    for n in (3, 1, 7, 16, 2):
        append(n)
        cp = audit.audit_checkpoint_create()
        leaves = [
            bytes.fromhex(h)
            for h in AuditEvent.objects.filter(seq__lte=cp.size)
            .order_by("seq")
            .values_list("entry_hash", flat=True)
        ]
        assert cp.merkle_root == merkle_root(leaves)
        assert json.loads(bytes(cp.body))["frontier"] == cp.frontier
    assert audit.audit_verify().ok


def test_checkpointer_refuses_to_sign_a_tampered_tail(log):
    drop_triggers()
    sql(f"UPDATE {EVENTS} SET canonical = convert_to('{{}}', 'UTF8') WHERE seq = 25")
    with pytest.raises(audit.AuditChainBroken, match="entry 25"):
        audit.audit_checkpoint_create()
    assert not AuditCheckpoint.objects.filter(size__gt=20).exists()
    refusal = AuditEvent.objects.order_by("-seq").first()
    assert (refusal.action, refusal.outcome) == ("audit.checkpoint", "failure")
    assert "entry 25" in refusal.details["refused"]
    assert first_bad() == ("HASH", 25)


def test_checkpointer_refuses_a_gap_since_the_last_checkpoint(log):
    drop_triggers()
    sql(f"DELETE FROM {EVENTS} WHERE seq = 23")
    with pytest.raises(audit.AuditChainBroken, match="entry 23"):
        audit.audit_checkpoint_create()
