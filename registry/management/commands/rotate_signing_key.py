from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from registry.crypto.keys import KeyProviderError
from registry.errors import RegistryError
from registry.models import SigningKeyProvider
from registry.services import audit
from registry.signing import signing_key_rotate


class Command(BaseCommand):
    help = (
        "Make a new registry signing key current and print its key id. New signatures use it; "
        "the old key is retired but kept, and its public key still verifies what it signed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--kind",
            choices=SigningKeyProvider.values,
            default=None,
            help="local (wrapped under the KEK) or kms (an asymmetric KMS key); default: kms "
            "when SMR_KEY_PROVIDER=aws-kms, else local",
        )
        parser.add_argument(
            "--kms-key-id",
            metavar="KEY_ID",
            help="use this existing ECC_NIST_P256 SIGN_VERIFY KMS key instead of creating one",
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        if opts["kms_key_id"] and opts["kind"] == SigningKeyProvider.LOCAL:
            raise CommandError("--kms-key-id names a KMS key; it cannot go with --kind local")
        audit.context_set_system("manage.py rotate_signing_key")
        try:
            key = signing_key_rotate(kind=opts["kind"], kms_key_id=opts["kms_key_id"])
        except (KeyProviderError, RegistryError) as exc:
            raise CommandError(f"no new signing key: {exc}") from exc
        self.stdout.write(key.key_id)
