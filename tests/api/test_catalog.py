"""Namespaces, members, models and versions over the REST API (DESIGN §5, §9, §10)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rest_framework.test import APIClient

from registry.models import (
    Artifact,
    Membership,
    ModelVersion,
    PendingObject,
    RegisteredModel,
    UploadPart,
)

API = "/api/v1"
BERT = f"{API}/namespaces/acme/models/bert"


def error(response, status: int, code: str) -> dict:
    """Assert the documented error shape and return the body."""
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"code", "message", "extra"}
    assert body["code"] == code
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["extra"], dict)
    return body


def upload(client, number: int, path: str, data: bytes):
    return client.put(
        f"{BERT}/versions/{number}/files/{path}", data=data, content_type="application/octet-stream"
    )


def stored_objects(root: Path) -> set[str]:
    """Committed object files under the folder store (staging under .incomplete excluded)."""
    if not root.exists():
        return set()
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and ".incomplete" not in p.relative_to(root).parts
    }


# --- namespaces ----------------------------------------------------------------------------


def test_namespace_create_makes_the_creator_its_admin(actors):
    response = actors.client("alice").post(
        f"{API}/namespaces", {"name": "vision", "description": "cv team"}, format="json"
    )
    assert response.status_code == 201, response.content
    assert response.json()["name"] == "vision"
    assert response.json()["description"] == "cv team"
    membership = Membership.objects.get(namespace__name="vision")
    assert membership.user == actors.users["alice"]
    assert membership.role == "admin"
    # Being admin is real: alice may now manage the namespace's members.
    added = actors.client("alice").post(
        f"{API}/namespaces/vision/members", {"username": "bob", "role": "viewer"}, format="json"
    )
    assert added.status_code == 200, added.content


def test_namespace_list_shows_only_the_callers_namespaces(actors):
    names = [n["name"] for n in actors.client("mallory").get(f"{API}/namespaces").json()["results"]]
    assert names == ["evil"]
    # Control: a member of acme does see it.
    names = [n["name"] for n in actors.client("carol").get(f"{API}/namespaces").json()["results"]]
    assert names == ["acme"]


def test_namespace_detail_of_another_team_is_not_found(actors):
    error(actors.client("mallory").get(f"{API}/namespaces/acme"), 404, "not_found")
    # The message is the same as for a namespace that does not exist: no existence oracle.
    missing = error(actors.client("mallory").get(f"{API}/namespaces/nope"), 404, "not_found")
    hidden = actors.client("mallory").get(f"{API}/namespaces/acme").json()
    assert hidden["message"].replace("acme", "X") == missing["message"].replace("nope", "X")
    assert actors.client("carol").get(f"{API}/namespaces/acme").status_code == 200


def test_namespace_duplicate_is_409_already_exists(actors):
    error(
        actors.client("mallory").post(f"{API}/namespaces", {"name": "acme"}, format="json"),
        409,
        "already_exists",
    )
    # mallory did not slip into acme through the failed create.
    assert not Membership.objects.filter(
        namespace__name="acme", user=actors.users["mallory"]
    ).exists()


@pytest.mark.parametrize("name", ["Acme_Team", "-lead", "a" * 64, "with space", ""])
def test_namespace_invalid_name_is_400_with_fields(actors, name):
    body = error(
        actors.client("alice").post(f"{API}/namespaces", {"name": name}, format="json"),
        400,
        "invalid_input",
    )
    assert "name" in body["extra"]["fields"]


def test_namespace_patch_needs_admin(actors):
    error(
        actors.client("alice").patch(
            f"{API}/namespaces/acme", {"description": "pwned"}, format="json"
        ),
        403,
        "permission_denied",
    )
    response = actors.client("root").patch(
        f"{API}/namespaces/acme", {"description": "the acme team"}, format="json"
    )
    assert response.status_code == 200
    assert response.json()["description"] == "the acme team"


# --- members -------------------------------------------------------------------------------


def members(client) -> dict[str, str]:
    rows = client.get(f"{API}/namespaces/acme/members?limit=100").json()["results"]
    return {row["username"]: row["role"] for row in rows}


def test_admin_adds_changes_and_removes_a_member(actors):
    root = actors.client("root")
    added = root.post(
        f"{API}/namespaces/acme/members", {"username": "mallory", "role": "viewer"}, format="json"
    )
    assert added.status_code == 200, added.content
    assert (added.json()["username"], added.json()["role"]) == ("mallory", "viewer")
    assert members(root)["mallory"] == "viewer"
    # Membership is effective at once: mallory can now see acme.
    assert actors.client("mallory").get(f"{API}/namespaces/acme").status_code == 200

    changed = root.post(
        f"{API}/namespaces/acme/members",
        {"username": "mallory", "role": "contributor"},
        format="json",
    )
    assert changed.status_code == 200
    assert members(root)["mallory"] == "contributor"
    assert Membership.objects.filter(namespace=actors.acme, user__username="mallory").count() == 1

    assert root.delete(f"{API}/namespaces/acme/members/mallory").status_code == 204
    assert "mallory" not in members(root)
    error(actors.client("mallory").get(f"{API}/namespaces/acme"), 404, "not_found")


@pytest.mark.parametrize("name", ["alice", "bob", "carol", "dave"])
def test_non_admin_cannot_manage_members(actors, name):
    client = actors.client(name)
    error(
        client.post(
            f"{API}/namespaces/acme/members", {"username": name, "role": "admin"}, format="json"
        ),
        403,
        "permission_denied",
    )
    error(client.delete(f"{API}/namespaces/acme/members/carol"), 403, "permission_denied")
    assert Membership.objects.get(namespace=actors.acme, user=actors.users[name]).role != "admin"
    assert Membership.objects.filter(namespace=actors.acme, user__username="carol").exists()


def test_other_teams_admin_cannot_add_themselves(actors):
    error(
        actors.client("mallory").post(
            f"{API}/namespaces/acme/members",
            {"username": "mallory", "role": "admin"},
            format="json",
        ),
        404,
        "not_found",
    )
    assert not Membership.objects.filter(namespace=actors.acme, user__username="mallory").exists()


def test_last_admin_cannot_be_removed_or_demoted(actors):
    root = actors.client("root")
    error(root.delete(f"{API}/namespaces/acme/members/root"), 409, "last_admin")
    error(
        root.post(
            f"{API}/namespaces/acme/members", {"username": "root", "role": "viewer"}, format="json"
        ),
        409,
        "last_admin",
    )
    assert members(root)["root"] == "admin"

    # Control: with a second admin, demoting and removing root both work.
    root.post(f"{API}/namespaces/acme/members", {"username": "bob", "role": "admin"}, format="json")
    demoted = root.post(
        f"{API}/namespaces/acme/members", {"username": "root", "role": "viewer"}, format="json"
    )
    assert demoted.status_code == 200
    bob = actors.client("bob")
    assert bob.delete(f"{API}/namespaces/acme/members/root").status_code == 204
    # bob is now the last admin again.
    error(bob.delete(f"{API}/namespaces/acme/members/bob"), 409, "last_admin")


def test_member_unknown_user_or_non_member_is_404(actors):
    root = actors.client("root")
    error(
        root.post(
            f"{API}/namespaces/acme/members",
            {"username": "nobody", "role": "viewer"},
            format="json",
        ),
        404,
        "not_found",
    )
    error(root.delete(f"{API}/namespaces/acme/members/nobody"), 404, "not_found")
    error(root.delete(f"{API}/namespaces/acme/members/mallory"), 404, "not_found")


def test_member_invalid_role_is_400(actors):
    body = error(
        actors.client("root").post(
            f"{API}/namespaces/acme/members", {"username": "carol", "role": "god"}, format="json"
        ),
        400,
        "invalid_input",
    )
    assert "role" in body["extra"]["fields"]
    assert members(actors.client("root"))["carol"] == "viewer"


# --- models --------------------------------------------------------------------------------


def test_contributor_creates_a_model(actors):
    response = actors.client("alice").post(
        f"{API}/namespaces/acme/models", {"name": "bert", "description": "base"}, format="json"
    )
    assert response.status_code == 201, response.content
    assert response.json()["namespace"] == "acme"
    assert response.json()["name"] == "bert"
    model = RegisteredModel.objects.get(namespace=actors.acme, name="bert")
    assert model.created_by == actors.users["alice"]
    assert actors.client("carol").get(BERT).json()["description"] == "base"


@pytest.mark.parametrize("name", ["carol", "bob", "dave"])
def test_roles_without_write_cannot_create_a_model(actors, name):
    error(
        actors.client(name).post(f"{API}/namespaces/acme/models", {"name": "x"}, format="json"),
        403,
        "permission_denied",
    )
    assert not RegisteredModel.objects.filter(name="x").exists()


def test_other_team_gets_404_for_namespace_and_model(actors, draft):
    mallory = actors.client("mallory")
    error(mallory.get(f"{API}/namespaces/acme"), 404, "not_found")
    error(mallory.get(f"{API}/namespaces/acme/models"), 404, "not_found")
    error(mallory.get(BERT), 404, "not_found")
    error(mallory.get(f"{BERT}/versions/1"), 404, "not_found")
    error(mallory.patch(BERT, {"description": "x"}, format="json"), 404, "not_found")
    error(mallory.delete(BERT), 404, "not_found")
    error(
        mallory.post(f"{API}/namespaces/acme/models", {"name": "y"}, format="json"),
        404,
        "not_found",
    )
    assert RegisteredModel.objects.filter(namespace=actors.acme, name="bert").exists()
    # Control: the same URLs answer acme's own viewer.
    assert actors.client("carol").get(BERT).status_code == 200
    assert actors.client("carol").get(f"{BERT}/versions/1").status_code == 200


def test_model_duplicate_is_409(actors, draft):
    error(
        actors.client("alice").post(
            f"{API}/namespaces/acme/models", {"name": "bert"}, format="json"
        ),
        409,
        "already_exists",
    )
    # The same name in another namespace is fine.
    created = actors.client("mallory").post(
        f"{API}/namespaces/evil/models", {"name": "bert"}, format="json"
    )
    assert created.status_code == 201


def test_model_invalid_name_is_400(actors):
    body = error(
        actors.client("alice").post(
            f"{API}/namespaces/acme/models", {"name": "../etc"}, format="json"
        ),
        400,
        "invalid_input",
    )
    assert "name" in body["extra"]["fields"]


def test_model_patch_description(actors, draft):
    response = actors.client("alice").patch(BERT, {"description": "fine-tuned"}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["description"] == "fine-tuned"
    assert RegisteredModel.objects.get(pk=draft.model.pk).description == "fine-tuned"
    error(
        actors.client("carol").patch(BERT, {"description": "x"}, format="json"),
        403,
        "permission_denied",
    )
    assert RegisteredModel.objects.get(pk=draft.model.pk).description == "fine-tuned"


def test_model_delete_removes_versions_files_and_objects(actors, draft, settings):
    alice = actors.client("alice")
    assert upload(alice, 1, "a.bin", b"weights").status_code == 201
    objects_dir = Path(settings.SMR_OBJECTS_DIR)
    key = Artifact.objects.get(version=draft).object_key
    assert key in stored_objects(objects_dir)

    # Deleting needs admin; a contributor's attempt changes nothing.
    error(alice.delete(BERT), 403, "permission_denied")
    assert key in stored_objects(objects_dir)

    assert actors.client("root").delete(BERT).status_code == 204
    assert not RegisteredModel.objects.filter(pk=draft.model.pk).exists()
    assert not ModelVersion.objects.filter(pk=draft.pk).exists()
    assert not Artifact.objects.filter(object_key=key).exists()
    assert key not in stored_objects(objects_dir)
    assert not PendingObject.objects.exists()
    error(alice.get(BERT), 404, "not_found")


def test_model_delete_also_removes_staged_upload_parts(actors, draft, settings):
    """A resumable upload in progress must not leave its encrypted parts behind for ever."""
    alice = actors.client("alice")
    session = alice.post(
        f"{BERT}/versions/1/uploads",
        {"path": "big.bin", "size": 2 << 20, "part_size": 1 << 20},
        format="json",
    )
    assert session.status_code == 201, session.content
    part = alice.put(
        f"{BERT}/versions/1/uploads/{session.json()['id']}/parts/1",
        data=b"x" * (1 << 20),
        content_type="application/octet-stream",
    )
    assert part.status_code == 200, part.content
    objects_dir = Path(settings.SMR_OBJECTS_DIR)
    part_key = UploadPart.objects.get().object_key
    assert part_key in stored_objects(objects_dir)

    assert actors.client("root").delete(BERT).status_code == 204
    assert part_key not in stored_objects(objects_dir)
    assert not PendingObject.objects.exists()


# --- versions ------------------------------------------------------------------------------


def test_version_numbers_count_up_from_one(actors):
    alice = actors.client("alice")
    alice.post(f"{API}/namespaces/acme/models", {"name": "bert"}, format="json")
    numbers = []
    for _ in range(3):
        response = alice.post(f"{BERT}/versions", {}, format="json")
        assert response.status_code == 201, response.content
        assert response.json()["state"] == "draft"
        numbers.append(response.json()["number"])
    assert numbers == [1, 2, 3]
    listed = [v["number"] for v in alice.get(f"{BERT}/versions").json()["results"]]
    assert listed == [3, 2, 1]


def test_version_detail_shows_state_and_files(actors, draft):
    alice = actors.client("alice")
    assert upload(alice, 1, "config.json", b"{}").status_code == 201
    body = actors.client("carol").get(f"{BERT}/versions/1").json()
    assert body["number"] == 1
    assert body["state"] == "draft"
    assert body["created_by"] == "alice"
    assert [f["path"] for f in body["files"]] == ["config.json"]
    assert body["files"][0]["size"] == 2
    assert body["files"][0]["sha256"] == (
        "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    )
    error(actors.client("carol").get(f"{BERT}/versions/2"), 404, "not_found")


def test_viewer_cannot_create_or_submit_versions(actors, draft):
    carol = actors.client("carol")
    error(carol.post(f"{BERT}/versions", {}, format="json"), 403, "permission_denied")
    error(carol.post(f"{BERT}/versions/1/submit"), 403, "permission_denied")
    assert ModelVersion.objects.filter(model=draft.model).count() == 1
    assert ModelVersion.objects.get(pk=draft.pk).state == "draft"


def test_submit_moves_to_scanning_with_a_job_and_freezes_files(actors, draft):
    alice = actors.client("alice")
    assert upload(alice, 1, "a.bin", b"weights").status_code == 201
    response = alice.post(f"{BERT}/versions/1/submit")
    assert response.status_code == 202, response.content
    version, job = response.json()["version"], response.json()["job"]
    assert version["state"] == "scanning"
    assert version["submitted_at"] is not None
    assert version["submitted_by"] == "alice"
    assert version["scan_job"] == job["id"]
    assert job["kind"] == "scan" and job["state"] == "queued"
    assert (job["namespace"], job["model"], job["version"]) == ("acme", "bert", 1)

    body = error(alice.post(f"{BERT}/versions/1/submit"), 409, "version_not_draft")
    assert body["extra"]["state"] == "scanning"
    error(upload(alice, 1, "b.bin", b"late"), 409, "version_not_draft")
    error(upload(alice, 1, "a.bin", b"replaced"), 409, "version_not_draft")
    assert list(Artifact.objects.filter(version=draft).values_list("path", "size")) == [
        ("a.bin", 7)
    ]


def test_submit_of_an_empty_version_is_409(actors, draft):
    error(actors.client("alice").post(f"{BERT}/versions/1/submit"), 409, "empty_version")
    assert ModelVersion.objects.get(pk=draft.pk).state == "draft"


# --- pagination ----------------------------------------------------------------------------


def test_limit_and_cursor_walk_every_item_once(actors, draft):
    alice = actors.client("alice")
    for _ in range(4):
        alice.post(f"{BERT}/versions", {}, format="json")
    first = alice.get(f"{BERT}/versions?limit=2").json()
    assert [v["number"] for v in first["results"]] == [5, 4]
    assert first["next"]
    seen = [v["number"] for v in first["results"]]
    url = first["next"]
    while url:
        page = alice.get(url).json()
        assert len(page["results"]) <= 2
        seen += [v["number"] for v in page["results"]]
        url = page["next"]
    assert seen == [5, 4, 3, 2, 1]


def test_namespace_list_pagination(actors):
    alice = actors.client("alice")
    for name in ["n1", "n2", "n3"]:
        assert alice.post(f"{API}/namespaces", {"name": name}, format="json").status_code == 201
    first = alice.get(f"{API}/namespaces?limit=2").json()
    assert [n["name"] for n in first["results"]] == ["acme", "n1"]
    rest = alice.get(first["next"]).json()
    assert [n["name"] for n in rest["results"]] == ["n2", "n3"]
    assert rest["next"] is None


# --- error shape, docs and probes ----------------------------------------------------------


def test_malformed_json_is_400_not_500(actors):
    response = actors.client("alice").generic(
        "POST", f"{API}/namespaces", '{"name": ', content_type="application/json"
    )
    error(response, 400, "malformed_request")


@pytest.mark.parametrize(
    "payload",
    [[], "acme", 42, None, {"name": ["a"]}, {"name": {"x": 1}}, {"name": "a\u0000b"}],
)
def test_wrong_json_types_are_400(actors, payload):
    response = actors.client("alice").generic(
        "POST", f"{API}/namespaces", json.dumps(payload), content_type="application/json"
    )
    error(response, 400, "invalid_input")


def test_unsupported_media_type_is_json_415(actors):
    response = actors.client("alice").generic(
        "POST", f"{API}/namespaces", "name=x", content_type="application/x-www-form-urlencoded"
    )
    error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    "method, url",
    [
        ("get", f"{API}/namespaces/ac%00me"),
        ("get", f"{API}/namespaces/acme/models/be%00rt"),
        ("get", f"{API}/namespaces/acme/models/bert/versions/1/files/a%00b"),
        ("delete", f"{API}/namespaces/acme/members/ca%00rol"),
        ("delete", f"{API}/tokens/ab%00cd"),
    ],
)
def test_nul_bytes_in_the_url_are_4xx_not_500(actors, draft, method, url):
    client = actors.client("root")
    client.raise_request_exception = False
    response = getattr(client, method)(url)
    assert 400 <= response.status_code < 500, response.content
    assert set(response.json()) == {"code", "message", "extra"}


def test_unknown_endpoint_is_json_404(actors):
    for client in (actors.client("alice"), APIClient()):
        response = client.get(f"{API}/no/such/thing")
        assert response["Content-Type"].startswith("application/json")
        error(response, 404, "not_found")


def test_method_not_allowed_is_json_405(actors):
    error(
        actors.client("alice").put(f"{API}/namespaces", {}, format="json"),
        405,
        "method_not_allowed",
    )


def test_every_error_has_exactly_code_message_extra(actors, draft):
    alice = actors.client("alice")
    responses = [
        APIClient().get(f"{API}/namespaces"),
        alice.get(f"{API}/namespaces/nope"),
        alice.post(f"{API}/namespaces", {}, format="json"),
        alice.delete(BERT),
        alice.post(f"{BERT}/versions/1/submit"),
        alice.get(f"{API}/namespaces?cursor=garbage"),
    ]
    for response in responses:
        assert response.status_code >= 400
        assert set(response.json()) == {"code", "message", "extra"}, response.content


def test_openapi_schema_is_public(db):
    response = APIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    schema = json.loads(response.content)
    assert schema["openapi"].startswith("3.")
    assert f"{API}/namespaces" in schema["paths"]
    assert f"{API}/namespaces/{{ns}}/models/{{model}}/versions/{{number}}/submit" in schema["paths"]
    assert f"{API}/tokens" in schema["paths"]


def test_docs_page_is_html(db):
    response = APIClient().get("/api/docs/")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    assert b"swagger" in response.content.lower()
    # Swagger UI's start-up script is a file of its own (the CSP allows no inline script).
    assert b"<script>" not in response.content
    assert b'<script src="/api/docs/?script="></script>' in response.content
    script = APIClient().get("/api/docs/?script=")
    assert script.status_code == 200 and b"/api/schema/" in script.content


def test_healthz_and_readyz(db):
    assert APIClient().get("/healthz").status_code == 200
    response = APIClient().get("/readyz")
    assert response.status_code == 200, response.content
    assert response.json()["checks"] == {"database": "ok", "storage": "ok"}
    assert response.json()["status"] == "ok"


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/namespaces",
        "/api/v1/namespaces/acme/models",
        "/api/v1/namespaces/acme/members",
        "/api/v1/tokens",
        "/api/v1/audit/events",
    ],
)
def test_options_is_never_a_server_error(actors, url):
    r = actors.client("alice").options(url)
    assert r.status_code == 200
    assert "name" in r.json()
