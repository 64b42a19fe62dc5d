from django.urls import path, register_converter

from api import audit, auth, datasets, files, signing, views


class VersionNumber:
    # A version number, or an alias name (which starts with a letter, so the two never
    # overlap); registry.selectors.version_get_for_user resolves either.
    regex = "(?:[0-9]{1,9}|[a-z][a-z0-9_-]{0,62})"

    def to_python(self, value: str) -> int | str:
        return int(value) if value.isdigit() else value

    def to_url(self, value: int | str) -> str:
        return str(value)


class ArtifactPath:
    # Matches anything, newlines included, so odd paths reach validation and get a clear 400
    # instead of an anonymous 404.
    regex = r"[\s\S]+"

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(VersionNumber, "vnum")
register_converter(ArtifactPath, "apath")

M = "namespaces/<str:ns>/models/<str:model>"
V = f"{M}/versions/<vnum:number>"
D = "namespaces/<str:ns>/datasets/<str:dataset>"

urlpatterns = [
    path("signing-keys", signing.SigningKeyListView.as_view()),
    path("namespaces/<str:ns>/publisher-keys", signing.PublisherKeyListView.as_view()),
    path(
        "namespaces/<str:ns>/publisher-keys/<str:key_id>",
        signing.PublisherKeyDetailView.as_view(),
    ),
    path(f"{V}/signatures", signing.SignatureListView.as_view()),
    path(f"{V}/signatures/<int:signature_id>.sig", signing.SignatureFileView.as_view()),
    path("namespaces", views.NamespaceListView.as_view()),
    path("namespaces/<str:ns>", views.NamespaceDetailView.as_view()),
    path("namespaces/<str:ns>/policy", views.PolicyView.as_view()),
    path("namespaces/<str:ns>/members", views.MemberListView.as_view()),
    path("namespaces/<str:ns>/webhooks", views.WebhookListView.as_view()),
    path("namespaces/<str:ns>/webhooks/<uuid:webhook_id>", views.WebhookDetailView.as_view()),
    path(
        "namespaces/<str:ns>/webhooks/<uuid:webhook_id>/deliveries",
        views.WebhookDeliveryListView.as_view(),
    ),
    path("namespaces/<str:ns>/members/<str:username>", views.MemberDetailView.as_view()),
    path("namespaces/<str:ns>/models", views.ModelListView.as_view()),
    path(M, views.ModelDetailView.as_view()),
    path(f"{M}/versions", views.VersionListView.as_view()),
    path(f"{M}/aliases", views.AliasListView.as_view()),
    path(f"{M}/aliases/<str:alias>", views.AliasDetailView.as_view()),
    path(V, views.VersionDetailView.as_view()),
    path(f"{V}/submit", views.VersionSubmitView.as_view()),
    path(f"{V}/rescan", views.VersionRescanView.as_view()),
    path(f"{V}/scans", views.ScanReportListView.as_view()),
    path(f"{V}/reviews", views.ReviewListView.as_view()),
    path(f"{V}/deprecate", views.VersionDeprecateView.as_view()),
    path(f"{V}/revoke", views.VersionRevokeView.as_view()),
    path(f"{V}/files", files.FileListView.as_view()),
    path(f"{V}/files/<apath:path>", files.FileView.as_view()),
    path(f"{V}/uploads", files.UploadCreateView.as_view()),
    path(f"{V}/uploads/<uuid:upload_id>", files.UploadDetailView.as_view()),
    path(f"{V}/uploads/<uuid:upload_id>/parts/<int:part>", files.UploadPartView.as_view()),
    path(f"{V}/uploads/<uuid:upload_id>/complete", files.UploadCompleteView.as_view()),
    path("audit/events", audit.AuditEventListView.as_view()),
    path("audit/events/export", audit.AuditExportView.as_view()),
    path("audit/checkpoints", audit.AuditCheckpointListView.as_view()),
    path("audit/checkpoint-key", audit.AuditKeyView.as_view()),
    path("audit/verify", audit.AuditVerifyView.as_view()),
    path("jobs", datasets.JobListView.as_view()),
    path("jobs/<uuid:job_id>", views.JobDetailView.as_view()),
    path("jobs/<uuid:job_id>/cancel", datasets.JobCancelView.as_view()),
    path("namespaces/<str:ns>/datasets", datasets.DatasetListView.as_view()),
    path(f"{D}", datasets.DatasetDetailView.as_view()),
    path(f"{D}/blocks", datasets.BlockListView.as_view()),
    path(f"{D}/ledger", datasets.LedgerView.as_view()),
    path(f"{D}/ledger/preview", datasets.PreviewView.as_view()),
    path(f"{D}/budget", datasets.BudgetView.as_view()),
    path(f"{V}/dp-record", datasets.DpRecordView.as_view()),
    path("auth/login", auth.LoginView.as_view()),
    path("auth/logout", auth.LogoutView.as_view()),
    path("auth/me", auth.MeView.as_view()),
    path("tokens", views.TokenListView.as_view()),
    path("tokens/<str:token_id>", views.TokenDetailView.as_view()),
]
