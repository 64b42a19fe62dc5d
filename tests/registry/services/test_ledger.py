"""registry/services/ledger.py: datasets, append-only blocks and the DP budget ledger on
PostgreSQL. Admission composes each block's entries under its accountant (checked against
dp-accounting driven directly), refuses overspending all or nothing, also when two claims
race; the tables reject changes in the database itself; every entry is audited; the
dp_budget gate holds versions trained on sensitive data to a committed DP record."""

from __future__ import annotations

import math
import threading
import uuid

import pytest
from django.db import DatabaseError, connection, transaction

from registry.dp import accounting
from registry.dp.accounting import DpEvent
from registry.errors import (
    AccountantMismatch,
    AlreadyExists,
    BudgetExceeded,
    DpBudgetGateNotMet,
    DpRecordExists,
    GateNotMet,
    InvalidInput,
    NotFound,
)
from registry.models import (
    AuditAction,
    AuditEvent,
    DataBlock,
    Dataset,
    LedgerEntry,
    LedgerSource,
    ModelVersion,
    Review,
    VersionState,
)
from registry.services import approvals, audit, catalog, ledger
from tests.registry.dp.test_accounting import DELTA, MNIST, library_epsilon
from tests.registry.services.test_approvals import pending
from tests.registry.services.test_scanning import put, wait_for_lock_waiters

# One full-batch Gaussian release at ~2.17. At delta 1e-5 two of them compose to ~3.19, over
# a cap of 3. (Two small-q DP-SGD runs of epsilon 2 compose to at most ~2.94 there: RDP
# composition is that much better than a sum, so they would both fit under 3.)
NEAR_TWO = DpEvent(sampling_rate=1.0, noise_multiplier=4.0, steps=4)
# A cheap ordinary DP-SGD run (~2.1 under RDP at 1e-5).
RUN = DpEvent(sampling_rate=0.01, noise_multiplier=1.0, steps=1000)


@pytest.fixture
def clinic(actors) -> Dataset:
    """A confidential dataset of acme, registered by root, accounted at delta 1e-5."""
    return ledger.dataset_create(
        namespace=actors.acme,
        name="clinic",
        sensitivity="confidential",
        delta=DELTA,
        creator=actors.users["root"],
    )


def block(dataset: Dataset, name: str, cap: float, accountant: str = "rdp", **kw) -> DataBlock:
    return ledger.data_block_create(
        dataset=dataset,
        name=name,
        epsilon=cap,
        accountant=accountant,
        creator=dataset.created_by,
        **kw,
    )


def claim(dataset: Dataset, blocks: list[str], event: DpEvent, **kw) -> uuid.UUID:
    return ledger.ledger_claim(
        dataset=dataset,
        blocks=blocks,
        event=event,
        source=LedgerSource.JOB,
        creator=dataset.created_by,
        **kw,
    )


def rows(**filters) -> list[tuple[str, str, int]]:
    """(block, kind, steps) of the matching entries, sorted."""
    entries = LedgerEntry.objects.filter(**filters).select_related("block")
    return sorted((e.block.name, e.kind, e.steps) for e in entries)


def rdp(events: list[DpEvent]) -> float:
    return accounting.epsilon(events, delta=DELTA, accountant="rdp")


# --- 1. The accountants' numbers ---------------------------------------------------------


def test_the_ledger_reports_the_accountants_epsilon_for_the_mnist_run(clinic):
    block(clinic, "r", 10.0, "rdp")
    block(clinic, "p", 10.0, "pld")
    expected = {"rdp": library_epsilon([MNIST], "rdp"), "pld": library_epsilon([MNIST], "pld")}
    assert round(expected["rdp"], 4) == 2.5966
    assert expected["pld"] == pytest.approx(2.382, abs=0.01)
    for name, acct in (("r", "rdp"), ("p", "pld")):
        preview = ledger.ledger_preview(dataset=clinic, blocks=[name], event=MNIST)
        assert preview.accountant == acct and preview.delta == DELTA and preview.fits
        assert preview.epsilon == pytest.approx(expected[acct], abs=1e-6)
        [row] = preview.blocks
        assert row["epsilon"] == pytest.approx(expected[acct], abs=1e-6)
        assert row["remaining_after"] == pytest.approx(10.0 - expected[acct], abs=1e-6)
        [entry] = LedgerEntry.objects.filter(claim=claim(clinic, [name], MNIST))
        assert entry.epsilon == pytest.approx(expected[acct], abs=1e-6)
        assert (entry.accountant, entry.delta) == (acct, DELTA)
        assert entry.library_versions == accounting.library_versions()
    assert round(LedgerEntry.objects.get(block__name="r").epsilon, 4) == 2.5966


# --- 2. Composition, recomputed from the entries ------------------------------------------


def test_a_blocks_budget_is_the_composition_of_its_entries(clinic):
    block(clinic, "b", 100.0)
    other = DpEvent(sampling_rate=0.02, noise_multiplier=1.2, steps=500)
    for event in (RUN, other):
        ledger.ledger_settle(claim=claim(clinic, ["b"], event), steps_run=event.steps)
    [budget] = ledger.dataset_budget(dataset=clinic)
    alone = (library_epsilon([RUN], "rdp"), library_epsilon([other], "rdp"))
    assert max(alone) < budget.spent() < sum(alone)
    assert budget.spent() == pytest.approx(library_epsilon([RUN, other], "rdp"), abs=1e-9)
    spent = budget.spent()
    assert budget.as_dict() == {
        "block": "b",
        "accountant": "rdp",
        "cap_epsilon": 100.0,
        "cap_delta": DELTA,
        "spent_epsilon": spent,
        "reserved_epsilon": 0.0,
        "remaining_epsilon": pytest.approx(100.0 - spent),
        "runs": 2,
    }

    # An unsettled claim counts as reserved: composed in, but not spent.
    open_claim = claim(clinic, ["b"], RUN)
    [budget] = ledger.dataset_budget(dataset=clinic)
    used = library_epsilon([RUN, other, RUN], "rdp")
    assert budget.spent() == spent and budget.used() == pytest.approx(used, abs=1e-9)
    assert budget.as_dict()["reserved_epsilon"] == pytest.approx(used - spent)
    assert budget.as_dict()["remaining_epsilon"] == pytest.approx(100.0 - used)

    # Released, it counts for nothing.
    ledger.ledger_settle(claim=open_claim, steps_run=0)
    [budget] = ledger.dataset_budget(dataset=clinic)
    assert budget.used() == budget.spent() == spent
    assert budget.as_dict()["runs"] == 2


# --- 3. Over budget, all or nothing -------------------------------------------------------


def test_a_claim_that_would_overspend_its_block_is_refused_and_writes_nothing(clinic):
    block(clinic, "b1", 3.0)
    one, two = library_epsilon([NEAR_TWO], "rdp"), library_epsilon([NEAR_TWO] * 2, "rdp")
    assert 1.9 < one < 2.3 and 3.0 < two < 2 * one
    first = claim(clinic, ["b1"], NEAR_TWO)
    audited = AuditEvent.objects.filter(action=AuditAction.LEDGER_CLAIM).count()

    with pytest.raises(BudgetExceeded) as exc:
        claim(clinic, ["b1"], NEAR_TWO)

    assert exc.value.code == "budget_exceeded" and exc.value.status == 409
    message = exc.value.message
    assert "Block 'b1' of dataset 'clinic' has a cap of epsilon 3 " in message
    assert f"this run asks for {one:.4f}" in message
    assert f"composes to {two:.4f}" in message
    assert exc.value.extra == {
        "block": "b1",
        "cap_epsilon": 3.0,
        "used_epsilon": pytest.approx(one),
        "requested_epsilon": pytest.approx(one),
        "epsilon_after": pytest.approx(two),
    }
    assert rows() == [("b1", "claim", 4)]
    assert set(LedgerEntry.objects.values_list("claim", flat=True)) == {first}
    assert AuditEvent.objects.filter(action=AuditAction.LEDGER_CLAIM).count() == audited
    # The preview says the same and reserves nothing either.
    assert not ledger.ledger_preview(dataset=clinic, blocks=["b1"], event=NEAR_TWO).fits
    assert LedgerEntry.objects.count() == 1


def test_a_claim_on_two_blocks_is_all_or_nothing(clinic):
    block(clinic, "a", 10.0)
    block(clinic, "b", 3.0)
    claim(clinic, ["b"], NEAR_TWO)
    with pytest.raises(BudgetExceeded) as exc:
        claim(clinic, ["a", "b"], NEAR_TWO)
    assert exc.value.extra["block"] == "b"
    assert not LedgerEntry.objects.filter(block__name="a").exists()
    # Control: block a alone admits the same run.
    claim(clinic, ["a"], NEAR_TWO)
    assert rows(block__name="a") == [("a", "claim", 4)]


def test_a_claim_on_an_unknown_block_is_not_found(clinic):
    block(clinic, "a", 10.0)
    with pytest.raises(NotFound) as exc:
        claim(clinic, ["a", "nope"], RUN)
    assert exc.value.extra == {"blocks": ["nope"]}
    with pytest.raises(InvalidInput):
        claim(clinic, [], RUN)
    assert not LedgerEntry.objects.exists()


# --- 4. Concurrent admission --------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("cap", "expected"), [(3.0, ["BudgetExceeded", "ok"]), (5.0, ["ok", "ok"])]
)
def test_two_racing_claims_cannot_both_spend_the_last_of_a_budget(actors, cap, expected):
    """Both claims start together and queue on the block while the test holds its row, so
    both read the ledger at the same moment unless admission locks it. Bug caught: checking
    the budget without the row lock admits both (cap 3). Control: cap 5 fits both."""
    dataset = ledger.dataset_create(
        namespace=actors.acme,
        name="clinic",
        sensitivity="confidential",
        delta=DELTA,
        creator=actors.users["root"],
    )
    target = block(dataset, "b", cap)
    barrier = threading.Barrier(2)
    results: list[object] = []

    def run() -> None:
        try:
            barrier.wait(timeout=30)
            claim(dataset, ["b"], NEAR_TWO)
            results.append("ok")
        except Exception as exc:
            results.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    with transaction.atomic():
        DataBlock.objects.select_for_update().get(pk=target.pk)
        for t in threads:
            t.start()
        wait_for_lock_waiters(2)
    for t in threads:
        t.join(60)
    assert sorted(type(r).__name__ if r != "ok" else "ok" for r in results) == expected
    assert LedgerEntry.objects.filter(block=target).count() == expected.count("ok")
    [budget] = ledger.dataset_budget(dataset=dataset)
    assert budget.used() <= cap


# --- 5. One accountant per run ------------------------------------------------------------


def test_a_run_never_mixes_accountants(clinic):
    block(clinic, "r", 10.0, "rdp")
    block(clinic, "p", 10.0, "pld")
    with pytest.raises(AccountantMismatch) as exc:
        claim(clinic, ["r", "p"], RUN)
    assert exc.value.code == "accountant_mismatch"
    assert exc.value.extra == {"accountants": ["pld", "rdp"]}
    with pytest.raises(AccountantMismatch) as exc:
        claim(clinic, ["r"], RUN, accountant="pld")
    assert exc.value.extra == {"block_accountant": "rdp", "asked": "pld"}
    with pytest.raises(AccountantMismatch):
        ledger.ledger_preview(dataset=clinic, blocks=["r", "p"], event=RUN)
    assert not LedgerEntry.objects.exists()
    # Control: naming the block's own accountant is admitted.
    claim(clinic, ["r"], RUN, accountant="rdp")
    assert rows() == [("r", "claim", 1000)]


# --- 6. Append-only in the database --------------------------------------------------------


def refused(statement) -> None:
    # A savepoint per attempt: the test's own transaction stays usable after the error.
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        statement()


def raw(sql: str, *params) -> None:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def test_ledger_entries_cannot_be_changed_or_deleted(clinic):
    block(clinic, "b", 10.0)
    ledger.ledger_settle(claim=claim(clinic, ["b"], RUN), steps_run=400)
    entry = LedgerEntry.objects.get(kind="commit")
    entries = LedgerEntry.objects.filter(pk=entry.pk)

    refused(lambda: entries.update(steps=0))
    refused(entries.delete)
    refused(LedgerEntry.objects.all().delete)
    entry.steps = 0
    refused(entry.save)
    refused(lambda: raw("UPDATE registry_ledgerentry SET steps = 0 WHERE id = %s", entry.pk))
    refused(lambda: raw("DELETE FROM registry_ledgerentry"))
    # The rows' deferred foreign-key checks would otherwise refuse the TRUNCATE first.
    refused(lambda: raw("SET CONSTRAINTS ALL IMMEDIATE; TRUNCATE registry_ledgerentry"))

    assert rows() == [("b", "claim", 1000), ("b", "commit", 400), ("b", "release", 600)]
    # Control: the dataset row is an ordinary table; the same UPDATE goes through there.
    assert Dataset.objects.filter(pk=clinic.pk).update(description="changed") == 1


def test_a_blocks_cap_cannot_be_changed_and_a_block_cannot_be_deleted(clinic):
    capped = block(clinic, "b", 3.0)
    unused = block(clinic, "unused", 3.0)  # no entries: nothing but the trigger protects it

    refused(lambda: DataBlock.objects.filter(pk=capped.pk).update(epsilon=1e6))
    refused(lambda: raw("UPDATE registry_datablock SET epsilon = 1000000 WHERE id = %s", capped.pk))
    refused(lambda: raw("UPDATE registry_datablock SET accountant = 'pld'"))
    refused(DataBlock.objects.filter(pk=unused.pk).delete)
    refused(lambda: raw("DELETE FROM registry_datablock WHERE id = %s", unused.pk))

    assert sorted(DataBlock.objects.values_list("name", "epsilon", "accountant")) == [
        ("b", 3.0, "rdp"),
        ("unused", 3.0, "rdp"),
    ]
    # The cap still holds: the second ~2 run is refused.
    claim(clinic, ["b"], NEAR_TWO)
    with pytest.raises(BudgetExceeded):
        claim(clinic, ["b"], NEAR_TWO)


# --- 7. Settlement ------------------------------------------------------------------------


def test_settling_commits_the_steps_that_ran_and_releases_the_rest(clinic):
    block(clinic, "a", 50.0)
    block(clinic, "b", 50.0)
    c = claim(clinic, ["a", "b"], RUN)

    assert ledger.ledger_settle(claim=c, steps_run=400) is True

    assert rows(claim=c) == [
        ("a", "claim", 1000),
        ("a", "commit", 400),
        ("a", "release", 600),
        ("b", "claim", 1000),
        ("b", "commit", 400),
        ("b", "release", 600),
    ]
    commit = LedgerEntry.objects.filter(claim=c, kind="commit").first()
    assert commit.epsilon == rdp([RUN.with_steps(400)])
    assert commit.epsilon < LedgerEntry.objects.filter(claim=c, kind="claim").first().epsilon
    for budget in ledger.dataset_budget(dataset=clinic):
        assert budget.spent() == budget.used() == rdp([RUN.with_steps(400)])

    # Idempotent: a second settle (a retried task) writes nothing.
    audited = AuditEvent.objects.count()
    assert ledger.ledger_settle(claim=c, steps_run=1000) is False
    assert LedgerEntry.objects.count() == 6 and AuditEvent.objects.count() == audited


def test_a_run_that_never_started_releases_its_whole_claim(clinic):
    block(clinic, "a", 50.0)
    c = claim(clinic, ["a"], RUN)
    assert ledger.ledger_settle(claim=c, steps_run=0) is True
    assert rows(claim=c) == [("a", "claim", 1000), ("a", "release", 1000)]
    [budget] = ledger.dataset_budget(dataset=clinic)
    assert budget.spent() == budget.used() == 0.0
    assert ledger.ledger_settle(claim=c, steps_run=0) is False


def test_a_run_commits_no_more_than_it_claimed(clinic):
    block(clinic, "a", 50.0)
    c = claim(clinic, ["a"], RUN)
    ledger.ledger_settle(claim=c, steps_run=5000)
    assert rows(claim=c) == [("a", "claim", 1000), ("a", "commit", 1000)]


def test_settling_an_unknown_claim_is_not_found(clinic):
    with pytest.raises(NotFound):
        ledger.ledger_settle(claim=uuid.uuid4(), steps_run=1)


# --- 8. Declared runs ---------------------------------------------------------------------


def test_a_declared_run_is_claimed_and_committed_on_the_version(actors, clinic, draft):
    block(clinic, "b", 10.0)
    alice = actors.users["alice"]
    c = ledger.dp_record_declare(
        version=draft, dataset=clinic, blocks=["b"], event=RUN, creator=alice
    )
    entries = LedgerEntry.objects.filter(claim=c).order_by("id")
    assert [(e.kind, e.steps, e.version_id, e.source, e.created_by_id) for e in entries] == [
        ("claim", 1000, draft.pk, "declared", alice.pk),
        ("commit", 1000, draft.pk, "declared", alice.pk),
    ]

    with pytest.raises(DpRecordExists) as exc:
        ledger.dp_record_declare(
            version=draft, dataset=clinic, blocks=["b"], event=NEAR_TWO, creator=alice
        )
    assert exc.value.code == "dp_record_exists"
    assert LedgerEntry.objects.count() == 2

    record = ledger.dp_record_of(draft)
    assert record is not None
    assert {k: record[k] for k in ("dataset", "sensitivity", "blocks", "origin", "job")} == {
        "dataset": "clinic",
        "sensitivity": "confidential",
        "blocks": ["b"],
        "origin": "declared",
        "job": None,
    }
    assert record["event"] == RUN.as_dict()
    assert (record["accountant"], record["delta"]) == ("rdp", DELTA)
    assert record["epsilon"] == rdp([RUN]) == pytest.approx(library_epsilon([RUN], "rdp"))
    assert record["library_versions"] == accounting.library_versions()
    # Control: another version of the same model has no record.
    other = catalog.version_create(model=draft.model, creator=alice)
    assert ledger.dp_record_of(other) is None


def test_a_declared_run_over_budget_records_nothing(actors, clinic, draft):
    block(clinic, "b", 2.0)
    alice = actors.users["alice"]
    with pytest.raises(BudgetExceeded):
        ledger.dp_record_declare(
            version=draft, dataset=clinic, blocks=["b"], event=RUN, creator=alice
        )
    assert not LedgerEntry.objects.exists() and ledger.dp_record_of(draft) is None
    # Nothing half-written blocks a corrected declaration.
    small = RUN.with_steps(10)
    ledger.dp_record_declare(
        version=draft, dataset=clinic, blocks=["b"], event=small, creator=alice
    )
    assert ledger.dp_record_of(draft)["event"] == small.as_dict()


# --- 9. Audit -------------------------------------------------------------------------------


def test_every_ledger_entry_is_audited_with_its_claim(clinic):
    block(clinic, "a", 50.0)
    block(clinic, "b", 50.0)
    c = claim(clinic, ["a", "b"], RUN)
    ledger.ledger_settle(claim=c, steps_run=400)

    for action, steps in (
        (AuditAction.LEDGER_CLAIM, 1000),
        (AuditAction.LEDGER_COMMIT, 400),
        (AuditAction.LEDGER_RELEASE, 600),
    ):
        events = list(AuditEvent.objects.filter(action=action).order_by("seq"))
        assert sorted(e.target for e in events) == [
            "acme/datasets/clinic/a",
            "acme/datasets/clinic/b",
        ]
        assert {e.details["claim"] for e in events} == {str(c)}
        assert {e.details["event"]["steps"] for e in events} == {steps}
        assert {e.namespace for e in events} == {"acme"}
    assert AuditEvent.objects.filter(action__startswith="ledger.").count() == (
        LedgerEntry.objects.count()
    )
    assert AuditEvent.objects.filter(action=AuditAction.DATASET_CREATE).count() == 1
    assert AuditEvent.objects.filter(action=AuditAction.DATA_BLOCK_CREATE).count() == 2
    assert audit.audit_verify().ok


# --- 10. The dp_budget gate -----------------------------------------------------------------


def tagged(version: ModelVersion, dataset: str) -> ModelVersion:
    return catalog.version_update(version=version, tags={"dataset": dataset})


def test_the_dp_budget_gate_is_registered():
    assert approvals.GATES["dp_budget"] is ledger.dp_budget_gate


def test_a_version_trained_on_confidential_data_needs_a_dp_record(actors, clinic, draft):
    block(clinic, "b", 10.0)
    version = tagged(draft, "clinic")
    with pytest.raises(DpBudgetGateNotMet) as exc:
        ledger.dp_budget_gate(version)
    assert isinstance(exc.value, GateNotMet) and exc.value.code == "gate_dp_budget"
    assert exc.value.extra == {"dataset": "clinic", "sensitivity": "confidential"}

    ledger.dp_record_declare(
        version=version, dataset=clinic, blocks=["b"], event=RUN, creator=actors.users["alice"]
    )
    ledger.dp_budget_gate(version)


def test_public_data_or_no_dataset_needs_no_dp_record(actors, draft):
    ledger.dataset_create(
        namespace=actors.acme,
        name="census",
        sensitivity="public",
        delta=DELTA,
        creator=actors.users["root"],
    )
    ledger.dp_budget_gate(draft)  # no dataset link at all
    ledger.dp_budget_gate(tagged(draft, "census"))
    ledger.dp_budget_gate(tagged(draft, "not-a-registered-dataset"))


def test_a_claim_still_running_is_not_a_dp_record(actors, clinic, draft):
    """A version linked to the dataset only by an unsettled claim (its job still running)
    has spent nothing final yet: the gate holds it."""
    block(clinic, "b", 10.0)
    claim(clinic, ["b"], RUN, version=draft)
    with pytest.raises(DpBudgetGateNotMet):
        ledger.dp_budget_gate(draft)


def test_a_dp_record_on_another_dataset_does_not_satisfy_the_tagged_one(actors, clinic, draft):
    census = ledger.dataset_create(
        namespace=actors.acme,
        name="census",
        sensitivity="public",
        delta=DELTA,
        creator=actors.users["root"],
    )
    block(census, "c", 10.0)
    ledger.dp_record_declare(
        version=draft, dataset=census, blocks=["c"], event=RUN, creator=actors.users["alice"]
    )
    with pytest.raises(DpBudgetGateNotMet) as exc:
        ledger.dp_budget_gate(tagged(draft, "clinic"))
    assert exc.value.extra["dataset"] == "clinic"


def test_review_applies_the_dp_budget_gate(actors, clinic, draft):
    block(clinic, "b", 10.0)
    approvals.policy_update(namespace=actors.acme, required_gates=["scan_clean", "dp_budget"])
    version = tagged(pending(draft, actors.users["alice"]), "clinic")
    bob = actors.users["bob"]

    with pytest.raises(DpBudgetGateNotMet):
        approvals.review_record(version=version, reviewer=bob, decision="approve")
    assert not Review.objects.exists()
    version.refresh_from_db()
    assert version.state == VersionState.PENDING_REVIEW

    ledger.dp_record_declare(
        version=version, dataset=clinic, blocks=["b"], event=RUN, creator=actors.users["alice"]
    )
    approvals.review_record(version=version, reviewer=bob, decision="approve")
    version.refresh_from_db()
    assert version.state == VersionState.APPROVED


# --- 12. Bad input --------------------------------------------------------------------------

VALID_EVENT = {"sampling_rate": 0.01, "noise_multiplier": 1.0, "steps": 1000}


@pytest.mark.parametrize(
    "change",
    [
        {"steps": None},
        {"sampling_rate": None},
        {"noise_multiplier": None},
        {"steps": -1},
        {"steps": 1.5},
        {"steps": True},
        {"steps": 10**9},
        {"sampling_rate": math.nan},
        {"sampling_rate": True},
        {"sampling_rate": "0.01"},
        {"sampling_rate": 1.5},
        {"sampling_rate": 0.0},
        {"noise_multiplier": -1.0},
        {"noise_multiplier": math.nan},
        {"noise_multiplier": math.inf},
        {"max_grad_norm": math.nan},
        {"max_grad_norm": False},
    ],
    ids=repr,
)
def test_event_parse_refuses_a_bad_event(change):
    data = {k: v for k, v in {**VALID_EVENT, **change}.items() if v is not None}
    with pytest.raises(InvalidInput):
        ledger.event_parse(data)


def test_event_parse_accepts_a_good_event_and_refuses_a_non_object():
    assert ledger.event_parse(VALID_EVENT) == DpEvent(0.01, 1.0, 1000, 1.0)
    assert ledger.event_parse({**VALID_EVENT, "max_grad_norm": 2}).max_grad_norm == 2.0
    with pytest.raises(InvalidInput):
        ledger.event_parse([0.01, 1.0, 1000])


@pytest.mark.parametrize(
    "change",
    [
        {"sensitivity": "secret"},
        {"privacy_unit": "household"},
        {"delta": 0.0},
        {"delta": 1.0},
        {"delta": -1e-5},
        {"delta": math.nan},
        {"delta": True},
    ],
    ids=repr,
)
def test_dataset_create_refuses_bad_input(actors, change):
    kwargs = {"sensitivity": "confidential", "delta": DELTA, **change}
    with pytest.raises(InvalidInput):
        ledger.dataset_create(
            namespace=actors.acme, name="clinic", creator=actors.users["root"], **kwargs
        )
    assert not Dataset.objects.exists()


def test_dataset_names_are_unique_per_namespace(actors, clinic):
    with pytest.raises(AlreadyExists):
        ledger.dataset_create(
            namespace=actors.acme,
            name="clinic",
            sensitivity="public",
            delta=1e-3,
            creator=actors.users["root"],
        )
    # Control: mallory's team may use the same name in its own namespace.
    ledger.dataset_create(
        namespace=actors.evil,
        name="clinic",
        sensitivity="public",
        delta=1e-3,
        creator=actors.users["mallory"],
    )
    assert Dataset.objects.count() == 2
    assert Dataset.objects.get(namespace=actors.acme).sensitivity == "confidential"


@pytest.mark.parametrize("what", ["dataset", "block"])
def test_a_bad_name_is_invalid_input(clinic, what):
    with pytest.raises(InvalidInput):
        if what == "dataset":
            ledger.dataset_create(
                namespace=clinic.namespace,
                name="../census",
                sensitivity="public",
                delta=DELTA,
                creator=clinic.created_by,
            )
        else:
            block(clinic, "../b", 3.0)


@pytest.mark.parametrize(
    "change",
    [
        {"accountant": "gdp"},
        {"accountant": "RDP"},
        {"epsilon": 0.0},
        {"epsilon": -1.0},
        {"epsilon": math.inf},
        {"delta": 1.0},
        {"records": 0},
        {"records": True},
    ],
    ids=repr,
)
def test_data_block_create_refuses_bad_input(clinic, change):
    kwargs = {"name": "b", "epsilon": 3.0, "accountant": "rdp", **change}
    with pytest.raises(InvalidInput):
        ledger.data_block_create(dataset=clinic, creator=clinic.created_by, **kwargs)
    assert not DataBlock.objects.exists()


def test_a_block_name_is_taken_once_and_its_cap_stays(clinic):
    first = block(clinic, "b", 3.0)
    with pytest.raises(AlreadyExists):
        block(clinic, "b", 300.0, "pld")
    assert list(DataBlock.objects.values_list("pk", "epsilon", "accountant")) == [
        (first.pk, 3.0, "rdp")
    ]


def test_a_block_reads_only_a_submitted_file_of_its_own_namespace(actors, clinic, draft):
    alice = actors.users["alice"]
    data = put(draft, "data.csv", b"x,y\n1,0\n", alice)
    with pytest.raises(InvalidInput) as exc:
        block(clinic, "b", 3.0, artifact=data, records=1)
    assert exc.value.extra == {"field": "file", "state": "draft"}

    # Control: once the version is submitted and scanned, the same file is accepted.
    pending(draft, alice, files={})
    data.refresh_from_db()
    made = block(clinic, "b", 3.0, artifact=data, records=1)
    assert made.artifact_id == data.pk

    # mallory's team cannot point an acme block at its own file, nor acme's at evil's.
    evil_model = catalog.model_create(
        namespace=actors.evil, name="loot", creator=actors.users["mallory"]
    )
    evil_version = catalog.version_create(model=evil_model, creator=actors.users["mallory"])
    evil_file = put(evil_version, "data.csv", b"x,y\n1,0\n", actors.users["mallory"])
    pending(evil_version, actors.users["mallory"], files={})
    evil_file.refresh_from_db()
    with pytest.raises(InvalidInput, match="namespace"):
        block(clinic, "stolen", 3.0, artifact=evil_file)
    assert list(DataBlock.objects.values_list("name", flat=True)) == ["b"]
