"""Receivers for Django's own events that must reach the audit log."""

from __future__ import annotations

from django.contrib.auth.signals import user_login_failed
from django.dispatch import receiver

from registry.models import AuditAction, AuditOutcome
from registry.services.audit import audit_record_now


@receiver(user_login_failed)
def login_failed(sender, credentials: dict, request=None, **kwargs) -> None:
    # Django already scrubs the password out of `credentials`; only the username is kept.
    audit_record_now(
        action=AuditAction.LOGIN_FAILED,
        outcome=AuditOutcome.FAILURE,
        target=f"user:{str(credentials.get('username', ''))[:150]}",
        details={"method": "session"},
    )
