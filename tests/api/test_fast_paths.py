"""The hand-written hot paths give exactly what the ORM and DRF's field walk give.

Version reads, lists and token checks skip the ORM's query building and DRF's per-instance
field copies (registry/joinload.py, VersionListOut, VersionDetailOut.to_representation). These
tests hold each fast path to the generic one over versions in every shape that matters: a draft
with files, an approved version with reviews and an alias, a quarantined one with findings. A
separate run checks the same on SQLite, the embedded default, in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from rest_framework import serializers

from api.serializers import VersionDetailOut, VersionOut, iso_time
from registry import selectors
from registry.access import Action, Principal
from registry.models import ApiToken, ModelVersion, Namespace, RegisteredModel
from registry.services import aliases, catalog
from registry.services.tokens import token_authenticate, token_create
from tests.api.test_reviews import approved

ROOT = Path(__file__).resolve().parents[2]
API = "/api/v1/namespaces/acme/models/bert/versions"
PICKLE_RCE = b"\x80\x04cposix\nsystem\n\x8c\x02id\x85R."


@pytest.fixture
def shapes(actors, draft):
    """v1 approved (a file, a review, alias `prod`), v2 a draft with two files, v3
    quarantined (a finding), v4 an empty draft created by a since-deleted user."""
    approved(actors)
    root = Principal(user=actors.users["root"])
    aliases.alias_set(principal=root, model=draft.model, name="prod", number=1)
    alice = actors.client("alice")
    for number, files in [(2, {"b.json": b"{}", "a.txt": b"x" * 10}), (3, {"m.pkl": PICKLE_RCE})]:
        catalog.version_create(model=draft.model, creator=actors.users["alice"])
        for path, data in files.items():
            response = alice.put(
                f"{API}/{number}/files/{path}", data, content_type="application/octet-stream"
            )
            assert response.status_code == 201, response.content
    from registry.services import scanning

    job = alice.post(f"{API}/3/submit").json()["job"]["id"]
    assert scanning.version_scan(job_id=job) == "quarantined"
    ghost = get_user_model().objects.create(username="ghost")
    catalog.version_create(model=draft.model, creator=ghost)
    ghost.delete()
    return draft.model


def generic(serializer: serializers.Serializer, instance) -> dict:
    """What DRF's own field walk makes of `instance` (the declared fields)."""
    return dict(serializers.Serializer.to_representation(serializer, instance))


@pytest.mark.parametrize("who", ["alice", "root", "bob"])
def test_version_detail_written_by_hand_equals_the_field_walk(actors, shapes, who):
    principal = Principal(user=actors.users[who])
    for number in (1, 2, 3, 4):
        version = selectors.version_detail_for_user(
            principal=principal, namespace="acme", model="bert", number=number
        )
        out = VersionDetailOut(version, context={"principal": principal})
        assert out.data == generic(out, version), number
    quarantined = selectors.version_detail_for_user(
        principal=principal, namespace="acme", model="bert", number=3
    )
    data = VersionDetailOut(quarantined, context={"principal": principal}).data
    assert data["scans"] and (data["scans"][0]["findings"] is None) == (who == "bob")


def test_version_rows_equal_the_instances(actors, shapes):
    qs = selectors.version_list_for_user(
        principal=Principal(user=actors.users["carol"]), namespace="acme", model="bert"
    ).order_by("number")
    from_rows = VersionOut(VersionOut.rows(qs), many=True).data
    from_instances = VersionOut(list(qs), many=True).data
    assert from_rows == from_instances
    assert [v["aliases"] for v in from_rows] == [["prod"], [], [], []]
    assert from_rows[3]["created_by"] is None


def test_lookups_load_what_the_orm_loads(actors, shapes):
    principal = Principal(user=actors.users["alice"])
    for ref in (1, 2, 3, 4, "prod"):
        fast = selectors.version_get_for_user(
            principal=principal, namespace="ACME", model="Bert", number=ref, action=Action.READ
        )
        slow = ModelVersion.objects.select_related(
            "model__namespace", "created_by", "submitted_by"
        ).get(pk=fast.pk)
        for a, b in [
            (fast, slow),
            (fast.model, slow.model),
            (fast.model.namespace, slow.model.namespace),
        ]:
            for field in type(a)._meta.concrete_fields:
                assert getattr(a, field.attname) == getattr(b, field.attname), field.name
        assert (fast.created_by and fast.created_by.username) == (
            slow.created_by and slow.created_by.username
        )
        assert (fast.submitted_by and fast.submitted_by.username) == (
            slow.submitted_by and slow.submitted_by.username
        )
    assert principal.roles == {actors.acme.pk: "contributor"}


def test_token_lookup_loads_the_whole_user(actors):
    issued = token_create(user=actors.users["alice"], scopes=["read"])
    assert token_authenticate(issued.plaintext) is not None  # stamps last_used_at
    token = token_authenticate(issued.plaintext)
    assert token is not None
    stored = ApiToken.objects.select_related("user").get(pk=token.pk)
    for a, b in [(token, stored), (token.user, stored.user)]:
        for field in type(a)._meta.concrete_fields:
            assert getattr(a, field.attname) == getattr(b, field.attname), field.name


def test_iso_time_is_drfs_format(actors, draft):
    field = serializers.DateTimeField()
    for version in ModelVersion.objects.all():
        assert iso_time(version.created_at) == field.to_representation(version.created_at)
    assert iso_time(None) is None


def test_lookups_refuse_and_hide_as_before(actors, shapes):
    """The fast paths fall back to the namespace's and model's own lookups for every miss."""
    mallory = actors.client("mallory")
    assert mallory.get(f"{API}/1").json()["code"] == "not_found"
    carol = actors.client("carol")
    assert carol.get(f"{API}/99").status_code == 404
    assert carol.get(f"{API}/nope").status_code == 404
    assert carol.get("/api/v1/namespaces/acme/models/nope/versions/1").status_code == 404
    assert carol.get("/api/v1/namespaces/nope/models/bert/versions/1").status_code == 404
    # Non-ASCII look-alikes never match (U+017F upper-cases to S, U+212A lower-cases to k).
    assert carol.get("/api/v1/namespaces/acme/models/ber\u0163/versions/1").status_code == 404
    kelvin = API.replace("acme", "a\u212acme")
    assert carol.get(f"{kelvin}/1").status_code == 404
    assert carol.get(f"{API}/1").status_code == 200
    assert carol.get(f"{API}/prod").json()["number"] == 1


SQLITE_SCRIPT = r"""
import io, json, os, django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
out = io.StringIO()
call_command("issue_token", "u", "--namespace", "ns", "--role", "admin",
             "--scopes", "read,write,admin", stdout=out)
token = out.getvalue().strip().splitlines()[-1]
from django.test import Client
c = Client(SERVER_NAME="127.0.0.1", HTTP_AUTHORIZATION=f"Bearer {token}")
api = "/api/v1/namespaces/ns/models"
assert c.post(api, {"name": "m"}, content_type="application/json").status_code == 201
v = c.post(f"{api}/M/versions", {"description": "d"}, content_type="application/json")
put = c.put(f"{api}/m/versions/1/files/w.bin", b"abc", content_type="application/octet-stream")
detail = c.get(f"{api}/m/versions/1").json()
page = c.get(f"{api}/m/versions?limit=1000").json()
print(json.dumps({"create": v.status_code, "put": put.status_code, "detail": detail,
                  "page": page["results"], "bad": c.get(f"{api}/m/versions/2").status_code}))
"""


def test_the_same_on_sqlite(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMR_", "DJANGO_", "DATABASE"))}
    env.update(
        DJANGO_SETTINGS_MODULE="registry.settings",
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        SMR_VAR_DIR=str(tmp_path / "var"),
        SECRET_KEY="k" * 50,
        SMR_KEY_PROVIDER="local",
    )
    done = subprocess.run(  # fixed argv, no shell
        [sys.executable, "-c", SQLITE_SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert (out["create"], out["put"], out["bad"]) == (201, 201, 404)
    detail = out["detail"]
    assert detail["files"][0]["path"] == "w.bin" and detail["total_size"] == 3
    assert detail["created_by"] == "u" and detail["created_at"].endswith("Z")
    assert [v["number"] for v in out["page"]] == [1]
    assert (
        out["page"][0]["description"] == "d"
        and out["page"][0]["created_at"] == detail["created_at"]
    )


def test_namespace_and_model_names_match_in_any_case(actors, draft):
    principal = Principal(user=actors.users["carol"])
    obj = selectors.model_get_for_user(
        principal=principal, namespace="AcMe", name="BERT", action=Action.READ
    )
    assert isinstance(obj, RegisteredModel) and isinstance(obj.namespace, Namespace)
    assert (obj.pk, obj.namespace.name) == (draft.model.pk, "acme")
