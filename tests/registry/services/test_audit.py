"""Tamper-evidence of the audit log, on PostgreSQL, attacked with raw SQL as a superuser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import redis
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, connections, transaction

from registry import storage
from registry.auditchain import canonical_bytes, entry_hash
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
    append(3)
    assert audit.audit_checkpoint_create() is not None
    # Only the checkpoint's own event is new; signing again would be pointless churn, but it
    # is one event, so a second run signs it and a third finds nothing.
    assert audit.audit_checkpoint_create() is not None
    size = AuditCheckpoint.objects.order_by("-size").first().size
    assert size == AuditEvent.objects.count() - 1


# --- Concurrency ---------------------------------------------------------------------------


def hammer(threads: int, per_thread: int, *, serialize: bool) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def work(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                with transaction.atomic():
                    audit.audit_record(
                        action="model.create",
                        namespace="acme",
                        target=f"t{t}/{i}",
                        serialize=serialize,
                    )
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
    errors = hammer(16, 200, serialize=True)
    assert errors == []
    seqs = list(AuditEvent.objects.order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, 3201))
    assert audit.audit_verify().ok


@pytest.mark.django_db(transaction=True)
def test_control_without_the_advisory_lock_the_chain_breaks():
    errors = hammer(16, 50, serialize=False)
    report = audit.audit_verify()
    # Without the lock, writers read the same head: duplicate seq numbers are refused by the
    # unique constraint, or the chain forks. Either way the invariant above does not hold.
    assert errors or not report.ok
    assert AuditEvent.objects.count() < 800 or not report.ok


# --- The periodic task, on a real Celery worker --------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_worker_signs_checkpoints(settings, tmp_path):
    broker = "redis://127.0.0.1:6379/15"
    redis.Redis.from_url(broker).flushdb()
    append(5)
    db = connection.settings_dict
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "CELERY_BROKER_URL": broker,
        "SMR_VAR_DIR": str(tmp_path / "var"),
        "SMR_OBJECTS_DIR": str(settings.SMR_OBJECTS_DIR),
        "SMR_KEYRING_FILE": str(settings.SMR_KEYRING_FILE),
        "SMR_AUDIT_SIGNING_KEY_FILE": str(settings.SMR_AUDIT_SIGNING_KEY_FILE),
    }
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.app",
            "worker",
            "--pool",
            "solo",
            "--loglevel",
            "warning",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        from workers.app import app

        with app.connection_for_write(broker) as conn:
            app.send_task("workers.tasks.audit_checkpoint", connection=conn)
        deadline = time.monotonic() + 60
        while not AuditCheckpoint.objects.exists():
            assert worker.poll() is None, worker.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the worker did not sign a checkpoint"
            time.sleep(0.2)
        cp = AuditCheckpoint.objects.get()
        assert cp.size == 5
        key = f"{audit.CHECKPOINT_PREFIX}{5:020d}.json"
        assert storage.get_object_store().exists(key)
        # Signed with the key file, verifiable here with the same public key.
        assert audit.audit_verify().ok
        assert AuditEvent.objects.filter(
            action="audit.checkpoint", actor_user__startswith="worker"
        ).exists()
    finally:
        worker.terminate()
        worker.wait(timeout=30)


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
