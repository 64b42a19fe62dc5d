"""The DP budget ledger: datasets, their append-only blocks, and claims on their budgets.

A run (a dp_retrain job, or a training run elsewhere declared with its DP event) claims every
block it reads. Admission locks the block rows, composes each block's ledger with the planned
event under the block's accountant and writes the claims only if every block stays within its
cap: all or nothing, in one transaction, so two runs admitted at once cannot both spend the
last of a budget. Settling a claim writes what was actually spent (a commit: steps already run
count, even when the run failed) and releases the rest. Spent budget is always recomposed from
the entries, never kept as a counter, and the entries themselves cannot change (triggers).
"""

from __future__ import annotations

import math
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from django.contrib.auth.models import User
from django.db import IntegrityError, transaction

from registry.dp import accounting
from registry.dp.accounting import AccountingError, DpEvent
from registry.errors import (
    AccountantMismatch,
    AlreadyExists,
    BudgetExceeded,
    DpBudgetGateNotMet,
    DpRecordExists,
    InvalidInput,
    NotFound,
    VersionNotRecordable,
)
from registry.models import (
    Accountant,
    Artifact,
    AuditAction,
    DataBlock,
    Dataset,
    Job,
    LedgerEntry,
    LedgerKind,
    LedgerSource,
    ModelVersion,
    Namespace,
    PrivacyUnit,
    Sensitivity,
    VersionState,
)
from registry.services.audit import audit_record, audit_target
from registry.services.catalog import fields_validate

T = TypeVar("T")

# Datasets whose models the DP gate holds to a committed DP record (DESIGN section 5).
SENSITIVE = frozenset({Sensitivity.CONFIDENTIAL, Sensitivity.RESTRICTED})
# A version's tag naming the registered dataset it was trained on: the gate then requires a
# DP record on that dataset even when no run was declared.
DATASET_TAG = "dataset"
# Data a block can point at: submitted (so its bytes can no longer change) and not unsafe.
_BLOCK_SOURCE_STATES = (VersionState.PENDING_REVIEW, VersionState.APPROVED)


def _audited(value: Any) -> Any:
    """`value` with its floats as their shortest repr: the audit log's canonical JSON holds
    no floats (they have no single text form), and repr round-trips exactly."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return {key: _audited(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_audited(item) for item in value]
    return value


def _target(dataset: Dataset, block: str | None = None) -> str:
    base = audit_target(dataset.namespace.name, f"datasets/{dataset.name}")
    return f"{base}/{block}" if block else base


def _finite(value: Any, name: str, *, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{name} must be a number.", field=name)
    number = float(value)
    if not math.isfinite(number) or not (low < number < high):
        raise InvalidInput(f"{name} must be between {low:g} and {high:g} (exclusive).", field=name)
    return number


def dataset_create(
    *,
    namespace: Namespace,
    name: str,
    sensitivity: str,
    delta: float,
    privacy_unit: str = PrivacyUnit.RECORD,
    description: str = "",
    creator: User,
) -> Dataset:
    """Register a dataset whose privacy budget the ledger tracks (audited)."""
    if sensitivity not in Sensitivity.values:
        raise InvalidInput(f"sensitivity must be one of {Sensitivity.values}.", field="sensitivity")
    if privacy_unit not in PrivacyUnit.values:
        raise InvalidInput(
            f"privacy_unit must be one of {PrivacyUnit.values}.", field="privacy_unit"
        )
    dataset = Dataset(
        namespace=namespace,
        name=name,
        sensitivity=sensitivity,
        privacy_unit=privacy_unit,
        delta=_finite(delta, "delta", low=0.0, high=1.0),
        description=description,
        created_by=creator,
    )
    fields_validate(dataset, exclude=["namespace", "created_by"])
    try:
        with transaction.atomic():
            dataset.save()
            audit_record(
                action=AuditAction.DATASET_CREATE,
                namespace=namespace.name,
                target=_target(dataset),
                details=_audited(
                    {
                        "sensitivity": sensitivity,
                        "privacy_unit": privacy_unit,
                        "delta": dataset.delta,
                    }
                ),
            )
    except IntegrityError as exc:
        raise AlreadyExists(f"Dataset {name!r} already exists in {namespace.name!r}.") from exc
    return dataset


def data_block_create(
    *,
    dataset: Dataset,
    name: str,
    epsilon: float,
    accountant: str,
    delta: float | None = None,
    artifact: Artifact | None = None,
    records: int | None = None,
    creator: User,
) -> DataBlock:
    """Append a block with its budget cap and its one accountant to a dataset (audited).

    `artifact` is the block's data, a file of a submitted version of the same namespace that
    passed its scan; `records` is how many privacy units it holds (a job checks the file
    against it before training). A block can never be changed afterwards.
    """
    if accountant not in Accountant.values:
        raise InvalidInput(f"accountant must be one of {Accountant.values}.", field="accountant")
    cap_delta = dataset.delta if delta is None else _finite(delta, "delta", low=0.0, high=1.0)
    if artifact is not None:
        version = artifact.version
        if version.model.namespace_id != dataset.namespace_id:
            raise InvalidInput("The block's file must belong to the dataset's namespace.")
        if version.state not in _BLOCK_SOURCE_STATES:
            raise InvalidInput(
                f"The block's file is in a version that is {version.state}; point a block at "
                "a file of a version that was submitted and passed its scan (pending_review "
                "or approved), so its bytes can no longer change.",
                field="file",
                state=version.state,
            )
    if records is not None and (isinstance(records, bool) or not 1 <= records <= 2**31 - 1):
        raise InvalidInput("records must be a positive integer.", field="records")
    block = DataBlock(
        dataset=dataset,
        name=name,
        epsilon=_finite(epsilon, "epsilon", low=0.0, high=1e6),
        delta=cap_delta,
        accountant=accountant,
        artifact=artifact,
        records=records,
        created_by=creator,
    )
    fields_validate(block, exclude=["dataset", "artifact", "created_by"])
    try:
        with transaction.atomic():
            block.save()
            audit_record(
                action=AuditAction.DATA_BLOCK_CREATE,
                namespace=dataset.namespace.name,
                target=_target(dataset, name),
                target_sha256=artifact.sha256 if artifact else "",
                details=_audited(
                    {
                        "epsilon": block.epsilon,
                        "delta": block.delta,
                        "accountant": accountant,
                        "records": records,
                        "file": artifact.path if artifact else None,
                    }
                ),
            )
    except IntegrityError as exc:
        raise AlreadyExists(f"Block {name!r} already exists in dataset {dataset.name!r}.") from exc
    return block


def event_parse(data: Any) -> DpEvent:
    """A DP event from its API shape {sampling_rate, noise_multiplier, steps, max_grad_norm}."""
    if not isinstance(data, dict):
        raise InvalidInput(
            "event must be an object {sampling_rate, noise_multiplier, steps, max_grad_norm}."
        )
    steps = data.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidInput("event.steps must be a positive integer.", field="event.steps")
    try:
        return DpEvent(
            sampling_rate=_finite(data.get("sampling_rate"), "event.sampling_rate", low=0, high=2),
            noise_multiplier=_finite(
                data.get("noise_multiplier"), "event.noise_multiplier", low=0, high=1e6
            ),
            steps=steps,
            max_grad_norm=_finite(
                data.get("max_grad_norm", 1.0), "event.max_grad_norm", low=0, high=1e6
            ),
        )
    except AccountingError as exc:
        raise InvalidInput(f"event: {exc}") from exc


@dataclass
class BlockBudget:
    """A block's budget recomposed from its ledger (at the block's own delta)."""

    block: DataBlock
    committed: list[DpEvent] = field(default_factory=list)
    reserved: list[DpEvent] = field(default_factory=list)  # unsettled claims

    def spent(self) -> float:
        return self._epsilon(self.committed)

    def used(self, extra: Sequence[DpEvent] = ()) -> float:
        """Epsilon of everything committed or reserved, plus `extra`, composed."""
        return self._epsilon([*self.committed, *self.reserved, *extra])

    def _epsilon(self, events: Sequence[DpEvent]) -> float:
        return accounting.epsilon(events, delta=self.block.delta, accountant=self.block.accountant)

    def as_dict(self) -> dict[str, Any]:
        spent, used = self.spent(), self.used()
        return {
            "block": self.block.name,
            "accountant": self.block.accountant,
            "cap_epsilon": self.block.epsilon,
            "cap_delta": self.block.delta,
            "spent_epsilon": spent,
            "reserved_epsilon": max(0.0, used - spent),
            "remaining_epsilon": max(0.0, self.block.epsilon - used),
            "runs": len(self.committed),
        }


def _event_of(entry: LedgerEntry) -> DpEvent:
    return DpEvent(entry.sampling_rate, entry.noise_multiplier, entry.steps, entry.max_grad_norm)


def budgets_of(blocks: Sequence[DataBlock]) -> list[BlockBudget]:
    """Each block's budget, composed from its entries (one query for all of them)."""
    budgets = {block.pk: BlockBudget(block) for block in blocks}
    settled: dict[int, set[uuid.UUID]] = defaultdict(set)
    claims: list[LedgerEntry] = []
    for entry in LedgerEntry.objects.filter(block__in=list(budgets)).order_by("id"):
        if entry.kind == LedgerKind.CLAIM:
            claims.append(entry)
            continue
        settled[entry.block_id].add(entry.claim)
        if entry.kind == LedgerKind.COMMIT:
            budgets[entry.block_id].committed.append(_event_of(entry))
    for entry in claims:
        if entry.claim not in settled[entry.block_id]:
            budgets[entry.block_id].reserved.append(_event_of(entry))
    return [budgets[block.pk] for block in blocks]


def dataset_budget(*, dataset: Dataset) -> list[BlockBudget]:
    return budgets_of(list(dataset.blocks.order_by("id")))


def blocks_named(dataset: Dataset, names: Iterable[str] | None, *, lock: bool) -> list[DataBlock]:
    """The named blocks of `dataset` in id order (all of them for None); NotFound names any
    missing one."""
    if names is None:
        names = DataBlock.objects.filter(dataset=dataset).values_list("name", flat=True)
        if not names:
            raise InvalidInput(f"Dataset {dataset.name!r} has no blocks yet.", field="blocks")
    wanted = list(dict.fromkeys(names))
    if not wanted or not all(isinstance(n, str) for n in wanted):
        raise InvalidInput("blocks must be a non-empty list of block names.", field="blocks")
    qs = DataBlock.objects.filter(dataset=dataset, name__in=wanted).order_by("id")
    if lock:
        # Locked in id order by every admission, so two claims never deadlock.
        qs = qs.select_for_update()
    found = {block.name: block for block in qs}
    missing = [n for n in wanted if n not in found]
    if missing:
        raise NotFound(f"Dataset {dataset.name!r} has no block(s) {missing}.", blocks=missing)
    return sorted(found.values(), key=lambda b: b.pk)


def accountant_of(blocks: Sequence[DataBlock], asked: str | None) -> str:
    accountants = sorted({block.accountant for block in blocks})
    if len(accountants) > 1:
        raise AccountantMismatch(
            f"The blocks are accounted with different accountants ({accountants}); a run "
            "must read blocks of one accountant.",
            accountants=accountants,
        )
    if asked is not None and asked != accountants[0]:
        raise AccountantMismatch(
            f"The blocks are accounted with {accountants[0]!r}, not {asked!r}; a block never "
            "mixes accountants.",
            block_accountant=accountants[0],
            asked=asked,
        )
    return accountants[0]


@dataclass(frozen=True)
class Preview:
    accountant: str
    delta: float
    epsilon: float  # the event alone, at the dataset's delta
    blocks: list[dict[str, Any]]

    @property
    def fits(self) -> bool:
        return all(block["fits"] for block in self.blocks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant,
            "delta": self.delta,
            "epsilon": self.epsilon,
            "fits": self.fits,
            "blocks": self.blocks,
        }


def _preview(dataset: Dataset, blocks: Sequence[DataBlock], event: DpEvent, acct: str) -> Preview:
    return _accounted(lambda: _preview_rows(dataset, blocks, event, acct))


def _preview_rows(
    dataset: Dataset, blocks: Sequence[DataBlock], event: DpEvent, acct: str
) -> Preview:
    rows = []
    for budget in budgets_of(blocks):
        cap = budget.block.epsilon
        before, after = budget.used(), budget.used([event])
        rows.append(
            {
                **budget.as_dict(),
                # The event alone at the block's delta, then everything composed with it.
                "epsilon": budget._epsilon([event]),
                "epsilon_after": after,
                "remaining_after": cap - after,
                "fits": after <= cap,
                "used_epsilon": before,
            }
        )
    cost = accounting.epsilon([event], delta=dataset.delta, accountant=acct)
    return Preview(accountant=acct, delta=dataset.delta, epsilon=cost, blocks=rows)


def ledger_preview(
    *, dataset: Dataset, blocks: Sequence[str], event: DpEvent, accountant: str | None = None
) -> Preview:
    """What `event` would cost on each block and whether it fits; reserves nothing."""
    found = blocks_named(dataset, blocks, lock=False)
    return _preview(dataset, found, event, accountant_of(found, accountant))


def _accounted(fn: Callable[[], T]) -> T:
    """Run an accountant computation; what it cannot account for is the caller's 400."""
    try:
        return fn()
    except AccountingError as exc:
        raise InvalidInput(f"event: {exc}", field="event") from exc


def ledger_claim(
    *,
    dataset: Dataset,
    blocks: Sequence[str],
    event: DpEvent,
    source: LedgerSource,
    creator: User | None,
    job: Job | None = None,
    version: ModelVersion | None = None,
    accountant: str | None = None,
    note: str = "",
) -> uuid.UUID:
    """Admit a planned run: reserve `event` on every block, all or nothing; returns the claim.

    Raises BudgetExceeded naming the first block it would overspend, its cap and what the run
    asked, and writes nothing then. Call inside the caller's transaction when the claim must
    commit together with something else (the job that will spend it).
    """
    if event.steps < 1:
        raise InvalidInput("A run claims at least one step.", field="event.steps")
    claim = uuid.uuid4()
    with transaction.atomic():
        found = blocks_named(dataset, blocks, lock=True)
        acct = accountant_of(found, accountant)
        preview = _preview(dataset, found, event, acct)
        for row in preview.blocks:
            if not row["fits"]:
                raise BudgetExceeded(
                    f"Block {row['block']!r} of dataset {dataset.name!r} has a cap of epsilon "
                    f"{row['cap_epsilon']:g} (delta {row['cap_delta']:g}) and has used "
                    f"{row['used_epsilon']:.4f}; this run asks for {row['epsilon']:.4f}, "
                    f"which composes to {row['epsilon_after']:.4f}. Use more noise, fewer "
                    "steps or a smaller sampling rate, or train on another block.",
                    block=row["block"],
                    cap_epsilon=row["cap_epsilon"],
                    used_epsilon=row["used_epsilon"],
                    requested_epsilon=row["epsilon"],
                    epsilon_after=row["epsilon_after"],
                )
        _write(
            dataset,
            found,
            claim=claim,
            kind=LedgerKind.CLAIM,
            source=source,
            event=event,
            accountant=acct,
            job=job,
            version=version,
            creator=creator,
            note=note,
        )
    return claim


def _write(
    dataset: Dataset,
    blocks: Sequence[DataBlock],
    *,
    claim: uuid.UUID,
    kind: LedgerKind,
    source: str,
    event: DpEvent,
    accountant: str,
    job: Job | None,
    version: ModelVersion | None,
    creator: User | None,
    note: str,
) -> None:
    versions = accounting.library_versions()
    cost = accounting.epsilon([event], delta=dataset.delta, accountant=accountant)
    action = {
        LedgerKind.CLAIM: AuditAction.LEDGER_CLAIM,
        LedgerKind.COMMIT: AuditAction.LEDGER_COMMIT,
        LedgerKind.RELEASE: AuditAction.LEDGER_RELEASE,
    }[kind]
    for block in blocks:
        LedgerEntry.objects.create(
            claim=claim,
            kind=kind,
            source=source,
            dataset=dataset,
            block=block,
            job=job,
            version=version,
            sampling_rate=event.sampling_rate,
            noise_multiplier=event.noise_multiplier,
            steps=event.steps,
            max_grad_norm=event.max_grad_norm,
            accountant=accountant,
            library_versions=versions,
            epsilon=cost,
            delta=dataset.delta,
            note=note[:500],
            created_by=creator,
        )
        audit_record(
            action=action,
            namespace=dataset.namespace.name,
            target=_target(dataset, block.name),
            details=_audited(
                {
                    "claim": str(claim),
                    "source": source,
                    "event": event.as_dict(),
                    "accountant": accountant,
                    "epsilon": cost,
                    "delta": dataset.delta,
                    "job": str(job.pk) if job else None,
                    "version": version.number if version else None,
                    "model": version.model.name if version else None,
                }
            ),
        )


def ledger_settle(
    *,
    claim: uuid.UUID,
    steps_run: int,
    version: ModelVersion | None = None,
    creator: User | None = None,
    note: str = "",
) -> bool:
    """Settle a claim: commit the `steps_run` it spent and release the rest.

    Idempotent: a claim already settled is left alone (False). Steps that ran are committed
    even when the run failed or was cancelled; they spent privacy all the same.
    """
    with transaction.atomic():
        claims = list(
            LedgerEntry.objects.filter(claim=claim, kind=LedgerKind.CLAIM)
            .select_related("dataset__namespace", "job")
            .order_by("block_id")
        )
        if not claims:
            raise NotFound("No such ledger claim.")
        first = claims[0]
        blocks = list(
            DataBlock.objects.select_for_update()
            .filter(pk__in=[c.block_id for c in claims])
            .order_by("id")
        )
        if LedgerEntry.objects.filter(claim=claim).exclude(kind=LedgerKind.CLAIM).exists():
            return False
        planned = _event_of(first)
        run = max(0, min(steps_run, planned.steps))
        for kind, steps in ((LedgerKind.COMMIT, run), (LedgerKind.RELEASE, planned.steps - run)):
            if steps > 0:
                _write(
                    first.dataset,
                    blocks,
                    claim=claim,
                    kind=kind,
                    source=first.source,
                    event=planned.with_steps(steps),
                    accountant=first.accountant,
                    job=first.job,
                    version=version,
                    creator=creator,
                    note=note,
                )
    return True


def dp_record_declare(
    *,
    version: ModelVersion,
    dataset: Dataset,
    blocks: Sequence[str],
    event: DpEvent,
    accountant: str | None = None,
    creator: User,
    note: str = "",
) -> uuid.UUID:
    """Register a version trained elsewhere with its DP event: charged like a job (admission
    against every block, then committed at once, since the steps already ran)."""
    if version.model.namespace_id != dataset.namespace_id:
        raise InvalidInput("A version can only record runs on its own namespace's datasets.")
    if version.state in (VersionState.REJECTED, VersionState.REVOKED, VersionState.DEPRECATED):
        raise VersionNotRecordable(
            f"Version {version.number} is {version.state}; a DP record can only be added "
            "before a version is rejected, deprecated or revoked.",
            state=version.state,
        )
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        if LedgerEntry.objects.filter(version=locked).exists():
            raise DpRecordExists()
        claim = ledger_claim(
            dataset=dataset,
            blocks=blocks,
            event=event,
            source=LedgerSource.DECLARED,
            creator=creator,
            version=locked,
            accountant=accountant,
            note=note,
        )
        ledger_settle(claim=claim, steps_run=event.steps, version=locked, creator=creator)
    return claim


def dp_record_of(version: ModelVersion) -> dict[str, Any] | None:
    """The version's committed DP record as the version JSON shows it (None if it has none)."""
    entries = list(
        LedgerEntry.objects.filter(version=version, kind=LedgerKind.COMMIT)
        .select_related("dataset", "block")
        .order_by("id")
    )
    if not entries:
        return None
    first = entries[0]
    event = _event_of(first)
    return {
        "dataset": first.dataset.name,
        "sensitivity": first.dataset.sensitivity,
        "blocks": [entry.block.name for entry in entries],
        "origin": first.source,
        "job": str(first.job_id) if first.job_id else None,
        "event": event.as_dict(),
        "accountant": first.accountant,
        "epsilon": first.epsilon,
        "delta": first.delta,
        "library_versions": first.library_versions,
        "committed_at": first.created_at,
    }


def dp_budget_gate(version: ModelVersion) -> None:
    """Gate `dp_budget`: a version trained on a sensitive dataset needs a committed DP record.

    The version is trained on a dataset if the ledger links it to one, or if its `dataset`
    tag names one of its namespace's datasets. Each such sensitive dataset must carry a
    commit for this version, and every block it spent must still be within its cap.
    """
    committed = list(
        LedgerEntry.objects.filter(version=version, kind=LedgerKind.COMMIT).select_related(
            "dataset", "block"
        )
    )
    linked = {entry.dataset_id: entry.dataset for entry in committed}
    for entry in LedgerEntry.objects.filter(version=version).select_related("dataset"):
        linked.setdefault(entry.dataset_id, entry.dataset)
    tagged = (version.tags or {}).get(DATASET_TAG)
    if isinstance(tagged, str):
        namespace_id = version.model.namespace_id
        for dataset in Dataset.objects.filter(namespace_id=namespace_id, name__iexact=tagged):
            linked.setdefault(dataset.pk, dataset)
    with_commit = {entry.dataset_id for entry in committed}
    for dataset in linked.values():
        if dataset.sensitivity in SENSITIVE and dataset.pk not in with_commit:
            raise DpBudgetGateNotMet(dataset=dataset.name, sensitivity=dataset.sensitivity)
    for budget in budgets_of([entry.block for entry in committed]):
        used = budget.used()
        if budget.block.dataset.sensitivity in SENSITIVE and used > budget.block.epsilon:
            raise DpBudgetGateNotMet(
                f"Block {budget.block.name!r} is over its cap ({used:.4f} > "
                f"{budget.block.epsilon:g}).",
                dataset=budget.block.dataset.name,
                block=budget.block.name,
            )


def spend_history_of(blocks: Sequence[DataBlock]) -> dict[int, list[tuple[datetime, float]]]:
    """Each block's epsilon spent after each of its commits, oldest first, by block id.

    Every point recomposes the block's commits up to and including that one with the block's
    accountant at the block's delta (never a running sum: composition is not additive), so the
    last point is what `BlockBudget.spent()` reports. One query for all the blocks.
    """
    by_id = {block.pk: block for block in blocks}
    events: dict[int, list[DpEvent]] = defaultdict(list)
    history: dict[int, list[tuple[datetime, float]]] = {pk: [] for pk in by_id}
    commits = LedgerEntry.objects.filter(block__in=list(by_id), kind=LedgerKind.COMMIT)
    for entry in commits.order_by("id"):
        block = by_id[entry.block_id]
        events[block.pk].append(_event_of(entry))
        spent = accounting.epsilon(events[block.pk], delta=block.delta, accountant=block.accountant)
        history[block.pk].append((entry.created_at, spent))
    return history
