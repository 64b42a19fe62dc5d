"""Management commands for scripts and first setup: issue_token and demo_setup."""

from __future__ import annotations

import io
import re
import stat

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from registry.models import ApiToken, Membership, Namespace

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


ISSUE = ("issue_token", "newbie", "--namespace", "fresh", "--role", "contributor")


@pytest.mark.django_db
def test_issue_token_creates_user_namespace_membership_and_a_working_token():
    token = only_token(run(*ISSUE, "--scopes", "read,write"))
    assert token.startswith("smr_")

    user = get_user_model().objects.get(username="newbie")
    assert not user.has_usable_password()
    namespace = Namespace.objects.get(name="fresh")
    assert Membership.objects.get(namespace=namespace, user=user).role == "contributor"
    row = ApiToken.objects.get(user=user)
    assert row.scopes == ["read", "write"]
    assert row.expires_at is not None  # default lifetime

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
def test_issue_token_twice_gives_two_valid_tokens():
    first = only_token(run(*ISSUE, "--scopes", "read,write"))
    second = only_token(run(*ISSUE, "--scopes", "read"))
    assert first != second
    assert get_user_model().objects.filter(username="newbie").count() == 1
    assert Membership.objects.filter(namespace__name="fresh").count() == 1
    assert ApiToken.objects.filter(user__username="newbie").count() == 2
    for token in (first, second):
        assert bearer(token).get("/api/v1/namespaces").status_code == 200


@pytest.mark.django_db
def test_issue_token_joins_an_existing_namespace_without_taking_it_over(actors):
    token = only_token(run("issue_token", "newbie", "--namespace", "acme", "--role", "viewer"))
    assert Membership.objects.get(namespace=actors.acme, user__username="newbie").role == "viewer"
    assert Namespace.objects.get(name="acme").created_by is None  # untouched
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
        ("--role", "contributor", "--scopes", "read,root"),
        ("--role", "contributor", "--scopes", ""),
        ("--role", "contributor", "--days", "-1"),
    ],
)
def test_issue_token_rejects_bad_options_and_creates_nothing(args):
    with pytest.raises((CommandError, SystemExit)):
        run("issue_token", "newbie", "--namespace", "fresh", *args)
    assert not get_user_model().objects.filter(username="newbie").exists()
    assert not Namespace.objects.filter(name="fresh").exists()
    assert not ApiToken.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("namespace", ["Bad_Name", "-x", "a" * 64, "has space"])
def test_issue_token_refuses_a_namespace_name_the_api_would_refuse(namespace):
    with pytest.raises(CommandError):
        run("issue_token", "newbie", "--namespace", namespace)
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
def test_demo_setup_prints_a_token_and_is_idempotent(settings, tmp_path):
    settings.VAR_DIR = tmp_path / "var"
    first_output = run("demo_setup")
    token = only_token(first_output)
    assert "password:" in first_output

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


@pytest.mark.django_db
def test_demo_setup_replaces_a_revoked_token(settings, tmp_path):
    settings.VAR_DIR = tmp_path / "var"
    old = only_token(run("demo_setup"))
    ApiToken.objects.update(revoked_at=ApiToken.objects.get().created_at)
    new = only_token(run("demo_setup"))
    assert new != old
    assert bearer(new).get("/api/v1/namespaces").status_code == 200
    assert bearer(old).get("/api/v1/namespaces").status_code == 401


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
