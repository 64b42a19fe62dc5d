"""workers/tasks.py on a real Celery worker process, with Redis as the broker."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import redis
from django.db import connection

from registry import storage
from registry.models import AuditCheckpoint, AuditEvent
from registry.services import audit


def append(n: int) -> None:
    for i in range(n):
        audit.audit_record(
            action="model.create", namespace="acme", target=f"acme/m{i}", details={"i": i}
        )


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
        # The store copy is written after the row commits (no store call inside the
        # transaction): wait for it rather than race the worker.
        while not storage.get_object_store().exists(key):
            assert time.monotonic() < deadline, "the checkpoint was not published to the store"
            time.sleep(0.2)
        assert storage.get_object_store().exists(key)
        # Signed with the key file, verifiable here with the same public key.
        assert audit.audit_verify().ok
        assert AuditEvent.objects.filter(
            action="audit.checkpoint", actor_user__startswith="worker"
        ).exists()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
