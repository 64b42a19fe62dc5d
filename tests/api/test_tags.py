"""Descriptions, tags, list filters and orderings of models and versions."""

from __future__ import annotations

import pytest

from registry.models import AuditEvent, ModelAlias, ModelVersion, VersionState
from registry.services import catalog

API = "/api/v1"
MODELS = f"{API}/namespaces/acme/models"
VERSIONS = f"{MODELS}/bert/versions"


@pytest.fixture
def versions(actors, draft):
    """bert v1..v4 by alice, v3 by root; v2 approved and aliased `staging`."""
    model = draft.model
    for _ in range(3):
        catalog.version_create(model=model, creator=actors.users["alice"])
    ModelVersion.objects.filter(model=model, number=3).update(created_by=actors.users["root"])
    v2 = ModelVersion.objects.get(model=model, number=2)
    ModelVersion.objects.filter(pk=v2.pk).update(state=VersionState.APPROVED)
    ModelAlias.objects.create(model=model, name="staging", version=v2)
    return model


def numbers(response) -> list[int]:
    assert response.status_code == 200, response.content
    return [v["number"] for v in response.json()["results"]]


def test_patch_sets_and_replaces_tags(actors, versions):
    alice = actors.client("alice")
    response = alice.patch(
        f"{VERSIONS}/2", {"tags": {"task": "nlp", "lang": "en"}, "description": "d"}, format="json"
    )
    assert response.status_code == 200, response.content
    assert response.json()["tags"] == {"task": "nlp", "lang": "en"}
    assert response.json()["state"] == "approved" and response.json()["aliases"] == ["staging"]
    response = alice.patch(f"{VERSIONS}/staging", {"tags": {"task": "qa"}}, format="json")
    assert response.json()["tags"] == {"task": "qa"}  # replaced, not merged
    assert alice.get(f"{VERSIONS}/2").json()["description"] == "d"
    event = AuditEvent.objects.filter(action="version.update").order_by("-seq").first()
    assert event is not None and event.target == "acme/bert/v2"
    assert event.details["tags"] == {"task": "qa"}
    response = alice.patch(f"{MODELS}/bert", {"tags": {"team": "search"}}, format="json")
    assert response.status_code == 200 and response.json()["tags"] == {"team": "search"}
    assert AuditEvent.objects.filter(action="model.update").exists()
    # Viewers and other namespaces may not change tags.
    assert (
        actors.client("carol").patch(f"{VERSIONS}/2", {"tags": {}}, format="json").status_code
        == 403
    )
    assert (
        actors.client("mallory").patch(f"{VERSIONS}/2", {"tags": {}}, format="json").status_code
        == 404
    )


@pytest.mark.parametrize(
    "tags",
    [
        ["a"],
        {"a": 1},
        {"a": None},
        {"": "x"},
        {"a:b": "x"},
        {"k" * 65: "x"},
        {"a": "v" * 257},
        {"a": "line\nbreak"},
        {f"k{i}": "v" for i in range(51)},
    ],
)
def test_invalid_tags_are_400(actors, versions, tags):
    response = actors.client("alice").patch(f"{VERSIONS}/1", {"tags": tags}, format="json")
    assert response.status_code == 400, response.content
    response = actors.client("alice").patch(f"{MODELS}/bert", {"tags": tags}, format="json")
    assert response.status_code == 400, response.content


def test_version_filters(actors, versions):
    ModelVersion.objects.filter(model=versions, number__in=[1, 3]).update(tags={"task": "nlp"})
    ModelVersion.objects.filter(model=versions, number=4).update(tags={"task": "nlp", "x": "y"})
    carol = actors.client("carol")
    assert numbers(carol.get(VERSIONS)) == [4, 3, 2, 1]
    assert numbers(carol.get(VERSIONS, {"state": "approved"})) == [2]
    assert numbers(carol.get(VERSIONS, {"tag": "task:nlp"})) == [4, 3, 1]
    assert numbers(carol.get(f"{VERSIONS}?tag=task:nlp&tag=x:y")) == [4]
    assert numbers(carol.get(VERSIONS, {"alias": "staging"})) == [2]
    assert numbers(carol.get(VERSIONS, {"created_by": "root"})) == [3]
    assert numbers(carol.get(VERSIONS, {"ordering": "number"})) == [1, 2, 3, 4]
    for bad in ({"state": "nope"}, {"tag": "novalue"}, {"alias": "9"}, {"ordering": "state"}):
        response = carol.get(VERSIONS, bad)
        assert response.status_code == 400 and response.json()["code"] == "invalid_input", bad


def test_version_pages_keep_the_ordering(actors, versions):
    carol = actors.client("carol")
    first = carol.get(VERSIONS, {"ordering": "number", "limit": 3})
    assert numbers(first) == [1, 2, 3]
    assert numbers(carol.get(first.json()["next"])) == [4]
    first = carol.get(VERSIONS, {"limit": 3})
    assert numbers(first) == [4, 3, 2]
    assert numbers(carol.get(first.json()["next"])) == [1]


def test_model_filters_and_ordering(actors, versions):
    for name in ("albert", "Bertha", "gpt"):
        catalog.model_create(namespace=actors.acme, name=name, creator=actors.users["alice"])
    actors.client("alice").patch(f"{MODELS}/gpt", {"tags": {"kind": "llm"}}, format="json")
    carol = actors.client("carol")

    def names(params):
        response = carol.get(MODELS, params)
        assert response.status_code == 200, response.content
        return [m["name"] for m in response.json()["results"]]

    assert sorted(names({"prefix": "bert"})) == ["Bertha", "bert"]
    assert names({"tag": "kind:llm"}) == ["gpt"]
    assert names({"ordering": "-updated_at"})[0] == "gpt"
    bert = carol.get(f"{MODELS}/bert").json()
    assert bert["aliases"] == {"staging": 2} and bert["tags"] == {}
    assert carol.get(MODELS, {"ordering": "size"}).status_code == 400
    assert carol.get(MODELS, {"tag": "a"}).status_code == 400
    assert actors.client("mallory").get(MODELS, {"tag": "kind:llm"}).status_code == 404
