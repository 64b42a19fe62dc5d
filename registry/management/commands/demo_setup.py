from __future__ import annotations

import os
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from registry.models import Membership, Namespace, Role
from registry.services import tokens


class Command(BaseCommand):
    help = (
        "Embedded mode: ensure a demo admin, a 'demo' namespace and a token (kept in var/, 0600)."
    )

    def handle(self, *args, **opts):
        token_file = settings.VAR_DIR / "demo-token"
        User = get_user_model()
        password = None
        with transaction.atomic():
            user = User.objects.filter(username="admin").first()
            if user is None:
                password = secrets.token_urlsafe(12)
                user = User.objects.create_superuser("admin", password=password)
            ns, _ = Namespace.objects.get_or_create(name="demo", defaults={"created_by": user})
            Membership.objects.update_or_create(
                namespace=ns, user=user, defaults={"role": Role.ADMIN}
            )
        raw = token_file.read_text().strip() if token_file.exists() else ""
        if not raw or tokens.token_authenticate(raw) is None:
            raw = tokens.token_create(
                user=user, scopes=["read", "write", "review", "admin"], name="demo"
            ).plaintext
            token_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(raw + "\n")
        self.stdout.write("Demo admin: admin" + (f"  password: {password}" if password else ""))
        self.stdout.write(f"Demo token (also in {token_file}):\n  {raw}")
        self.stdout.write(
            "Try:\n  curl -H 'Authorization: Bearer $TOKEN' http://127.0.0.1:8000/api/v1/namespaces"
        )
