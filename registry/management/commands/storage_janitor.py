from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from registry.services.janitor import objects_cleanup, uploads_expire


class Command(BaseCommand):
    help = "Abort expired upload sessions and delete objects left behind by failed writes."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            type=int,
            default=24 * 3600,
            help="seconds a pending object must have waited (protects uploads in flight)",
        )

    def handle(self, *args: Any, older_than: int, **opts: Any) -> None:
        expired = uploads_expire()
        cleaned, left = objects_cleanup(older_than=timedelta(seconds=older_than))
        self.stdout.write(
            f"expired uploads: {expired}; objects cleaned: {cleaned}; still pending: {left}"
        )
