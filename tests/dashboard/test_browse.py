"""registry/dashboard/views/browse.py with Django's test client: namespace, model, version and
compare pages, their controls (shown only to those who may use them, refused by the services
when forged), safe Markdown, and bounded queries for big models and versions."""

from __future__ import annotations

import json
import re

import pytest
from django.contrib.auth import get_user_model

from registry.dp.accounting import DpEvent
from registry.models import (
    Artifact,
    AuditEvent,
    Job,
    JobKind,
    Membership,
    ModelAlias,
    ModelVersion,
    VersionState,
)
from registry.services import approvals, catalog, ledger, scanning, signatures
from registry.services.audit import audit_record
from tests.registry.scanners.corpus import call
from tests.registry.services.test_approvals import pending
from tests.registry.services.test_scanning import put

NS = "/ns/acme"
BERT = "/ns/acme/bert"

# A cheap ordinary DP-SGD run (~2.1 under RDP at 1e-5).
RUN = DpEvent(sampling_rate=0.01, noise_multiplier=1.0, steps=1000)
# Calls mylib.payloads.Runner("echo pwned") when loaded: a HIGH finding (not on the allowlist).
UNKNOWN_CALL_PICKLE = call("mylib.payloads", "Runner", "echo pwned")


def safetensors_file() -> bytes:
    header = {
        "__metadata__": {"format": "pt"},
        "weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "bias": {"dtype": "F16", "shape": [3], "data_offsets": [24, 30]},
    }
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + bytes(30)


def login(client, actors, name: str):
    client.force_login(actors.users[name])
    return client


def text(response) -> str:
    return response.content.decode()


@pytest.fixture
def bert(actors):
    return catalog.model_create(namespace=actors.acme, name="bert", creator=actors.users["alice"])


def new_version(actors, model, user: str = "alice") -> ModelVersion:
    return catalog.version_create(model=model, creator=actors.users[user])


def approved(actors, model) -> ModelVersion:
    version = pending(new_version(actors, model), actors.users["alice"])
    approvals.review_record(version=version, reviewer=actors.users["bob"], decision="approve")
    return version


# --- Namespace ------------------------------------------------------------------------------


def test_namespace_lists_models_with_search_tags_and_sort(client, actors, bert):
    small = catalog.model_create(
        namespace=actors.acme, name="gpt-small", creator=actors.users["alice"]
    )
    catalog.model_update(model=small, tags={"task": "lm"})
    catalog.model_create(namespace=actors.acme, name="gpt-large", creator=actors.users["alice"])
    login(client, actors, "carol")
    page = text(client.get(NS))
    assert all(name in page for name in ("bert", "gpt-small", "gpt-large"))
    page = text(client.get(NS, {"q": "gpt"}))
    assert "gpt-small" in page and "gpt-large" in page and 'href="/ns/acme/bert"' not in page
    page = text(client.get(NS, {"tag": "task=lm"}))
    assert "gpt-small" in page and "gpt-large" not in page
    page = text(client.get(NS, {"tag": "no-equals-sign"}))
    assert "key=value" in page and "(invalid_input)" in page
    page = text(client.get(NS, {"q": "zzz"}))
    assert "No model matches" in page
    # Sorted by name by default, by last update on request.
    catalog.model_update(model=bert, description="touched")
    by_name = text(client.get(NS))
    by_update = text(client.get(NS, {"sort": "updated"}))
    assert by_name.index("/ns/acme/bert") < by_name.index("/ns/acme/gpt-large")
    assert by_update.index("/ns/acme/bert") < by_update.index("/ns/acme/gpt-small")


def test_a_namespace_without_models_says_how_to_push_the_first(client, actors):
    login(client, actors, "mallory")
    page = text(client.get("/ns/evil"))
    assert "No models in evil yet" in page
    assert """curl -sH "$H" -H 'Content-Type: application/json' -d '{"name":"my-model"}'""" in page
    assert "$API/namespaces/evil/models" in page and "API=http://testserver/api/v1" in page


def test_namespace_pages_models_in_pages_of_fifty(client, actors):
    for i in range(55):
        catalog.model_create(namespace=actors.acme, name=f"m{i:03d}", creator=actors.users["root"])
    login(client, actors, "carol")
    first, second = text(client.get(NS)), text(client.get(NS, {"page": 2}))
    assert "m000" in first and "m049" in first and "m050" not in first
    assert "m050" in second and "m054" in second and "Page 2 of 2" in second


def test_everyone_sees_members_and_only_admins_get_the_forms(client, actors):
    login(client, actors, "carol")
    page = text(client.get(NS))
    assert all(name in page for name in ("root", "alice", "bob", "carol", "dave"))
    assert "Change role" not in page and "Add member" not in page
    client.force_login(actors.users["root"])
    page = text(client.get(NS))
    assert "Change role" in page and "Add member" in page and "Remove alice" in page


def test_admins_add_change_and_remove_members(client, actors):
    erin = get_user_model().objects.create(username="erin")
    login(client, actors, "root")
    response = client.post(f"{NS}/-/members", {"username": "erin", "role": "reviewer"}, follow=True)
    assert "erin is now reviewer of acme" in text(response)
    assert Membership.objects.get(user=erin, namespace=actors.acme).role == "reviewer"
    client.post(f"{NS}/-/members", {"username": "erin", "role": "viewer"})
    assert Membership.objects.get(user=erin, namespace=actors.acme).role == "viewer"
    response = client.post(f"{NS}/-/members/erin/remove", follow=True)
    assert "erin is no longer a member" in text(response)
    assert not Membership.objects.filter(user=erin).exists()


def test_member_errors_are_messages_with_their_code(client, actors):
    login(client, actors, "root")
    page = text(client.post(f"{NS}/-/members/root/remove", follow=True))
    assert "(last_admin)" in page
    assert Membership.objects.filter(user=actors.users["root"], role="admin").exists()
    page = text(
        client.post(f"{NS}/-/members", {"username": "nobody", "role": "viewer"}, follow=True)
    )
    assert "(not_found)" in page
    page = text(client.post(f"{NS}/-/members", {"username": "bob", "role": "king"}, follow=True))
    assert "(invalid_input)" in page


def test_a_forged_member_change_by_a_non_admin_is_refused(client, actors):
    login(client, actors, "carol")
    response = client.post(f"{NS}/-/members", {"username": "carol", "role": "admin"})
    assert response.status_code == 403 and "permission_denied" in text(response)
    assert (
        Membership.objects.get(user=actors.users["carol"], namespace=actors.acme).role == "viewer"
    )
    login(client, actors, "mallory")
    assert client.post(f"{NS}/-/members/alice/remove").status_code == 404
    assert Membership.objects.filter(user=actors.users["alice"]).exists()


# --- Model ----------------------------------------------------------------------------------


def test_model_description_markdown_is_rendered_without_raw_html(client, actors, bert):
    catalog.model_update(
        model=bert,
        description="# BERT\n\n**bold** <script>alert('x')</script>\n\n"
        "[click](javascript:alert(1)) [docs](https://example.org/docs)\n\n"
        '<img src=x onerror="alert(2)">',
    )
    login(client, actors, "carol")
    page = text(client.get(BERT))
    assert "<h1>BERT</h1>" in page and "<strong>bold</strong>" in page
    assert "<script>alert" not in page and "&lt;script&gt;alert('x')&lt;/script&gt;" in page
    assert 'href="javascript:' not in page and "[click](javascript:alert(1))" in page
    assert '<a href="https://example.org/docs">docs</a>' in page
    assert "<img" not in page and "&lt;img src=x onerror=" in page


def test_versions_table_shows_states_creators_tags_and_aliases(client, actors, bert):
    v1 = approved(actors, bert)
    catalog.version_update(version=v1, tags={"stage": "exp"})
    new_version(actors, bert)
    ModelAlias.objects.create(model=bert, name="staging", version=v1)
    login(client, actors, "carol")
    page = text(client.get(BERT))
    assert '<span class="badge approved">approved</span>' in page
    assert '<span class="badge draft">draft</span>' in page
    assert "stage=exp" in page and '<span class="alias">staging</span>' in page
    assert page.count("<td>alice</td>") == 2


def test_a_model_with_a_thousand_versions_pages_them_in_bounded_queries(
    client, actors, bert, django_assert_max_num_queries
):
    alice = actors.users["alice"]
    ModelVersion.objects.bulk_create(
        ModelVersion(model=bert, number=n, created_by=alice) for n in range(1, 1001)
    )
    login(client, actors, "carol")
    with django_assert_max_num_queries(15):
        page = text(client.get(BERT))
    assert ">v1000<" in page and ">v951<" in page and ">v950<" not in page
    assert "Page 1 of 20" in page
    with django_assert_max_num_queries(15):
        page = text(client.get(BERT, {"page": 20}))
    assert ">v1<" in page and ">v51<" not in page


def test_reviewers_move_aliases_admins_also_protected_ones(client, actors, bert):
    v1, v2 = approved(actors, bert), approved(actors, bert)
    login(client, actors, "bob")
    page = text(client.get(BERT))
    assert "Set alias" in page
    client.post(f"{BERT}/aliases", {"alias": "staging", "version": v1.number})
    assert ModelAlias.objects.get(model=bert, name="staging").version == v1
    client.post(f"{BERT}/aliases", {"alias": "staging", "version": v2.number})
    assert ModelAlias.objects.get(model=bert, name="staging").version == v2
    # production is protected: bob is refused by the service, with its code.
    page = text(client.post(f"{BERT}/aliases", {"alias": "production", "version": 1}, follow=True))
    assert "(alias_protected)" in page and not ModelAlias.objects.filter(name="production").exists()
    login(client, actors, "root")
    client.post(f"{BERT}/aliases", {"alias": "production", "version": v1.number})
    assert ModelAlias.objects.get(model=bert, name="production").version == v1
    # bob sees no controls on it, and a forged delete is refused.
    login(client, actors, "bob")
    page = text(client.get(BERT))
    assert "Delete staging" in page and "Delete production" not in page and "admins only" in page
    page = text(client.post(f"{BERT}/aliases/production/delete", follow=True))
    assert "(alias_protected)" in page and ModelAlias.objects.filter(name="production").exists()
    client.post(f"{BERT}/aliases/staging/delete")
    assert not ModelAlias.objects.filter(name="staging").exists()


def test_alias_errors_and_forged_alias_changes(client, actors, bert):
    draft = new_version(actors, bert)
    login(client, actors, "bob")
    page = text(
        client.post(f"{BERT}/aliases", {"alias": "staging", "version": draft.number}, follow=True)
    )
    assert "(version_not_approved)" in page
    page = text(client.post(f"{BERT}/aliases", {"alias": "9bad", "version": 1}, follow=True))
    assert "(invalid_input)" in page
    login(client, actors, "carol")
    assert "Set alias" not in text(client.get(BERT))
    assert client.post(f"{BERT}/aliases", {"alias": "staging", "version": 1}).status_code == 403
    assert not ModelAlias.objects.exists()


def test_compare_two_versions_by_digest_size_scan_and_signature(client, actors, bert):
    alice = actors.users["alice"]
    v1 = pending(
        new_version(actors, bert),
        alice,
        {"config.json": b'{"a": 1}', "same.txt": b"same\n", "old.txt": b"gone\n"},
    )
    v2 = pending(
        new_version(actors, bert),
        alice,
        {"config.json": b'{"a": 2}', "same.txt": b"same\n", "new.txt": b"new\n"},
    )
    login(client, actors, "carol")
    page = text(client.get(f"{BERT}/compare", {"a": v1.number, "b": v2.number}))
    assert "1 added, 1 removed, 1 changed, 1 unchanged" in page
    rows = dict(
        re.findall(r"<code>([\w.]+)</code></td>\s*<td><span class=\"badge diff (\w+)\"", page)
    )
    assert rows == {
        "config.json": "changed",
        "new.txt": "added",
        "old.txt": "removed",
        "same.txt": "same",
    }
    assert page.count('<span class="badge clean">clean</span>') == 6
    assert page.count("none") >= 4  # no signatures, no DP records on either side
    # Without both numbers: the picker only.
    assert "Pick two versions" in text(client.get(f"{BERT}/compare"))
    assert client.get(f"{BERT}/compare", {"a": 1, "b": 99}).status_code == 404


# --- Version --------------------------------------------------------------------------------


def test_version_page_shows_files_scans_findings_and_downloads(client, actors, bert):
    actors.acme.scan_quarantine_severity = "critical"
    actors.acme.save()
    version = pending(
        new_version(actors, bert),
        actors.users["alice"],
        {"config.json": b'{"a": 1}', "model.pkl": UNKNOWN_CALL_PICKLE},
    )
    login(client, actors, "bob")
    page = text(client.get(f"{BERT}/v/{version.number}"))
    assert '<span class="badge pending_review" id="version-state">pending_review</span>' in page
    assert "pickle.global.not_allowed" in page and "mylib.payloads.Runner" in page
    assert '<span class="badge findings">findings · high</span>' in page
    assert '<span class="badge clean">clean</span>' in page
    config = Artifact.objects.get(version=version, path="config.json")
    assert config.sha256 in page
    url = f"/api/v1/namespaces/acme/models/bert/versions/{version.number}/files/config.json"
    assert f'href="{url}"' in page
    # The link works with the session (a reviewer may fetch what they are asked to review).
    assert b"".join(client.get(url).streaming_content) == b'{"a": 1}'
    assert "smr pull acme/bert:1" in page and f"{url}" in page
    # A viewer sees no download buttons for a version not yet approved.
    login(client, actors, "carol")
    assert f'href="{url}"' not in text(client.get(f"{BERT}/v/{version.number}"))


def test_quarantined_findings_are_for_the_owner_and_admins_only(client, actors, bert):
    version = new_version(actors, bert)
    put(version, "evil.pkl", call("os", "system", "echo"), actors.users["alice"])
    version, job = catalog.version_submit(version=version, submitter=actors.users["alice"])
    assert scanning.version_scan(job_id=job.pk) == VersionState.QUARANTINED
    for name, visible in [("alice", True), ("root", True), ("bob", False), ("carol", False)]:
        login(client, actors, name)
        page = text(client.get(f"{BERT}/v/1"))
        assert ("pickle.global.dangerous" in page) is visible, name
        assert ("shown to the owner and admins only" in page) is not visible, name


def test_review_controls_only_for_those_who_may_review(client, actors, bert):
    version = pending(new_version(actors, bert), actors.users["alice"])
    for name, shown in [("bob", True), ("root", True), ("alice", False), ("carol", False)]:
        login(client, actors, name)
        page = text(client.get(f"{BERT}/v/{version.number}"))
        assert ('id="review-form"' in page) is shown, name
    # root uploads a version: not theirs to review unless the policy allows it.
    own = pending(new_version(actors, bert, "root"), actors.users["root"])
    login(client, actors, "root")
    assert 'id="review-form"' not in text(client.get(f"{BERT}/v/{own.number}"))


def test_safetensors_header_summary_read_with_a_ranged_download(client, actors, bert):
    version = pending(
        new_version(actors, bert), actors.users["alice"], {"model.safetensors": safetensors_file()}
    )
    login(client, actors, "bob")
    page = text(client.get(f"{BERT}/v/{version.number}"))
    fragment = f"{BERT}/v/{version.number}/safetensors?path=model.safetensors"
    assert f'hx-get="{fragment}"' in page
    before = AuditEvent.objects.filter(action="artifact.download").count()
    summary = text(client.get(fragment))
    assert "2 tensors, 9 parameters" in summary and "F16 \u00d71, F32 \u00d71" in summary
    assert "format=pt" in summary
    [event] = AuditEvent.objects.filter(action="artifact.download").order_by("-seq")[:1]
    assert AuditEvent.objects.filter(action="artifact.download").count() == before + 1
    assert event.actor_user == "bob" and event.details["range"] is not None
    # Viewers may not download a version pending review: no fragment, and a forged one is refused.
    login(client, actors, "carol")
    assert "safetensors?path=" not in text(client.get(f"{BERT}/v/{version.number}"))
    assert client.get(fragment).status_code == 403


def test_a_broken_safetensors_header_is_reported_not_raised(client, actors, bert):
    data = (10**9).to_bytes(8, "little") + b"{}"
    version = new_version(actors, bert)
    put(version, "bad.safetensors", data, actors.users["alice"])
    login(client, actors, "alice")
    summary = text(client.get(f"{BERT}/v/{version.number}/safetensors?path=bad.safetensors"))
    assert "Not a readable safetensors header" in summary
    big = (2 << 20).to_bytes(8, "little") + b"{" + b" " * (2 << 20)
    put(version, "big.safetensors", big, actors.users["alice"])
    summary = text(client.get(f"{BERT}/v/{version.number}/safetensors?path=big.safetensors"))
    assert "over the 1 MiB shown here" in summary


def test_a_version_with_a_thousand_files_renders_in_bounded_queries(
    client, actors, bert, django_assert_max_num_queries
):
    version = pending(new_version(actors, bert), actors.users["alice"])
    alice = actors.users["alice"]
    Artifact.objects.bulk_create(
        Artifact(
            version=version,
            path=f"shard-{i:04d}.bin",
            size=i,
            sha256=f"{i:064x}",
            object_key=f"test/{version.pk}/{i}",
            wrapped_dek=b"",
            kek_id="test",
            created_by=alice,
        )
        for i in range(1000)
    )
    login(client, actors, "bob")
    with django_assert_max_num_queries(25):
        page = text(client.get(f"{BERT}/v/{version.number}"))
    assert "shard-0999.bin" in page and "1001 (" in page


def test_the_audit_trail_is_for_auditors_and_admins(client, actors, bert):
    version = pending(new_version(actors, bert), actors.users["alice"])
    for name, shown in [("dave", True), ("root", True), ("bob", False), ("alice", False)]:
        login(client, actors, name)
        page = text(client.get(f"{BERT}/v/{version.number}"))
        assert ('id="audit"' in page) is shown, name
    login(client, actors, "dave")
    page = text(client.get(f"{BERT}/v/{version.number}"))
    for action in ("version.create", "artifact.upload", "version.submit", "version.scan"):
        assert f"<code>{action}</code>" in page, action
    # v10's events are not v1's, though "acme/bert/v10" begins with "acme/bert/v1".
    audit_record(action="version.create", namespace="acme", target="acme/bert/v10")
    audit_record(action="artifact.download", namespace="acme", target="acme/bert/v1/x.bin")
    page = text(client.get(f"{BERT}/v/{version.number}"))
    assert "acme/bert/v10" not in page and "acme/bert/v1/x.bin" in page


def test_version_page_lists_reviews_and_the_registry_signature(client, actors, bert):
    version = pending(new_version(actors, bert), actors.users["alice"])
    login(client, actors, "carol")
    page = text(client.get(f"{BERT}/v/{version.number}"))
    assert "No signatures" in page and "None: this version was not trained" in page
    approvals.review_record(
        version=version,
        reviewer=actors.users["bob"],
        decision="approve",
        comment="looks <b>fine</b>",
    )
    sign_job = Job.objects.get(version=version, kind=JobKind.SIGN)
    signature = signatures.version_sign(job_id=sign_job.pk)
    assert signature is not None
    page = text(client.get(f"{BERT}/v/{version.number}"))
    assert '<span class="badge approve">approve</span> by bob' in page
    assert "looks &lt;b&gt;fine&lt;/b&gt;" in page
    assert '<span class="badge valid">valid</span>' in page and signature.key_id in page
    bundle_url = f"/api/v1/namespaces/acme/models/bert/versions/1/signatures/{signature.pk}.sig"
    assert f'href="{bundle_url}"' in page
    # The bundle link works with the session.
    assert json.loads(client.get(bundle_url).content) == signature.bundle


def test_version_page_and_compare_show_the_dp_record(client, actors, bert):
    clinic = ledger.dataset_create(
        namespace=actors.acme,
        name="clinic",
        sensitivity="confidential",
        delta=1e-5,
        creator=actors.users["root"],
    )
    ledger.data_block_create(
        dataset=clinic, name="b1", epsilon=10.0, accountant="rdp", creator=actors.users["root"]
    )
    trained, plain = new_version(actors, bert), new_version(actors, bert)
    ledger.dp_record_declare(
        version=trained, dataset=clinic, blocks=["b1"], event=RUN, creator=actors.users["alice"]
    )
    epsilon = ledger.dp_record_of(trained)["epsilon"]
    login(client, actors, "carol")
    page = text(client.get(f"{BERT}/v/{trained.number}"))
    assert "clinic (confidential), blocks b1" in page
    assert f"\u03b5 = {epsilon:.4f}, \u03b4 = 1e-05 (rdp accountant)" in page
    assert "sampling rate 0.01, noise multiplier 1.0, 1000 steps" in page and "declared" in page
    page = text(client.get(f"{BERT}/compare", {"a": trained.number, "b": plain.number}))
    assert f"\u03b5 = {epsilon:.3f}, \u03b4 = 1e-05 on clinic" in page


def test_others_namespaces_are_404_and_leak_nothing(client, actors, bert):
    version = pending(new_version(actors, bert), actors.users["alice"])
    login(client, actors, "mallory")
    for url in (
        NS,
        BERT,
        f"{BERT}/v/{version.number}",
        f"{BERT}/compare?a=1&b=1",
        f"{BERT}/v/{version.number}/safetensors?path=config.json",
        "/ns/acme/nope",
        f"{BERT}/v/99999999999",
    ):
        response = client.get(url)
        assert response.status_code == 404, url
        assert "bert" not in text(response).replace(url, ""), url
