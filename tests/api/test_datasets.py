"""Datasets, blocks and the DP budget ledger over HTTP: declared runs, dp_retrain admission and
cancel, and the dp_budget gate.

No worker runs here: a dp_retrain job is only admitted (its claim reserved) and cancelled; the
training itself is tested with the worker. Scans run in-process (the service a worker calls).
tests/api/test_access_matrix.py covers who may call each endpoint.
"""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest

from registry.models import Job, JobKind, LedgerEntry, RegisteredModel, VersionState
from registry.services import scanning

API = "/api/v1"
ACME = f"{API}/namespaces/acme"
DATASETS = f"{ACME}/datasets"
CENSUS = f"{DATASETS}/census"
DATA = f"{ACME}/models/digits-data/versions"
BERT = f"{ACME}/models/bert/versions"
OCTET = "application/octet-stream"
RECORDS = 200
CAP = 3.0
# q = 0.01, sigma = 1.1, 1000 steps: epsilon 1.71 under RDP at delta 1e-5 (two compose to 2.38).
EVENT = {"sampling_rate": 0.01, "noise_multiplier": 1.1, "steps": 1000, "max_grad_norm": 1.0}


def npz(rows: int = RECORDS) -> bytes:
    """A small numeric table (X, y) as numpy writes it: what a block's data file holds."""
    rng = np.random.default_rng(0)
    out = io.BytesIO()
    np.savez(out, X=rng.normal(size=(rows, 4)).astype(np.float32), y=rng.integers(0, 2, rows))
    return out.getvalue()


def data_version(actors, *, submit: bool = True) -> int:
    """A version of acme/digits-data holding data.npz, pending review unless `submit` is off."""
    alice = actors.client("alice")
    alice.post(f"{ACME}/models", {"name": "digits-data"}, format="json")
    number = alice.post(DATA, {}, format="json").json()["number"]
    response = alice.put(f"{DATA}/{number}/files/data.npz", npz(), content_type=OCTET)
    assert response.status_code == 201, response.content
    if submit:
        job = alice.post(f"{DATA}/{number}/submit").json()["job"]["id"]
        assert scanning.version_scan(job_id=job) == VersionState.PENDING_REVIEW
    return number


def create_dataset(actors, name: str = "census", who: str = "root", **fields):
    body = {"name": name, "sensitivity": "confidential", "delta": 1e-5, **fields}
    return actors.client(who).post(DATASETS, body, format="json")


def create_block(actors, name: str, *, dataset: str = "census", who: str = "root", **fields):
    body = {"name": name, "epsilon": CAP, "accountant": "rdp", **fields}
    return actors.client(who).post(f"{DATASETS}/{dataset}/blocks", body, format="json")


@pytest.fixture
def census(actors) -> dict:
    """acme's confidential dataset `census` with block b0 (cap 3.0, RDP) on data.npz of
    digits-data v1, and acme/bert v1, alice's draft with one file."""
    number = data_version(actors)
    assert create_dataset(actors).status_code == 201
    source = {"model": "digits-data", "version": number, "path": "data.npz"}
    response = create_block(actors, "b0", file=source, records=RECORDS)
    assert response.status_code == 201, response.content
    alice = actors.client("alice")
    assert alice.post(f"{ACME}/models", {"name": "bert"}, format="json").status_code == 201
    assert alice.post(BERT, {}, format="json").status_code == 201
    response = alice.put(f"{BERT}/1/files/config.json", b'{"a": 1}', content_type=OCTET)
    assert response.status_code == 201
    return response.json()


def budget(actors, who: str = "root") -> dict:
    response = actors.client(who).get(f"{CENSUS}/budget")
    assert response.status_code == 200, response.content
    return {row["block"]: row for row in response.json()["blocks"]}


def ledger(actors) -> list[dict]:
    response = actors.client("root").get(f"{CENSUS}/ledger")
    assert response.status_code == 200, response.content
    return response.json()["results"]


def dp_record(actors, who: str = "alice", number: int = 1, **fields):
    body = {"dataset": "census", "blocks": ["b0"], "event": EVENT, **fields}
    return actors.client(who).post(f"{BERT}/{number}/dp-record", body, format="json")


def retrain(actors, who: str = "alice", **fields):
    body = {
        "kind": "dp_retrain",
        "namespace": "acme",
        "dataset": "census",
        "model": "digits-dp",
        "target_epsilon": 1.0,
        "epochs": 2,
        "batch_size": 16,
        **fields,
    }
    return actors.client(who).post(f"{API}/jobs", body, format="json")


def error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert body["code"] == code, body
    return body


# --- Datasets and blocks -------------------------------------------------------------------


def test_an_admin_registers_a_dataset(actors):
    response = create_dataset(actors, description="1994 census extract")
    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == {
        "name",
        "sensitivity",
        "privacy_unit",
        "delta",
        "description",
        "created_by",
        "created_at",
    }
    assert body["name"] == "census" and body["sensitivity"] == "confidential"
    assert body["privacy_unit"] == "record" and body["delta"] == 1e-5
    assert body["created_by"] == "root" and body["description"] == "1994 census extract"
    carol = actors.client("carol")
    assert carol.get(CENSUS).json() == body
    assert [d["name"] for d in carol.get(DATASETS).json()["results"]] == ["census"]
    body = error(create_dataset(actors), 409, "already_exists")
    assert "census" in body["message"]
    assert len(carol.get(DATASETS).json()["results"]) == 1


def test_dataset_names_ignore_case_like_model_names(actors):
    assert create_dataset(actors).status_code == 201
    error(create_dataset(actors, "Census"), 409, "already_exists")
    assert actors.client("carol").get(f"{DATASETS}/CENSUS").json()["name"] == "census"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"sensitivity": "secret"}, "sensitivity"),
        ({"privacy_unit": "household"}, "privacy_unit"),
        ({"delta": 0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": -1e-5}, "delta"),
        ({"delta": "tiny"}, "delta"),
        ({"name": "two words"}, "name"),
    ],
)
def test_a_bad_dataset_is_a_400_naming_the_field(actors, fields, field):
    body = error(create_dataset(actors, **fields), 400, "invalid_input")
    # The serializer names its fields in extra.fields, the service its one in extra.field.
    assert field in body["extra"].get("fields", {}) or body["extra"].get("field") == field, body
    assert actors.client("root").get(DATASETS).json()["results"] == []


def test_blocks_with_and_without_a_file(actors):
    number = data_version(actors)
    assert create_dataset(actors).status_code == 201
    source = {"model": "digits-data", "version": number, "path": "data.npz"}
    response = create_block(actors, "b0", file=source, records=RECORDS)
    assert response.status_code == 201, response.content
    with_file = response.json()
    digest = actors.client("alice").get(f"{DATA}/{number}").json()["files"][0]["sha256"]
    assert with_file["file"] == {**source, "sha256": digest}
    assert with_file["records"] == RECORDS and with_file["accountant"] == "rdp"
    assert with_file["epsilon"] == CAP and with_file["delta"] == 1e-5  # the dataset's delta
    response = create_block(actors, "p0", epsilon=2.0, delta=1e-6, accountant="pld")
    assert response.status_code == 201, response.content
    bare = response.json()
    assert bare["file"] is None and bare["records"] is None
    assert (bare["epsilon"], bare["delta"], bare["accountant"]) == (2.0, 1e-6, "pld")
    listed = actors.client("carol").get(f"{CENSUS}/blocks").json()["results"]
    assert listed == [with_file, bare]
    error(create_block(actors, "b0"), 409, "already_exists")
    # A block is never changed: its budget starts untouched.
    assert budget(actors)["b0"]["remaining_epsilon"] == CAP


def test_a_block_cannot_point_at_a_draft(actors):
    assert create_dataset(actors).status_code == 201
    number = data_version(actors, submit=False)
    source = {"model": "digits-data", "version": number, "path": "data.npz"}
    body = error(create_block(actors, "b0", file=source, records=RECORDS), 400, "invalid_input")
    assert body["extra"] == {"field": "file", "state": "draft"}
    assert "submitted" in body["message"]
    missing = {**source, "path": "nope.npz"}
    error(create_block(actors, "b1", file=missing, records=RECORDS), 404, "not_found")
    error(create_block(actors, "b2", epsilon=0), 400, "invalid_input")
    error(create_block(actors, "b3", accountant="moments"), 400, "invalid_input")
    assert actors.client("root").get(f"{CENSUS}/blocks").json()["results"] == []


# --- Preview, declared runs, budget and ledger ---------------------------------------------


def test_a_preview_reserves_nothing(actors, census):
    before = budget(actors)
    preview = {"blocks": ["b0"], "event": EVENT}
    response = actors.client("dave").post(f"{CENSUS}/ledger/preview", preview, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["accountant"] == "rdp" and body["delta"] == 1e-5 and body["fits"] is True
    assert body["epsilon"] == pytest.approx(1.7118, abs=1e-3)
    (row,) = body["blocks"]
    assert row["block"] == "b0" and row["cap_epsilon"] == CAP and row["fits"] is True
    assert row["used_epsilon"] == 0 and row["epsilon"] == pytest.approx(body["epsilon"])
    assert row["epsilon_after"] == pytest.approx(body["epsilon"])
    assert row["remaining_after"] == pytest.approx(CAP - row["epsilon_after"])
    assert budget(actors) == before and ledger(actors) == []
    # One that does not fit is still an answer (200), not a refusal.
    big = {"blocks": ["b0"], "event": {**EVENT, "steps": 10_000}}
    body = actors.client("carol").post(f"{CENSUS}/ledger/preview", big, format="json").json()
    assert body["fits"] is False and body["blocks"][0]["remaining_after"] < 0
    assert budget(actors) == before and ledger(actors) == []


def test_a_declared_run_spends_the_budget_once(actors, census):
    assert actors.client("alice").get(BERT + "/1").json()["dp_record"] is None
    response = dp_record(actors, note="trained on the laptop")
    assert response.status_code == 201, response.content
    record = response.json()
    assert record["dataset"] == "census" and record["sensitivity"] == "confidential"
    assert record["blocks"] == ["b0"] and record["origin"] == "declared"
    assert record["job"] is None and record["event"] == EVENT and record["accountant"] == "rdp"
    assert record["epsilon"] == pytest.approx(1.7118, abs=1e-3) and record["delta"] == 1e-5
    assert "dp-accounting" in record["library_versions"]
    assert actors.client("carol").get(f"{BERT}/1").json()["dp_record"] == record
    b0 = budget(actors, "carol")["b0"]
    assert b0["spent_epsilon"] == pytest.approx(record["epsilon"])
    assert b0["reserved_epsilon"] == 0 and b0["runs"] == 1
    assert b0["remaining_epsilon"] == pytest.approx(CAP - record["epsilon"])
    entries = ledger(actors)
    assert [e["kind"] for e in entries] == ["claim", "commit"]
    assert len({e["claim"] for e in entries}) == 1
    for entry in entries:
        assert (entry["origin"], entry["block"], entry["model"], entry["version"]) == (
            "declared",
            "b0",
            "bert",
            1,
        )
        assert entry["event"] == EVENT and entry["created_by"] == "alice"
    # Once per version: the ledger is append-only.
    error(dp_record(actors), 409, "dp_record_exists")
    error(dp_record(actors, "root"), 409, "dp_record_exists")
    assert budget(actors)["b0"] == b0 and len(ledger(actors)) == 2


def test_the_ledger_pages(actors, census):
    assert dp_record(actors).status_code == 201
    first = actors.client("root").get(f"{CENSUS}/ledger?limit=1").json()
    assert [e["kind"] for e in first["results"]] == ["claim"] and first["next"]
    second = actors.client("root").get(first["next"]).json()
    assert [e["kind"] for e in second["results"]] == ["commit"] and not second["next"]


def test_a_run_over_budget_is_refused_and_writes_nothing(actors, census):
    # Two runs of 1.71 compose to 2.38; a third of twice the steps would make 3.41 (> 3.0).
    assert dp_record(actors).status_code == 201
    alice = actors.client("alice")
    for number in (2, 3):
        assert alice.post(BERT, {}, format="json").status_code == 201
        response = alice.put(f"{BERT}/{number}/files/c.json", b"{}", content_type=OCTET)
        assert response.status_code == 201
    assert dp_record(actors, number=2).status_code == 201
    spent = budget(actors)["b0"]
    assert spent["spent_epsilon"] == pytest.approx(2.381, abs=1e-3)
    longer = {**EVENT, "steps": 2000}
    body = error(dp_record(actors, number=3, event=longer), 409, "budget_exceeded")
    assert "'b0'" in body["message"] and "cap of epsilon 3" in body["message"]
    assert body["extra"]["block"] == "b0" and body["extra"]["cap_epsilon"] == CAP
    assert body["extra"]["epsilon_after"] == pytest.approx(3.414, abs=1e-3)
    assert budget(actors)["b0"] == spent and len(ledger(actors)) == 4
    assert alice.get(f"{BERT}/3").json()["dp_record"] is None


def test_accountants_never_mix(actors, census):
    assert create_block(actors, "p0", accountant="pld").status_code == 201
    body = error(dp_record(actors, blocks=["b0", "p0"]), 409, "accountant_mismatch")
    assert body["extra"]["accountants"] == ["pld", "rdp"]
    body = error(dp_record(actors, accountant="pld"), 409, "accountant_mismatch")
    assert body["extra"] == {"block_accountant": "rdp", "asked": "pld"}
    preview = {"blocks": ["b0", "p0"], "event": EVENT}
    response = actors.client("alice").post(f"{CENSUS}/ledger/preview", preview, format="json")
    error(response, 409, "accountant_mismatch")
    assert ledger(actors) == []
    # The block's own accountant, named, is fine.
    assert dp_record(actors, accountant="rdp").status_code == 201


def test_a_declared_run_of_no_steps_is_refused(actors, census):
    error(dp_record(actors, event={**EVENT, "steps": 0}), 400, "invalid_input")
    assert ledger(actors) == []
    assert dp_record(actors).status_code == 201


def test_a_pld_event_below_the_minimum_noise_is_refused(actors, census):
    assert create_block(actors, "p0", accountant="pld").status_code == 201
    # Refused at once (it would take minutes and gigabytes to compute at 0.01).
    event = {**EVENT, "noise_multiplier": 0.01, "steps": 1000}
    preview = {"blocks": ["p0"], "event": event}
    response = actors.client("carol").post(f"{CENSUS}/ledger/preview", preview, format="json")
    body = error(response, 400, "invalid_input")
    assert "noise_multiplier" in body["message"]


# --- dp_retrain admission and cancel --------------------------------------------------------


def test_dp_retrain_over_budget_queues_nothing(actors, census):
    body = error(retrain(actors, target_epsilon=5.0), 409, "budget_exceeded")
    assert body["extra"]["block"] == "b0"
    assert not Job.objects.filter(kind=JobKind.DP_RETRAIN).exists()
    assert not LedgerEntry.objects.exists()
    # The model it would have created for the new version is not left behind either.
    assert not RegisteredModel.objects.filter(name="digits-dp").exists()
    assert budget(actors)["b0"]["remaining_epsilon"] == CAP


def test_dp_retrain_reserves_its_budget_until_cancelled(actors, census):
    response = retrain(actors)
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["kind"] == "dp_retrain" and body["state"] == "queued"
    assert body["namespace"] == "acme" and body["created_by"] == "alice"
    job = Job.objects.get(pk=body["id"])
    # The planned run: 160 training records (200 less the 20% holdout), batches of 16.
    event = job.params["event"]
    assert event["sampling_rate"] == pytest.approx(16 / 160) and event["steps"] == 20
    assert event["max_grad_norm"] == 1.0 and event["noise_multiplier"] > 0
    assert job.params["epsilon"] == pytest.approx(1.0, abs=0.05)
    assert job.params["epsilon"] <= 1.0
    claim = uuid.UUID(job.params["claim"])
    b0 = budget(actors, "carol")["b0"]
    assert b0["spent_epsilon"] == 0 and b0["runs"] == 0
    assert b0["reserved_epsilon"] == pytest.approx(job.params["epsilon"], rel=1e-6)
    assert b0["remaining_epsilon"] == pytest.approx(CAP - b0["reserved_epsilon"])
    (entry,) = ledger(actors)
    assert (entry["kind"], entry["origin"], entry["job"]) == ("claim", "job", body["id"])
    assert entry["claim"] == str(claim) and entry["event"] == event
    assert RegisteredModel.objects.filter(name="digits-dp").exists()

    response = actors.client("alice").post(f"{API}/jobs/{body['id']}/cancel")
    assert response.status_code == 200, response.content
    assert response.json()["state"] == "cancelled"
    b0 = budget(actors)["b0"]
    assert (b0["spent_epsilon"], b0["reserved_epsilon"], b0["runs"]) == (0, 0, 0)
    assert b0["remaining_epsilon"] == CAP
    entries = ledger(actors)
    assert [(e["kind"], e["claim"]) for e in entries] == [
        ("claim", str(claim)),
        ("release", str(claim)),
    ]
    assert entries[1]["event"]["steps"] == 20
    error(
        actors.client("alice").post(f"{API}/jobs/{body['id']}/cancel"), 409, "job_not_cancellable"
    )
    error(actors.client("root").post(f"{API}/jobs/{body['id']}/cancel"), 409, "job_not_cancellable")
    assert len(ledger(actors)) == 2


def test_a_job_is_cancelled_by_its_creator_or_an_admin(actors, census):
    job = retrain(actors).json()["id"]
    error(actors.client("bob").post(f"{API}/jobs/{job}/cancel"), 403, "permission_denied")
    error(actors.client("mallory").post(f"{API}/jobs/{job}/cancel"), 404, "not_found")
    assert budget(actors)["b0"]["reserved_epsilon"] > 0
    response = actors.client("root").post(f"{API}/jobs/{job}/cancel")
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    assert budget(actors)["b0"]["reserved_epsilon"] == 0


# --- Who sees what ----------------------------------------------------------------------


def test_mallory_sees_no_dataset_of_acme(actors, census):
    mallory, root = actors.client("mallory"), actors.client("root")
    preview = {"blocks": ["b0"], "event": EVENT}
    calls = [
        ("get", DATASETS, None),
        ("post", DATASETS, {"name": "x", "sensitivity": "public", "delta": 1e-5}),
        ("get", CENSUS, None),
        ("get", f"{CENSUS}/blocks", None),
        ("post", f"{CENSUS}/blocks", {"name": "x", "epsilon": 1.0, "accountant": "rdp"}),
        ("get", f"{CENSUS}/ledger", None),
        ("post", f"{CENSUS}/ledger/preview", preview),
        ("get", f"{CENSUS}/budget", None),
    ]
    for method, url, data in calls:
        response = getattr(mallory, method)(url, data, format="json")
        error(response, 404, "not_found")
        assert b"census" not in response.content and b"b0" not in response.content
        # The control: the same call is not a 404 for acme's admin.
        assert getattr(root, method)(url, data, format="json").status_code < 300, url
    for namespace in ("acme", "evil"):
        response = retrain(actors, "mallory", namespace=namespace)
        error(response, 404, "not_found")
    assert Job.objects.filter(kind=JobKind.DP_RETRAIN).count() == 0
    assert len(ledger(actors)) == 0


def test_viewers_and_auditors_read_but_do_not_register(actors, census):
    for who in ("carol", "dave", "alice", "bob"):
        error(create_dataset(actors, f"by-{who}", who=who), 403, "permission_denied")
        error(create_block(actors, f"by-{who}", who=who), 403, "permission_denied")
        assert set(budget(actors, who)) == {"b0"}
    assert [d["name"] for d in actors.client("root").get(DATASETS).json()["results"]] == ["census"]


# --- The dp_budget gate ---------------------------------------------------------------------


def test_the_dp_budget_gate_needs_a_record(actors, census):
    root, alice, bob = (actors.client(n) for n in ("root", "alice", "bob"))
    gates = {"required_gates": ["scan_clean", "dp_budget"]}
    response = root.patch(f"{ACME}/policy", gates, format="json")
    assert response.status_code == 200, response.content
    response = alice.patch(f"{BERT}/1", {"tags": {"dataset": "census"}}, format="json")
    assert response.status_code == 200, response.content
    job = alice.post(f"{BERT}/1/submit").json()["job"]["id"]
    assert scanning.version_scan(job_id=job) == VersionState.PENDING_REVIEW
    review = {"decision": "approve"}
    body = error(bob.post(f"{BERT}/1/reviews", review, format="json"), 409, "gate_dp_budget")
    assert body["extra"]["dataset"] == "census"
    assert alice.get(f"{BERT}/1").json()["state"] == "pending_review"
    assert dp_record(actors).status_code == 201
    response = bob.post(f"{BERT}/1/reviews", review, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["version"]["state"] == "approved"
    assert response.json()["version"]["dp_record"]["dataset"] == "census"
