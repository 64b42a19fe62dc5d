"""Webhook delivery through a real Celery worker on Redis: submit -> scan on the `scan` queue,
the submitted and scanned events delivered signed from the `webhooks` queue, the first
attempt failing and retried after its backoff; and an event whose enqueue failed (the broker
down at commit) delivered once beat's webhooks_dispatch finds it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import redis
from django.db import connection

from registry.models import VersionState, WebhookDelivery
from registry.services import webhooks
from tests.conftest import free_port
from tests.registry.services.test_webhooks import verifies
from tests.support.receiver import receiver
from tests.workers.test_scan_worker import put, state_of

BROKER = "redis://127.0.0.1:6379/11"  # scan workers use /14, test_tasks.py /15
WAIT = 90


def start_worker(settings, tmp_path, *, beat: bool = False) -> subprocess.Popen:
    db = connection.settings_dict
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "CELERY_BROKER_URL": BROKER,
        "SMR_VAR_DIR": str(tmp_path / "var"),
        "SMR_OBJECTS_DIR": str(settings.SMR_OBJECTS_DIR),
        "SMR_KEYRING_FILE": str(settings.SMR_KEYRING_FILE),
        "SMR_AUDIT_SIGNING_KEY_FILE": str(settings.SMR_AUDIT_SIGNING_KEY_FILE),
        "SMR_WEBHOOK_ALLOW_PRIVATE": "1",
        "SMR_WEBHOOK_BACKOFF": "1",
        "SMR_WEBHOOK_DISPATCH_INTERVAL": "1",
        "SMR_WEBHOOK_UNSENT_AFTER": "0",
    }
    args = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--pool", "solo"]
    args += ["-Q", "webhooks,scan,celery" if beat else "webhooks,scan"]
    args += ["--loglevel", "warning", "--without-heartbeat", "--without-gossip", "--without-mingle"]
    if beat:
        args += ["--beat", "--schedule", str(tmp_path / "beat-schedule")]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def broker(settings):
    redis.Redis.from_url(BROKER).flushdb()
    settings.CELERY_BROKER_URL = BROKER
    yield
    redis.Redis.from_url(BROKER).flushdb()


@pytest.fixture
def worker(settings, tmp_path, broker):
    proc = start_worker(settings, tmp_path)
    yield proc
    stop(proc)


def wait_until(predicate, what: str, proc) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited: {proc.stderr.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.django_db(transaction=True)
def test_signed_deliveries_with_a_retry_through_a_worker(actors, draft, settings, worker):
    settings.SMR_WEBHOOK_ALLOW_PRIVATE = True  # for the creation check, in this process
    with receiver([500, 200]) as rx:
        hook, secret = webhooks.webhook_create(
            namespace=actors.acme,
            url=rx.url,
            events=["version.submitted", "version.scanned"],
            creator=actors.users["root"],
        )
        put(draft, actors, {"config.json": b'{"hidden": 8}'})
        alice = actors.client("alice")
        submit = alice.post("/api/v1/namespaces/acme/models/bert/versions/1/submit")
        assert submit.status_code == 202
        wait_until(lambda: state_of(draft.pk) == VersionState.PENDING_REVIEW, "the scan", worker)
        wait_until(
            lambda: WebhookDelivery.objects.filter(state="succeeded").count() == 2,
            "both events delivered",
            worker,
        )
        received = list(rx.requests)

    history = list(WebhookDelivery.objects.filter(webhook=hook).order_by("created_at"))
    by_event: dict[str, list[tuple[int, str, int | None]]] = {}
    for d in history:
        by_event.setdefault(d.event, []).append((d.attempt, d.state, d.response_status))
    # The receiver's first answer (500) failed whichever event came first; it was retried.
    attempts = sorted(by_event.values(), key=len)
    assert attempts[0] == [(1, "succeeded", 200)]
    assert attempts[1] == [(1, "failed", 500), (2, "succeeded", 200)]
    assert sorted(by_event) == ["version.scanned", "version.submitted"]
    assert len(received) == 3
    assert all(verifies(r, secret) for r in received)
    assert {r.headers["X-SMR-Event"] for r in received} == {"version.submitted", "version.scanned"}


@pytest.mark.django_db(transaction=True)
def test_broker_down_at_commit_the_dispatcher_delivers_it_once(
    actors, draft, settings, tmp_path, broker
):
    settings.SMR_WEBHOOK_ALLOW_PRIVATE = True
    with receiver() as rx:
        hook, secret = webhooks.webhook_create(
            namespace=actors.acme,
            url=rx.url,
            events=["version.submitted"],
            creator=actors.users["root"],
        )
        put(draft, actors, {"config.json": b"{}"})
        settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{free_port()}/11"  # nothing listens
        submit = actors.client("alice").post(
            "/api/v1/namespaces/acme/models/bert/versions/1/submit"
        )
        # The submit stands; the delivery row is the outbox.
        assert submit.status_code == 202, submit.content
        attempt = WebhookDelivery.objects.get(webhook=hook)
        assert attempt.state == "pending" and attempt.enqueued_at is None
        assert redis.Redis.from_url(BROKER).llen("webhooks") == 0

        settings.CELERY_BROKER_URL = BROKER  # the broker is back; beat's webhooks_dispatch sends
        proc = start_worker(settings, tmp_path, beat=True)
        try:
            wait_until(
                lambda: WebhookDelivery.objects.filter(pk=attempt.pk, state="succeeded").exists(),
                "the lost delivery",
                proc,
            )
            # A few more dispatcher rounds (every second) find nothing more to send.
            time.sleep(3)
            assert proc.poll() is None
        finally:
            stop(proc)
        received = list(rx.requests)

    assert len(received) == 1
    assert verifies(received[0], secret)
    assert received[0].headers["X-SMR-Delivery"] == str(attempt.delivery_id)
    assert WebhookDelivery.objects.filter(webhook=hook).count() == 1
    attempt.refresh_from_db()
    assert attempt.enqueued_at is not None and attempt.response_status == 200
