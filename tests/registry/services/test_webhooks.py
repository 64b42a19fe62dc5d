"""registry/services/webhooks.py: signed deliveries to a loopback receiver for the version
lifecycle, retries with history, and the SSRF refusals. Deliveries run in-process here
(webhook_deliver, as the worker calls it); tests/workers/test_webhook_worker.py uses Celery."""

from __future__ import annotations

import json
import logging
import socket
import threading
import uuid
from datetime import timedelta

import boto3
import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from registry.errors import WebhookUrlNotAllowed
from registry.models import AuditEvent, Webhook, WebhookDelivery, WebhookEvent
from registry.services import approvals, catalog, scanning, webhooks
from tests.conftest import REGION, free_port, use_kms
from tests.registry.services.test_approvals import pending
from tests.registry.services.test_scanning import MALICIOUS_PICKLE, put
from tests.support.broker import redis_broker
from tests.support.receiver import Received, Receiver, receiver
from tests.support.tls import CertificateAuthority, server_context

ALL_EVENTS = list(WebhookEvent.values)


def deliver_pending() -> int:
    """Run every pending attempt (and the attempts they schedule) in-process."""
    done = 0
    while True:
        due = list(
            WebhookDelivery.objects.filter(state="pending")
            .order_by("created_at", "attempt")
            .values_list("pk", flat=True)
        )
        if not due:
            return done
        for attempt_id in due:
            webhooks.webhook_deliver(attempt_id=attempt_id)
            done += 1


def verifies(req: Received, secret: str, body: bytes | None = None) -> bool:
    return webhooks.webhook_signature_verify(
        secret=secret,
        timestamp=int(req.headers["X-SMR-Timestamp"]),
        body=req.body if body is None else body,
        signature=req.headers["X-SMR-Signature"],
    )


@pytest.fixture
def allow_private(settings):
    settings.SMR_WEBHOOK_ALLOW_PRIVATE = True
    settings.SMR_WEBHOOK_BACKOFF = 0


def test_submit_scan_approve_reach_the_receiver_signed(actors, draft, allow_private):
    with receiver() as rx:
        hook, secret = webhooks.webhook_create(
            namespace=actors.acme, url=rx.url, events=ALL_EVENTS, creator=actors.users["root"]
        )
        # mallory's namespace has a webhook too: it must hear nothing of acme.
        with receiver() as evil_rx:
            webhooks.webhook_create(
                namespace=actors.evil, url=evil_rx.url, events=ALL_EVENTS, creator=None
            )
            version = pending(draft, actors.users["alice"])
            bob = actors.users["bob"]
            approvals.review_record(version=version, reviewer=bob, decision="approve")
            assert deliver_pending() == 3
            assert evil_rx.requests == []

    assert [r.headers["X-SMR-Event"] for r in rx.requests] == [
        "version.submitted",
        "version.scanned",
        "version.approved",
    ]
    for req in rx.requests:
        assert req.path == "/hooks/smr"
        assert req.headers["Content-Type"] == "application/json"
        assert req.headers["X-SMR-Signature"].startswith("v1=")
        assert verifies(req, secret), req.headers
        # Control: a tampered body, or another key, fails the same check.
        assert not verifies(req, secret, body=req.body.replace(b"acme", b"acmf"))
        assert not verifies(req, "whsec_" + "0" * 64)
        document = json.loads(req.body)
        assert document["id"] == req.headers["X-SMR-Delivery"]
        assert document["event"] == req.headers["X-SMR-Event"]
        assert document["data"]["namespace"] == "acme"
        assert document["data"]["model"] == "bert"
        assert document["data"]["version"] == 1
    states = [json.loads(r.body)["data"]["state"] for r in rx.requests]
    assert states == ["scanning", "pending_review", "approved"]
    # The documented scheme, computed by hand.
    import hashlib
    import hmac

    req = rx.requests[0]
    mac = hmac.new(
        secret.encode(), req.headers["X-SMR-Timestamp"].encode() + b"." + req.body, hashlib.sha256
    )
    assert req.headers["X-SMR-Signature"] == f"v1={mac.hexdigest()}"
    history = WebhookDelivery.objects.filter(webhook=hook)
    assert {d.state for d in history} == {"succeeded"}
    assert {d.response_status for d in history} == {200}
    assert AuditEvent.objects.filter(action="webhook.create", namespace="acme").count() == 1


def test_quarantine_rejection_and_revocation_events(actors, draft, allow_private):
    with receiver() as rx:
        webhooks.webhook_create(
            namespace=actors.acme,
            url=rx.url,
            events=["version.quarantined", "version.rejected", "version.revoked"],
            creator=None,
        )
        alice = actors.users["alice"]
        put(draft, "model.pkl", MALICIOUS_PICKLE, alice)
        draft, job = catalog.version_submit(version=draft, submitter=alice)
        assert scanning.version_scan(job_id=job.pk) == "quarantined"
        model = draft.model
        second = pending(catalog.version_create(model=model, creator=alice), alice)
        approvals.review_record(version=second, reviewer=actors.users["bob"], decision="reject")
        approvals.version_revoke(version=second)
        deliver_pending()
    # Unsubscribed events (submitted, scanned) were not sent.
    assert [r.headers["X-SMR-Event"] for r in rx.requests] == [
        "version.quarantined",
        "version.rejected",
        "version.revoked",
    ]
    revoked = json.loads(rx.requests[2].body)["data"]
    assert (revoked["version"], revoked["state"], revoked["previous_state"]) == (
        2,
        "revoked",
        "rejected",
    )


def test_failing_receiver_is_retried_and_each_attempt_is_recorded(actors, draft, allow_private):
    with receiver([500, 500, 200]) as rx:
        hook, secret = webhooks.webhook_create(
            namespace=actors.acme, url=rx.url, events=["version.submitted"], creator=None
        )
        put(draft, "config.json", b"{}", actors.users["alice"])
        catalog.version_submit(version=draft, submitter=actors.users["alice"])
        first = WebhookDelivery.objects.get(webhook=hook)
        second = webhooks.webhook_deliver(attempt_id=first.pk)
        assert second is not None
        third = webhooks.webhook_deliver(attempt_id=second)
        assert third is not None
        assert webhooks.webhook_deliver(attempt_id=third) is None
        # A duplicate message for a finished attempt changes nothing and sends nothing.
        assert webhooks.webhook_deliver(attempt_id=first.pk) is None
    history = list(WebhookDelivery.objects.filter(webhook=hook).order_by("attempt"))
    assert [(d.attempt, d.state, d.response_status) for d in history] == [
        (1, "failed", 500),
        (2, "failed", 500),
        (3, "succeeded", 200),
    ]
    assert "HTTP 500" in history[0].error and history[2].error == ""
    assert len({d.delivery_id for d in history}) == 1
    assert all(d.duration_ms is not None for d in history)
    # Three POSTs, one body: the receiver can drop duplicates by X-SMR-Delivery.
    assert len(rx.requests) == 3
    assert len({r.body for r in rx.requests}) == 1
    assert {r.headers["X-SMR-Delivery"] for r in rx.requests} == {str(first.delivery_id)}
    assert all(verifies(r, secret) for r in rx.requests)


def test_retries_back_off_exponentially_and_give_up(actors, draft, settings, allow_private):
    settings.SMR_WEBHOOK_MAX_ATTEMPTS = 3
    settings.SMR_WEBHOOK_BACKOFF = 10
    with receiver([500]) as rx:
        hook, _ = webhooks.webhook_create(
            namespace=actors.acme, url=rx.url, events=["version.submitted"], creator=None
        )
        put(draft, "config.json", b"{}", actors.users["alice"])
        catalog.version_submit(version=draft, submitter=actors.users["alice"])
        deliver_pending()
    history = list(WebhookDelivery.objects.filter(webhook=hook).order_by("attempt"))
    assert [(d.attempt, d.state) for d in history] == [(1, "failed"), (2, "failed"), (3, "failed")]
    assert "Gave up after 3 attempts" in history[2].error
    assert all(d.next_attempt_at is None for d in history)  # nothing is due any more
    assert len(rx.requests) == 3


def test_backoff_schedule_is_exponential(actors, draft, settings, allow_private):
    settings.SMR_WEBHOOK_BACKOFF = 10
    with receiver([500]) as rx:
        hook, _ = webhooks.webhook_create(
            namespace=actors.acme, url=rx.url, events=["version.submitted"], creator=None
        )
        put(draft, "config.json", b"{}", actors.users["alice"])
        catalog.version_submit(version=draft, submitter=actors.users["alice"])
        attempt = WebhookDelivery.objects.get(webhook=hook).pk
        delays = []
        for _ in range(3):
            next_id = webhooks.webhook_deliver(attempt_id=attempt)
            assert next_id is not None
            following = WebhookDelivery.objects.get(pk=next_id)
            delays.append((following.next_attempt_at - following.created_at).total_seconds())
            attempt = next_id
        assert len(rx.requests) == 3
    assert [round(d) for d in delays] == [10, 20, 40]


def test_connection_refused_is_retried(actors, draft, allow_private):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens
    hook, _ = webhooks.webhook_create(
        namespace=actors.acme,
        url=f"http://127.0.0.1:{port}/",
        events=["version.submitted"],
        creator=None,
    )
    put(draft, "config.json", b"{}", actors.users["alice"])
    catalog.version_submit(version=draft, submitter=actors.users["alice"])
    first = WebhookDelivery.objects.get(webhook=hook)
    assert webhooks.webhook_deliver(attempt_id=first.pk) is not None
    first.refresh_from_db()
    assert first.state == "failed" and first.response_status is None
    assert "Could not deliver" in first.error


REFUSED = [
    "http://127.0.0.1/hook",
    "http://127.1.2.3:8080/hook",
    "http://10.0.0.1/hook",
    "http://172.16.5.4/hook",
    "http://192.168.1.1/hook",
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://[fd00::1]/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://0.0.0.0/hook",
    "http://100.64.0.1/hook",
    "http://224.0.0.1/hook",
    "http://240.0.0.1/hook",
    "http://localhost:9000/hook",
]


@pytest.mark.parametrize("url", REFUSED)
def test_private_addresses_are_refused_by_default(actors, url):
    with pytest.raises(WebhookUrlNotAllowed) as caught:
        webhooks.webhook_create(namespace=actors.acme, url=url, events=ALL_EVENTS, creator=None)
    assert caught.value.code == "webhook_url_not_allowed"
    assert not webhooks.webhook_list(namespace=actors.acme).exists()


@pytest.mark.parametrize(
    "url",
    [
        "ftp://93.184.216.34/hook",
        "file:///etc/passwd",
        "gopher://93.184.216.34/",
        "http://user:pw@93.184.216.34/hook",
        "http:///nohost",
    ],
)
def test_bad_schemes_credentials_and_hostless_urls_are_refused_even_when_private_is_allowed(
    actors, settings, url
):
    settings.SMR_WEBHOOK_ALLOW_PRIVATE = True
    with pytest.raises(WebhookUrlNotAllowed):
        webhooks.webhook_url_check(url)


def test_public_address_is_accepted_and_private_ones_with_the_setting(actors, settings):
    # Control: the check is not refusing everything (an IP literal needs no DNS).
    assert webhooks.webhook_url_check("https://93.184.216.34/hook").address == "93.184.216.34"
    settings.SMR_WEBHOOK_ALLOW_PRIVATE = True
    for url in ("http://127.0.0.1/hook", "http://localhost:9000/hook", "http://[::1]/h"):
        webhooks.webhook_create(namespace=actors.acme, url=url, events=ALL_EVENTS, creator=None)
    assert webhooks.webhook_list(namespace=actors.acme).count() == 3


def test_delivery_time_check_refuses_without_retrying(actors, draft, settings, allow_private):
    with receiver() as rx:
        hook, _ = webhooks.webhook_create(
            namespace=actors.acme, url=rx.url, events=["version.submitted"], creator=None
        )
        # The operator withdraws the permission (or DNS now answers a private address).
        settings.SMR_WEBHOOK_ALLOW_PRIVATE = False
        put(draft, "config.json", b"{}", actors.users["alice"])
        catalog.version_submit(version=draft, submitter=actors.users["alice"])
        first = WebhookDelivery.objects.get(webhook=hook)
        assert webhooks.webhook_deliver(attempt_id=first.pk) is None
    assert rx.requests == []
    first.refresh_from_db()
    assert first.state == "failed" and "non-public address" in first.error


def test_rolled_back_change_emits_nothing(actors, draft, allow_private):
    from django.db import transaction

    with receiver() as rx:
        webhooks.webhook_create(namespace=actors.acme, url=rx.url, events=ALL_EVENTS, creator=None)
        with pytest.raises(RuntimeError), transaction.atomic():
            put(draft, "config.json", b"{}", actors.users["alice"])
            catalog.version_submit(version=draft, submitter=actors.users["alice"])
            raise RuntimeError("the request failed after the submit")
        assert not WebhookDelivery.objects.exists()
        assert rx.requests == []


def test_delete_removes_webhook_and_history_audited(actors, draft, allow_private):
    hook, _ = webhooks.webhook_create(
        namespace=actors.acme, url="http://127.0.0.1:9/", events=ALL_EVENTS, creator=None
    )
    webhooks.webhook_delete(namespace=actors.acme, webhook_id=hook.pk)
    assert not webhooks.webhook_list(namespace=actors.acme).exists()
    assert AuditEvent.objects.filter(action="webhook.delete").count() == 1
    from registry.errors import NotFound

    with pytest.raises(NotFound):
        webhooks.webhook_delete(namespace=actors.evil, webhook_id=uuid.uuid4())


def test_alias_moved_is_delivered(actors, draft, allow_private):
    from registry.access import Principal
    from registry.services import aliases

    alice = actors.users["alice"]
    first = pending(draft, alice)
    second = pending(catalog.version_create(model=draft.model, creator=alice), alice)
    for version in (first, second):
        approvals.review_record(version=version, reviewer=actors.users["bob"], decision="approve")
    with receiver() as rx:
        _, secret = webhooks.webhook_create(
            namespace=actors.acme, url=rx.url, events=["alias.moved"], creator=None
        )
        root = Principal(user=actors.users["root"])
        aliases.alias_set(principal=root, model=draft.model, name="production", number=1)
        aliases.alias_set(principal=root, model=draft.model, name="production", number=2)
        deliver_pending()
    assert [r.headers["X-SMR-Event"] for r in rx.requests] == ["alias.moved", "alias.moved"]
    assert all(verifies(r, secret) for r in rx.requests)
    moves = [json.loads(r.body)["data"] for r in rx.requests]
    assert [(m["alias"], m["from"], m["to"]) for m in moves] == [
        ("production", None, 1),
        ("production", 1, 2),
    ]


# --- The outbox: attempts lost at commit, by the broker or with their worker -----------------

BROKER = "redis://127.0.0.1:6379/11"  # the webhooks worker test's db; those tests run in turn


@pytest.fixture
def broker(settings):
    with redis_broker(settings, BROKER) as client:
        yield client


def queued_attempts(client) -> list[str]:
    """The attempt ids of the messages waiting on the `webhooks` queue, oldest first."""
    messages = reversed(client.lrange("webhooks", 0, -1))  # kombu LPUSHes
    return [json.loads(m)["headers"]["argsrepr"].strip("[]()',") for m in messages]


def test_broker_down_at_commit_the_dispatcher_sends_the_attempt_once(
    actors, draft, settings, broker, allow_private, django_capture_on_commit_callbacks
):
    with receiver() as rx:
        hook, secret = webhooks.webhook_create(
            namespace=actors.acme, url=rx.url, events=["version.submitted"], creator=None
        )
        put(draft, "config.json", b"{}", actors.users["alice"])
        settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{free_port()}/11"  # nothing listens
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            catalog.version_submit(version=draft, submitter=actors.users["alice"])
        assert callbacks  # the enqueue did run after the commit, and failed
        attempt = WebhookDelivery.objects.get(webhook=hook)
        assert attempt.state == "pending" and attempt.enqueued_at is None
        # Still down: nothing is sent, and the attempt stays unsent for the next run.
        assert webhooks.webhooks_dispatch(unsent_after=timedelta(0)) == 0
        attempt.refresh_from_db()
        assert attempt.enqueued_at is None

        settings.CELERY_BROKER_URL = BROKER  # the broker is back
        # Within the grace period the commit's own enqueue may still be under way: not yet.
        assert webhooks.webhooks_dispatch(unsent_after=timedelta(minutes=1)) == 0
        assert webhooks.webhooks_dispatch(unsent_after=timedelta(0)) == 1
        assert queued_attempts(broker) == [str(attempt.pk)]
        # Sent once: later runs leave it alone while its message waits.
        assert webhooks.webhooks_dispatch(unsent_after=timedelta(0)) == 0
        assert broker.llen("webhooks") == 1
        # What the worker does with the message.
        assert webhooks.webhook_deliver(attempt_id=uuid.UUID(queued_attempts(broker)[0])) is None
    assert len(rx.requests) == 1 and verifies(rx.requests[0], secret)
    attempt.refresh_from_db()
    assert attempt.state == "succeeded" and attempt.enqueued_at is not None
    assert webhooks.webhooks_dispatch(unsent_after=timedelta(0), stale_after=timedelta(0)) == 0


def test_dispatch_sends_only_attempts_whose_message_is_missing(actors, broker, settings):
    settings.SMR_WEBHOOK_LOST_AFTER = 600
    hook, _ = webhooks.webhook_create(
        namespace=actors.acme, url="https://93.184.216.34/", events=ALL_EVENTS, creator=None
    )
    now = timezone.now()

    def ago(**delta: float):
        return now - timedelta(**delta)

    def attempt(state="pending", **fields) -> WebhookDelivery:
        return WebhookDelivery.objects.create(
            webhook=hook, event="version.submitted", state=state, **fields
        )

    lost = {
        "unsent": attempt(next_attempt_at=ago(minutes=5)),
        "stale": attempt(next_attempt_at=ago(hours=3), enqueued_at=ago(hours=3)),
        "worker died": attempt(
            next_attempt_at=ago(hours=1), enqueued_at=ago(hours=1), claimed_at=ago(minutes=11)
        ),
    }
    fine = {
        "unsent, within the grace period": attempt(next_attempt_at=ago(seconds=5)),
        "a retry not due yet": attempt(next_attempt_at=now + timedelta(minutes=5)),
        "waiting in the queue": attempt(next_attempt_at=ago(minutes=5), enqueued_at=ago(minutes=5)),
        "a retry waiting for its countdown": attempt(
            next_attempt_at=ago(minutes=1), enqueued_at=ago(hours=3)
        ),
        "being delivered": attempt(
            next_attempt_at=ago(hours=1), enqueued_at=ago(hours=1), claimed_at=ago(minutes=9)
        ),
        "claimed before its enqueue was stamped": attempt(
            next_attempt_at=ago(minutes=5), claimed_at=ago(minutes=1)
        ),
        "succeeded": attempt("succeeded", next_attempt_at=ago(hours=3)),
        "failed": attempt("failed", next_attempt_at=ago(hours=3)),
    }

    sent = webhooks.webhooks_dispatch(
        unsent_after=timedelta(minutes=1), stale_after=timedelta(hours=2)
    )

    assert sent == 3
    assert sorted(queued_attempts(broker)) == sorted(str(a.pk) for a in lost.values())
    for what, row in fine.items():
        assert str(row.pk) not in queued_attempts(broker), what
    died = lost["worker died"]
    died.refresh_from_db()
    assert died.claimed_at is None  # released: the re-sent message may claim it
    # Sent once: the next run leaves them alone.
    assert (
        webhooks.webhooks_dispatch(
            unsent_after=timedelta(minutes=1), stale_after=timedelta(hours=2)
        )
        == 0
    )


def test_a_claimed_attempt_is_taken_over_only_after_its_claim_expires(
    actors, draft, settings, allow_private
):
    settings.SMR_WEBHOOK_LOST_AFTER = 600
    with receiver() as rx:
        hook, _ = webhooks.webhook_create(
            namespace=actors.acme, url=rx.url, events=["version.submitted"], creator=None
        )
        put(draft, "config.json", b"{}", actors.users["alice"])
        catalog.version_submit(version=draft, submitter=actors.users["alice"])
        row = WebhookDelivery.objects.get(webhook=hook)
        # Another worker holds it: a second message sends nothing.
        WebhookDelivery.objects.filter(pk=row.pk).update(
            claimed_at=timezone.now() - timedelta(minutes=9)
        )
        assert webhooks.webhook_deliver(attempt_id=row.pk) is None
        assert rx.requests == []
        row.refresh_from_db()
        assert row.state == "pending"
        # That worker died long ago (its claim is past SMR_WEBHOOK_LOST_AFTER): taken over.
        WebhookDelivery.objects.filter(pk=row.pk).update(
            claimed_at=timezone.now() - timedelta(minutes=11)
        )
        assert webhooks.webhook_deliver(attempt_id=row.pk) is None
    assert len(rx.requests) == 1
    row.refresh_from_db()
    assert row.state == "succeeded"


@pytest.mark.django_db(transaction=True)
def test_a_duplicate_message_never_posts_while_the_first_is_in_flight(actors, draft, allow_private):
    release = threading.Event()
    with receiver(hold=release) as rx:
        hook, secret = webhooks.webhook_create(
            namespace=actors.acme, url=rx.url, events=["version.submitted"], creator=None
        )
        put(draft, "config.json", b"{}", actors.users["alice"])
        catalog.version_submit(version=draft, submitter=actors.users["alice"])
        row = WebhookDelivery.objects.get(webhook=hook)

        def first_worker() -> None:
            try:
                webhooks.webhook_deliver(attempt_id=row.pk)
            finally:
                connection.close()

        thread = threading.Thread(target=first_worker)
        thread.start()
        try:
            assert rx.arrived.wait(10), "the first POST never arrived"
            # The same attempt again, while the receiver holds the first POST: the dispatcher's
            # copy or a broker redelivery. Without the claim it would POST a second time.
            assert webhooks.webhook_deliver(attempt_id=row.pk) is None
        finally:
            release.set()
            thread.join(30)
    assert len(rx.requests) == 1 and verifies(rx.requests[0], secret)
    row.refresh_from_db()
    assert row.state == "succeeded" and row.response_status == 200


# --- The signing secret at rest --------------------------------------------------------------


def webhook_row_bytes(webhook_id) -> bytes:
    """Every column of the webhook's row as PostgreSQL returns it, as one byte string."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM registry_webhook WHERE id = %s", [webhook_id])
        row = cursor.fetchone()
    return b"|".join(bytes(v) if isinstance(v, memoryview) else str(v).encode() for v in row)


def submit_and_deliver(actors, draft) -> None:
    put(draft, "config.json", b"{}", actors.users["alice"])
    catalog.version_submit(version=draft, submitter=actors.users["alice"])
    deliver_pending()


def test_the_database_holds_only_the_wrapped_secret_and_deliveries_still_verify(
    actors, draft, allow_private, caplog
):
    caplog.set_level(logging.DEBUG)
    with receiver() as rx:
        hook, secret = webhooks.webhook_create(
            namespace=actors.acme, url=rx.url, events=["version.submitted"], creator=None
        )
        submit_and_deliver(actors, draft)
    raw = bytes.fromhex(secret.removeprefix("whsec_"))
    stored = webhook_row_bytes(hook.pk)
    for form in (secret.encode(), secret.removeprefix("whsec_").encode(), raw):
        assert form not in stored
    with connection.cursor() as cursor:
        columns = [
            c.name
            for c in connection.introspection.get_table_description(cursor, "registry_webhook")
        ]
    assert "secret" not in columns
    hook.refresh_from_db()
    assert hook.secret_kek_id == "local:k1" and len(bytes(hook.secret_wrapped)) > 32
    # Deliveries are signed with the secret shown at creation, unwrapped for each attempt.
    assert len(rx.requests) == 1 and verifies(rx.requests[0], secret)
    # Control: what a copy of the database holds does not sign like the secret.
    for guess in (bytes(hook.secret_wrapped).hex(), "whsec_" + bytes(hook.secret_wrapped).hex()):
        assert not verifies(rx.requests[0], guess)
    assert secret not in str(list(AuditEvent.objects.values_list("details", flat=True)))
    assert secret not in caplog.text and secret[6:] not in caplog.text


def test_a_wrapped_secret_copied_onto_another_webhook_does_not_sign(actors, draft, allow_private):
    """Someone who can write the database moves acme's wrapped secret onto mallory's webhook,
    hoping evil's deliveries get signed with acme's secret. The wrap is bound to the webhook id:
    the copy does not unwrap, nothing is sent, and the attempt fails for good."""
    with receiver() as acme_rx, receiver() as evil_rx:
        acme_hook, acme_secret = webhooks.webhook_create(
            namespace=actors.acme, url=acme_rx.url, events=["version.submitted"], creator=None
        )
        evil_hook, _ = webhooks.webhook_create(
            namespace=actors.evil, url=evil_rx.url, events=["version.submitted"], creator=None
        )
        Webhook.objects.filter(pk=evil_hook.pk).update(
            secret_wrapped=acme_hook.secret_wrapped, secret_kek_id=acme_hook.secret_kek_id
        )
        for hook in (evil_hook, acme_hook):
            WebhookDelivery.objects.create(
                webhook=hook, event="version.submitted", next_attempt_at=timezone.now()
            )
        deliver_pending()
    assert evil_rx.requests == []
    failed = WebhookDelivery.objects.get(webhook=evil_hook)
    assert failed.state == "failed" and "could not be decrypted" in failed.error
    assert WebhookDelivery.objects.filter(webhook=evil_hook).count() == 1  # not retried
    # Control: the untouched webhook still delivers, signed with its own secret.
    assert len(acme_rx.requests) == 1 and verifies(acme_rx.requests[0], acme_secret)


def test_a_lost_kek_fails_the_attempt_without_sending(actors, draft, settings, allow_private):
    from registry import keyconfig

    with receiver() as rx:
        hook, _ = webhooks.webhook_create(
            namespace=actors.acme, url=rx.url, events=["version.submitted"], creator=None
        )
        # The keyring was replaced by a new one (the old keys were lost).
        settings.SMR_KEYRING_FILE = settings.SMR_KEYRING_FILE.parent / "other" / "keyring.json"
        keyconfig.reset()
        submit_and_deliver(actors, draft)
    assert rx.requests == []
    attempt = WebhookDelivery.objects.get(webhook=hook)
    assert attempt.state == "failed" and "register it again" in attempt.error
    assert "local:k1" not in attempt.error  # which key, and why, is for the operator's log


def test_secrets_under_kms_and_rewrapped_to_a_new_local_key(
    actors, draft, settings, allow_private, moto_endpoint, kms_key_id
):
    from registry import keyconfig

    with receiver() as rx:
        _, local_secret = webhooks.webhook_create(
            namespace=actors.acme, url=rx.url, events=["version.submitted"], creator=None
        )
        use_kms(settings, moto_endpoint, kms_key_id)
        kms_hook, kms_secret = webhooks.webhook_create(
            namespace=actors.acme, url=rx.url + "/kms", events=["version.submitted"], creator=None
        )
        assert kms_hook.secret_kek_id == f"aws-kms:{kms_key_id}"
        assert kms_secret.encode() not in webhook_row_bytes(kms_hook.pk)

        call_command("rewrap_keys", "--new-local-key", stdout=open("/dev/null", "w"))  # noqa: SIM115
        assert set(Webhook.objects.values_list("secret_kek_id", flat=True)) == {"local:k2"}
        assert AuditEvent.objects.filter(action="key.rewrap", namespace="acme").count() == 2
        # Nothing depends on the old keys any more: drop k1 from the keyring, disable the KMS key.
        ring = json.loads(settings.SMR_KEYRING_FILE.read_text())
        del ring["keys"]["k1"]
        settings.SMR_KEYRING_FILE.write_text(json.dumps(ring))
        keyconfig.reset()
        boto3.client("kms", endpoint_url=moto_endpoint, region_name=REGION).disable_key(
            KeyId=kms_key_id.rsplit("/", 1)[1]
        )
        submit_and_deliver(actors, draft)
    by_path = {r.path: r for r in rx.requests}
    assert sorted(by_path) == ["/hooks/smr", "/hooks/smr/kms"]
    # The secrets did not change: receivers keep verifying with what they were shown.
    assert verifies(by_path["/hooks/smr"], local_secret)
    assert verifies(by_path["/hooks/smr/kms"], kms_secret)
    assert {d.state for d in WebhookDelivery.objects.all()} == {"succeeded"}


# --- https receivers --------------------------------------------------------------------------


def localhost_address() -> str:
    """Where this host's resolver sends `localhost` first: the delivery connects there."""
    return str(socket.getaddrinfo("localhost", 443, type=socket.SOCK_STREAM)[0][4][0])


@pytest.fixture
def ca(settings, tmp_path) -> CertificateAuthority:
    """A private CA, trusted for webhook deliveries through SMR_WEBHOOK_CA_BUNDLE."""
    authority = CertificateAuthority(tmp_path / "tls")
    settings.SMR_WEBHOOK_CA_BUNDLE = str(authority.bundle)
    return authority


def deliver_over_tls(actors, draft, tls) -> tuple[Receiver, str, WebhookDelivery]:
    with receiver(tls=tls, host="localhost", bind=localhost_address()) as rx:
        hook, secret = webhooks.webhook_create(
            namespace=actors.acme, url=rx.url, events=["version.submitted"], creator=None
        )
        put(draft, "config.json", b"{}", actors.users["alice"])
        catalog.version_submit(version=draft, submitter=actors.users["alice"])
        first = WebhookDelivery.objects.get(webhook=hook)
        webhooks.webhook_deliver(attempt_id=first.pk)
    first.refresh_from_db()
    return rx, secret, first


def test_https_receiver_with_a_trusted_certificate_gets_a_signed_delivery(
    actors, draft, allow_private, ca
):
    rx, secret, attempt = deliver_over_tls(actors, draft, ca.issue("localhost"))
    assert rx.url.startswith("https://localhost:")
    assert attempt.state == "succeeded" and attempt.response_status == 200, attempt.error
    assert len(rx.requests) == 1 and verifies(rx.requests[0], secret)
    assert rx.requests[0].headers["Host"] == rx.url.split("/")[2]
    assert rx.tls_errors == []


@pytest.mark.parametrize("trust", ["private CA bundle", "system trust store"])
def test_https_receiver_with_an_untrusted_certificate_gets_nothing(
    actors, draft, allow_private, ca, settings, tmp_path, trust
):
    """A receiver (or someone in the path) presents a self-signed certificate for the right
    name: the handshake is refused, nothing is sent, the attempt fails and says why."""
    if trust == "system trust store":
        settings.SMR_WEBHOOK_CA_BUNDLE = ""
    forged = server_context(tmp_path / "forged", ("localhost",))
    rx, _, attempt = deliver_over_tls(actors, draft, forged)
    assert rx.requests == []
    assert rx.tls_errors  # the handshake began, and the client broke it off
    assert attempt.state == "failed" and attempt.response_status is None
    assert "TLS certificate was refused (self-signed certificate)" in attempt.error
    assert "SMR_WEBHOOK_CA_BUNDLE" in attempt.error
    # Retried: the receiver may fix its certificate.
    assert WebhookDelivery.objects.filter(delivery_id=attempt.delivery_id, attempt=2).exists()


def test_https_certificate_for_another_name_gets_nothing(actors, draft, allow_private, ca):
    """A certificate from the trusted CA, but for another host (and the loopback address the
    connection really goes to) is refused: the name in the URL is what is checked."""
    rx, _, attempt = deliver_over_tls(actors, draft, ca.issue("other.example", "127.0.0.1"))
    assert rx.requests == []
    assert attempt.state == "failed"
    assert "TLS certificate was refused" in attempt.error and "localhost" in attempt.error
