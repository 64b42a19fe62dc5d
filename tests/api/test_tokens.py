"""Bearer authentication and the /tokens endpoints (DESIGN §5 Tokens, §9)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from registry.models import ApiToken, RegisteredModel
from registry.services.tokens import token_create

API = "/api/v1"
MODELS = f"{API}/namespaces/acme/models"


def bearer(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"code", "message", "extra"}
    assert body["code"] == code
    return body


def auth_failed(response) -> None:
    error(response, 401, "authentication_failed")
    assert response["WWW-Authenticate"].startswith("Bearer")


# --- authentication ------------------------------------------------------------------------


def test_no_authorization_is_401_not_authenticated(actors):
    response = APIClient().get(f"{API}/namespaces")
    error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert actors.client("alice").get(f"{API}/namespaces").status_code == 200  # control


@pytest.mark.parametrize(
    "header",
    [
        "Bearer garbage",
        "Bearer smr_",
        "Bearer smr_deadbeef0000_notthesecret",
        "Bearer smr_a b",
        "Bearer smr_ab\x00cd_secret",
    ],
)
def test_garbage_token_is_401(actors, header):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    auth_failed(client.get(f"{API}/namespaces"))


def test_wrong_secret_with_a_valid_key_id_is_401(actors):
    key_id = actors.tokens["alice"].split("_")[1]
    forged = f"smr_{key_id}_{'x' * 43}"
    auth_failed(bearer(forged).get(f"{API}/namespaces"))
    assert bearer(actors.tokens["alice"]).get(f"{API}/namespaces").status_code == 200


def test_expired_token_is_401(actors):
    issued = token_create(
        user=actors.users["alice"],
        scopes=["read"],
        expires_at=timezone.now() + timedelta(hours=1),
    )
    assert bearer(issued.plaintext).get(f"{API}/namespaces").status_code == 200
    ApiToken.objects.filter(pk=issued.token.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    auth_failed(bearer(issued.plaintext).get(f"{API}/namespaces"))


def test_token_of_an_inactive_user_is_401(actors):
    alice = actors.users["alice"]
    alice.is_active = False
    alice.save(update_fields=["is_active"])
    auth_failed(actors.client("alice").get(f"{API}/namespaces"))
    assert actors.client("bob").get(f"{API}/namespaces").status_code == 200


# --- /tokens -------------------------------------------------------------------------------


def test_token_is_shown_once_and_never_listed(actors):
    alice = actors.client("alice")
    created = alice.post(f"{API}/tokens", {"name": "ci", "scopes": ["read"]}, format="json")
    assert created.status_code == 201, created.content
    body = created.json()
    plaintext = body["token"]
    assert plaintext.startswith(f"smr_{body['id']}_")
    assert body["scopes"] == ["read"]
    assert body["name"] == "ci"
    assert body["expires_at"] is not None  # the default lifetime applies
    assert bearer(plaintext).get(f"{API}/namespaces").status_code == 200

    listed = alice.get(f"{API}/tokens")
    assert listed.status_code == 200
    assert plaintext not in listed.content.decode()
    assert plaintext.rsplit("_", 1)[1] not in listed.content.decode()
    rows = {row["id"]: row for row in listed.json()["results"]}
    assert body["id"] in rows
    assert "token" not in rows[body["id"]]
    assert "secret_hash" not in rows[body["id"]]
    # Stored hashed: the row holds neither the token nor its secret.
    row = ApiToken.objects.get(key_id=body["id"])
    assert row.secret_hash != plaintext
    assert plaintext.rsplit("_", 1)[1] not in row.secret_hash


def test_token_list_shows_only_the_callers_tokens(actors):
    mine = {row["id"] for row in actors.client("mallory").get(f"{API}/tokens").json()["results"]}
    assert mine == {actors.tokens["mallory"].split("_")[1]}
    assert actors.tokens["alice"].split("_")[1] not in mine


def test_read_only_token_cannot_write(actors):
    alice = actors.client("alice")
    read_only = alice.post(f"{API}/tokens", {"scopes": ["read"]}, format="json").json()["token"]
    writer = alice.post(f"{API}/tokens", {"scopes": ["read", "write"]}, format="json").json()[
        "token"
    ]

    error(bearer(read_only).post(MODELS, {"name": "ro"}, format="json"), 403, "permission_denied")
    error(
        bearer(read_only).post(f"{API}/namespaces", {"name": "ro"}, format="json"),
        403,
        "permission_denied",
    )
    assert not RegisteredModel.objects.filter(name="ro").exists()
    assert bearer(read_only).get(MODELS).status_code == 200  # it still reads

    # Control: the same user with a write token succeeds.
    assert bearer(writer).post(MODELS, {"name": "rw"}, format="json").status_code == 201


def test_write_token_without_admin_scope_cannot_manage(actors):
    root = actors.client("root")
    writer = root.post(f"{API}/tokens", {"scopes": ["read", "write"]}, format="json").json()[
        "token"
    ]
    error(
        bearer(writer).post(
            f"{API}/namespaces/acme/members", {"username": "carol", "role": "admin"}, format="json"
        ),
        403,
        "permission_denied",
    )
    assert (
        root.post(
            f"{API}/namespaces/acme/members",
            {"username": "carol", "role": "reviewer"},
            format="json",
        ).status_code
        == 200
    )


def test_token_cannot_mint_broader_scopes(actors):
    alice = actors.client("alice")
    read_only = alice.post(f"{API}/tokens", {"scopes": ["read"]}, format="json").json()["token"]
    before = ApiToken.objects.count()
    error(
        bearer(read_only).post(f"{API}/tokens", {"scopes": ["read", "write"]}, format="json"),
        403,
        "permission_denied",
    )
    error(
        bearer(read_only).post(f"{API}/tokens", {"scopes": ["admin"]}, format="json"),
        403,
        "permission_denied",
    )
    assert ApiToken.objects.count() == before
    # Control: narrowing (or keeping) its scopes is allowed.
    same = bearer(read_only).post(f"{API}/tokens", {"scopes": ["read"]}, format="json")
    assert same.status_code == 201


def test_token_cannot_mint_a_token_that_outlives_it(actors):
    alice = actors.client("alice")
    soon = timezone.now() + timedelta(hours=1)
    short = alice.post(
        f"{API}/tokens", {"scopes": ["read"], "expires_at": soon.isoformat()}, format="json"
    ).json()["token"]
    before = ApiToken.objects.count()
    for expires_at in [None, (soon + timedelta(days=30)).isoformat()]:
        error(
            bearer(short).post(
                f"{API}/tokens", {"scopes": ["read"], "expires_at": expires_at}, format="json"
            ),
            403,
            "permission_denied",
        )
    assert ApiToken.objects.count() == before
    # Without an explicit expiry the child inherits at most the parent's lifetime.
    child = bearer(short).post(f"{API}/tokens", {"scopes": ["read"]}, format="json")
    assert child.status_code == 201, child.content
    assert ApiToken.objects.get(key_id=child.json()["id"]).expires_at <= soon
    # Control: an earlier expiry is fine.
    earlier = (soon - timedelta(minutes=30)).isoformat()
    ok = bearer(short).post(
        f"{API}/tokens", {"scopes": ["read"], "expires_at": earlier}, format="json"
    )
    assert ok.status_code == 201, ok.content


def test_delete_revokes_the_token(actors):
    alice = actors.client("alice")
    created = alice.post(f"{API}/tokens", {"scopes": ["read"]}, format="json").json()
    assert bearer(created["token"]).get(f"{API}/namespaces").status_code == 200
    assert alice.delete(f"{API}/tokens/{created['id']}").status_code == 204
    auth_failed(bearer(created["token"]).get(f"{API}/namespaces"))
    listed = {row["id"]: row for row in alice.get(f"{API}/tokens").json()["results"]}
    assert listed[created["id"]]["revoked_at"] is not None
    assert alice.get(f"{API}/namespaces").status_code == 200  # the other token still works


def test_cannot_revoke_someone_elses_token(actors):
    alice_key = actors.tokens["alice"].split("_")[1]
    error(actors.client("mallory").delete(f"{API}/tokens/{alice_key}"), 404, "not_found")
    assert actors.client("alice").get(f"{API}/namespaces").status_code == 200
    error(actors.client("mallory").delete(f"{API}/tokens/ffffffffffff"), 404, "not_found")


@pytest.mark.parametrize(
    "payload",
    [
        {"scopes": ["read", "superuser"]},
        {"scopes": "read"},
        {"scopes": []},
        {},
        {"scopes": ["read"], "expires_at": "yesterday"},
        {"scopes": ["read"], "expires_at": "2001-01-01T00:00:00Z"},
    ],
)
def test_invalid_token_requests_are_400(actors, payload):
    before = ApiToken.objects.count()
    error(
        actors.client("alice").post(f"{API}/tokens", payload, format="json"), 400, "invalid_input"
    )
    assert ApiToken.objects.count() == before


def test_unknown_scope_is_named_in_extra_fields(actors):
    body = error(
        actors.client("alice").post(f"{API}/tokens", {"scopes": ["read", "sudo"]}, format="json"),
        400,
        "invalid_input",
    )
    assert "scopes" in body["extra"]["fields"]


def test_read_token_can_revoke_itself_but_not_its_siblings(actors):
    alice = actors.users["alice"]
    reader = token_create(user=alice, scopes=["read"]).plaintext
    sibling = token_create(user=alice, scopes=["read", "write"])
    client = bearer(reader)
    r = client.delete(f"/api/v1/tokens/{sibling.token.key_id}")
    error(r, 403, "permission_denied")
    assert bearer(sibling.plaintext).get("/api/v1/namespaces").status_code == 200
    # Control: with the admin scope the same revocation works.
    assert (
        actors.client("alice").delete(f"/api/v1/tokens/{sibling.token.key_id}").status_code == 204
    )
    auth_failed(bearer(sibling.plaintext).get("/api/v1/namespaces"))
    # And any token can kill itself.
    own_id = reader.split("_")[1]
    assert client.delete(f"/api/v1/tokens/{own_id}").status_code == 204
    auth_failed(client.get("/api/v1/namespaces"))


def test_malformed_cursor_is_400(actors):
    r = actors.client("alice").get("/api/v1/namespaces?cursor=not-a-cursor")
    error(r, 400, "invalid_input")
