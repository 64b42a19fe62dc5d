"""Identity (issue 8 §5): token scopes, session login, lockout, throttles, deploy checks.

Expired and revoked tokens are 401 in tests/api/test_tokens.py (test_expired_token_is_401,
test_delete_revokes_the_token); here they are checked once more with their audit reason.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.db.models import Max
from django.utils import timezone
from rest_framework.test import APIClient

from registry.models import ApiToken, Artifact, AuditAction, AuditEvent, AuditOutcome
from registry.services.tokens import token_create, token_revoke
from tests.conftest import FILES

API = "/api/v1"
LOGIN = f"{API}/auth/login"
LOGOUT = f"{API}/auth/logout"
ME = f"{API}/auth/me"
PASSWORD = "correct-horse-battery-staple-9"
ROOT = Path(__file__).resolve().parents[2]
OCTET = "application/octet-stream"


def bearer(raw: str, ip: str = "127.0.0.1") -> APIClient:
    client = APIClient(REMOTE_ADDR=ip)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


def error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert body["code"] == code, body
    return body


def throttled(response) -> None:
    error(response, 429, "throttled")
    assert int(response["Retry-After"]) >= 1


def last_seq() -> int:
    return AuditEvent.objects.aggregate(m=Max("seq"))["m"] or 0


def actions_after(seq: int) -> list[str]:
    return list(
        AuditEvent.objects.filter(seq__gt=seq).order_by("seq").values_list("action", flat=True)
    )


def login(client: APIClient, username: str, password: str):
    return client.post(LOGIN, {"username": username, "password": password}, format="json")


@pytest.fixture
def alice_password(actors) -> str:
    alice = actors.users["alice"]
    alice.set_password(PASSWORD)
    alice.save()
    return PASSWORD


# --- Tokens ------------------------------------------------------------------------------------


def test_read_token_cannot_upload(actors, draft):
    alice = actors.users["alice"]
    read = token_create(user=alice, scopes=["read"]).plaintext
    put = bearer(read).put(f"{FILES}/w.bin", b"weights", content_type=OCTET)
    error(put, 403, "permission_denied")
    started = bearer(read).post(
        f"{API}/namespaces/acme/models/bert/versions/1/uploads",
        {"path": "w.bin", "size": 7},
        format="json",
    )
    error(started, 403, "permission_denied")
    assert not Artifact.objects.exists()
    assert bearer(read).get(FILES).status_code == 200  # it still reads
    # Control: the same user with a write token uploads.
    write = token_create(user=alice, scopes=["read", "write"]).plaintext
    assert bearer(write).put(f"{FILES}/w.bin", b"weights", content_type=OCTET).status_code == 201


@pytest.mark.parametrize("reason", ["expired", "revoked"])
def test_expired_or_revoked_token_is_401_and_audited(actors, reason):
    issued = token_create(user=actors.users["alice"], scopes=["read"])
    assert bearer(issued.plaintext).get(f"{API}/namespaces").status_code == 200
    if reason == "expired":
        ApiToken.objects.filter(pk=issued.token.pk).update(
            expires_at=timezone.now() - timedelta(seconds=1)
        )
    else:
        token_revoke(user=actors.users["alice"], key_id=issued.token.key_id)
    before = last_seq()
    response = bearer(issued.plaintext).get(f"{API}/namespaces")
    error(response, 401, "authentication_failed")
    event = AuditEvent.objects.get(seq__gt=before)
    assert (event.action, event.details["reason"]) == (AuditAction.AUTH_FAILED, reason)


# --- Sessions ----------------------------------------------------------------------------------


def test_session_login_me_and_logout_are_audited(actors, alice_password):
    client = APIClient(enforce_csrf_checks=True)
    before = last_seq()
    response = login(client, "alice", alice_password)
    assert response.status_code == 200, response.content
    me = {"username": "alice", "namespaces": [{"namespace": "acme", "role": "contributor"}]}
    assert response.json() == me
    session = response.cookies["sessionid"]
    assert session["httponly"]
    assert session["samesite"] == "Lax"
    csrf = response.cookies["csrftoken"].value
    event = AuditEvent.objects.get(seq__gt=before)
    assert (event.action, event.actor_user, event.target) == (
        AuditAction.LOGIN,
        "alice",
        "user:alice",
    )
    assert not AuditEvent.objects.filter(details__icontains=alice_password).exists()

    assert client.get(ME).json() == me
    assert client.get(f"{API}/namespaces").status_code == 200  # the session is an API login

    # An unsafe call on the session needs the CSRF token (a cross-site form cannot log out).
    before = last_seq()
    error(client.post(LOGOUT), 403, "permission_denied")
    assert actions_after(before) == []
    assert client.post(LOGOUT, HTTP_X_CSRFTOKEN=csrf).status_code == 204
    event = AuditEvent.objects.get(seq__gt=before)
    assert (event.action, event.actor_user) == (AuditAction.LOGOUT, "alice")
    error(client.get(ME), 401, "not_authenticated")


def test_a_token_call_to_logout_ends_nothing_and_records_nothing(actors):
    before = last_seq()
    assert bearer(actors.tokens["alice"]).post(LOGOUT).status_code == 204
    assert actions_after(before) == []
    assert bearer(actors.tokens["alice"]).get(ME).status_code == 200  # the token still works


def test_session_cookies_are_secure_in_production(actors, alice_password, settings):
    settings.SESSION_COOKIE_SECURE = True
    settings.CSRF_COOKIE_SECURE = True
    response = login(APIClient(), "alice", alice_password)
    assert response.status_code == 200
    assert response.cookies["sessionid"]["secure"]
    assert response.cookies["csrftoken"]["secure"]


def test_wrong_password_is_401_without_telling_which_part_was_wrong(actors, alice_password):
    before = last_seq()
    wrong = error(login(APIClient(), "alice", "nope"), 401, "invalid_credentials")
    unknown = error(login(APIClient(), "nobody", "nope"), 401, "invalid_credentials")
    assert wrong["message"] == unknown["message"]
    assert actions_after(before) == [AuditAction.LOGIN_FAILED] * 2


def test_lockout_after_the_configured_number_of_failures_is_audited(
    actors, alice_password, settings
):
    limit = settings.AXES_FAILURE_LIMIT
    assert limit == 5  # SMR_LOGIN_FAILURE_LIMIT's default
    client = APIClient()
    for _ in range(limit - 1):
        error(login(client, "alice", "wrong"), 401, "invalid_credentials")
    before = last_seq()
    response = login(client, "alice", "wrong")
    error(response, 429, "locked_out")
    assert int(response["Retry-After"]) == int(settings.AXES_COOLOFF_TIME.total_seconds())
    assert sorted(actions_after(before)) == [AuditAction.LOCKED_OUT, AuditAction.LOGIN_FAILED]
    locked = AuditEvent.objects.get(seq__gt=before, action=AuditAction.LOCKED_OUT)
    assert locked.outcome == AuditOutcome.FAILURE
    assert locked.target == "user:alice"
    assert locked.client_ip == "127.0.0.1"
    assert locked.details["failure_limit"] == limit

    # The right password is refused too while locked out, and starts no session.
    before = last_seq()
    response = login(client, "alice", alice_password)
    error(response, 429, "locked_out")
    assert "sessionid" not in response.cookies
    assert AuditAction.LOGIN not in actions_after(before)
    assert AuditAction.LOCKED_OUT in actions_after(before)

    # Username + address: alice from elsewhere and bob from here are not locked out.
    assert login(APIClient(REMOTE_ADDR="10.0.0.7"), "alice", alice_password).status_code == 200
    bob = actors.users["bob"]
    bob.set_password(PASSWORD)
    bob.save()
    assert login(client, "bob", PASSWORD).status_code == 200


def test_a_successful_login_resets_the_failure_count(actors, alice_password, settings):
    limit = settings.AXES_FAILURE_LIMIT
    client = APIClient()
    for _ in range(limit - 1):
        error(login(client, "alice", "wrong"), 401, "invalid_credentials")
    assert login(client, "alice", alice_password).status_code == 200
    for _ in range(limit - 1):
        error(login(APIClient(), "alice", "wrong"), 401, "invalid_credentials")


def test_lockout_limit_comes_from_settings(actors, alice_password, settings):
    settings.AXES_FAILURE_LIMIT = 2
    error(login(APIClient(), "alice", "wrong"), 401, "invalid_credentials")
    error(login(APIClient(), "alice", "wrong"), 429, "locked_out")


# --- Throttles ---------------------------------------------------------------------------------


def test_failed_authentications_are_throttled_per_address(actors, settings):
    settings.SMR_RATE_AUTH_FAILURES = "3/min"
    forged = "smr_0123456789ab_" + "x" * 43
    for _ in range(3):
        error(bearer(forged).get(f"{API}/namespaces"), 401, "authentication_failed")
    before = last_seq()
    throttled(bearer(forged).get(f"{API}/namespaces"))
    # Once over the limit, even a good token from that address waits; nothing is looked up
    # or logged per guess.
    throttled(bearer(actors.tokens["alice"]).get(f"{API}/namespaces"))
    throttled(login(APIClient(), "alice", "whatever"))
    assert actions_after(before) == []
    # Control: another address is unaffected.
    assert bearer(actors.tokens["alice"], ip="10.0.0.8").get(f"{API}/namespaces").status_code == 200


def test_failed_passwords_count_towards_the_address_limit(actors, alice_password, settings):
    settings.SMR_RATE_AUTH_FAILURES = "3/min"
    for name in ("carol", "dave", "mallory"):  # spraying usernames dodges the per-user lockout
        error(login(APIClient(), name, "guess"), 401, "invalid_credentials")
    throttled(login(APIClient(), "alice", alice_password))
    assert login(APIClient(REMOTE_ADDR="10.0.0.9"), "alice", alice_password).status_code == 200


def test_under_the_limit_nothing_is_throttled(actors, settings):
    settings.SMR_RATE_AUTH_FAILURES = "3/min"
    forged = "smr_0123456789ab_" + "x" * 43
    for _ in range(2):
        error(bearer(forged).get(f"{API}/namespaces"), 401, "authentication_failed")
    assert bearer(actors.tokens["alice"]).get(f"{API}/namespaces").status_code == 200


def test_token_creation_is_throttled_per_user(actors, settings):
    settings.SMR_RATE_TOKEN_CREATE = "2/min"
    alice = actors.client("alice")
    for _ in range(2):
        assert alice.post(f"{API}/tokens", {"scopes": ["read"]}, format="json").status_code == 201
    count = ApiToken.objects.count()
    throttled(alice.post(f"{API}/tokens", {"scopes": ["read"]}, format="json"))
    assert ApiToken.objects.count() == count
    assert alice.get(f"{API}/tokens").status_code == 200  # listing is not token creation
    # Control: another user still creates tokens.
    assert (
        actors.client("bob").post(f"{API}/tokens", {"scopes": ["read"]}, format="json").status_code
        == 201
    )


def test_uploads_are_throttled_per_user(actors, draft, settings):
    settings.SMR_RATE_UPLOAD = "2/min"
    alice = actors.client("alice")
    for name in ("a.bin", "b.bin"):
        assert alice.put(f"{FILES}/{name}", b"weights", content_type=OCTET).status_code == 201
    throttled(alice.put(f"{FILES}/c.bin", b"weights", content_type=OCTET))
    throttled(
        alice.post(
            f"{API}/namespaces/acme/models/bert/versions/1/uploads",
            {"path": "d.bin", "size": 7},
            format="json",
        )
    )
    assert sorted(Artifact.objects.values_list("path", flat=True)) == ["a.bin", "b.bin"]
    assert alice.get(f"{FILES}/a.bin").status_code == 200  # downloads are not uploads
    # Control: another uploader of the namespace is not throttled by alice's budget.
    root = actors.client("root")
    assert root.put(f"{FILES}/c.bin", b"weights", content_type=OCTET).status_code == 201


def test_default_rates_leave_normal_use_alone(settings):
    assert settings.SMR_RATE_UPLOAD == "600/min"
    assert settings.SMR_RATE_TOKEN_CREATE == "30/min"
    assert settings.SMR_RATE_AUTH_FAILURES == "100/min"


# --- Deploy ------------------------------------------------------------------------------------


def test_check_deploy_with_production_settings_reports_nothing(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SECRET_KEY", "SMR_", "DJANGO_", "AXES_", "DATABASE_URL"))
    }
    env.update(
        SMR_PRODUCTION="1",
        SECRET_KEY=secrets.token_urlsafe(50),
        ALLOWED_HOSTS="registry.example.com",
        SMR_VAR_DIR=str(tmp_path / "var"),
        DJANGO_SETTINGS_MODULE="registry.settings",
    )
    done = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "System check identified no issues" in done.stdout
    # Control: the same check flags a development key, so it would catch a regression.
    env["SECRET_KEY"] = "django-insecure-" + "k" * 50
    flagged = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert flagged.returncode != 0
    assert "security.W009" in flagged.stdout + flagged.stderr
