"""In a browser: an admin registers a dataset and a block through the forms, two runs are
declared on it, and the budget plot shows the numbers the ledger API returns."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from registry.dp.accounting import DpEvent
from registry.models import Dataset
from registry.services import catalog, ledger
from tests.dashboard.conftest import sign_in

pytestmark = pytest.mark.django_db(transaction=True)

RUNS = (
    DpEvent(sampling_rate=0.01, noise_multiplier=1.0, steps=1000),
    DpEvent(sampling_rate=0.02, noise_multiplier=1.2, steps=500),
)


def test_the_budget_plot_shows_the_ledger_apis_numbers(page, site, actors, draft):
    sign_in(page, site, "root")
    page.goto(f"{site}/ns/acme/-/datasets")
    expect(page.get_by_text("No datasets registered in acme yet")).to_be_visible()
    page.get_by_label("Name").fill("clinic")
    page.get_by_label("Sensitivity").select_option("confidential")
    page.get_by_label("δ (every ledger entry reports ε at this δ)").fill("1e-5")
    page.get_by_role("button", name="Register dataset").click()
    page.wait_for_url("**/ns/acme/-/datasets/clinic")
    page.get_by_label("Name").fill("b")
    page.get_by_label("ε cap").fill("8")
    page.get_by_role("button", name="Add block").click()
    expect(page.get_by_role("heading", name="Block b")).to_be_visible()

    dataset = Dataset.objects.get(name="clinic")
    alice = actors.users["alice"]
    second = catalog.version_create(model=draft.model, creator=alice)
    for version, event in zip((draft, second), RUNS, strict=True):
        ledger.dp_record_declare(
            version=version, dataset=dataset, blocks=["b"], event=event, creator=alice
        )
    page.reload()

    # The API, called with the browser's own session.
    api = f"{site}/api/v1/namespaces/acme/datasets/clinic"
    budget = page.request.get(f"{api}/budget").json()
    entries = page.request.get(f"{api}/ledger").json()["results"]
    spent = budget["blocks"][0]["spent_epsilon"]

    points = page.locator("section[data-block='b'] circle.datasets-point")
    expect(points).to_have_count(2)
    plotted = [float(points.nth(i).get_attribute("data-epsilon")) for i in range(2)]
    assert plotted[-1] == pytest.approx(spent, abs=5e-5)
    # The first point is the first commit alone: the API's epsilon of that entry.
    commits = [e for e in entries if e["kind"] == "commit"]
    assert plotted[0] == pytest.approx(commits[0]["epsilon"], abs=5e-5)
    assert plotted[0] < plotted[1] < budget["blocks"][0]["cap_epsilon"]
    assert f"{spent:.4f}" in points.nth(1).locator("title").text_content()
    # The same numbers as text, beside the plot.
    table = page.locator("section[data-block='b'] table.datasets-history td[data-epsilon]")
    assert table.all_text_contents() == [f"{e:.4f}" for e in plotted]
    expect(page.locator("section[data-block='b'] [data-spent]")).to_have_text(f"{spent:.4f}")
    # The ledger table lists every entry the API returns, with its epsilon.
    rows = page.locator("table.datasets-ledger tbody tr")
    expect(rows).to_have_count(len(entries))
    shown = {
        (
            r.get_attribute("data-entry"),
            r.get_attribute("data-kind"),
            r.get_attribute("data-epsilon"),
        )
        for r in rows.all()
    }
    assert shown == {(str(e["id"]), e["kind"], f"{e['epsilon']:.4f}") for e in entries}
