"""In a browser: dave (auditor) filters the audit log to artifact.download, finds bob's
download with its digest, and "Verify now" shows the log intact."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.conftest import FILES
from tests.dashboard.conftest import sign_in
from tests.registry.services.test_approvals import pending

pytestmark = pytest.mark.django_db(transaction=True)


def test_dave_finds_bobs_download_and_verifies_the_log(page, site, actors, draft):
    version = pending(draft, actors.users["alice"], {"config.json": b'{"layers": 12}'})
    digest = version.artifacts.get(path="config.json").sha256
    # bob's download through the REST API: the audit event's actor is bob.
    response = actors.client("bob").get(f"{FILES}/config.json")
    assert b"".join(response.streaming_content) == b'{"layers": 12}'

    sign_in(page, site, "dave")
    page.goto(f"{site}/audit")
    rows = page.locator("table.audit-events tbody tr")
    assert rows.count() > 1  # uploads, the submit, the scan... before filtering
    page.get_by_label("Action").select_option("artifact.download")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url("**/audit?*action=artifact.download*")
    expect(rows).to_have_count(1)
    row = rows.first
    expect(row.locator(".audit-user")).to_have_text("bob")
    expect(row).to_contain_text("artifact.download")
    expect(row.locator(".audit-digest")).to_have_text(digest)
    assert (
        page.get_by_role("link", name="Export these events (JSON Lines)")
        .get_attribute("href")
        .endswith("?action=artifact.download")
    )

    filtered_url = page.url
    page.get_by_role("button", name="Verify now").click()
    result = page.locator("#verify-result")
    expect(result).to_contain_text("intact")
    assert page.url == filtered_url  # htmx swapped the result in; the filters stay
