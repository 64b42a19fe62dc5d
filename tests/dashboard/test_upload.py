"""The upload pages through Django's test client: new model, new draft, the uploader page, the
files and scan-status fragments, submit (with htmx and without); who may use them."""

from __future__ import annotations

import re

import pytest

from registry.models import AuditEvent, ModelVersion, RegisteredModel, VersionState
from registry.services import catalog, scanning
from registry.services.artifacts import artifact_upload
from tests.registry.scanners.corpus import OS_SYSTEM

UPLOAD = "/ns/acme/bert/v/1/upload"


@pytest.fixture
def web(client, actors):
    def signed_in(name: str):
        client.force_login(actors.users[name])
        return client

    return signed_in


def put(version: ModelVersion, user, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        artifact_upload(
            version=version,
            path=path,
            chunks=[data],
            expected_sha256=None,
            expected_size=len(data),
            creator=user,
        )


def html(response) -> str:
    return response.content.decode()


def no_inline_script_or_style(text: str) -> None:
    assert not re.search(r"<script(?![^>]*\ssrc=)[^>]*>", text), "inline <script>"
    assert " style=" not in text and "<style" not in text
    assert not re.search(r"\son[a-z]+=", text), "an on* attribute"
    assert "hx-on" not in text


def test_new_model_creates_it_and_goes_to_its_upload_page(web, actors):
    alice = web("alice")
    page = alice.get("/ns/acme/-/new-model")
    assert page.status_code == 200
    text = html(page)
    assert '<label for="model-name">' in text and 'id="model-name"' in text
    assert "csrfmiddlewaretoken" in text
    no_inline_script_or_style(text)

    response = alice.post("/ns/acme/-/new-model", {"name": "bert", "description": "A *BERT*"})
    assert response.status_code == 302 and response["Location"] == "/ns/acme/bert/upload"
    model = RegisteredModel.objects.get(namespace=actors.acme, name="bert")
    assert model.created_by == actors.users["alice"] and model.description == "A *BERT*"

    again = alice.post("/ns/acme/-/new-model", {"name": "BERT"})
    assert again.status_code == 409
    assert "(already_exists)" in html(again) and 'value="BERT"' in html(again)
    bad = alice.post("/ns/acme/-/new-model", {"name": "no spaces"})
    assert bad.status_code == 400 and "(invalid_input)" in html(bad)
    assert RegisteredModel.objects.filter(namespace=actors.acme).count() == 1


def test_only_writers_may_create_models(web, actors):
    # carol views acme: the page is refused, and so is a forged POST.
    carol = web("carol")
    assert carol.get("/ns/acme/-/new-model").status_code == 403
    forged = carol.post("/ns/acme/-/new-model", {"name": "sneaky"})
    assert forged.status_code == 403 and "(permission_denied)" in html(forged)
    # mallory is not a member: acme does not exist for her.
    mallory = web("mallory")
    assert mallory.get("/ns/acme/-/new-model").status_code == 404
    assert mallory.post("/ns/acme/-/new-model", {"name": "sneaky"}).status_code == 404
    assert not RegisteredModel.objects.filter(name="sneaky").exists()


def test_anonymous_visitors_are_sent_to_the_login_page(client, draft):
    for url in ("/ns/acme/-/new-model", "/ns/acme/bert/upload", UPLOAD, f"{UPLOAD}/status"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login?next=")
    assert client.post(f"{UPLOAD}/submit").status_code == 302
    assert ModelVersion.objects.get(pk=draft.pk).state == VersionState.DRAFT


def test_model_upload_page_lists_your_drafts_and_creates_one(web, actors):
    model = catalog.model_create(namespace=actors.acme, name="bert", creator=actors.users["alice"])
    alice = web("alice")
    empty = html(alice.get("/ns/acme/bert/upload"))
    assert "You have no draft of bert" in empty

    response = alice.post("/ns/acme/bert/upload", {"description": "first"})
    assert response.status_code == 302 and response["Location"] == UPLOAD
    version = ModelVersion.objects.get(model=model, number=1)
    assert version.state == VersionState.DRAFT and version.created_by == actors.users["alice"]
    listed = html(alice.get("/ns/acme/bert/upload"))
    assert f'href="{UPLOAD}"' in listed and "first" in listed
    # root's drafts are root's: alice's list does not offer them.
    catalog.version_create(model=model, creator=actors.users["root"])
    assert "/ns/acme/bert/v/2/upload" not in html(alice.get("/ns/acme/bert/upload"))
    # bob reviews: he may not start versions, not even with a forged POST.
    bob = web("bob")
    assert bob.get("/ns/acme/bert/upload").status_code == 403
    assert bob.post("/ns/acme/bert/upload").status_code == 403
    assert ModelVersion.objects.filter(model=model).count() == 2


def test_upload_page_of_a_draft(web, draft):
    alice = web("alice")
    page = alice.get(UPLOAD)
    assert page.status_code == 200
    text = html(page)
    no_inline_script_or_style(text)
    assert 'data-api="/api/v1/namespaces/acme/models/bert/versions/1"' in text
    assert 'data-version="acme/bert/1"' in text
    # Both pickers are labelled; the folder one takes folders.
    assert '<label for="pick-folder">' in text and '<label for="pick-files">' in text
    assert re.search(r'<input type="file" id="pick-folder" webkitdirectory multiple>', text)
    assert "Resume: choose the same files again." in text
    assert "No files in version 1 yet" in text
    assert "/static/dashboard/upload.js" in text
    # A csrftoken cookie for the script's X-CSRFToken header.
    assert "csrftoken" in page.cookies
    assert 'hx-trigger="every 1s"' not in text  # nothing to poll for a draft


def test_upload_page_is_for_the_versions_owner(web, draft):
    # Another contributor's draft, a reviewer, a viewer: 403; another team: 404.
    for name in ("bob", "carol", "dave"):
        assert web(name).get(UPLOAD).status_code == 403, name
    mallory = web("mallory")
    response = mallory.get(UPLOAD)
    assert response.status_code == 404 and "bert" not in html(response)
    assert mallory.get(f"{UPLOAD}/status").status_code == 404
    assert mallory.get(f"{UPLOAD}/files").status_code == 404
    # root administers acme: any draft.
    assert web("root").get(UPLOAD).status_code == 200


def test_files_fragment_lists_what_was_uploaded(web, actors, draft):
    put(draft, actors.users["alice"], {"b/weights.bin": b"\0" * 10, "a.json": b"{}"})
    text = html(web("alice").get(f"{UPLOAD}/files"))
    assert text.index("a.json") < text.index("b/weights.bin")
    assert "2 files in version 1" in text
    assert 'hx-trigger="smr:uploaded from:body delay:300ms"' in text


def test_submit_without_files_shows_the_code_beside_the_button(web, draft):
    alice = web("alice")
    response = alice.post(f"{UPLOAD}/submit", HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    assert response["HX-Retarget"] == "#submit-error"
    assert "(empty_version)" in html(response)
    # Without htmx: back to the page, with the message.
    plain = alice.post(f"{UPLOAD}/submit", follow=True)
    assert "(empty_version)" in html(plain)
    assert ModelVersion.objects.get(pk=draft.pk).state == VersionState.DRAFT


def test_submit_then_the_status_polls_until_the_scan_ends(web, actors, draft):
    put(draft, actors.users["alice"], {"config.json": b'{"a": 1}'})
    alice = web("alice")
    response = alice.post(f"{UPLOAD}/submit", HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    text = html(response)
    assert "Scanning" in text and 'hx-trigger="every 1s"' in text
    assert f'hx-get="{UPLOAD}/status"' in text and 'role="status"' in text
    version = ModelVersion.objects.get(pk=draft.pk)
    assert version.state == VersionState.SCANNING and version.submitted_by == actors.users["alice"]
    assert "waiting for a scanner" in html(alice.get(f"{UPLOAD}/status"))

    assert scanning.version_scan(job_id=version.scan_job_id) == VersionState.PENDING_REVIEW
    done = html(alice.get(f"{UPLOAD}/status"))
    assert "Pending review" in done and "hx-trigger" not in done
    # The page itself shows the status, no uploader, for a submitted version.
    page = html(alice.get(UPLOAD))
    assert "Pending review" in page and 'id="uploader"' not in page
    # Submitting twice: refused by the service, with its code.
    again = alice.post(f"{UPLOAD}/submit", HTTP_HX_REQUEST="true")
    assert "(version_not_draft)" in html(again)


def test_a_failed_scan_stops_the_polling(web, actors, draft):
    put(draft, actors.users["alice"], {"config.json": b"{}"})
    _, job = catalog.version_submit(version=draft, submitter=actors.users["alice"])
    job.state, job.error_code = "failed", "scan_failed"
    job.save(update_fields=["state", "error_code"])
    text = html(web("alice").get(f"{UPLOAD}/status"))
    assert "(scan_failed)" in text and "hx-trigger" not in text


def test_quarantined_shows_the_findings_to_the_owner_only(web, actors, draft):
    put(draft, actors.users["alice"], {"model.pkl": OS_SYSTEM, "config.json": b"{}"})
    _, job = catalog.version_submit(version=draft, submitter=actors.users["alice"])
    assert scanning.version_scan(job_id=job.pk) == VersionState.QUARANTINED
    text = html(web("alice").get(f"{UPLOAD}/status"))
    assert "Quarantined" in text and "hx-trigger" not in text
    assert "model.pkl" in text and "os" in text and "config.json" not in text
    # carol may read the version's state, not how to attack a loader.
    hidden = html(web("carol").get(f"{UPLOAD}/status"))
    assert "Quarantined" in hidden and "model.pkl" not in hidden
    assert "for its owner and the namespace's admins" in hidden


def test_a_forged_submit_by_someone_else_is_refused(web, actors, draft):
    put(draft, actors.users["alice"], {"config.json": b"{}"})
    for name, status in (("bob", 403), ("carol", 403), ("mallory", 404)):
        response = web(name).post(f"{UPLOAD}/submit", HTTP_HX_REQUEST="true")
        assert response.status_code == status, name
    assert ModelVersion.objects.get(pk=draft.pk).state == VersionState.DRAFT
    refused = AuditEvent.objects.filter(action="access.denied", target="acme/bert/v1")
    assert refused.count() >= 2


def test_the_upload_page_stays_small_for_a_version_with_many_files(
    web, actors, draft, django_assert_max_num_queries
):
    put(draft, actors.users["alice"], {f"f{i:04d}.txt": b"x" for i in range(250)})
    alice = web("alice")
    with django_assert_max_num_queries(25):
        text = html(alice.get(UPLOAD))
    assert "250 files in version 1; the first 200 by path" in text
    assert "f0199.txt" in text and "f0200.txt" not in text
