from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from registry.services import audit


class Command(BaseCommand):
    help = "Sign a checkpoint of the audit log now (the worker also does this periodically)."

    def handle(self, *args: Any, **opts: Any) -> None:
        audit.context_set_system("manage.py audit_checkpoint")
        try:
            checkpoint = audit.audit_checkpoint_create()
        except audit.AuditChainBroken as exc:
            raise CommandError(
                f"refusing to sign: {exc}. Run manage.py verify_audit for the details."
            ) from exc
        if checkpoint is None:
            self.stdout.write("no new audit events since the last checkpoint")
            return
        self.stdout.write(
            f"checkpoint size={checkpoint.size} head={checkpoint.head_hash} "
            f"merkle_root={checkpoint.merkle_root} key={checkpoint.key_id}"
        )
