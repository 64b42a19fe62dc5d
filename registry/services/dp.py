"""DP retraining and privacy-audit jobs: admission at creation, the run on a `dp` worker.

`dp_job_create` plans the run's DP event from the blocks' declared record counts (q =
batch / training records, steps = epochs x batches per epoch), calibrates the noise for a
target epsilon with the blocks' accountant, and claims the budget in the transaction that
creates the job: a job exists only if its budget was reserved, and an over-budget request is
refused before anything is queued.

`dp_retrain_run` (the worker) records each epoch's steps on the job *before* running them, so
a worker killed mid-epoch leaves a durable upper bound of what it spent. Whatever ends the run
(success, a failure, a cancel, or a later delivery finding that the previous worker died),
the claim is settled with those steps committed and the rest released.

torch, opacus and scikit-learn are an optional extra (`pip install -e '.[dp]'`): the training
loop is `workers.training`, which only the `dp` worker imports and hands to the run functions
here (services sit below workers and never import them), so the web server never needs torch.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from registry.dp import accounting
from registry.dp.accounting import AccountingError, DpEvent
from registry.errors import InvalidInput, JobNotCancellable, RegistryError
from registry.models import (
    Artifact,
    AuditAction,
    DataBlock,
    Dataset,
    Job,
    JobKind,
    JobState,
    LedgerEntry,
    LedgerKind,
    LedgerSource,
    ModelVersion,
    Namespace,
    RegisteredModel,
)
from registry.services import artifacts, audit, catalog, jobs, ledger

logger = logging.getLogger(__name__)

FAMILIES = ("logreg", "mlp")
# Files a dp_retrain version holds; a base version must hold the first two.
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"

EPSILON_EVERY = 5.0  # seconds between two "epsilon spent" figures in a job's progress
RECORD_AHEAD = 0.5  # seconds of training recorded as started with one database write
CANCEL_CHECK_EVERY = 1.0  # seconds between two looks for a cancel of a running job

DEFAULTS: dict[str, Any] = {
    "family": "logreg",
    "hidden": [64],
    "epochs": 10,
    "batch_size": 64,
    "max_grad_norm": 1.0,
    "learning_rate": None,  # the family's default (workers.training)
    "holdout_fraction": 0.2,
    "seed": 0,
    "label_column": "label",
}


class DpJobFailed(RegistryError):
    """A run that cannot go on (bad data, mismatched base weights): fails the job, not retried."""

    code = "dp_job_failed"


def _int(params: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = params.get(name, DEFAULTS.get(name))
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"{name} must be an integer from {low} to {high}.", field=name)
    return value


def _number(params: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = params.get(name, DEFAULTS.get(name))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{name} must be a number.", field=name)
    if not math.isfinite(value) or not low < value <= high:
        raise InvalidInput(f"{name} must be above {low:g} and at most {high:g}.", field=name)
    return float(value)


def training_records(records: int, holdout_fraction: float) -> tuple[int, int]:
    """(train, holdout) sizes of a split, as workers.training.table_split makes it."""
    holdout = min(max(round(records * holdout_fraction), 1), max(records - 1, 1))
    return records - holdout, holdout


def dp_retrain_plan(
    *, dataset: Dataset, blocks: list[DataBlock], params: Mapping[str, Any]
) -> dict[str, Any]:
    """Validate a dp_retrain request and plan its DP event (no writes)."""
    family = params.get("family", DEFAULTS["family"])
    if family not in FAMILIES:
        raise InvalidInput(f"family must be one of {list(FAMILIES)}.", field="family")
    hidden = params.get("hidden", DEFAULTS["hidden"])
    if (
        not isinstance(hidden, list)
        or not 1 <= len(hidden) <= 4
        or not all(
            isinstance(h, int) and not isinstance(h, bool) and 1 <= h <= 4096 for h in hidden
        )
    ):
        raise InvalidInput("hidden must be a list of 1 to 4 layer widths (1-4096).", field="hidden")
    epochs = _int(params, "epochs", 1, 1000)
    batch_size = _int(params, "batch_size", 1, 1_000_000)
    seed = _int(params, "seed", 0, 2**31 - 1)
    max_grad_norm = _number(params, "max_grad_norm", 0.0, 1e6)
    holdout = _number(params, "holdout_fraction", 0.0, 0.9)
    learning_rate = _number(params, "learning_rate", 0.0, 100.0)
    label_column = params.get("label_column", DEFAULTS["label_column"])
    if not isinstance(label_column, str) or not 0 < len(label_column) <= 128:
        raise InvalidInput("label_column must be a column name.", field="label_column")
    target = _number(params, "target_epsilon", 0.0, 1e4)
    sigma = _number(params, "noise_multiplier", 0.0, 1e4)
    if (target is None) == (sigma is None):
        raise InvalidInput("Give exactly one of target_epsilon and noise_multiplier.")
    missing = [b.name for b in blocks if b.artifact_id is None or b.records is None]
    if missing:
        raise InvalidInput(
            f"Block(s) {missing} have no data file or no record count; a job can only train "
            "on blocks created with a file and its records.",
            blocks=missing,
        )
    records = sum(b.records or 0 for b in blocks)
    assert holdout is not None and max_grad_norm is not None  # defaults are set
    n_train, n_holdout = training_records(records, holdout)
    if n_train < batch_size:
        raise InvalidInput(
            f"The blocks hold {n_train} training records, fewer than batch_size {batch_size}; "
            "use a smaller batch.",
            field="batch_size",
        )
    q = accounting.sampling_rate(n_train, batch_size)
    steps = epochs * accounting.steps_per_epoch(n_train, batch_size)
    accountant = ledger.accountant_of(blocks, params.get("accountant"))
    try:
        if sigma is None:
            assert target is not None
            sigma = accounting.noise_calibrate(
                sampling_rate=q,
                steps=steps,
                target_epsilon=target,
                delta=dataset.delta,
                accountant=accountant,
                max_grad_norm=max_grad_norm,
            )
        event = DpEvent(q, sigma, steps, max_grad_norm)
        cost = accounting.epsilon([event], delta=dataset.delta, accountant=accountant)
    except AccountingError as exc:
        raise InvalidInput(str(exc)) from exc
    return {
        "family": family,
        "hidden": hidden if family == "mlp" else [],
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "learning_rate": learning_rate,
        "holdout_fraction": holdout,
        "label_column": label_column,
        "target_epsilon": target,
        "records": records,
        "n_train": n_train,
        "n_holdout": n_holdout,
        "accountant": accountant,
        "event": event.as_dict(),
        "epsilon": cost,
    }


def dp_retrain_create(
    *,
    namespace: Namespace,
    dataset: Dataset,
    blocks: list[str] | None,
    model_name: str,
    base_version: ModelVersion | None,
    params: Mapping[str, Any],
    creator: User,
) -> Job:
    """Admit a DP retraining job: plan it, claim its budget and queue it, all or nothing.

    The new version goes to `model_name`, created for `creator` if the namespace has no such
    model (the caller checked they may write there).
    """
    found = ledger.blocks_named(dataset, blocks, lock=False)
    plan = dp_retrain_plan(dataset=dataset, blocks=found, params=params)
    event = DpEvent(**plan["event"])
    with transaction.atomic():
        model = RegisteredModel.objects.filter(namespace=namespace, name__iexact=model_name).first()
        if model is None:
            model = catalog.model_create(namespace=namespace, name=model_name, creator=creator)
        job = jobs.job_create(
            kind=JobKind.DP_RETRAIN,
            namespace=namespace,
            created_by=creator,
            params={
                **plan,
                "dataset": dataset.name,
                "blocks": [b.name for b in found],
                "model": model.name,
                "base_version": base_version.number if base_version else None,
            },
        )
        claim = ledger.ledger_claim(
            dataset=dataset,
            blocks=[b.name for b in found],
            event=event,
            source=LedgerSource.JOB,
            creator=creator,
            job=job,
            accountant=plan["accountant"],
        )
        job.params = {**job.params, "claim": str(claim)}
        job.save(update_fields=["params"])
        audit.audit_record(
            action=AuditAction.JOB_CREATE,
            namespace=namespace.name,
            target=f"jobs/{job.pk}",
            details={"kind": job.kind, "dataset": dataset.name, "claim": str(claim)},
        )
    return job


def privacy_audit_create(
    *,
    namespace: Namespace,
    version: ModelVersion,
    dataset: Dataset,
    blocks: list[str] | None,
    params: Mapping[str, Any],
    creator: User,
) -> Job:
    """Queue a membership-inference audit of `version` against a dataset's blocks."""
    found = ledger.blocks_named(dataset, blocks, lock=False)
    missing = [b.name for b in found if b.artifact_id is None]
    if missing:
        raise InvalidInput(f"Block(s) {missing} have no data file to audit against.")
    holdout = _number(params, "holdout_fraction", 0.0, 0.9)
    seed = _int(params, "seed", 0, 2**31 - 1)
    label_column = params.get("label_column", DEFAULTS["label_column"])
    if not isinstance(label_column, str):
        raise InvalidInput("label_column must be a column name.", field="label_column")
    with transaction.atomic():
        job = jobs.job_create(
            kind=JobKind.PRIVACY_AUDIT,
            namespace=namespace,
            version=version,
            created_by=creator,
            params={
                "dataset": dataset.name,
                "blocks": [b.name for b in found],
                "model": version.model.name,
                "version": version.number,
                "holdout_fraction": holdout,
                "seed": seed,
                "label_column": label_column,
            },
        )
        audit.audit_record(
            action=AuditAction.JOB_CREATE,
            namespace=namespace.name,
            target=f"jobs/{job.pk}",
            details={"kind": job.kind, "dataset": dataset.name, "version": version.number},
        )
    return job


def job_cancel(*, job: Job) -> Job:
    """Cancel a queued or running job (audited). A queued DP job releases its whole claim at
    once; a running one stops at its next check and commits the steps it ran."""
    with transaction.atomic():
        locked = Job.objects.select_for_update(of=("self",)).get(pk=job.pk)
        if locked.state not in (JobState.QUEUED, JobState.RUNNING):
            raise JobNotCancellable(state=locked.state)
        now = timezone.now()
        if locked.state == JobState.QUEUED:
            locked.state = JobState.CANCELLED
            locked.finished_at = now
            locked.error_code = "cancelled"
            locked.error_message = "Cancelled before it started."
        locked.cancel_requested_at = now
        locked.save()
        audit.audit_record(
            action=AuditAction.JOB_CANCEL,
            namespace=job.namespace.name if job.namespace else "",
            target=f"jobs/{job.pk}",
            details={"kind": locked.kind, "state_was": job.state},
        )
        claim = locked.params.get("claim")
        if locked.state == JobState.CANCELLED and claim:
            ledger.ledger_settle(claim=uuid.UUID(claim), steps_run=0, note="cancelled while queued")
    return locked


# --- the run (worker side) -------------------------------------------------------------------


def _steps_started(job: Job) -> int:
    value = (job.result or {}).get("steps_started", 0)
    return value if isinstance(value, int) else 0


def _progress(job: Job, **fields: Any) -> None:
    """Record progress on a running job (a conditional UPDATE: a finished job stays so)."""
    result = {**(job.result or {}), **fields}
    job.result = result
    epochs = job.params.get("epochs") or 1
    message = f"{result.get('epoch', 0)}/{epochs} epochs done"
    if "epsilon_spent" in result:
        message += f", epsilon spent {result['epsilon_spent']:.3f}"
    Job.objects.filter(pk=job.pk, state=JobState.RUNNING).update(
        result=result,
        progress=min(1.0, result.get("epoch", 0) / epochs),
        progress_message=message[:300],
    )


def _claim_settled(job: Job) -> bool:
    claim = job.params.get("claim")
    return bool(claim) and (
        LedgerEntry.objects.filter(claim=claim).exclude(kind=LedgerKind.CLAIM).exists()
    )


def _cancel_requested(job_id: uuid.UUID) -> bool:
    return (
        Job.objects.filter(pk=job_id)
        .exclude(state=JobState.RUNNING, cancel_requested_at__isnull=True)
        .exists()
    )


def _settle(job: Job, steps: int, *, version: ModelVersion | None = None, note: str) -> None:
    claim = job.params.get("claim")
    if claim:
        ledger.ledger_settle(
            claim=uuid.UUID(claim),
            steps_run=steps,
            version=version,
            creator=job.created_by,
            note=note,
        )


def _training_check(training: Any) -> Any:
    if training is None:
        raise DpJobFailed(
            "This worker cannot train: torch and opacus are not installed. Install the dp "
            "extra (pip install -e '.[dp]') on the workers of the `dp` queue.",
        )
    return training


def _download(artifact_id: uuid.UUID, folder: Path) -> Path:
    """Decrypt one data file to a private temporary file (an audited download)."""
    artifact = (
        Artifact.objects.select_related("version__model__namespace").filter(pk=artifact_id).first()
    )
    if artifact is None:
        raise DpJobFailed("A block's data file is gone.")
    suffix = Path(artifact.path).suffix.lower()
    out = folder / f"{artifact.pk}{suffix}"
    with out.open("wb") as handle:
        stream = artifacts.artifact_open(artifact=artifact)
        try:
            for chunk in stream:
                handle.write(chunk)
        finally:
            stream.close()
    return out


def _tables(
    training: Any, dataset: Dataset, names: list[str], label_column: str, folder: Path
) -> Any:
    blocks = list(DataBlock.objects.filter(dataset=dataset, name__in=names).order_by("id"))
    tables = []
    for block in blocks:
        if block.artifact_id is None:
            raise DpJobFailed(f"Block {block.name!r} has no data file.")
        path = _download(block.artifact_id, folder)
        try:
            table = training.table_read(path, label_column=label_column)
        except training.TrainingDataError as exc:
            raise DpJobFailed(f"Block {block.name!r}: {exc}") from exc
        if block.records is not None and len(table.y) != block.records:
            raise DpJobFailed(
                f"Block {block.name!r} was declared with {block.records} records but its file "
                f"holds {len(table.y)}; the ledger's sampling rate would be wrong. Create a "
                "block with the right count."
            )
        tables.append(table)
    return training.tables_concat(tables)


def _version_files(version: ModelVersion) -> dict[str, Artifact]:
    return {a.path: a for a in Artifact.objects.filter(version=version)}


def _read_small(artifact: Artifact, limit: int = 1 << 20) -> bytes:
    if artifact.size > limit:
        raise DpJobFailed(f"{artifact.path} is larger than {limit} bytes.")
    stream = artifacts.artifact_open(artifact=artifact)
    try:
        return b"".join(stream)
    finally:
        stream.close()


def _weights_of(
    training: Any, version: ModelVersion, folder: Path
) -> tuple[Any, dict[str, Any], Mapping[str, Any]]:
    """(spec, config, tensors) of a version written by a dp_retrain job (safetensors only)."""
    files = _version_files(version)
    if WEIGHTS_FILE not in files or CONFIG_FILE not in files:
        raise DpJobFailed(
            f"Version {version.number} has no {WEIGHTS_FILE} and {CONFIG_FILE}; only versions "
            "written by a dp_retrain job (or in its format) can be a base or be audited."
        )
    try:
        config = json.loads(_read_small(files[CONFIG_FILE]))
        spec = training.ModelSpec.from_config(config.get("model", {}))
    except (ValueError, AttributeError, training.TrainingDataError) as exc:
        raise DpJobFailed(f"{CONFIG_FILE} of version {version.number} is not valid: {exc}") from exc
    path = _download(files[WEIGHTS_FILE].pk, folder)
    try:
        tensors = training.weights_load(path)
    except Exception as exc:
        raise DpJobFailed(f"{WEIGHTS_FILE} of version {version.number} is not valid.") from exc
    return spec, config, tensors


def _device() -> str:
    device = str(settings.SMR_DP_DEVICE)
    return device if device in ("cpu", "cuda", "auto") else "auto"


def dp_retrain_run(*, job_id: uuid.UUID, training: Any) -> str | None:
    """Run a claimed dp_retrain job with the worker's training loop (`workers.training`, or
    None where torch is missing); returns the new version's number, or None.

    A delivery that finds steps recorded by an earlier one (its worker died) does not train
    again: it commits those steps, releases the rest and fails the job.
    """
    audit.context_set_system("worker:dp_retrain")
    job = jobs.job_start(job_id=job_id)
    if job is None:
        # Finished or out of attempts; a claim left open by a dead worker is settled here.
        stale = Job.objects.filter(pk=job_id).first()
        if stale is not None and stale.kind == JobKind.DP_RETRAIN:
            _settle(stale, _steps_started(stale), note="job ended without its worker")
        return None
    started = _steps_started(job)
    if started > 0 or job.cancel_requested_at is not None:
        cancelled = job.cancel_requested_at is not None
        _settle(job, started, note="cancelled" if cancelled else "worker lost mid-run")
        jobs.job_fail(
            job_id=job_id,
            code="cancelled" if cancelled else "worker_lost",
            message=(
                f"The worker running this job stopped after starting {started} steps; they "
                "are committed to the ledger and the rest released. Start a new job."
            ),
            state=JobState.CANCELLED if cancelled else JobState.FAILED,
        )
        return None
    if _claim_settled(job):
        # Settled by a cancel or an earlier failure: training now would spend budget that is
        # no longer reserved.
        jobs.job_fail(
            job_id=job_id,
            code="claim_settled",
            message="The job's budget claim "
            "was already settled (cancelled or failed); start a new job.",
        )
        return None
    try:
        return _train(job, _training_check(training))
    except BaseException as exc:
        # Whatever stopped it, the steps it started spent privacy: commit them. No error is
        # retried (the task has no autoretry): a retry would train again on a settled claim.
        fresh = Job.objects.filter(pk=job_id).first() or job
        _settle(fresh, _steps_started(fresh), note=f"run failed: {type(exc).__name__}")
        if isinstance(exc, RegistryError):
            jobs.job_fail(job_id=job_id, code=exc.code, message=exc.message)
            return None
        raise


def _train(job: Job, training: Any) -> str | None:
    params = job.params
    namespace = job.namespace
    assert namespace is not None
    dataset = Dataset.objects.select_related("namespace").get(
        namespace=namespace, name=params["dataset"]
    )
    event = DpEvent(**params["event"])
    with tempfile.TemporaryDirectory(prefix="smr-dp-") as tmp:
        folder = Path(tmp)
        table = _tables(training, dataset, params["blocks"], params["label_column"], folder)
        train_table, holdout_table = training.table_split(
            table, holdout_fraction=params["holdout_fraction"], seed=params["seed"]
        )
        if len(train_table.y) != params["n_train"]:
            raise DpJobFailed(
                f"The split holds {len(train_table.y)} training records, the plan "
                f"{params['n_train']}; nothing was trained."
            )
        model = RegisteredModel.objects.select_related("namespace").get(
            namespace=namespace, name=params["model"]
        )
        spec = training.ModelSpec(
            family=params["family"],
            n_features=int(table.X.shape[1]),
            n_classes=len(table.classes),
            hidden=tuple(params["hidden"]),
        )
        init = None
        if params.get("base_version") is not None:
            base = ModelVersion.objects.get(model=model, number=params["base_version"])
            base_spec, _config, init = _weights_of(training, base, folder)
            if base_spec != spec:
                raise DpJobFailed(
                    f"Base version {base.number} is a {base_spec.to_config()} model; this job "
                    f"trains {spec.to_config()} (same family, layers, features and classes "
                    "needed)."
                )
        train_params = training.TrainParams(
            epochs=params["epochs"],
            batch_size=params["batch_size"],
            max_grad_norm=event.max_grad_norm,
            noise_multiplier=event.noise_multiplier,
            seed=params["seed"],
            device=_device(),
            **({"learning_rate": params["learning_rate"]} if params["learning_rate"] else {}),
        )
        steps_done = 0
        recorded = 0  # steps recorded as started on the job row
        epoch_began = time.monotonic()
        # Epsilon so far is shown at most every EPSILON_EVERY seconds: an accountant call costs
        # as much as an epoch of a small model, and the progress line needs no more.
        shown_at = -math.inf

        def before_epoch(epoch: int, steps: int) -> None:
            nonlocal shown_at, recorded, epoch_began
            now = time.monotonic()
            epoch_s, epoch_began = now - epoch_began, now
            due = steps_done > 0 and now - shown_at >= EPSILON_EVERY
            if steps_done + steps <= recorded and not due:
                return
            # Durable before the steps run: a worker killed mid-epoch leaves an upper bound.
            # Short epochs are recorded a few at a time (about RECORD_AHEAD seconds of them),
            # so a tiny model does not wait on a database write per epoch; a kill then
            # over-counts by at most that much, never under-counts.
            ahead = 1 if epoch == 0 else max(1, math.ceil(RECORD_AHEAD / max(epoch_s, 1e-3)))
            ahead = min(ahead, params["epochs"] - epoch)
            recorded = max(recorded, steps_done + steps * ahead)
            fields: dict[str, Any] = {
                "epoch": epoch,
                "steps": steps_done,
                "steps_started": recorded,
            }
            if due:
                fields["epsilon_spent"] = accounting.epsilon(
                    [event.with_steps(steps_done)],
                    delta=dataset.delta,
                    accountant=params["accountant"],
                )
                shown_at = time.monotonic()
            _progress(job, **fields)

        def after_epoch(epochs_done: int, total: int) -> None:
            nonlocal steps_done
            steps_done = total

        checked_at = time.monotonic()

        def stop_requested() -> bool:
            # A cancel is looked for once a second, not after every (maybe millisecond) epoch.
            nonlocal checked_at
            if time.monotonic() - checked_at < CANCEL_CHECK_EVERY:
                return False
            checked_at = time.monotonic()
            return _cancel_requested(job.pk)

        result = training.train(
            spec,
            train_params,
            train_table,
            init=init,
            before_epoch=before_epoch,
            after_epoch=after_epoch,
            should_stop=stop_requested,
        )
        if result.stopped:
            _settle(job, result.steps, note="cancelled")
            jobs.job_fail(
                job_id=job.pk,
                code="cancelled",
                message=f"Cancelled after {result.steps} steps; they are committed.",
                state=JobState.CANCELLED,
            )
            return None
        spent_event = event.with_steps(result.steps)
        epsilon = accounting.epsilon(
            [spent_event], delta=dataset.delta, accountant=params["accountant"]
        )
        accuracy = training.accuracy(result.module, holdout_table)
        mia = training.membership_inference(result.module, train_table, holdout_table)
        weights = folder / WEIGHTS_FILE
        training.weights_save(result.module, spec, weights)
        summary = {
            "dataset": dataset.name,
            "privacy_unit": dataset.privacy_unit,
            "blocks": params["blocks"],
            "accountant": params["accountant"],
            "epsilon": epsilon,
            "delta": dataset.delta,
            "target_epsilon": params["target_epsilon"],
            "event": spent_event.as_dict(),
            "accuracy": accuracy,
            "membership_inference": mia,
            "n_train": len(train_table.y),
            "n_holdout": len(holdout_table.y),
        }
        config = {
            "format": "smr-dp-v1",
            "model": spec.to_config(),
            "classes": table.classes,
            "training": {
                key: params[key]
                for key in (
                    "epochs",
                    "batch_size",
                    "learning_rate",
                    "holdout_fraction",
                    "seed",
                    "label_column",
                    "base_version",
                )
            },
            "privacy": summary,
            "library_versions": _library_versions(),
        }
        version = catalog.version_create(
            model=model,
            description=f"DP-SGD retraining on {dataset.name} (epsilon {epsilon:.3f})",
            creator=_owner(job),
        )
        uploads = {
            WEIGHTS_FILE: _file_chunks(weights),
            CONFIG_FILE: iter([json.dumps(config, indent=2, sort_keys=True).encode()]),
            CARD_FILE: iter([model_card(model=model, version=version, config=config).encode()]),
        }
        for path, chunks in uploads.items():
            artifacts.artifact_upload(
                version=version,
                path=path,
                chunks=chunks,
                expected_sha256=None,
                expected_size=None,
                creator=job.created_by,
            )
    with transaction.atomic():
        catalog.version_update(
            version=version, tags={ledger.DATASET_TAG: dataset.name, "trained_by": "dp_retrain"}
        )
        _settle(job, result.steps, version=version, note="trained")
        jobs.job_finish(
            job_id=job.pk,
            result={**summary, "version": version.number, "model": model.name},
        )
    return str(version.number)


def _file_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(size):
            yield chunk


def _owner(job: Job) -> User:
    if job.created_by is None:
        raise DpJobFailed("The job's creator no longer exists; nobody could own its version.")
    return job.created_by


def _library_versions() -> dict[str, str]:
    found = {}
    for name in ("torch", "opacus"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return {**accounting.library_versions(), **found}


def model_card(*, model: RegisteredModel, version: ModelVersion, config: Mapping[str, Any]) -> str:
    """The version's README: the DP guarantee first, the measured leakage beside it."""
    privacy = config["privacy"]
    mia = privacy["membership_inference"]
    event = privacy["event"]
    spec = config["model"]
    training_params = config["training"]
    layers = f" hidden layers {spec.get('hidden')}" if spec.get("family") == "mlp" else ""
    return (
        f"# {model.name} v{version.number}: DP-SGD on `{privacy['dataset']}`\n\n"
        "## Privacy guarantee\n\n"
        f"- **(epsilon, delta) = ({privacy['epsilon']:.4f}, {privacy['delta']:g})**, "
        f"{privacy['accountant'].upper()} accountant (dp-accounting "
        f"{config['library_versions'].get('dp-accounting', '?')}), privacy unit: one "
        f"{privacy.get('privacy_unit', 'record')} (one row of the data)\n"
        f"- target epsilon: {privacy['target_epsilon']}\n"
        f"- blocks charged: {', '.join(privacy['blocks'])}\n"
        f"- DP-SGD event: sampling rate {event['sampling_rate']:.6f}, noise multiplier "
        f"{event['noise_multiplier']:.4f}, {event['steps']} steps, clipping norm "
        f"{event['max_grad_norm']:g}\n\n"
        "## Measured leakage (loss-threshold membership inference)\n\n"
        f"- AUC: {mia['auc']:.4f} (0.5 = the attack cannot tell members from non-members)\n"
        f"- membership advantage: {mia['advantage']:.4f}\n"
        f"- members {mia['members']}, non-members {mia['nonmembers']} (training vs held-out)\n\n"
        "## Quality\n\n"
        f"- held-out accuracy: {privacy['accuracy']:.4f} on {privacy['n_holdout']} records "
        f"({privacy['n_train']} used for training)\n\n"
        "## Training\n\n"
        f"- family: {spec['family']}{layers}, {spec['n_features']} features, "
        f"{spec['n_classes']} classes\n"
        f"- epochs {training_params['epochs']}, batch size {training_params['batch_size']}, "
        f"seed {training_params['seed']}, base version {training_params['base_version']}\n"
        f"- weights: `{WEIGHTS_FILE}` (safetensors), configuration: `{CONFIG_FILE}`\n"
    )


def privacy_audit_run(*, job_id: uuid.UUID, training: Any) -> dict[str, Any] | None:
    """Run a membership-inference audit of a version against its dataset's blocks."""
    audit.context_set_system("worker:privacy_audit")
    job = jobs.job_start(job_id=job_id)
    if job is None:
        return None
    try:
        return _audit(job, _training_check(training))
    except RegistryError as exc:
        jobs.job_fail(job_id=job_id, code=exc.code, message=exc.message)
        return None


def _audit(job: Job, training: Any) -> dict[str, Any]:
    params = job.params
    namespace = job.namespace
    version = job.version
    if namespace is None or version is None:
        raise DpJobFailed("The version to audit is gone.")
    dataset = Dataset.objects.select_related("namespace").get(
        namespace=namespace, name=params["dataset"]
    )
    with tempfile.TemporaryDirectory(prefix="smr-audit-") as tmp:
        folder = Path(tmp)
        spec, config, tensors = _weights_of(training, version, folder)
        split = config.get("training", {}) if isinstance(config.get("training"), dict) else {}
        # A version this registry trained is audited on its own split; any other on the
        # job's parameters.
        holdout = params.get("holdout_fraction") or split.get("holdout_fraction") or 0.2
        seed = params.get("seed") if "seed" in params else split.get("seed", 0)
        table = _tables(training, dataset, params["blocks"], params["label_column"], folder)
        members, nonmembers = training.table_split(table, holdout_fraction=holdout, seed=seed)
        try:
            module = training.module_from_weights(spec, tensors)
        except training.TrainingDataError as exc:
            raise DpJobFailed(str(exc)) from exc
        mia = training.membership_inference(module, members, nonmembers)
        result = {
            "dataset": dataset.name,
            "blocks": params["blocks"],
            "model": version.model.name,
            "version": version.number,
            "membership_inference": mia,
            "accuracy": training.accuracy(module, nonmembers),
            "dp_record": _record_summary(version),
        }
    jobs.job_finish(job_id=job.pk, result=result)
    return result


def _record_summary(version: ModelVersion) -> dict[str, Any] | None:
    entry = (
        LedgerEntry.objects.filter(version=version, kind=LedgerKind.COMMIT).order_by("id").first()
    )
    if entry is None:
        return None
    return {"epsilon": entry.epsilon, "delta": entry.delta, "accountant": entry.accountant}
