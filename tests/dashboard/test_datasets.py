"""Dataset pages (registry/dashboard/views/datasets.py): budget plots with the ledger's
numbers, the ledger, DP results, live jobs, and the admins' forms."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from registry.dp import accounting
from registry.dp.accounting import DpEvent
from registry.models import DataBlock, Dataset, JobKind, LedgerEntry
from registry.services import catalog, jobs, ledger

pytestmark = pytest.mark.django_db

RUN_A = DpEvent(sampling_rate=0.01, noise_multiplier=1.0, steps=1000)
RUN_B = DpEvent(sampling_rate=0.02, noise_multiplier=1.2, steps=500)


def signed_in(actors, name: str) -> Client:
    client = Client()
    client.force_login(actors.users[name])
    return client


def point_epsilons(html: str) -> list[str]:
    return re.findall(r'<circle class="datasets-point"[^>]* data-epsilon="([0-9.]+)"', html)


@pytest.fixture
def clinic(actors, draft) -> Dataset:
    """acme's confidential dataset `clinic`: block b (cap 8, RDP) with two declared runs."""
    alice = actors.users["alice"]
    dataset = ledger.dataset_create(
        namespace=actors.acme, name="clinic", sensitivity="confidential", delta=1e-5, creator=alice
    )
    ledger.data_block_create(
        dataset=dataset, name="b", epsilon=8.0, accountant="rdp", creator=alice
    )
    second = catalog.version_create(model=draft.model, creator=alice)
    for version, event in ((draft, RUN_A), (second, RUN_B)):
        ledger.dp_record_declare(
            version=version, dataset=dataset, blocks=["b"], event=event, creator=alice
        )
    return dataset


def test_the_budget_plot_recomposes_each_commit_and_ends_at_the_apis_spent(actors, clinic):
    html = signed_in(actors, "carol").get("/ns/acme/-/datasets/clinic").content.decode()
    first = accounting.epsilon([RUN_A], delta=1e-5, accountant="rdp")
    both = accounting.epsilon([RUN_A, RUN_B], delta=1e-5, accountant="rdp")
    assert point_epsilons(html) == [f"{first:.4f}", f"{both:.4f}"]
    # Composition, not a sum of the entries' own epsilons.
    alone = accounting.epsilon([RUN_B], delta=1e-5, accountant="rdp")
    assert both < first + alone
    budget = actors.client("carol").get("/api/v1/namespaces/acme/datasets/clinic/budget").json()
    spent = budget["blocks"][0]["spent_epsilon"]
    assert point_epsilons(html)[-1] == f"{spent:.4f}"
    assert f'data-spent="{spent:.4f}"' in html
    # Every plotted number is in the table beside it, and the cap is drawn and labelled.
    assert re.findall(r'<td data-epsilon="([0-9.]+)">', html) == point_epsilons(html)
    assert 'data-cap="8"' in html and "cap ε = 8" in html
    assert "<title>" in html and "time of commit (UTC)" in html


def test_the_ledger_table_shows_the_apis_entries(actors, clinic):
    html = signed_in(actors, "carol").get("/ns/acme/-/datasets/clinic").content.decode()
    api = actors.client("carol").get("/api/v1/namespaces/acme/datasets/clinic/ledger").json()
    rows = re.findall(r'<tr data-entry="(\d+)" data-kind="(\w+)" data-epsilon="([0-9.]+)">', html)
    expected = [(str(e["id"]), e["kind"], f"{e['epsilon']:.4f}") for e in api["results"]]
    assert sorted(rows) == sorted(expected) and len(rows) == 4
    assert "bert v1" in html and "bert v2" in html and "declared" in html


def test_the_ledger_pages_by_entry_id(actors, clinic, monkeypatch):
    from registry.dashboard.views import datasets

    monkeypatch.setattr(datasets, "LEDGER_PAGE", 3)
    carol = signed_in(actors, "carol")
    html = carol.get("/ns/acme/-/datasets/clinic").content.decode()
    ids = [int(i) for i in re.findall(r'<tr data-entry="(\d+)"', html)]
    older = re.search(r'<a href="([^"]+)" rel="next">Older entries', html).group(1)
    rest = [
        int(i) for i in re.findall(r'<tr data-entry="(\d+)"', carol.get(older).content.decode())
    ]
    all_ids = sorted(LedgerEntry.objects.values_list("id", flat=True), reverse=True)
    assert ids + rest == all_ids and len(ids) == 3


def dp_job(actors, state: str, result: dict | None = None, progress: float = 0.0):
    job = jobs.job_create(
        kind=JobKind.DP_RETRAIN,
        namespace=actors.acme,
        created_by=actors.users["alice"],
        params={"dataset": "clinic", "blocks": ["b"], "model": "bert"},
    )
    if state != "queued":
        jobs.job_start(job_id=job.pk)
        jobs.job_progress(job_id=job.pk, progress=progress, message="epoch 3 of 10")
    if state == "succeeded":
        jobs.job_finish(job_id=job.pk, result=result)
    return job


def test_dp_results_are_plotted_and_tabled(actors, clinic):
    dp_job(
        actors,
        "succeeded",
        {
            "epsilon": 3.98766,
            "accuracy": 0.91234,
            "membership_inference": {"auc": 0.51234},
            "model": "bert",
            "version": 7,
        },
    )
    html = signed_in(actors, "carol").get("/ns/acme/-/datasets/clinic").content.decode()
    assert 'data-epsilon="3.9877" data-accuracy="0.9123" data-auc="0.5123"' in html
    assert "<td>3.9877</td>" in html and "<td>0.9123</td>" in html and "<td>0.5123</td>" in html
    assert "bert v7" in html


def test_running_jobs_poll_their_fragment_until_done(actors, clinic):
    job = dp_job(actors, "running", progress=0.3)
    carol = signed_in(actors, "carol")
    html = carol.get("/ns/acme/-/datasets/clinic").content.decode()
    assert 'hx-trigger="every 2s"' in html
    fragment = carol.get("/ns/acme/-/datasets/clinic/jobs").content.decode()
    assert fragment.startswith('<section id="dataset-jobs"') and "<html" not in fragment
    assert 'max="1" value="0.300"' in fragment and "epoch 3 of 10" in fragment
    jobs.job_finish(job_id=job.pk, result={})
    fragment = carol.get("/ns/acme/-/datasets/clinic/jobs").content.decode()
    assert "hx-trigger" not in fragment and 'data-state="succeeded"' in fragment


def test_admins_create_datasets_and_blocks_others_see_no_forms(actors, clinic):
    carol = signed_in(actors, "carol")
    assert "Register a dataset" not in carol.get("/ns/acme/-/datasets").content.decode()
    assert "Add a block" not in carol.get("/ns/acme/-/datasets/clinic").content.decode()
    root = signed_in(actors, "root")
    assert "Register a dataset" in root.get("/ns/acme/-/datasets").content.decode()
    form = {"name": "wards", "sensitivity": "restricted", "privacy_unit": "user", "delta": "1e-6"}
    response = root.post("/ns/acme/-/datasets", form)
    assert response.status_code == 302 and response["Location"] == "/ns/acme/-/datasets/wards"
    wards = Dataset.objects.get(name="wards")
    assert (wards.sensitivity, wards.privacy_unit, wards.delta) == ("restricted", "user", 1e-6)
    response = root.post(
        "/ns/acme/-/datasets/wards/blocks", {"name": "w1", "epsilon": "2.5", "accountant": "pld"}
    )
    assert response.status_code == 302
    block = DataBlock.objects.get(dataset=wards)
    assert (block.name, block.epsilon, block.accountant, block.delta) == ("w1", 2.5, "pld", 1e-6)


def test_bad_input_is_the_services_message_with_its_code(actors, clinic):
    root = signed_in(actors, "root")
    page = root.post("/ns/acme/-/datasets", {"name": "x", "sensitivity": "public", "delta": "lots"})
    assert page.status_code == 400
    assert "delta must be a number. (invalid_input)" in page.content.decode()
    assert 'value="x"' in page.content.decode()  # the form keeps what was typed
    page = root.post(
        "/ns/acme/-/datasets", {"name": "clinic", "sensitivity": "public", "delta": "0.1"}
    )
    assert "(already_exists)" in page.content.decode()
    page = root.post(
        "/ns/acme/-/datasets/clinic/blocks",
        {"name": "c", "epsilon": "1", "accountant": "rdp", "model": "bert"},
        follow=True,
    )
    assert "(invalid_input)" in page.content.decode()
    assert not DataBlock.objects.filter(name="c").exists()


def test_forged_posts_from_non_admins_are_refused(actors, clinic):
    alice = signed_in(actors, "alice")
    form = {"name": "sneaky", "sensitivity": "public", "delta": "0.1"}
    assert alice.post("/ns/acme/-/datasets", form).status_code == 403
    response = alice.post(
        "/ns/acme/-/datasets/clinic/blocks", {"name": "more", "epsilon": "100", "accountant": "rdp"}
    )
    assert response.status_code == 403
    assert not Dataset.objects.filter(name="sneaky").exists()
    assert not DataBlock.objects.filter(name="more").exists()


def test_another_namespace_sees_nothing(actors, clinic):
    mallory = signed_in(actors, "mallory")
    for url in (
        "/ns/acme/-/datasets",
        "/ns/acme/-/datasets/clinic",
        "/ns/acme/-/datasets/clinic/jobs",
    ):
        page = mallory.get(url)
        assert page.status_code == 404
        assert "clinic" not in page.content.decode()
    assert mallory.post("/ns/acme/-/datasets/clinic/blocks", {"name": "x"}).status_code == 404


def test_empty_states_say_what_to_do(actors):
    root = signed_in(actors, "root")
    assert "No datasets registered in acme yet" in root.get("/ns/acme/-/datasets").content.decode()
    ledger.dataset_create(
        namespace=actors.acme,
        name="new",
        sensitivity="public",
        delta=1e-5,
        creator=actors.users["root"],
    )
    html = root.get("/ns/acme/-/datasets/new").content.decode()
    assert "This dataset has no blocks yet" in html and "The ledger is empty" in html


def test_the_dataset_page_reads_in_a_bounded_number_of_queries(actors, clinic):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    carol = signed_in(actors, "carol")

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert carol.get("/ns/acme/-/datasets/clinic").status_code == 200
        return len(captured)

    before = queries()
    alice = actors.users["alice"]
    for i in range(4):
        version = catalog.version_create(model=clinic.ledger.first().version.model, creator=alice)
        ledger.dp_record_declare(
            version=version, dataset=clinic, blocks=["b"], event=RUN_B, creator=alice
        )
        dp_job(actors, "succeeded", {"epsilon": 1.0 + i, "accuracy": 0.5})
    assert queries() == before
