from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from registry.services import audit


class Command(BaseCommand):
    help = (
        "Recompute the audit hash chain and check it against every signed checkpoint. "
        "Exits non-zero naming the first bad sequence number and the kind of tampering "
        "(GAP, HASH, LINK, TRUNCATED, REWRITTEN, BADSIG)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="print the report as JSON")

    def handle(self, *args: Any, **opts: Any) -> None:
        report = audit.audit_verify()
        first = report.first
        if opts["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "ok": report.ok,
                        "entries": report.entries,
                        "checkpoints": report.checkpoints,
                        "first_bad": vars(first) if first else None,
                    }
                )
            )
        if first is not None:
            raise CommandError(f"{first.kind} at seq {first.seq}: {first.message}")
        if not opts["json"]:
            self.stdout.write(
                self.style.SUCCESS(
                    f"audit log OK: {report.entries} entries, "
                    f"{report.checkpoints} signed checkpoints verified"
                )
            )
