from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from registry import keyconfig
from registry.crypto.keys import KeyProvider
from registry.services import audit
from registry.services.artifacts import artifacts_rewrap_all
from registry.services.rotation import rewrap_job_create
from registry.services.uploads import upload_sessions_rewrap_all
from registry.services.webhooks import webhook_secrets_rewrap_all
from registry.signing.keys import signing_keys_rewrap_all


class Command(BaseCommand):
    help = (
        "Re-wrap every artifact data key, open upload key and webhook signing secret under a new "
        "key-encryption key. Only wrapped keys in the database change; stored objects are not "
        "read or rewritten, and webhook secrets keep their value. With --job a worker does it "
        "in the background (resumable, with progress in the job); the job id is printed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        target = parser.add_mutually_exclusive_group(required=True)
        target.add_argument(
            "--new-local-key",
            action="store_true",
            help="add a KEK version to the local keyring, make it primary, move every key to it",
        )
        target.add_argument(
            "--to-local", action="store_true", help="move to the local keyring's primary KEK"
        )
        target.add_argument(
            "--to-kms-key", metavar="KEY_ID", help="move to this AWS KMS key (id, ARN or alias)"
        )
        parser.add_argument(
            "--job",
            action="store_true",
            help="queue a rewrap job for a worker instead of re-wrapping here; prints its id "
            "(follow it with GET /api/v1/jobs/<id> as a superuser)",
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        audit.context_set_system("manage.py rewrap_keys")
        target: KeyProvider
        if opts["new_local_key"]:
            ring = keyconfig.local_keyring()
            kek = ring.add_key()
            (self.stderr if opts["job"] else self.stdout).write(
                f"new local KEK {kek} is now primary"
            )
            target = ring
        elif opts["to_local"]:
            target = keyconfig.local_keyring()
        else:
            target = keyconfig.kms_provider(opts["to_kms_key"])
        try:
            to = target.primary_kek_id()
        except Exception as exc:
            raise CommandError(f"target KEK unavailable: {exc}") from exc
        if opts["job"]:
            job = rewrap_job_create(to_kek_id=to)
            # The id alone on stdout, so that scripts can capture it.
            self.stderr.write(f"queued rewrap job {job.pk}: every key moves under {to}")
            self.stdout.write(str(job.pk))
            return

        def progress(done: int, total: int) -> None:
            if done % 1000 == 0 or done == total:
                self.stdout.write(f"  {done}/{total}")

        moved, total = artifacts_rewrap_all(target=target, progress=progress)
        self.stdout.write(self.style.SUCCESS(f"re-wrapped {moved} of {total} data keys under {to}"))
        moved, total = upload_sessions_rewrap_all(target=target)
        self.stdout.write(
            self.style.SUCCESS(f"re-wrapped {moved} of {total} open upload keys under {to}")
        )
        moved, total = webhook_secrets_rewrap_all(target=target)
        self.stdout.write(
            self.style.SUCCESS(f"re-wrapped {moved} of {total} webhook secrets under {to}")
        )
        moved, total = signing_keys_rewrap_all(target=target)
        self.stdout.write(
            self.style.SUCCESS(f"re-wrapped {moved} of {total} registry signing keys under {to}")
        )
