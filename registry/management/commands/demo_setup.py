from __future__ import annotations

import os
import secrets
import shlex
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction

from registry.embedded import embedded_prepare
from registry.models import Membership, Namespace, Role, TokenScope
from registry.services import audit, catalog, tokens


class Command(BaseCommand):
    help = (
        "Embedded mode (`make run`): create var/ (secret key, broker folders, a 0600 SQLite "
        "file), then ensure a demo admin, a 'demo' namespace and a token (kept in var/, 0600)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--migrate",
            action="store_true",
            help="apply migrations after creating the files and before the demo data",
        )
        parser.add_argument(
            "--base-url",
            default="http://127.0.0.1:8000",
            help="where the server will listen, for the printed example",
        )

    def handle(self, *args: Any, migrate: bool, base_url: str, **opts: Any) -> None:
        # Before migrate: SQLite would otherwise create its file with the umask's mode.
        embedded_prepare()
        if migrate:
            call_command("migrate", interactive=False, verbosity=0)
        audit.context_set_system("manage.py demo_setup")
        token_file = settings.VAR_DIR / "demo-token"
        User = get_user_model()
        password = None
        with transaction.atomic():
            user = User.objects.filter(username="admin").first()
            if user is None:
                password = secrets.token_urlsafe(12)
                user = User.objects.create_superuser("admin", password=password)
            ns = Namespace.objects.filter(name="demo").first()
            if ns is None:
                catalog.namespace_create(name="demo", creator=user)
            elif not Membership.objects.filter(namespace=ns, user=user, role=Role.ADMIN).exists():
                catalog.member_set(namespace=ns, username=user.get_username(), role=Role.ADMIN)
        raw = token_file.read_text().strip() if token_file.exists() else ""
        if not raw or tokens.token_authenticate(raw) is None:
            raw = tokens.token_create(user=user, scopes=list(TokenScope), name="demo").plaintext
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file that exists
            with os.fdopen(fd, "w") as fh:
                fh.write(raw + "\n")
        api = base_url.rstrip("/") + "/api/v1"
        self.stdout.write("Demo admin: admin" + (f"  password: {password}" if password else ""))
        self.stdout.write(f"Demo token (also in {token_file}):\n  {raw}")
        self.stdout.write(
            "Try:\n"
            f"  TOKEN=$(cat {shlex.quote(str(token_file))})\n"
            f'  curl -H "Authorization: Bearer $TOKEN" {api}/namespaces\n'
            f'  curl -H "Authorization: Bearer $TOKEN" {api}/namespaces/demo\n'
            "With the smr client (installed in .venv; the token goes in on stdin, never argv):\n"
            f"  .venv/bin/smr login --url {base_url.rstrip('/')} < {shlex.quote(str(token_file))}\n"
            "  .venv/bin/smr ls demo\n"
            "  .venv/bin/smr push demo/my-model ./my-model-folder --submit\n"
            f"Dashboard: {base_url.rstrip('/')}/ (sign in as admin)"
        )
