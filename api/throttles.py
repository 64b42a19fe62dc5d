"""HTTP rate limits, answered 429 `throttled` with Retry-After (api/errors.py).

DRF's SimpleRateThrottle reads DEFAULT_THROTTLE_RATES once, at import; these read their rate
from a Django setting on every request, so the env (registry/settings.py, SMR_RATE_*) and a
test's override both apply. Counts live in Django's cache (SMR_CACHE_URL to share them).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle, SimpleRateThrottle

from registry.services import audit

if TYPE_CHECKING:  # rest_framework.views imports the authenticators, which import this
    from rest_framework.views import APIView

DURATIONS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_rate(rate: str) -> tuple[int, int]:
    """Parse a DRF rate: "100/min" is (100, 60)."""
    num, _, period = rate.partition("/")
    return int(num), DURATIONS[period[:1]]


def client_ip(request: HttpRequest | Request) -> str:
    """The client address the audit log records (SMR_TRUST_X_FORWARDED_FOR honoured)."""
    return audit.context().client_ip or request.META.get("REMOTE_ADDR", "")


# --- Failed authentications per client address ---------------------------------------------


def _failure_key(ip: str) -> str:
    return f"smr:authfail:{ip}"


def auth_failure_wait(ip: str) -> int | None:
    """Seconds the address must wait because it failed too often, or None if it may try."""
    limit, window = parse_rate(settings.SMR_RATE_AUTH_FAILURES)
    key = _failure_key(ip)
    if cache.get(key, 0) < limit:
        return None
    until = cache.get(f"{key}:until")
    return max(1, math.ceil(until - time.time())) if until else window


def auth_failure_note(ip: str) -> None:
    """Count one failed authentication (bad token or password) from `ip` in this window."""
    _limit, window = parse_rate(settings.SMR_RATE_AUTH_FAILURES)
    key = _failure_key(ip)
    cache.add(f"{key}:until", time.time() + window, window)
    cache.add(key, 0, window)
    try:
        cache.incr(key)
    except ValueError:  # expired between add and incr
        cache.set(key, 1, window)


class AuthFailureThrottle(BaseThrottle):
    """Refuses every request from an address over SMR_RATE_AUTH_FAILURES until its window ends.

    The default throttle of every view. Bearer requests are stopped earlier, in
    BearerTokenAuthentication, before the token is looked up.
    """

    def allow_request(self, request: Request, view: APIView) -> bool:
        self.retry_after = auth_failure_wait(client_ip(request))
        return self.retry_after is None

    def wait(self) -> float | None:
        return self.retry_after


# --- Per-user rates on costly writes -------------------------------------------------------


class SettingsRateThrottle(SimpleRateThrottle):
    """A per-user rate named by a setting, counted only for `methods`."""

    rate_setting = ""
    methods: frozenset[str] = frozenset()

    def get_rate(self) -> str:
        return getattr(settings, self.rate_setting)

    def allow_request(self, request: Request, view: APIView) -> bool:
        if request.method not in self.methods:
            return True
        return super().allow_request(request, view)

    def get_cache_key(self, request: Request, view: APIView) -> str:
        user = request.user
        ident = user.pk if user is not None and user.is_authenticated else client_ip(request)
        return self.cache_format % {"scope": self.scope, "ident": ident}


class TokenCreateThrottle(SettingsRateThrottle):
    scope = "token_create"
    rate_setting = "SMR_RATE_TOKEN_CREATE"
    methods = frozenset({"POST"})


class UploadThrottle(SettingsRateThrottle):
    # File PUTs, upload sessions created, parts sent, uploads completed: one budget per user.
    scope = "upload"
    rate_setting = "SMR_RATE_UPLOAD"
    methods = frozenset({"PUT", "POST"})


# Views that set throttle_classes keep the address check too.
TOKEN_CREATE = [AuthFailureThrottle, TokenCreateThrottle]
UPLOAD = [AuthFailureThrottle, UploadThrottle]
