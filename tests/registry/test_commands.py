"""Management commands for scripts and first setup: issue_token and demo_setup."""

from __future__ import annotations

import io
import re
import stat

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from registry.models import ApiToken, AuditEvent, Membership, Namespace

TOKEN_RE = re.compile(r"smr_[0-9a-f]+_[A-Za-z0-9_-]+")


def run(*args: str) -> str:
    buf = io.StringIO()
    call_command(*args, stdout=buf)
    return buf.getvalue()


def bearer(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def only_token(output: str) -> str:
    found = TOKEN_RE.findall(output)
    assert len(found) == 1, output
    return found[0]


def audited(**filters: str) -> list[tuple[str, str, str, str]]:
    """(action, actor_kind, actor_user, target) of the audit events matching `filters`."""
    return list(
        AuditEvent.objects.filter(**filters)
        .order_by("seq")
        .values_list("action", "actor_kind", "actor_user", "target")
    )


ISSUE = ("issue_token", "newbie", "--namespace", "fresh")


@pytest.fixture
def var_dir(settings, tmp_path):
    """demo_setup's files in a fresh folder (settings computes their paths from VAR_DIR)."""
    var = tmp_path / "var"
    settings.VAR_DIR = var
    settings.EMBEDDED_SECRET_KEY_FILE = var / "secret_key"
    settings.CELERY_BROKER_URL = "filesystem://"  # the embedded broker, as make run uses
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(var / "celery" / "queue"),
        "data_folder_out": str(var / "celery" / "queue"),
        "control_folder": str(var / "celery" / "control"),
    }
    return var


@pytest.mark.django_db
def test_issue_token_creates_user_namespace_membership_and_a_working_token():
    token = only_token(run(*ISSUE, "--scopes", "read,write"))
    assert token.startswith("smr_")

    user = get_user_model().objects.get(username="newbie")
    assert not user.has_usable_password()
    namespace = Namespace.objects.get(name="fresh")
    # As through the API, a namespace's creator is its admin (a namespace always has one).
    assert Membership.objects.get(namespace=namespace, user=user).role == "admin"
    row = ApiToken.objects.get(user=user)
    assert row.scopes == ["read", "write"]
    assert row.expires_at is not None  # default lifetime
    # Every change went through a service: audited, as the command.
    system = "manage.py issue_token"
    assert audited(actor_kind="system") == [
        ("namespace.create", "system", system, "fresh"),
        ("token.create", "system", system, f"token:{row.key_id}"),
    ]
    assert AuditEvent.objects.get(action="token.create").details["owner"] == "newbie"

    client = bearer(token)
    assert [n["name"] for n in client.get("/api/v1/namespaces").json()["results"]] == ["fresh"]
    created = client.post("/api/v1/namespaces/fresh/models", {"name": "m"}, format="json")
    assert created.status_code == 201, created.content
    # Scopes are honoured: no admin scope, so no member management.
    denied = client.post(
        "/api/v1/namespaces/fresh/members", {"username": "newbie", "role": "admin"}, format="json"
    )
    assert denied.status_code == 403


@pytest.mark.django_db
def test_issue_token_refuses_to_create_a_namespace_without_an_admin():
    with pytest.raises(CommandError, match="becomes its admin"):
        run(*ISSUE, "--role", "contributor")
    assert not Namespace.objects.exists()
    assert not get_user_model().objects.filter(username="newbie").exists()
    assert not AuditEvent.objects.exists()  # rolled back with the change

    run(*ISSUE, "--role", "admin")
    run("issue_token", "helper", "--namespace", "fresh", "--role", "contributor")
    assert Membership.objects.get(user__username="helper").role == "contributor"
    assert audited(action="member.set") == [
        ("member.set", "system", "manage.py issue_token", "fresh/members/helper")
    ]


@pytest.mark.django_db
def test_issue_token_twice_gives_two_valid_tokens():
    first = only_token(run(*ISSUE, "--scopes", "read,write"))
    second = only_token(run(*ISSUE, "--scopes", "read"))
    assert first != second
    assert get_user_model().objects.filter(username="newbie").count() == 1
    assert Membership.objects.get(namespace__name="fresh").role == "admin"  # kept
    assert ApiToken.objects.filter(user__username="newbie").count() == 2
    assert [a for a, *_ in audited(actor_kind="system")] == [
        "namespace.create",
        "token.create",
        "token.create",
    ]
    for token in (first, second):
        assert bearer(token).get("/api/v1/namespaces").status_code == 200


@pytest.mark.django_db
def test_issue_token_joins_an_existing_namespace_without_taking_it_over(actors):
    token = only_token(run("issue_token", "newbie", "--namespace", "acme", "--role", "viewer"))
    assert Membership.objects.get(namespace=actors.acme, user__username="newbie").role == "viewer"
    assert Namespace.objects.get(name="acme").created_by is None  # untouched
    assert audited(action="member.set") == [
        ("member.set", "system", "manage.py issue_token", "acme/members/newbie")
    ]
    assert AuditEvent.objects.get(action="member.set").details["role"] == "viewer"
    assert bearer(token).get("/api/v1/namespaces/acme").status_code == 200
    assert (
        bearer(token)
        .post("/api/v1/namespaces/acme/models", {"name": "m"}, format="json")
        .status_code
        == 403
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args",
    [
        ("--role", "overlord"),
        ("--scopes", "read,root"),
        ("--scopes", ""),
        ("--days", "-1"),
    ],
)
def test_issue_token_rejects_bad_options_and_creates_nothing(args):
    with pytest.raises((CommandError, SystemExit)):
        run("issue_token", "newbie", "--namespace", "fresh", *args)
    assert not get_user_model().objects.filter(username="newbie").exists()
    assert not Namespace.objects.filter(name="fresh").exists()
    assert not ApiToken.objects.exists()
    assert not AuditEvent.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("namespace", ["Bad_Name", "-x", "a" * 64, "has space"])
def test_issue_token_refuses_a_namespace_name_the_api_would_refuse(namespace):
    with pytest.raises(CommandError, match="Invalid namespace name"):
        run("issue_token", "newbie", f"--namespace={namespace}")  # "-x" is not an option
    assert not Namespace.objects.exists()
    assert not get_user_model().objects.filter(username="newbie").exists()


@pytest.mark.django_db
def test_issue_token_refuses_an_invalid_username():
    with pytest.raises(CommandError):
        run("issue_token", "bad name/with slash")
    assert not get_user_model().objects.exists()


@pytest.mark.django_db
def test_issue_token_days_zero_never_expires():
    token = only_token(run("issue_token", "newbie", "--days", "0"))
    assert ApiToken.objects.get(user__username="newbie").expires_at is None
    assert bearer(token).get("/api/v1/namespaces").status_code == 200


@pytest.mark.django_db
def test_demo_setup_prints_a_token_and_is_idempotent(settings, var_dir):
    first_output = run("demo_setup")
    token = only_token(first_output)
    assert "password:" in first_output
    # The smr commands it prints read the token from its file, never from argv.
    smr_lines = [line for line in first_output.splitlines() if ".venv/bin/smr" in line]
    assert any("smr login --url" in line and "< " in line for line in smr_lines)
    assert not any(token in line for line in smr_lines)

    client = bearer(token)
    assert [n["name"] for n in client.get("/api/v1/namespaces").json()["results"]] == ["demo"]
    token_file = settings.VAR_DIR / "demo-token"
    assert token_file.read_text().strip() == token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

    second_output = run("demo_setup")
    assert only_token(second_output) == token
    assert "password:" not in second_output  # the existing admin is reused, not reset
    assert ApiToken.objects.filter(user__username="admin").count() == 1
    assert Namespace.objects.filter(name="demo").count() == 1
    assert client.get("/api/v1/namespaces/demo").status_code == 200
    # The changes went through the services, audited as the command; the rerun changed nothing.
    system = "manage.py demo_setup"
    key_id = ApiToken.objects.get().key_id
    assert audited(actor_kind="system") == [
        ("namespace.create", "system", system, "demo"),
        ("token.create", "system", system, f"token:{key_id}"),
    ]


@pytest.mark.django_db
def test_demo_setup_makes_the_embedded_files_private_and_prints_working_examples(settings, var_dir):
    output = run("demo_setup", "--base-url", "http://127.0.0.1:8123")

    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    key = settings.EMBEDDED_SECRET_KEY_FILE.read_text().strip()
    assert len(key) >= 50
    assert mode(settings.EMBEDDED_SECRET_KEY_FILE) == 0o600
    for folder in ("", "celery", "celery/queue", "celery/control"):
        assert mode(settings.VAR_DIR / folder) == 0o700, folder
    run("demo_setup")
    assert settings.EMBEDDED_SECRET_KEY_FILE.read_text().strip() == key  # kept, not rotated

    # The example uses the port it was given and double quotes, so the shell expands $TOKEN.
    token_file = settings.VAR_DIR / "demo-token"
    assert f"TOKEN=$(cat {token_file})" in output
    assert 'curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8123/api/v1/namespaces' in (
        output
    )
    assert ":8000" not in output


@pytest.mark.django_db
def test_demo_setup_replaces_a_revoked_token(var_dir):
    old = only_token(run("demo_setup"))
    ApiToken.objects.update(revoked_at=ApiToken.objects.get().created_at)
    new = only_token(run("demo_setup"))
    assert new != old
    assert bearer(new).get("/api/v1/namespaces").status_code == 200
    assert bearer(old).get("/api/v1/namespaces").status_code == 401
    assert [a for a, *_ in audited(actor_kind="system")] == [
        "namespace.create",
        "token.create",
        "auth.failed",  # the revoked token in var/demo-token
        "token.create",
    ]


def test_issue_token_cannot_demote_the_last_admin(db):
    from io import StringIO

    from django.core.management import call_command
    from django.core.management.base import CommandError

    from registry.models import Membership

    call_command("issue_token", "boss", "--namespace", "solo", "--role", "admin", stdout=StringIO())
    with pytest.raises(CommandError, match="at least one admin"):
        call_command(
            "issue_token", "boss", "--namespace", "solo", "--role", "viewer", stdout=StringIO()
        )
    assert Membership.objects.get(user__username="boss").role == "admin"
