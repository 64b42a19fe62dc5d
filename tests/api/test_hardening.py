"""Bad input is a clean 4xx with a stable code, never a 500 (DESIGN §10)."""

from __future__ import annotations

import base64
import json
from urllib.parse import urlencode

import pytest

from registry.services import audit
from tests.conftest import FILES
from tests.support.http import put

API = "/api/v1"
BERT = f"{API}/namespaces/acme/models/bert"


def error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"code", "message", "extra"}
    assert body["code"] == code
    assert isinstance(body["message"], str) and body["message"]
    return body


def cursor(payload: str) -> str:
    """A hand-made cursor: DRF's encoding is base64 of a query string."""
    return base64.b64encode(payload.encode("utf-8")).decode("ascii")


# list -> (url, who may read it, kind of the position the list orders by)
LISTS = {
    "namespaces": (f"{API}/namespaces", "alice", "name"),
    "members": (f"{API}/namespaces/acme/members", "alice", "time"),
    "models": (f"{API}/namespaces/acme/models", "alice", "name"),
    "versions": (f"{BERT}/versions", "alice", "int"),
    "files": (f"{FILES}", "alice", "path"),
    "tokens": (f"{API}/tokens", "alice", "time"),
    "audit events": (f"{API}/audit/events", "dave", "int"),
    "audit checkpoints": (f"{API}/audit/checkpoints", "dave", "int"),
}

ANY_LIST = [
    "o=abc",
    "o=-1",
    "o=1e999",
    "r=x",
    "r=",
    "p=a\x00b",
]
BY_KIND = {
    "int": ["p=abc", "p=-1", "p=1e999", "p=1.5", "p=99999999999999999999999999", "p="],
    "time": [
        "p=abc",
        "p=-1",
        "p=1e999",
        "p=2024-13-45 00:00:00+00:00",
        "p=2024-02-30 12:00:00+00:00",
        "p=2024-01-01 12:00:00",  # no timezone: ambiguous, DRF never makes one
        "p=",
    ],
    "name": ["p=-1", "p=" + "a" * 300, "p=Not A Name"],
    "path": ["p=" + "a" * 5000],
}
NOT_BASE64 = ["not-a-cursor", "%%%", "cD1hYmM", "\u00e9t\u00e9", "cD0" + "=" * 10]


@pytest.fixture
def lists(actors, draft):
    """Two of everything on every list, so a page can have a next link."""
    from registry.services import catalog, tokens

    alice = actors.client("alice")
    assert put(alice, "a.bin", b"a").status_code == 201
    assert put(alice, "b.bin", b"b").status_code == 201
    catalog.version_create(model=draft.model, creator=actors.users["alice"])
    catalog.model_create(namespace=actors.acme, name="gpt", creator=actors.users["alice"])
    catalog.namespace_create(name="vision", creator=actors.users["alice"])
    tokens.token_create(user=actors.users["alice"], scopes=["read"])
    assert audit.audit_checkpoint_create() is not None
    assert put(alice, "c.bin", b"c").status_code == 201
    assert audit.audit_checkpoint_create() is not None
    return actors


def bad_cursors(kind: str) -> list[str]:
    return [cursor(p) for p in ANY_LIST + BY_KIND[kind]] + NOT_BASE64


def answers(client, url: str, param: str, values: list[str]) -> dict[str, tuple[int, str]]:
    """Status and code for each value of `param` that did not get the expected 400."""
    wrong = {}
    for value in values:
        response = client.get(url, {param: value})
        body = response.json() if response["Content-Type"] == "application/json" else {}
        if (
            response.status_code != 400
            or body.get("code") != "invalid_input"
            or body.get("extra") != {"param": param}
            or not body.get("message")
        ):
            wrong[value] = (response.status_code, body.get("code", ""))
    return wrong


@pytest.mark.parametrize("name", LISTS)
def test_a_hand_made_cursor_is_a_400_on_every_list(lists, name):
    url, who, kind = LISTS[name]
    assert answers(lists.client(who), url, "cursor", bad_cursors(kind)) == {}


@pytest.mark.parametrize("name", LISTS)
def test_cursors_the_api_hands_out_still_work(lists, name):
    url, who, _ = LISTS[name]
    client = lists.client(who)
    first = client.get(url, {"limit": 1})
    assert first.status_code == 200, first.content
    assert len(first.json()["results"]) == 1
    second = client.get(first.json()["next"])
    assert second.status_code == 200, second.content
    assert second.json()["results"] and second.json()["results"] != first.json()["results"]
    back = client.get(second.json()["previous"])
    assert back.status_code == 200
    assert back.json()["results"] == first.json()["results"]


def test_a_well_formed_hand_made_cursor_is_a_position_not_an_error(lists):
    # Control: the checks above reject what cannot be a position, not hand-made cursors as such.
    alice = lists.client("alice")
    names = alice.get(f"{API}/namespaces", {"cursor": cursor("p=b")})
    assert names.status_code == 200, names.content
    assert [n["name"] for n in names.json()["results"]] == ["vision"]
    versions = alice.get(f"{BERT}/versions", {"cursor": cursor("p=2")})
    assert versions.status_code == 200, versions.content
    assert [v["number"] for v in versions.json()["results"]] == [1]
    when = alice.get(
        f"{API}/namespaces/acme/members",
        {"cursor": cursor(urlencode({"p": "2000-01-01 00:00:00+00:00"}))},
    )
    assert when.status_code == 200, when.content


# --- limit ---------------------------------------------------------------------------------


BAD_LIMITS = ["0", "-1", "abc", "null", "1e3", "1001", "99999999999999999999", "", "1.0", " 5"]


@pytest.mark.parametrize("name", LISTS)
def test_a_bad_limit_is_a_400(lists, name):
    url, who, _ = LISTS[name]
    assert answers(lists.client(who), url, "limit", BAD_LIMITS) == {}


def test_limit_in_range_is_honoured(lists):
    alice = lists.client("alice")
    assert len(alice.get(f"{BERT}/versions", {"limit": "1"}).json()["results"]) == 1
    assert len(alice.get(f"{BERT}/versions", {"limit": "1000"}).json()["results"]) == 2
    assert len(alice.get(f"{BERT}/versions").json()["results"]) == 2


def test_limit_range_is_in_the_schema(db):
    from rest_framework.test import APIClient

    schema = APIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    params = json.loads(schema.content)["paths"][f"{API}/namespaces"]["get"]["parameters"]
    limit = next(p for p in params if p["name"] == "limit")
    assert limit["schema"]["minimum"] == 1
    assert limit["schema"]["maximum"] == 1000


# --- JSON bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "[" * 1000 + "]" * 1000,
        '{"a":' * 1000 + "1" + "}" * 1000,
        "[" * 100_000 + "]" * 100_000,
        '{"name": "x", "description": ' + "[" * 5000 + "]" * 5000 + "}",
    ],
    ids=["list", "object", "very-deep", "inside-a-field"],
)
def test_deeply_nested_json_is_a_400(actors, body):
    response = actors.client("alice").post(
        f"{API}/namespaces", body, content_type="application/json"
    )
    error(response, 400, "malformed_request")


def test_nesting_that_json_can_parse_is_still_capped(actors):
    # json parses this, but later recursive code (validation, the audit log's JSON) may not.
    description = json.loads("[" * 300 + "]" * 300)
    response = actors.client("alice").post(
        f"{API}/namespaces", {"name": "deep", "description": description}, format="json"
    )
    error(response, 400, "malformed_request")


def test_ordinary_nesting_is_parsed(actors):
    alice = actors.client("alice")
    shallow = json.loads("[" * 10 + "]" * 10)
    response = alice.post(f"{API}/namespaces", {"name": "x", "description": shallow}, format="json")
    error(response, 400, "invalid_input")  # parsed, then the serializer wants a string
    response = alice.post(f"{API}/namespaces", {"name": "x", "description": "d"}, format="json")
    assert response.status_code == 201, response.content


def test_an_oversize_json_body_is_a_413(actors):
    big = json.dumps({"name": "big", "description": "x" * (5 << 20)})
    response = actors.client("alice").post(
        f"{API}/namespaces", big, content_type="application/json"
    )
    error(response, 413, "too_large")
