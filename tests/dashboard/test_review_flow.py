"""The review flow in a real browser (issue 11's acceptance): bob finds alice's version in his
queue, reads the findings of another of her versions file by file, approves the clean one with
a comment; alice sees it approved, has no review control on her own versions, and a review
forged from her signed-in session is refused by the service.

bob is a reviewer, and a quarantined version's findings are for its owner and admins only
(selectors.scan_findings_visible). So the malicious upload here is a pickle that calls
`mylib.payloads.Runner("echo pwned")` on load, a HIGH finding, in a namespace that quarantines
at CRITICAL: it stays pending review with its findings reported, where reviewers see them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import expect

from registry.models import Review, VersionState
from registry.services import approvals, catalog
from tests.dashboard.conftest import sign_in
from tests.dashboard.test_browse import UNKNOWN_CALL_PICKLE, safetensors_file
from tests.registry.services.test_approvals import pending

pytestmark = pytest.mark.django_db(transaction=True)


def shot(page, name: str) -> None:
    """A screenshot for the README's gallery, when SMR_SCREENSHOTS names a folder."""
    folder = os.environ.get("SMR_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def file_row(page, path: str):
    return page.locator("table.files tbody tr", has=page.locator("code", has_text=path))


@pytest.fixture
def bert(actors):
    approvals.policy_update(namespace=actors.acme, scan_quarantine_severity="critical")
    alice = actors.users["alice"]
    model = catalog.model_create(namespace=actors.acme, name="bert", creator=alice)
    catalog.model_update(model=model, description="A **BERT** base model, fine-tuned.")
    clean = pending(
        catalog.version_create(model=model, creator=alice),
        alice,
        {"config.json": b'{"hidden_size": 768}', "model.safetensors": safetensors_file()},
    )
    malicious = pending(
        catalog.version_create(model=model, creator=alice),
        alice,
        {"config.json": b'{"hidden_size": 768}', "model.pkl": UNKNOWN_CALL_PICKLE},
    )
    return clean, malicious


def test_bob_reviews_alice_sees_it_approved_and_cannot_review_her_own(page, site, actors, bert):
    clean, malicious = bert
    v1, v2 = f"{site}/ns/acme/bert/v/{clean.number}", f"{site}/ns/acme/bert/v/{malicious.number}"

    sign_in(page, site, "bob")
    page.get_by_role("link", name="Reviews").click()
    expect(page.get_by_role("heading", name="Review queue")).to_be_visible()
    queue = page.locator("table tbody tr")
    expect(queue).to_have_count(2)
    expect(queue.nth(0)).to_contain_text("acme/bert")
    expect(queue.nth(0)).to_contain_text("alice")
    expect(queue.nth(0).get_by_role("link", name="v1")).to_be_visible()
    expect(queue.nth(1)).to_contain_text("1 file with findings, up to high")
    shot(page, "review-queue")

    # The malicious upload: findings per file, rule, severity and what they reference.
    queue.nth(1).get_by_role("link", name="v2").click()
    page.wait_for_url(v2)
    pickle_row = page.locator(
        "table.files tbody tr", has=page.locator("code", has_text="model.pkl")
    )
    expect(pickle_row).to_contain_text("findings · high")
    expect(pickle_row).to_contain_text("pickle.global.not_allowed")
    expect(pickle_row).to_contain_text("references mylib.payloads.Runner")
    config_row = page.locator(
        "table.files tbody tr", has=page.locator("code", has_text="config.json")
    )
    expect(config_row).to_contain_text("clean")
    expect(config_row).not_to_contain_text("pickle.global")
    shot(page, "version-findings")

    # The clean one: its safetensors header read by a ranged download, then the approval.
    page.goto(v1)
    expect(page.locator(".st")).to_contain_text("2 tensors, 9 parameters")
    page.get_by_label("Approve").check()
    page.get_by_label("Comment").fill("Scan clean, config matches the card. Approved.")
    shot(page, "version-review")
    page.get_by_role("button", name="Record review").click()
    expect(page.get_by_role("status")).to_contain_text("is approved")
    expect(page.locator("#version-state")).to_have_text("approved")
    expect(page.locator("#review-form")).to_have_count(0)
    page.get_by_role("button", name="Sign out").click()

    sign_in(page, site, "alice")
    page.goto(v1)
    expect(page.locator("#version-state")).to_have_text("approved")
    expect(page.locator(".reviews")).to_contain_text("approve by bob")
    expect(page.locator(".reviews")).to_contain_text("Scan clean, config matches the card.")
    expect(page.locator("#review-form")).to_have_count(0)
    expect(page.get_by_role("button", name="Record review")).to_have_count(0)
    shot(page, "version-approved")
    page.goto(v2)
    expect(page.locator("#version-state")).to_have_text("pending_review")
    expect(page.locator("#review-form")).to_have_count(0)

    # A review forged from alice's signed-in session, with a valid CSRF token: the service
    # refuses it (her role may not review; it is her own upload anyway) and nothing is recorded.
    csrf = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    response = page.request.post(
        f"{v2}/review",
        form={"csrfmiddlewaretoken": csrf, "decision": "approve", "comment": "forged"},
        headers={"X-CSRFToken": csrf},
        max_redirects=0,
    )
    assert response.status == 403 and "permission_denied" in response.text()
    assert not Review.objects.filter(reviewer=actors.users["alice"]).exists()
    malicious.refresh_from_db()
    assert malicious.state == VersionState.PENDING_REVIEW
    assert list(Review.objects.values_list("reviewer__username", "decision", "comment")) == [
        ("bob", "approve", "Scan clean, config matches the card. Approved.")
    ]
