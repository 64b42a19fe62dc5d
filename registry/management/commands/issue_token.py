from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from registry.errors import RegistryError
from registry.models import AuditAction, Namespace, Role, TokenScope
from registry.services import audit, catalog, tokens


class Command(BaseCommand):
    help = (
        "Print a new API token for USERNAME, creating the user, the namespace and the membership "
        "if they do not exist (for scripts and first setup). The token is shown only once."
    )

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--namespace", help="namespace to create/join")
        parser.add_argument("--role", choices=Role.values, default=Role.CONTRIBUTOR)
        parser.add_argument(
            "--scopes",
            default="read,write",
            help=f"comma-separated subset of {','.join(TokenScope.values)}",
        )
        parser.add_argument("--name", default="cli")
        parser.add_argument("--days", type=int, default=None, help="expiry in days (0 = never)")
        parser.add_argument("--staff", action="store_true", help="make the user a superuser")

    def handle(self, *args, username: str, namespace: str | None, role: str, scopes: str, **opts):
        from django.conf import settings

        scope_list = [s.strip() for s in scopes.split(",") if s.strip()]
        days = opts["days"] if opts["days"] is not None else settings.SMR_TOKEN_DEFAULT_DAYS
        if days < 0:
            raise CommandError("--days must be 0 (never expires) or a positive number of days.")
        audit.context_set_system("manage.py issue_token")
        User = get_user_model()
        try:
            User._meta.get_field(User.USERNAME_FIELD).clean(username, None)
        except ValidationError as exc:
            raise CommandError(f"Invalid username {username!r}: {' '.join(exc.messages)}") from exc
        with transaction.atomic():
            user, created = User.objects.get_or_create(username=username)
            if created:
                user.set_unusable_password()
            if opts["staff"]:
                user.is_staff = user.is_superuser = True
            user.save()
            if namespace:
                ns = Namespace.objects.filter(name=namespace).first()
                if ns is None:
                    ns = Namespace(name=namespace, created_by=user)
                    # The same name rules as the API's namespace create.
                    try:
                        ns.full_clean(exclude=["created_by"], validate_constraints=False)
                    except ValidationError as exc:
                        raise CommandError(
                            f"Invalid namespace name {namespace!r}: {' '.join(exc.messages)}"
                        ) from exc
                    ns.save()
                    audit.audit_record(
                        action=AuditAction.NAMESPACE_CREATE, namespace=ns.name, target=ns.name
                    )
                try:
                    # The service keeps the last admin from being demoted, and audits.
                    catalog.member_set(namespace=ns, username=user.get_username(), role=role)
                except RegistryError as exc:
                    raise CommandError(exc.message) from exc
            try:
                issued = tokens.token_create(
                    user=user,
                    scopes=scope_list,
                    name=opts["name"],
                    expires_at=tokens.default_expiry(days),
                )
            except Exception as exc:
                raise CommandError(str(exc)) from exc
        self.stdout.write(issued.plaintext)
