"""Permission-scoped reads: a non-member gets NotFound (never PermissionDenied, which would
confirm the object exists), a member whose role or token forbids the action gets
PermissionDenied, and mallory (admin of evil) sees nothing of acme."""

from __future__ import annotations

import itertools
import uuid

import pytest
from django.contrib.auth import get_user_model
from django.core.cache import cache

from registry import selectors
from registry.access import Action, Principal
from registry.errors import InvalidPath, NotFound, PermissionDenied, VersionRevoked
from registry.models import (
    ApiToken,
    AuditAction,
    AuditEvent,
    ModelVersion,
    VersionState,
)
from registry.services import catalog
from registry.services import uploads as upload_svc
from registry.services.artifacts import artifact_upload
from registry.services.tokens import token_create
from tests.registry.test_access import EXPECTED

ACME_MEMBERS = {"root": "admin", "alice": "contributor", "bob": "reviewer", "carol": "viewer",
                "dave": "auditor"}  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_denial_counters():
    # Refusals are folded per actor in the cache; start every test with empty counters.
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def world(actors, draft):
    """acme/bert v1 (draft, one file, one open upload) and v2 (approved, one file)."""
    alice = actors.users["alice"]
    artifact_upload(
        version=draft, path="weights.bin", chunks=[b"v1"], expected_sha256=None,
        expected_size=2, creator=alice,
    )  # fmt: skip
    v2 = catalog.version_create(model=draft.model, creator=alice)
    artifact_upload(
        version=v2, path="weights.bin", chunks=[b"v2"], expected_sha256=None,
        expected_size=2, creator=alice,
    )  # fmt: skip
    # Reviews are another service's business; only the resulting state matters here.
    ModelVersion.objects.filter(pk=v2.pk).update(state=VersionState.APPROVED)
    session = upload_svc.upload_session_create(
        version=draft, path="big.bin", size=10, sha256=None, part_size=None, creator=alice
    )
    mallory = actors.users["mallory"]
    catalog.model_create(namespace=actors.evil, name="evil-model", creator=mallory)
    actors.session = session
    return actors


def who(actors, name: str, *scopes: str) -> Principal:
    """A principal for `name`: a browser session, or a token with exactly `scopes`."""
    user = get_user_model().objects.get(pk=actors.users[name].pk)
    token = token_create(user=user, scopes=list(scopes)).token if scopes else None
    return Principal(user=user, token=token)


def denials() -> int:
    return AuditEvent.objects.filter(action=AuditAction.ACCESS_DENIED).count()


# --- Namespaces ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "action"), list(itertools.product(ACME_MEMBERS, Action)), ids=lambda v: str(v)
)
def test_namespace_get_follows_the_role_table(world, name, action):
    principal = who(world, name)
    if action in EXPECTED[ACME_MEMBERS[name]]:
        ns = selectors.namespace_get_for_user(principal=principal, name="acme", action=action)
        assert ns.pk == world.acme.pk
    else:
        with pytest.raises(PermissionDenied) as exc:
            selectors.namespace_get_for_user(principal=principal, name="acme", action=action)
        assert exc.value.status == 403
        assert exc.value.extra["role"] == ACME_MEMBERS[name]


@pytest.mark.parametrize("action", list(Action))
def test_non_member_gets_not_found_like_a_missing_namespace(world, action):
    # mallory is an admin (allowed everything) but not of acme: NotFound, never Forbidden.
    mallory = who(world, "mallory")
    with pytest.raises(NotFound) as hidden:
        selectors.namespace_get_for_user(principal=mallory, name="acme", action=action)
    with pytest.raises(NotFound) as missing:
        selectors.namespace_get_for_user(principal=mallory, name="nope", action=action)
    # Same status and wording: the reply does not tell acme exists.
    assert hidden.value.status == missing.value.status == 404
    assert str(hidden.value).replace("acme", "X") == str(missing.value).replace("nope", "X")
    # Control: in her own namespace she is allowed.
    assert selectors.namespace_get_for_user(principal=mallory, name="evil", action=action)


def test_refusals_of_an_existing_namespace_are_audited(world):
    before = denials()
    with pytest.raises(NotFound):
        selectors.namespace_get_for_user(
            principal=who(world, "mallory"), name="acme", action=Action.READ
        )
    with pytest.raises(PermissionDenied):
        selectors.namespace_get_for_user(
            principal=who(world, "carol"), name="acme", action=Action.WRITE
        )
    assert denials() == before + 2
    # A namespace that does not exist is not an access to anything: nothing to record.
    with pytest.raises(NotFound):
        selectors.namespace_get_for_user(
            principal=who(world, "mallory"), name="nope", action=Action.READ
        )
    assert denials() == before + 2


def test_nul_in_a_name_is_not_found_not_a_database_error(world):
    alice = who(world, "alice")
    with pytest.raises(NotFound):
        selectors.namespace_get_for_user(principal=alice, name="ac\x00me", action=Action.READ)
    with pytest.raises(NotFound):
        selectors.model_get_for_user(
            principal=alice, namespace="acme", name="be\x00rt", action=Action.READ
        )


def test_namespace_list(world):
    def names(name: str) -> list[str]:
        return sorted(n.name for n in selectors.namespace_list_for_user(principal=who(world, name)))

    assert names("alice") == ["acme"]
    assert names("dave") == ["acme"]
    assert names("mallory") == ["evil"]
    get_user_model().objects.create(username="nobody")
    world.users["nobody"] = get_user_model().objects.get(username="nobody")
    assert names("nobody") == []


def test_namespace_list_needs_the_read_scope(world):
    write_only = who(world, "alice", "write")
    # Control: the same token cannot list models, a metadata read of the same namespace.
    with pytest.raises(PermissionDenied):
        selectors.model_list_for_user(principal=write_only, namespace="acme")
    with pytest.raises(PermissionDenied):
        selectors.namespace_list_for_user(principal=write_only)
    # Control: a read token lists them.
    assert [
        n.name for n in selectors.namespace_list_for_user(principal=who(world, "alice", "read"))
    ] == ["acme"]


# --- Models, versions, files, uploads ------------------------------------------------------


def test_model_get(world):
    alice = who(world, "alice")
    m = selectors.model_get_for_user(
        principal=alice, namespace="acme", name="bert", action=Action.READ
    )
    assert (m.namespace.name, m.name) == ("acme", "bert")
    with pytest.raises(NotFound):
        selectors.model_get_for_user(
            principal=alice, namespace="acme", name="gpt", action=Action.READ
        )
    # Alice has no part in evil: its models are hidden even though they exist.
    with pytest.raises(NotFound):
        selectors.model_get_for_user(
            principal=alice, namespace="evil", name="evil-model", action=Action.READ
        )


@pytest.mark.parametrize("model", ["bert", "missing"])
def test_mallory_cannot_tell_an_acme_model_exists(world, model):
    with pytest.raises(NotFound) as exc:
        selectors.model_get_for_user(
            principal=who(world, "mallory"), namespace="acme", name=model, action=Action.READ
        )
    assert "acme" in str(exc.value) and "bert" not in str(exc.value)


@pytest.mark.parametrize("state", list(VersionState))
def test_viewer_downloads_released_versions_only(world, state):
    ModelVersion.objects.filter(model__name="bert", number=1).update(state=state)
    carol = who(world, "carol")

    def download():
        return selectors.version_get_for_user(
            principal=carol, namespace="acme", model="bert", number=1, action=Action.DOWNLOAD
        )

    if state in (VersionState.APPROVED, VersionState.DEPRECATED):
        assert download().state == state
    elif state == VersionState.REVOKED:
        with pytest.raises(VersionRevoked):
            download()
    else:
        with pytest.raises(PermissionDenied) as exc:
            download()
        assert exc.value.extra["state"] == state
    # Reading the metadata is always fine, and a contributor may fetch the bytes in any state
    # but revoked (410 for everyone).
    assert selectors.version_get_for_user(
        principal=carol, namespace="acme", model="bert", number=1, action=Action.READ
    )

    def alice_downloads():
        return selectors.version_get_for_user(
            principal=who(world, "alice"),
            namespace="acme",
            model="bert",
            number=1,
            action=Action.DOWNLOAD,
        )

    if state == VersionState.REVOKED:
        with pytest.raises(VersionRevoked) as revoked:
            alice_downloads()
        assert revoked.value.status == 410
    else:
        assert alice_downloads()


def test_version_get(world):
    bob = who(world, "bob")
    v = selectors.version_get_for_user(
        principal=bob, namespace="acme", model="bert", number=2, action=Action.REVIEW
    )
    assert (v.number, v.model.name) == (2, "bert")
    with pytest.raises(NotFound):
        selectors.version_get_for_user(
            principal=bob, namespace="acme", model="bert", number=3, action=Action.READ
        )
    with pytest.raises(PermissionDenied):
        selectors.version_get_for_user(
            principal=bob, namespace="acme", model="bert", number=1, action=Action.WRITE
        )
    with pytest.raises(NotFound):
        selectors.version_get_for_user(
            principal=who(world, "mallory"),
            namespace="acme",
            model="bert",
            number=2,
            action=Action.READ,
        )


def artifact(principal, number: int, action: Action, path: str = "weights.bin"):
    return selectors.artifact_get_for_user(
        principal=principal, namespace="acme", model="bert", number=number, path=path,
        action=action,
    )  # fmt: skip


def test_artifact_get(world):
    a = artifact(who(world, "alice"), 1, Action.DOWNLOAD)
    assert (a.path, a.version.number, a.size) == ("weights.bin", 1, 2)
    # The version is attached (with its namespace), so callers do not query it again.
    assert a.version.model.namespace.name == "acme"
    carol = who(world, "carol")
    assert artifact(carol, 2, Action.DOWNLOAD).version.number == 2
    assert artifact(carol, 1, Action.READ).path == "weights.bin"
    with pytest.raises(PermissionDenied):
        artifact(carol, 1, Action.DOWNLOAD)  # a viewer, and v1 is a draft
    with pytest.raises(PermissionDenied):
        artifact(who(world, "dave"), 2, Action.DOWNLOAD)  # auditors never get bytes
    with pytest.raises(NotFound):
        artifact(who(world, "alice"), 1, Action.DOWNLOAD, path="other.bin")
    for number in (1, 2):
        with pytest.raises(NotFound):
            artifact(who(world, "mallory"), number, Action.DOWNLOAD)


def test_invalid_artifact_path_is_invalid_whoever_asks(world):
    for name in ("alice", "mallory"):
        with pytest.raises(InvalidPath):
            artifact(who(world, name), 1, Action.READ, path="../secrets")


def test_upload_session_get(world):
    sid = world.session.pk

    def get(principal, number: int = 1, upload_id=sid, action: Action = Action.WRITE):
        return selectors.upload_session_get_for_user(
            principal=principal, namespace="acme", model="bert", number=number,
            upload_id=upload_id, action=action,
        )  # fmt: skip

    alice = who(world, "alice")
    session = get(alice)
    assert session.pk == sid and session.version.number == 1
    assert get(alice, upload_id=str(sid)).pk == sid
    with pytest.raises(PermissionDenied):
        get(who(world, "carol"))
    with pytest.raises(PermissionDenied):
        get(who(world, "bob"))
    with pytest.raises(NotFound):
        get(who(world, "mallory"))
    # A session id is only found under its own version.
    with pytest.raises(NotFound):
        get(alice, number=2)
    with pytest.raises(NotFound):
        get(alice, upload_id=uuid.uuid4())


# --- Token scopes narrow roles -------------------------------------------------------------


def test_read_only_token_narrows_an_admin(world):
    root = who(world, "root", "read")
    assert selectors.namespace_get_for_user(principal=root, name="acme", action=Action.READ)
    assert artifact(root, 1, Action.DOWNLOAD)
    for action in (Action.WRITE, Action.REVIEW, Action.MANAGE):
        with pytest.raises(PermissionDenied):
            selectors.namespace_get_for_user(principal=root, name="acme", action=action)
    # Control: the same admin with every scope may do all of it.
    full = who(world, "root", "read", "write", "review", "admin")
    for action in Action:
        assert selectors.namespace_get_for_user(principal=full, name="acme", action=action)


def test_write_only_token_cannot_read(world):
    alice = who(world, "alice", "write")
    assert selectors.upload_session_get_for_user(
        principal=alice, namespace="acme", model="bert", number=1,
        upload_id=world.session.pk, action=Action.WRITE,
    )  # fmt: skip
    with pytest.raises(PermissionDenied):
        artifact(alice, 1, Action.DOWNLOAD)
    with pytest.raises(PermissionDenied):
        selectors.version_list_for_user(principal=alice, namespace="acme", model="bert")


def test_scopes_do_not_reach_into_other_namespaces(world):
    # Every scope on mallory's token still finds nothing in acme.
    mallory = who(world, "mallory", "read", "write", "review", "admin")
    with pytest.raises(NotFound):
        selectors.namespace_get_for_user(principal=mallory, name="acme", action=Action.MANAGE)


# --- List selectors ------------------------------------------------------------------------


def test_list_selectors_for_a_member(world):
    carol = who(world, "carol", "read")
    members = selectors.member_list_for_user(principal=carol, namespace="acme")
    assert {m.user.username: m.role for m in members} == ACME_MEMBERS
    models = selectors.model_list_for_user(principal=carol, namespace="acme")
    assert [m.name for m in models] == ["bert"]
    versions = selectors.version_list_for_user(principal=carol, namespace="acme", model="bert")
    assert sorted(v.number for v in versions) == [1, 2]
    files = selectors.artifact_list_for_user(
        principal=carol, namespace="acme", model="bert", number=1
    )
    assert [a.path for a in files] == ["weights.bin"]


def test_list_selectors_hide_acme_from_mallory(world):
    mallory = who(world, "mallory")
    calls = [
        lambda: selectors.member_list_for_user(principal=mallory, namespace="acme"),
        lambda: selectors.model_list_for_user(principal=mallory, namespace="acme"),
        lambda: selectors.version_list_for_user(principal=mallory, namespace="acme", model="bert"),
        lambda: selectors.artifact_list_for_user(
            principal=mallory, namespace="acme", model="bert", number=1
        ),
    ]
    for call in calls:
        with pytest.raises(NotFound):
            list(call())
    # Control: her own namespace lists fine.
    evil_models = selectors.model_list_for_user(principal=mallory, namespace="evil")
    assert [m.name for m in evil_models] == ["evil-model"]


def test_token_list_is_only_the_callers(world):
    alice = world.users["alice"]
    extra = token_create(user=alice, scopes=["read"]).token
    mine = set(selectors.token_list_for_user(user=alice).values_list("pk", flat=True))
    assert extra.pk in mine
    assert mine == set(ApiToken.objects.filter(user=alice).values_list("pk", flat=True))
    assert not mine & set(
        ApiToken.objects.filter(user=world.users["mallory"]).values_list("pk", flat=True)
    )


# --- The audit log -------------------------------------------------------------------------


def test_audit_namespaces(world):
    def visible(name: str, *scopes: str):
        return selectors.audit_namespaces_for_user(principal=who(world, name, *scopes))

    assert visible("dave") == ["acme"]
    assert visible("root") == ["acme"]
    assert visible("mallory") == ["evil"]
    for name in ("alice", "bob", "carol"):
        with pytest.raises(PermissionDenied):
            visible(name)
    # An auditor's token without the read scope cannot read the log.
    with pytest.raises(PermissionDenied):
        visible("dave", "write", "review", "admin")
    assert visible("dave", "read") == ["acme"]
    boss = get_user_model().objects.create(username="boss", is_superuser=True)
    assert selectors.audit_namespaces_for_user(principal=Principal(user=boss)) is None


def test_audit_event_list_is_scoped_to_audited_namespaces(world):
    dave = {e.namespace for e in selectors.audit_event_list_for_user(principal=who(world, "dave"))}
    mallory = {
        e.namespace for e in selectors.audit_event_list_for_user(principal=who(world, "mallory"))
    }
    assert dave == {"acme"}
    assert mallory == {"evil"}
    # Filtering by another namespace cannot widen the view.
    forced = selectors.audit_event_list_for_user(
        principal=who(world, "mallory"), filters=selectors.AuditFilters(namespace="acme")
    )
    assert not forced.exists()
    with pytest.raises(PermissionDenied):
        selectors.audit_event_list_for_user(principal=who(world, "alice"))
