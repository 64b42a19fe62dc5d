from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.db.models import Field

from registry.errors import InvalidInput, RegistryError
from registry.models import Membership, Namespace, Role, TokenScope
from registry.services import audit, catalog, tokens


def _message(exc: RegistryError) -> str:
    fields = exc.extra.get("fields")
    if isinstance(fields, dict):
        return " ".join(str(m) for messages in fields.values() for m in messages)
    return exc.message


class Command(BaseCommand):
    help = (
        "Print a new API token for USERNAME, creating the user, the namespace and the membership "
        "if they do not exist (for scripts and first setup). The token is shown only once. "
        "A namespace this command creates has USERNAME as its admin, as in the API."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--namespace", help="namespace to create/join")
        parser.add_argument(
            "--role",
            choices=Role.values,
            default=None,
            help="role in --namespace (default: admin of a namespace this command creates; "
            "contributor for a new member of an existing one, whose members keep theirs)",
        )
        parser.add_argument(
            "--scopes",
            default="read,write",
            help=f"comma-separated subset of {','.join(TokenScope.values)}",
        )
        parser.add_argument("--name", default="cli")
        parser.add_argument("--days", type=int, default=None, help="expiry in days (0 = never)")
        parser.add_argument("--staff", action="store_true", help="make the user a superuser")

    def handle(
        self, *args: Any, username: str, namespace: str | None, role: str | None, **opts: Any
    ) -> None:
        scope_list = [s.strip() for s in opts["scopes"].split(",") if s.strip()]
        days = opts["days"] if opts["days"] is not None else settings.SMR_TOKEN_DEFAULT_DAYS
        if days < 0:
            raise CommandError("--days must be 0 (never expires) or a positive number of days.")
        audit.context_set_system("manage.py issue_token")
        User = get_user_model()
        field = User._meta.get_field(User.USERNAME_FIELD)
        try:
            if isinstance(field, Field):
                field.clean(username, None)
        except ValidationError as exc:
            raise CommandError(f"Invalid username {username!r}: {' '.join(exc.messages)}") from exc
        # Every change below goes through a service (audited); any error rolls back them all.
        with transaction.atomic():
            user, created = User.objects.get_or_create(username=username)
            if created:
                user.set_unusable_password()
            if opts["staff"]:
                user.is_staff = user.is_superuser = True
            user.save()
            if namespace:
                self._join(user, namespace, role)
            try:
                issued = tokens.token_create(
                    user=user,
                    scopes=scope_list,
                    name=opts["name"],
                    expires_at=tokens.default_expiry(days),
                )
            except RegistryError as exc:
                raise CommandError(exc.message) from exc
        self.stdout.write(issued.plaintext)

    def _join(self, user: Any, namespace: str, role: str | None) -> None:
        ns = Namespace.objects.filter(name=namespace).first()
        if ns is None:
            if role not in (None, Role.ADMIN):
                # A namespace always has an admin (the services enforce it); one created here
                # with only a contributor could never be managed.
                raise CommandError(
                    f"Namespace {namespace!r} does not exist, and its creator becomes its admin. "
                    f"Create it first for its owner (issue_token OWNER --namespace {namespace}), "
                    f"then add {user.get_username()!r} with --role {role}."
                )
            try:
                catalog.namespace_create(name=namespace, creator=user)
            except InvalidInput as exc:
                raise CommandError(
                    f"Invalid namespace name {namespace!r}: {_message(exc)}"
                ) from exc
            except RegistryError as exc:
                raise CommandError(exc.message) from exc
            return
        if role is None and Membership.objects.filter(namespace=ns, user=user).exists():
            return  # an existing member keeps their role unless --role says otherwise
        try:
            # The service keeps the last admin from being demoted.
            catalog.member_set(
                namespace=ns, username=user.get_username(), role=role or Role.CONTRIBUTOR
            )
        except RegistryError as exc:
            raise CommandError(exc.message) from exc
