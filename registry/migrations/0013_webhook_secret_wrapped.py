"""Webhook signing secrets encrypted at rest: each existing plaintext secret ("whsec_" + 64 hex
digits, the only form webhook_create ever made) has its 32 bytes wrapped under the configured
key provider, bound to the webhook's id, and the plaintext column is dropped.

The key provider is asked only when there are rows to convert, so a fresh install migrates
without one. The wrap context is frozen here on purpose: it must stay what the service
(registry.services.webhooks.secret_context) unwraps with.
"""

import re

from django.db import migrations, models

SECRET = re.compile(r"^whsec_([0-9a-f]{64})\Z")


def _context(webhook_id):
    return {"smr:webhook": str(webhook_id), "smr:use": "webhook-signing-secret"}


def encrypt_secrets(apps, schema_editor):
    Webhook = apps.get_model("registry", "Webhook")
    rows = Webhook.objects.using(schema_editor.connection.alias).filter(secret_kek_id="")
    if not rows.exists():
        return
    from registry import keyconfig

    provider = keyconfig.get_key_provider()
    for hook in rows.iterator():
        found = SECRET.match(hook.secret)
        if found is None:
            raise RuntimeError(
                f"webhook {hook.pk} has a signing secret not of the form whsec_<64 hex digits>; "
                "delete that webhook (or fix its secret) and migrate again"
            )
        wrapped = provider.wrap(bytes.fromhex(found.group(1)), _context(hook.pk))
        hook.secret_wrapped = wrapped.blob
        hook.secret_kek_id = wrapped.kek_id
        hook.secret = ""
        hook.save(update_fields=["secret_wrapped", "secret_kek_id", "secret"])


def decrypt_secrets(apps, schema_editor):
    Webhook = apps.get_model("registry", "Webhook")
    rows = Webhook.objects.using(schema_editor.connection.alias).exclude(secret_kek_id="")
    if not rows.exists():
        return
    from registry import keyconfig
    from registry.crypto.keys import WrappedKey

    for hook in rows.iterator():
        provider = keyconfig.provider_for(hook.secret_kek_id)
        wrapped = WrappedKey(kek_id=hook.secret_kek_id, blob=bytes(hook.secret_wrapped))
        hook.secret = "whsec_" + provider.unwrap(wrapped, _context(hook.pk)).hex()
        hook.save(update_fields=["secret"])


class Migration(migrations.Migration):
    dependencies = [
        ("registry", "0012_webhook_outbox"),
    ]

    operations = [
        migrations.AddField(
            model_name="webhook",
            name="secret_kek_id",
            field=models.CharField(default="", max_length=512),
            preserve_default=False,
        ),
        migrations.AddField(
            model_name="webhook",
            name="secret_wrapped",
            field=models.BinaryField(default=b""),
            preserve_default=False,
        ),
        migrations.RunPython(encrypt_secrets, decrypt_secrets, elidable=False),
        # For the reverse only: RemoveField, reversed, re-adds the column from this state, so
        # it needs a default for the existing rows ("", which decrypt_secrets then fills).
        migrations.AlterField(
            model_name="webhook",
            name="secret",
            field=models.CharField(default="", max_length=128),
        ),
        migrations.RemoveField(
            model_name="webhook",
            name="secret",
        ),
    ]
