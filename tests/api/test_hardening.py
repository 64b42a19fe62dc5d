"""Bad input is a clean 4xx with a stable code, never a 500 (DESIGN §10)."""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

import psycopg
import pytest
import requests

from registry.services import audit
from tests.conftest import FILES
from tests.support.http import put
from tests.support.netproxy import TcpProxy
from tests.support.server import Server, database_url

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


# --- database outage -----------------------------------------------------------------------


def assert_database_unavailable(response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "database_unavailable"
    assert set(response.json()) == {"code", "message", "extra"}
    assert int(response.headers["Retry-After"]) > 0


@pytest.fixture
def pg_proxy(transactional_db):
    from django.db import connection

    sd = connection.settings_dict
    with TcpProxy(sd["HOST"] or "127.0.0.1", int(sd["PORT"] or 5432)) as proxy:
        yield proxy


@pytest.fixture
def server(pg_proxy, tmp_path):
    """The registry under gunicorn, reaching PostgreSQL only through the proxy."""
    from django.db import connection

    url = database_url(connection.settings_dict, host="127.0.0.1", port=pg_proxy.port)
    # One thread, so one pooled connection: every request below meets the same database link.
    with Server(tmp_path, {"DATABASE_URL": url, "DB_CONN_MAX_AGE": "60"}, threads=1) as running:
        yield running


def lock_waiters() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0]


def test_a_database_outage_is_a_503_with_retry_after(pg_proxy, server, actors):
    from django.db import connection

    auth = {"Authorization": f"Bearer {actors.tokens['alice']}"}
    namespaces = f"{server.url}/api/v1/namespaces"
    assert requests.get(namespaces, headers=auth, timeout=30).status_code == 200
    assert requests.get(f"{server.url}/readyz", timeout=30).status_code == 200

    # Cut in mid-request: the server's query waits on a table lock inside PostgreSQL when the
    # link goes down.
    with psycopg.connect(database_url(connection.settings_dict)) as locker:
        locker.execute("LOCK TABLE registry_namespace IN ACCESS EXCLUSIVE MODE")
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(requests.get, namespaces, headers=auth, timeout=60)
            deadline = time.monotonic() + 30
            while not lock_waiters():
                assert time.monotonic() < deadline, server.tail()
                time.sleep(0.05)
            pg_proxy.cut()
            in_flight = pending.result()
        locker.rollback()
    assert_database_unavailable(in_flight)

    # Down: new connections are refused, in DRF views and below them (the session lookup
    # runs in middleware, before any view).
    assert_database_unavailable(requests.get(namespaces, headers=auth, timeout=30))
    model = f"{namespaces}/acme/models"
    assert_database_unavailable(requests.post(model, json={"name": "m"}, headers=auth, timeout=30))
    assert_database_unavailable(
        requests.get(f"{server.url}/healthz", cookies={"sessionid": "x" * 32}, timeout=30)
    )
    ready = requests.get(f"{server.url}/readyz", timeout=30)
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"] != "ok"
    assert ready.json()["checks"]["storage"] == "ok"
    assert int(ready.headers["Retry-After"]) > 0
    assert "Traceback" not in server.tail(200)

    pg_proxy.restore()
    assert requests.get(namespaces, headers=auth, timeout=30).status_code == 200
    ready = requests.get(f"{server.url}/readyz", timeout=30)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "storage": "ok"}


def test_the_outage_middleware_answers_for_views_outside_drf(rf):
    from django.db import OperationalError

    from api.errors import OutageMiddleware

    middleware = OutageMiddleware(lambda request: None)
    response = middleware.process_exception(rf.get("/"), OperationalError("server closed"))
    assert response.status_code == 503
    assert json.loads(response.content)["code"] == "database_unavailable"
    assert int(response["Retry-After"]) > 0
    # Control: anything else is left to Django's own handling.
    assert middleware.process_exception(rf.get("/"), KeyError("x")) is None


# --- OpenAPI -------------------------------------------------------------------------------


def openapi() -> dict:
    from rest_framework.test import APIClient

    response = APIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    return json.loads(response.content)


def test_every_operation_documents_its_error_responses(db):
    schema = openapi()
    error_schema = schema["components"]["schemas"]["Error"]
    assert set(error_schema["required"]) == {"code", "message", "extra"}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert {"400", "503"} <= set(responses), (method, path)
            assert "Retry-After" in responses["503"]["headers"]
            for status, response in responses.items():
                if status[0] in "45":
                    body = response["content"]["application/json"]["schema"]
                    assert body == {"$ref": "#/components/schemas/Error"}, (method, path, status)

    def statuses(path: str, method: str) -> set[str]:
        return set(schema["paths"][f"{API}{path}"][method]["responses"])

    assert {"401", "403"} <= statuses("/namespaces", "get")
    assert "404" not in statuses("/namespaces", "get")
    assert {"409", "413", "415"} <= statuses("/namespaces", "post")
    assert "404" in statuses("/namespaces/{ns}", "get")
    file = "/namespaces/{ns}/models/{model}/versions/{number}/files/{path}"
    assert "416" in statuses(file, "get")
    assert "411" in statuses(file, "put")
    assert "401" not in statuses("/audit/checkpoint-key", "get")  # public


def test_the_schema_validates_without_warnings(db, tmp_path):
    from django.core.management import call_command

    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "s.yaml"))
