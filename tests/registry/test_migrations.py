"""Data migrations, run for real on the test database: the schema is taken back to before the
migration, rows are written the old way, and the migration is applied (and reversed)."""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from registry.models import Webhook, WebhookDelivery
from registry.services import webhooks
from tests.registry.services.test_webhooks import deliver_pending, verifies, webhook_row_bytes
from tests.support.receiver import receiver

BEFORE = ("registry", "0012_webhook_outbox")
AFTER = ("registry", "0013_webhook_secret_wrapped")


def migrate(target: tuple[str, str]):
    """Apply or unapply migrations up to `target`; returns the app registry of that state."""
    executor = MigrationExecutor(connection)
    executor.migrate([target])
    return MigrationExecutor(connection).loader.project_state([target]).apps


@pytest.mark.django_db(transaction=True)
def test_0013_encrypts_the_plaintext_secrets_already_stored(actors, settings):
    settings.SMR_WEBHOOK_ALLOW_PRIVATE = True
    leaf = MigrationExecutor(connection).loader.graph.leaf_nodes("registry")
    secret = "whsec_" + "5e" * 32
    try:
        with receiver() as rx:
            old_apps = migrate(BEFORE)
            OldWebhook = old_apps.get_model("registry", "Webhook")
            old = OldWebhook.objects.create(
                namespace_id=actors.acme.pk,
                url=rx.url,
                secret=secret,
                events=["version.submitted"],
            )
            assert secret.encode() in webhook_row_bytes(old.pk)  # control: it was plaintext

            migrate(AFTER)
            assert secret.encode() not in webhook_row_bytes(old.pk)
            assert bytes.fromhex(secret[6:]) not in webhook_row_bytes(old.pk)
            hook = Webhook.objects.get(pk=old.pk)
            assert hook.secret_kek_id == "local:k1"
            assert webhooks.webhook_secret(webhook=hook) == secret
            # Receivers keep the secret they were shown: deliveries verify with it.
            WebhookDelivery.objects.create(webhook=hook, event="version.submitted")
            assert deliver_pending() == 1
        assert len(rx.requests) == 1 and verifies(rx.requests[0], secret)

        # Reversible: back to the plaintext column, the same secret.
        old_apps = migrate(BEFORE)
        assert old_apps.get_model("registry", "Webhook").objects.get(pk=old.pk).secret == secret
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(leaf)


@pytest.mark.django_db(transaction=True)
def test_0013_refuses_a_secret_it_cannot_have_made(actors):
    leaf = MigrationExecutor(connection).loader.graph.leaf_nodes("registry")
    try:
        old_apps = migrate(BEFORE)
        old_apps.get_model("registry", "Webhook").objects.create(
            namespace_id=actors.acme.pk, url="https://93.184.216.34/", secret="short", events=[]
        )
        with pytest.raises(RuntimeError, match="whsec_<64 hex digits>"):
            migrate(AFTER)
        # The migration ran in one transaction: nothing changed, the row is still there.
        old_apps = migrate(BEFORE)
        assert old_apps.get_model("registry", "Webhook").objects.get().secret == "short"
        old_apps.get_model("registry", "Webhook").objects.all().delete()
    finally:
        MigrationExecutor(connection).migrate(leaf)
