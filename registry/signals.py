"""Receivers for Django's own events that must reach the audit log."""

from __future__ import annotations

from axes.signals import user_locked_out
from django.contrib.auth.signals import user_login_failed
from django.dispatch import receiver

from registry.services import sessions


@receiver(user_login_failed)
def login_failed(sender, credentials: dict, request=None, **kwargs) -> None:
    # Django already scrubs the password out of `credentials`; only the username is kept.
    sessions.login_failure_record(username=str(credentials.get("username", "")))


@receiver(user_locked_out)
def locked_out(sender, request=None, username: str | None = None, **kwargs) -> None:
    sessions.lockout_record(username=str(username or ""))
