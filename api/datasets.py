"""Datasets, their blocks and the DP budget ledger; declared DP records; DP jobs."""

from __future__ import annotations

import uuid

from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from api import views
from api.pagination import cursor_by
from api.serializers import (
    BlockIn,
    BlockOut,
    BudgetOut,
    DatasetIn,
    DatasetOut,
    DpRecordIn,
    DpRecordOut,
    JobIn,
    JobOut,
    LedgerEntryOut,
    PreviewIn,
    PreviewOut,
)
from api.views import ListView, parse, principal_of, user_of
from registry import selectors
from registry.access import Action
from registry.errors import InvalidInput
from registry.models import JobKind
from registry.services import dp, ledger


class DatasetListView(ListView):
    pagination_class = cursor_by("name")

    @extend_schema(responses=DatasetOut(many=True))
    def get(self, request: Request, ns: str) -> Response:
        qs = selectors.dataset_list_for_user(principal=principal_of(request), namespace=ns)
        return self.page(request, qs, DatasetOut)

    @extend_schema(
        request=DatasetIn,
        responses={201: DatasetOut},
        description="Register a dataset whose privacy budget the ledger tracks (admins).",
    )
    def post(self, request: Request, ns: str) -> Response:
        namespace = selectors.namespace_get_for_user(
            principal=principal_of(request), name=ns, action=Action.MANAGE
        )
        dataset = ledger.dataset_create(
            namespace=namespace, creator=user_of(request), **parse(DatasetIn, request)
        )
        return Response(DatasetOut(dataset).data, status=status.HTTP_201_CREATED)


class DatasetDetailView(APIView):
    @extend_schema(responses=DatasetOut)
    def get(self, request: Request, ns: str, dataset: str) -> Response:
        found = selectors.dataset_get_for_user(
            principal=principal_of(request), namespace=ns, name=dataset, action=Action.READ
        )
        return Response(DatasetOut(found).data)


class BlockListView(ListView):
    pagination_class = cursor_by("created_at")

    @extend_schema(responses=BlockOut(many=True))
    def get(self, request: Request, ns: str, dataset: str) -> Response:
        qs = selectors.data_block_list_for_user(
            principal=principal_of(request), namespace=ns, dataset=dataset
        )
        return self.page(request, qs, BlockOut)

    @extend_schema(
        request=BlockIn,
        responses={201: BlockOut},
        description="Append a block with its budget cap and its one accountant (admins). "
        "Blocks never change afterwards. A block a job trains on names its data: a file of a "
        "submitted version of this namespace, and how many records it holds.",
    )
    def post(self, request: Request, ns: str, dataset: str) -> Response:
        principal = principal_of(request)
        found = selectors.dataset_get_for_user(
            principal=principal, namespace=ns, name=dataset, action=Action.MANAGE
        )
        data = parse(BlockIn, request)
        source = data.pop("file", None)
        artifact = None
        if source is not None:
            artifact = selectors.artifact_get_for_user(
                principal=principal,
                namespace=ns,
                model=source["model"],
                number=source["version"],
                path=source["path"],
                action=Action.READ,
            )
        block = ledger.data_block_create(
            dataset=found, artifact=artifact, creator=user_of(request), **data
        )
        return Response(BlockOut(block).data, status=status.HTTP_201_CREATED)


class LedgerView(ListView):
    pagination_class = cursor_by("id")

    @extend_schema(
        responses=LedgerEntryOut(many=True),
        description="Every entry of every block, oldest first: claims, commits and releases.",
    )
    def get(self, request: Request, ns: str, dataset: str) -> Response:
        qs = selectors.ledger_entry_list_for_user(
            principal=principal_of(request), namespace=ns, dataset=dataset
        )
        return self.page(request, qs, LedgerEntryOut)


class BudgetView(APIView):
    @extend_schema(
        responses=BudgetOut,
        description="Spent, reserved and remaining epsilon per block, recomposed from the "
        "ledger with each block's accountant.",
    )
    def get(self, request: Request, ns: str, dataset: str) -> Response:
        found = selectors.dataset_get_for_user(
            principal=principal_of(request), namespace=ns, name=dataset, action=Action.READ
        )
        blocks = [budget.as_dict() for budget in ledger.dataset_budget(dataset=found)]
        return Response({"dataset": found.name, "delta": found.delta, "blocks": blocks})


class PreviewView(APIView):
    @extend_schema(
        request=PreviewIn,
        responses=PreviewOut,
        description="What a DP event would cost on each block and whether it fits; reserves "
        "nothing.",
    )
    def post(self, request: Request, ns: str, dataset: str) -> Response:
        found = selectors.dataset_get_for_user(
            principal=principal_of(request), namespace=ns, name=dataset, action=Action.READ
        )
        data = parse(PreviewIn, request)
        preview = ledger.ledger_preview(
            dataset=found,
            blocks=data["blocks"],
            event=ledger.event_parse(data["event"]),
            accountant=data.get("accountant"),
        )
        return Response(preview.as_dict())


class DpRecordView(APIView):
    @extend_schema(
        request=DpRecordIn,
        responses={201: DpRecordOut},
        description="Register the DP event of a run that trained this version elsewhere: "
        "charged against the dataset's blocks like a job (refused over budget), then "
        "committed. The version's owner and the namespace's admins; once per version.",
    )
    def post(self, request: Request, ns: str, model: str, number: int) -> Response:
        principal = principal_of(request)
        version = selectors.version_get_for_user(
            principal=principal, namespace=ns, model=model, number=number, action=Action.WRITE
        )
        data = parse(DpRecordIn, request)
        # WRITE, the action this call needs: a write-only token may record its runs.
        found = selectors.dataset_get_for_user(
            principal=principal, namespace=ns, name=data["dataset"], action=Action.WRITE
        )
        ledger.dp_record_declare(
            version=version,
            dataset=found,
            blocks=data["blocks"],
            event=ledger.event_parse(data["event"]),
            accountant=data.get("accountant"),
            creator=user_of(request),
            note=data["note"],
        )
        return Response(DpRecordOut(ledger.dp_record_of(version)).data, status=201)


class JobListView(views.JobListView):
    """GET /jobs lists jobs (api.views); POST starts a dp_retrain or privacy_audit job."""

    @extend_schema(
        request=JobIn,
        responses={202: JobOut},
        description="dp_retrain (contributors): admitted only if every block's budget allows "
        "the planned run, which is reserved at once (409 budget_exceeded otherwise); the "
        "worker trains a new draft version of `model`. privacy_audit (contributors and "
        "reviewers): a membership-inference attack on `model` version `version`.",
    )
    def post(self, request: Request) -> Response:
        principal = principal_of(request)
        data = parse(JobIn, request)
        ns = data.pop("namespace")
        kind = data.pop("kind")
        dataset_name = data.pop("dataset")
        model_name = data.pop("model")
        # The action each kind needs, and only it: a write-only token may start a retraining.
        action = Action.WRITE if kind == JobKind.DP_RETRAIN else Action.READ
        namespace = selectors.namespace_get_for_user(principal=principal, name=ns, action=action)
        dataset = selectors.dataset_get_for_user(
            principal=principal, namespace=ns, name=dataset_name, action=action
        )
        # None: every block of the dataset (registry.services.ledger.blocks_named).
        blocks = data.pop("blocks", None) or None
        if kind == JobKind.PRIVACY_AUDIT:
            if "version" not in data:
                raise InvalidInput("privacy_audit needs `version`.", field="version")
            version = selectors.version_get_for_user(
                principal=principal,
                namespace=ns,
                model=model_name,
                number=data.pop("version"),
                action=Action.DOWNLOAD,
            )
            job = dp.privacy_audit_create(
                namespace=namespace,
                version=version,
                dataset=dataset,
                blocks=blocks,
                params=data,
                creator=user_of(request),
            )
        else:
            base = data.pop("base_version", None)
            base_version = None
            if base is not None:
                base_version = selectors.version_get_for_user(
                    principal=principal,
                    namespace=ns,
                    model=model_name,
                    number=base,
                    action=Action.DOWNLOAD,
                )
            job = dp.dp_retrain_create(
                namespace=namespace,
                dataset=dataset,
                blocks=blocks,
                model_name=model_name,
                base_version=base_version,
                params=data,
                creator=user_of(request),
            )
        return Response(JobOut(job).data, status=status.HTTP_202_ACCEPTED)


class JobCancelView(APIView):
    @extend_schema(
        request=None,
        responses=JobOut,
        description="Cancel a queued or running job (its creator, or a namespace admin). A "
        "DP job that already ran steps commits them to the ledger and releases the rest.",
    )
    def post(self, request: Request, job_id: uuid.UUID) -> Response:
        principal = principal_of(request)
        job = selectors.job_get_for_cancel(principal=principal, job_id=job_id)
        return Response(JobOut(dp.job_cancel(job=job)).data)
