"""DP retraining and privacy audits, run in-process by the services a `dp` worker calls."""

from __future__ import annotations

import json
import types
import uuid

import pytest

pytest.importorskip("torch")

from registry.dp import accounting
from registry.models import Job, JobState, LedgerEntry, ModelVersion, VersionState
from registry.services import dp, ledger
from registry.services.artifacts import Artifact, artifact_open
from tests.support.dp import digits_dataset
from workers import training


def read(version: ModelVersion, path: str) -> bytes:
    artifact = Artifact.objects.get(version=version, path=path)
    stream = artifact_open(artifact=artifact)
    try:
        return b"".join(stream)
    finally:
        stream.close()


def retrain(actors, dataset, **params) -> Job:
    return dp.dp_retrain_create(
        namespace=actors.acme,
        dataset=dataset,
        blocks=["b1"],
        model_name="digits-dp",
        base_version=None,
        params={"epochs": 3, "batch_size": 64, **params},
        creator=actors.users["alice"],
    )


def test_retraining_writes_a_draft_with_its_guarantee_and_commits_the_ledger(actors, tmp_path):
    dataset = digits_dataset(actors)
    job = retrain(actors, dataset, target_epsilon=4.0, epochs=5)
    planned = job.params["event"]
    assert job.params["n_train"] == 1797 - round(1797 * 0.2)
    assert planned["sampling_rate"] == accounting.sampling_rate(job.params["n_train"], 64)

    assert dp.dp_retrain_run(job_id=job.pk, training=training) == "1"

    job.refresh_from_db()
    assert job.state == JobState.SUCCEEDED, job.error_message
    version = ModelVersion.objects.get(model__name="digits-dp", number=1)
    assert version.state == VersionState.DRAFT
    assert version.tags == {"dataset": "digits", "trained_by": "dp_retrain"}
    config = json.loads(read(version, "config.json"))
    privacy = config["privacy"]
    assert privacy["epsilon"] <= 4.0
    # The accountant's own figure for the steps that ran, at the dataset's delta.
    expected = accounting.epsilon(
        [accounting.DpEvent(**privacy["event"])], delta=1e-5, accountant="rdp"
    )
    assert privacy["epsilon"] == pytest.approx(expected)
    assert privacy["accuracy"] > 0.5  # chance is 0.1
    assert 0.0 <= privacy["membership_inference"]["auc"] <= 1.0
    card = read(version, "README.md").decode()
    assert "(epsilon, delta) = (" in card and "AUC" in card

    from safetensors.numpy import load

    tensors = load(read(version, "model.safetensors"))
    assert tensors["layers.0.weight"].shape == (10, 64)

    entries = list(LedgerEntry.objects.filter(job=job).order_by("id"))
    assert [e.kind for e in entries] == ["claim", "commit"]
    assert entries[1].version == version and entries[1].steps == planned["steps"]
    record = ledger.dp_record_of(version)
    assert record is not None and record["origin"] == "job"
    assert record["epsilon"] == pytest.approx(privacy["epsilon"])
    ledger.dp_budget_gate(version)  # passes: committed, within budget


def test_a_cancelled_run_commits_the_steps_it_ran_and_releases_the_rest(actors):
    dataset = digits_dataset(actors)
    job = retrain(actors, dataset, noise_multiplier=5.0, epochs=1000)
    planned = job.params["event"]["steps"]
    per_epoch = planned // 1000

    # The cancel lands after the second epoch; the worker sees it at its next look (they are
    # a second apart) and stops after that epoch.
    def train_and_cancel(*args, **kwargs):
        after = kwargs["after_epoch"]

        def after_epoch(done: int, steps: int) -> None:
            after(done, steps)
            if done == 2:
                dp.job_cancel(job=Job.objects.get(pk=job.pk))

        result = training.train(*args, **{**kwargs, "after_epoch": after_epoch})
        ran.append(result.steps)
        return result

    ran: list[int] = []
    loop = types.SimpleNamespace(**{**vars(training), "train": train_and_cancel})
    assert dp.dp_retrain_run(job_id=job.pk, training=loop) is None
    job.refresh_from_db()
    assert job.state == JobState.CANCELLED
    kinds = {e.kind: e.steps for e in LedgerEntry.objects.filter(job=job)}
    # Exactly the steps that ran are committed: whole epochs, more than two, far from all.
    (steps,) = ran
    assert steps % per_epoch == 0 and 2 * per_epoch < steps < planned
    assert kinds == {"claim": planned, "commit": steps, "release": planned - steps}
    assert not ModelVersion.objects.filter(model__name="digits-dp").exists()


def test_a_redelivery_after_a_dead_worker_commits_what_it_had_started(actors):
    dataset = digits_dataset(actors)
    job = retrain(actors, dataset, noise_multiplier=1.0)
    planned = job.params["event"]["steps"]
    # What a worker killed in its second epoch leaves behind: running, steps recorded.
    Job.objects.filter(pk=job.pk).update(
        state=JobState.RUNNING, attempts=1, result={"epoch": 1, "steps_started": 46}
    )
    assert dp.dp_retrain_run(job_id=job.pk, training=training) is None
    job.refresh_from_db()
    assert (job.state, job.error_code) == (JobState.FAILED, "worker_lost")
    kinds = {e.kind: e.steps for e in LedgerEntry.objects.filter(job=job)}
    assert kinds == {"claim": planned, "commit": 46, "release": planned - 46}
    # A third delivery changes nothing.
    assert dp.dp_retrain_run(job_id=job.pk, training=training) is None
    assert LedgerEntry.objects.filter(job=job).count() == 3


def test_a_block_whose_file_does_not_hold_its_declared_records_trains_nothing(actors):
    dataset = digits_dataset(actors)
    block = dataset.blocks.get()
    ledger.data_block_create(
        dataset=dataset,
        name="b2",
        epsilon=10,
        accountant="rdp",
        artifact=block.artifact,
        records=1000,
        creator=actors.users["root"],
    )
    job = dp.dp_retrain_create(
        namespace=actors.acme,
        dataset=dataset,
        blocks=["b2"],
        model_name="digits-dp",
        base_version=None,
        params={"noise_multiplier": 1.0},
        creator=actors.users["alice"],
    )
    assert dp.dp_retrain_run(job_id=job.pk, training=training) is None
    job.refresh_from_db()
    assert job.state == JobState.FAILED and "1000 records" in job.error_message
    kinds = [e.kind for e in LedgerEntry.objects.filter(job=job).order_by("id")]
    assert kinds == ["claim", "release"]


def test_retraining_from_a_base_version_and_auditing_it(actors):
    dataset = digits_dataset(actors, epsilon=20)
    first = retrain(actors, dataset, noise_multiplier=1.0, family="mlp", hidden=[32])
    assert dp.dp_retrain_run(job_id=first.pk, training=training) == "1"
    base = ModelVersion.objects.get(model__name="digits-dp", number=1)
    second = dp.dp_retrain_create(
        namespace=actors.acme,
        dataset=dataset,
        blocks=["b1"],
        model_name="digits-dp",
        base_version=base,
        params={"noise_multiplier": 1.0, "family": "mlp", "hidden": [32], "epochs": 2},
        creator=actors.users["alice"],
    )
    assert dp.dp_retrain_run(job_id=second.pk, training=training) == "2"
    # A base of another shape is refused before any step runs.
    third = dp.dp_retrain_create(
        namespace=actors.acme,
        dataset=dataset,
        blocks=["b1"],
        model_name="digits-dp",
        base_version=base,
        params={"noise_multiplier": 1.0, "family": "logreg", "epochs": 1},
        creator=actors.users["alice"],
    )
    assert dp.dp_retrain_run(job_id=third.pk, training=training) is None
    third.refresh_from_db()
    assert third.state == JobState.FAILED and "Base version 1" in third.error_message
    assert [e.kind for e in LedgerEntry.objects.filter(job=third).order_by("id")] == [
        "claim",
        "release",
    ]

    audit_job = dp.privacy_audit_create(
        namespace=actors.acme,
        version=ModelVersion.objects.get(model__name="digits-dp", number=2),
        dataset=dataset,
        blocks=["b1"],
        params={},
        creator=actors.users["bob"],
    )
    result = dp.privacy_audit_run(job_id=audit_job.pk, training=training)
    assert result is not None
    assert 0.0 <= result["membership_inference"]["auc"] <= 1.0
    assert result["accuracy"] > 0.5
    assert result["dp_record"]["accountant"] == "rdp"
    audit_job.refresh_from_db()
    assert audit_job.state == JobState.SUCCEEDED
    # An audit spends no budget.
    assert not LedgerEntry.objects.filter(job=audit_job).exists()


def test_over_budget_retraining_is_refused_before_anything_is_queued(actors):
    dataset = digits_dataset(actors, epsilon=3.0)
    # Two runs at 2.2 compose to 3.13 under RDP (composition is sublinear: two runs at 2.0
    # would compose to 2.85 and both fit a cap of 3).
    retrain(actors, dataset, target_epsilon=2.2, epochs=10)
    before = Job.objects.count()
    from registry.errors import BudgetExceeded

    with pytest.raises(BudgetExceeded) as refused:
        retrain(actors, dataset, target_epsilon=2.2, epochs=10)
    assert refused.value.extra["block"] == "b1" and refused.value.extra["cap_epsilon"] == 3.0
    assert Job.objects.count() == before
    assert uuid.UUID(Job.objects.get(kind="dp_retrain").params["claim"])


def test_a_worker_without_torch_fails_the_job_and_releases_its_claim(actors):
    dataset = digits_dataset(actors)
    job = retrain(actors, dataset, noise_multiplier=1.0)
    assert dp.dp_retrain_run(job_id=job.pk, training=None) is None
    job.refresh_from_db()
    assert job.state == JobState.FAILED and "pip install -e '.[dp]'" in job.error_message
    kinds = [e.kind for e in LedgerEntry.objects.filter(job=job).order_by("id")]
    assert kinds == ["claim", "release"]
