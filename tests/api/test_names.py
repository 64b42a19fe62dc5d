"""Names over the API: Unicode spellings of paths, case of model names, names of deleted models."""

from __future__ import annotations

import unicodedata
from urllib.parse import quote

import pytest

from registry.errors import InvalidInput
from registry.models import Artifact, ModelVersion, Namespace, RegisteredModel
from registry.services import catalog
from tests.conftest import FILES
from tests.support.http import body, put

API = "/api/v1"
MODELS = f"{API}/namespaces/acme/models"
BERT = f"{MODELS}/bert"

NFC = "r\u00e9sum\u00e9.bin"
NFD = unicodedata.normalize("NFD", NFC)


def error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response.json()["code"] == code
    return response.json()


# --- artifact paths --------------------------------------------------------------------------


def test_nfc_and_nfd_spellings_are_one_file(actors, draft):
    alice = actors.client("alice")
    assert put(alice, NFC, b"first").status_code == 201
    r = put(alice, NFD, b"second")
    assert r.status_code == 201, r.content
    assert r.json()["path"] == NFC
    # One file, replaced, stored under the NFC spelling.
    assert list(Artifact.objects.filter(version=draft).values_list("path", flat=True)) == [NFC]
    for spelling in (NFC, NFD):
        got = alice.get(f"{FILES}/{spelling}")
        assert got.status_code == 200, spelling
        assert body(got) == b"second"


def test_resumable_upload_path_is_normalised(actors, draft):
    r = actors.client("alice").post(
        FILES.rsplit("/files", 1)[0] + "/uploads", {"path": NFD, "size": 3}, format="json"
    )
    assert r.status_code == 201, r.content
    assert r.json()["path"] == NFC


@pytest.mark.parametrize(
    "path",
    ["invoice\u202efdp.exe", "a\u200bb", "a\u2028b", "\u2024\u2024/x", "\uff0e\uff0e/x", "a./b"],
    ids=["rlo", "zwsp", "line-sep", "one-dot-leader", "fullwidth-dots", "trailing-dot"],
)
def test_deceptive_paths_are_400(actors, draft, path):
    error(put(actors.client("alice"), path, b"x"), 400, "invalid_path")
    assert not Artifact.objects.exists()


@pytest.mark.parametrize("method", ["put", "get", "head", "delete"])
def test_path_that_is_not_utf8_is_400_invalid_path(actors, draft, method):
    """%ff%fe decodes to bytes that are not UTF-8; Django would re-quote them to '%FF%FE'."""
    alice = actors.client("alice")
    url = f"{FILES}/%ff%fe"
    r = put(alice, "%ff%fe", b"x") if method == "put" else getattr(alice, method)(url)
    assert r.status_code == 400, (r.status_code, r.content)
    if method != "head":
        assert r.json()["code"] == "invalid_path"
    assert not Artifact.objects.exists()


def test_utf8_and_literal_percent_signs_still_work(actors, draft):
    """Control: properly encoded UTF-8 and a literal '%' are accepted."""
    alice = actors.client("alice")
    for name in ("caf\u00e9 100%.bin", "%41.txt"):
        r = put(alice, quote(name), b"literal")
        assert r.status_code == 201, r.content
        assert r.json()["path"] == name
        assert body(alice.get(f"{FILES}/{quote(name)}")) == b"literal"
    # A name literally spelled like a non-UTF-8 escape is refused too: it would be ambiguous.
    error(put(alice, quote("%FF%FE"), b"x"), 400, "invalid_path")


# --- Content-Disposition ---------------------------------------------------------------------


def test_content_disposition_of_a_non_ascii_name(actors, draft):
    alice = actors.client("alice")
    assert put(alice, f"dir/{NFC}", b"x").status_code == 201
    for r in (alice.get(f"{FILES}/dir/{NFC}"), alice.head(f"{FILES}/dir/{NFC}")):
        assert r.status_code == 200
        value = r["Content-Disposition"]
        assert value.isascii()
        assert value == "attachment; filename=\"r_sum_.bin\"; filename*=UTF-8''r%C3%A9sum%C3%A9.bin"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.bin", 'attachment; filename="model.bin"'),
        (
            'a"b;100%.bin',
            "attachment; filename=\"a_b;100_.bin\"; filename*=UTF-8''a%22b%3B100%25.bin",
        ),
    ],
)
def test_content_disposition_of_ascii_names(actors, draft, name, expected):
    alice = actors.client("alice")
    assert put(alice, quote(name), b"x").status_code == 201
    assert alice.head(f"{FILES}/{quote(name)}")["Content-Disposition"] == expected


# --- namespace and model names ---------------------------------------------------------------


def test_model_names_are_unique_ignoring_case(actors, draft):
    alice = actors.client("alice")
    for name in ("BERT", "Bert", "bErT"):
        error(alice.post(MODELS, {"name": name}, format="json"), 409, "already_exists")
    assert RegisteredModel.objects.filter(namespace=actors.acme).count() == 1
    # Another namespace may still use the name.
    assert (
        actors.client("mallory")
        .post(f"{API}/namespaces/evil/models", {"name": "BERT"}, format="json")
        .status_code
        == 201
    )


def test_model_and_namespace_lookups_ignore_case(actors, draft):
    carol = actors.client("carol")
    for url in (f"{MODELS}/BERT", f"{API}/namespaces/ACME/models/Bert"):
        r = carol.get(url)
        assert r.status_code == 200, url
        assert r.json()["name"] == "bert"  # the stored spelling
    assert carol.get(f"{MODELS}/BERT/versions/1").json()["number"] == 1
    # Control: a different name is still 404, and case-folding does not leak other teams.
    error(carol.get(f"{MODELS}/bart"), 404, "not_found")
    error(actors.client("mallory").get(f"{API}/namespaces/ACME"), 404, "not_found")


def test_non_ascii_name_lookups_are_404(actors, draft):
    # U+017F LATIN SMALL LETTER LONG S upper-cases to 'S' in PostgreSQL; no name may match it.
    actors.client("alice").post(MODELS, {"name": "sbert"}, format="json")
    error(actors.client("carol").get(f"{MODELS}/\u017fbert"), 404, "not_found")


def test_namespace_names_are_unique_ignoring_case(actors):
    # Names are lowercase by rule; a row written around the rule still cannot clash.
    from django.db import IntegrityError, transaction

    with pytest.raises(IntegrityError), transaction.atomic():
        Namespace.objects.create(name="ACME")


@pytest.mark.parametrize(
    "name",
    ["bert\n", "be\u202ert", "b\u200bert", "bert\u2028"],
    ids=["trailing-newline", "rlo", "zwsp", "line-sep"],
)
def test_model_names_with_control_characters_are_refused(actors, name):
    with pytest.raises(InvalidInput):
        catalog.model_create(namespace=actors.acme, name=name, creator=actors.users["alice"])
    with pytest.raises(InvalidInput):
        catalog.namespace_create(name=name.lower(), creator=actors.users["alice"])
    assert not RegisteredModel.objects.exists()
    error(
        actors.client("alice").post(MODELS, {"name": "be\u202ert"}, format="json"),
        400,
        "invalid_input",
    )


# --- deleted models --------------------------------------------------------------------------


def test_version_numbers_are_never_reused_after_a_model_is_deleted(actors, draft):
    alice, root = actors.client("alice"), actors.client("root")
    assert put(alice, "a.bin", b"old bytes").status_code == 201
    assert root.delete(BERT).status_code == 204

    r = alice.post(MODELS, {"name": "bert"}, format="json")
    assert r.status_code == 201, r.content
    r = alice.post(f"{BERT}/versions", {}, format="json")
    assert r.status_code == 201, r.content
    assert r.json()["number"] == 2
    # The pinned URL of the deleted version is gone for good, not pointing at other bytes.
    error(alice.get(f"{BERT}/versions/1"), 404, "not_found")
    error(alice.get(f"{BERT}/versions/1/files/a.bin"), 404, "not_found")
    # Deleted models are not listed; the recreated one is, once.
    assert [m["name"] for m in alice.get(MODELS).json()["results"]] == ["bert"]

    # Again, under another spelling of the same name: numbering still continues.
    assert root.delete(f"{MODELS}/BERT").status_code == 204
    assert alice.post(MODELS, {"name": "Bert"}, format="json").status_code == 201
    assert alice.post(f"{MODELS}/Bert/versions", {}, format="json").json()["number"] == 3


def test_a_deleted_model_name_in_another_namespace_does_not_count(actors, draft):
    assert actors.client("root").delete(BERT).status_code == 204
    mallory = actors.client("mallory")
    r = mallory.post(f"{API}/namespaces/evil/models", {"name": "bert"}, format="json")
    assert r.status_code == 201
    r = mallory.post(f"{API}/namespaces/evil/models/bert/versions", {}, format="json")
    assert r.json()["number"] == 1


def test_version_numbers_continue_in_the_service(actors, draft):
    model = draft.model
    v2 = catalog.version_create(model=model, creator=actors.users["alice"])
    assert v2.number == 2
    catalog.model_delete(model=model)
    again = catalog.model_create(namespace=actors.acme, name="bert", creator=actors.users["alice"])
    assert catalog.version_create(model=again, creator=actors.users["alice"]).number == 3
    assert not ModelVersion.objects.filter(model=again, number__lte=2).exists()
