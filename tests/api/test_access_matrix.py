"""The access matrix: every operation of the OpenAPI schema, called by every kind of caller, on
every representative object, answers what DESIGN.md §5 and §9 say it should.

The expectations are written here from the specification (roles, token scopes, version
states), not read from registry/access.py, so a change there that widens access fails this
test. `RULES` must name exactly the schema's operations: a new endpoint without an entry fails
`test_rules_cover_the_schema`. Each operation's cases run in one test whose failure lists every
mismatching (caller, object) pair. A case that exposes a real bug is listed in KNOWN_BUGS with
the correct expectation; it is checked by `test_known_bug` under xfail(strict=True) instead.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from django.contrib.auth import get_user_model
from drf_spectacular.generators import SchemaGenerator
from rest_framework.test import APIClient

from registry.access import Principal
from registry.models import Artifact, Dataset, Job, JobKind, Signature, VersionState
from registry.services import (
    aliases,
    approvals,
    artifacts,
    catalog,
    dp,
    ledger,
    scanning,
    signatures,
    tokens,
    uploads,
    webhooks,
)
from registry.signing import bundles

API = "/api/v1"
NS = f"{API}/namespaces/{{ns}}"
M = f"{NS}/models/{{model}}"
V = f"{M}/versions/{{number}}"
U = f"{V}/uploads/{{upload_id}}"
D = f"{NS}/datasets/{{dataset}}"
CANCEL = f"{API}/jobs/{{job_id}}/cancel"

DRAFT, PENDING, APPROVED = VersionState.DRAFT, VersionState.PENDING_REVIEW, VersionState.APPROVED
QUARANTINED, REVOKED = VersionState.QUARANTINED, VersionState.REVOKED
STATES = (DRAFT, PENDING, APPROVED, QUARANTINED, REVOKED)
DEPRECATED = VersionState.DEPRECATED
RELEASED = {APPROVED, DEPRECATED}

# GLOBAL os.system then REDUCE: the scanner quarantines it (never unpickled).
MALICIOUS_PICKLE = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00echoq\x01\x85q\x02Rq\x03."

# The specification (DESIGN.md §5, issue 8), independent of registry/access.py.
ROLE_MAY = {
    "viewer": {"read", "download"},
    "contributor": {"read", "download", "write"},
    "reviewer": {"read", "download", "review"},
    "admin": {"read", "download", "write", "review", "manage", "audit"},
    "auditor": {"read", "audit"},
}
SCOPE_OF = {
    "read": "read",
    "download": "read",
    "audit": "read",
    "write": "write",
    "review": "review",
    "manage": "admin",
}
ALL_SCOPES = ["read", "write", "review", "admin"]


@dataclass(frozen=True)
class Caller:
    name: str
    user: str | None  # None: anonymous
    role: str | None  # role in acme; None for non-members
    scopes: tuple[str, ...] = tuple(ALL_SCOPES)
    auditor_anywhere: bool = False  # an auditor membership somewhere (checkpoints, verify)
    audits_somewhere: bool = False  # admin or auditor somewhere (the audit event list)
    superuser: bool = False
    revoked: bool = False  # the token was revoked: it authenticates nothing

    def has(self, scope: str) -> bool:
        return scope in self.scopes


CALLERS = [
    Caller("anonymous", None, None, ()),
    Caller("root", "root", "admin", audits_somewhere=True),
    Caller("alice", "alice", "contributor"),
    Caller("bob", "bob", "reviewer"),
    Caller("carol", "carol", "viewer"),
    Caller("dave", "dave", "auditor", auditor_anywhere=True, audits_somewhere=True),
    # An admin of another namespace: acme's objects do not exist for her (BOLA: always 404).
    Caller("mallory", "mallory", None, audits_somewhere=True),
    # Narrower tokens: the scope narrows the role.
    Caller("root:read", "root", "admin", ("read",), audits_somewhere=True),
    Caller("alice:read", "alice", "contributor", ("read",)),
    Caller("bob:read", "bob", "reviewer", ("read",)),
    Caller("alice:write", "alice", "contributor", ("write",)),
    # Review but not admin scope: moves aliases, but not the protected ones.
    Caller("root:review", "root", "admin", ("review",)),
    # Operators see every job and the whole audit log, but reach no namespace without a role.
    Caller("su", "su", None, superuser=True),
    Caller("carol:revoked", "carol", "viewer", revoked=True),
]
# Versions created by root rather than alice: "own drafts" are alice's only.
ROOTS_DRAFT, ROOTS_PENDING = "root's draft", "root's pending_review"
OWNER = {ROOTS_DRAFT: "root", ROOTS_PENDING: "root"}
# The approved version reached through its alias (`.../versions/production/...`).
VIA_ALIAS = "approved via alias"
# POST /jobs: the body's kind decides the action. dp_retrain writes to the namespace; a
# privacy_audit downloads the version it attacks (so a viewer may audit released versions only).
RETRAIN, AUDIT_APPROVED = "dp_retrain", "privacy_audit of approved"
AUDIT_DRAFT = "privacy_audit of alice's draft"
JOB_ACTION = {RETRAIN: "write", AUDIT_APPROVED: "download", AUDIT_DRAFT: "download"}
STATE_OF = {
    ROOTS_DRAFT: DRAFT,
    ROOTS_PENDING: PENDING,
    VIA_ALIAS: APPROVED,
    AUDIT_APPROVED: APPROVED,
    AUDIT_DRAFT: DRAFT,
}
PROTECTED, UNPROTECTED = "production", "staging"  # the default policy protects production
# Alias cases: "<alias>-><state of the version it is pointed at>".
ALIAS_PUT_OBJECTS = (
    *(f"{UNPROTECTED}->{state}" for state in STATES),
    f"{PROTECTED}->{APPROVED}",
    f"{PROTECTED}->{DRAFT}",
)
# A webhook of acme, named through acme, or through evil (mallory's namespace): BOLA by id.
HOOK, HOOK_VIA_EVIL = "acme's webhook", "acme's webhook via /namespaces/evil"
HOOK_URL = "http://127.0.0.1:9/hook"  # loopback: SMR_WEBHOOK_ALLOW_PRIVATE in the fixture
# acme's dataset named through evil, and a dp_retrain job in evil naming acme's dataset: every
# dataset lookup is scoped to the namespace of the path or body (BOLA by name).
DATASET, DATASET_VIA_EVIL = "acme's dataset", "acme's dataset via /namespaces/evil"
RETRAIN_VIA_EVIL = "dp_retrain in evil naming acme's dataset"
VIA_EVIL = {HOOK_VIA_EVIL, DATASET_VIA_EVIL, RETRAIN_VIA_EVIL}
BLOCK = "b0"
# Tiny DP events: the shared block's cap holds every admitted case of a test.
EVENT = {"sampling_rate": 0.01, "noise_multiplier": 2.0, "steps": 10, "max_grad_norm": 1.0}
RETRAIN_PARAMS = {"noise_multiplier": 2.0, "epochs": 1, "batch_size": 10}
# Jobs to cancel: queued dp_retrain jobs (they hold a claim) of alice and of root, and
# alice's scan job, which already finished (a 409 for those who may cancel it).
ALICES_JOB, ROOTS_JOB, FINISHED_JOB = "alice's queued job", "root's queued job", "finished job"
JOB_CREATOR = {ALICES_JOB: "alice", ROOTS_JOB: "root", FINISHED_JOB: "alice"}


@dataclass(frozen=True)
class Rule:
    """Who may call an operation, on which objects, and what success looks like.

    kind: "ns" (needs `action` in acme), "scope" (any signed-in user whose token holds
    `scope`), "self" (any signed-in user, their own things), "public", "audit_log" (admins
    and auditors of some namespace), "verifier" (auditors and superusers only), "cancel" (a
    job's creator, or an admin of its namespace).
    states: the representative versions to call it on (None: not about one version).
    ok_states: the states in which it succeeds; elsewhere it is a 409 (None: all of them).
    fresh: it changes its object, so each case gets a new one.
    """

    kind: str
    ok: int
    action: str = ""
    scope: str = "read"
    states: tuple[str, ...] | None = None
    ok_states: frozenset[str] | None = None
    fresh: bool = False
    # Quarantined findings (scans) are for the version's owner and admins only.
    owner_only_when_quarantined: bool = False


def _all(ok: int, action: str, **kw: Any) -> Rule:
    return Rule("ns", ok, action=action, states=STATES, **kw)


RULES: dict[tuple[str, str], Rule] = {
    ("GET", f"{API}/audit/checkpoint-key"): Rule("public", 200),
    ("GET", f"{API}/signing-keys"): Rule("public", 200),
    ("GET", f"{API}/audit/checkpoints"): Rule("verifier", 200),
    ("GET", f"{API}/audit/events"): Rule("audit_log", 200),
    ("GET", f"{API}/audit/events/export"): Rule("audit_log", 200),
    ("POST", f"{API}/audit/verify"): Rule("verifier", 200),
    ("POST", f"{API}/auth/login"): Rule("public", 200),
    ("POST", f"{API}/auth/logout"): Rule("self", 204),
    ("GET", f"{API}/auth/me"): Rule("self", 200),
    ("GET", f"{API}/jobs"): Rule("scope", 200, scope="read"),
    ("GET", f"{API}/jobs/{{job_id}}"): Rule("ns", 200, action="read"),
    ("GET", f"{API}/namespaces"): Rule("scope", 200, scope="read"),
    ("POST", f"{API}/namespaces"): Rule("scope", 201, scope="write"),
    ("GET", NS): Rule("ns", 200, action="read"),
    ("PATCH", NS): Rule("ns", 200, action="manage"),
    ("GET", f"{NS}/members"): Rule("ns", 200, action="read"),
    ("POST", f"{NS}/members"): Rule("ns", 200, action="manage"),
    ("DELETE", f"{NS}/members/{{username}}"): Rule("ns", 204, action="manage", fresh=True),
    ("GET", f"{NS}/models"): Rule("ns", 200, action="read"),
    ("POST", f"{NS}/models"): Rule("ns", 201, action="write"),
    ("GET", M): Rule("ns", 200, action="read"),
    ("PATCH", M): Rule("ns", 200, action="write"),
    ("DELETE", M): Rule("ns", 204, action="manage", fresh=True),
    ("GET", f"{M}/versions"): Rule("ns", 200, action="read"),
    ("POST", f"{M}/versions"): Rule("ns", 201, action="write"),
    ("GET", V): Rule("ns", 200, action="read", states=(*STATES, VIA_ALIAS)),
    # Description and tags are metadata: any state (the files stay frozen). Writes to a
    # version are its owner's and the admins' (root's draft: alice may not touch it).
    ("PATCH", V): Rule("ns", 200, action="write", states=(*STATES, ROOTS_DRAFT)),
    ("POST", f"{V}/deprecate"): _all(200, "manage", ok_states=frozenset({APPROVED}), fresh=True),
    ("GET", f"{V}/files"): Rule("ns", 200, action="read", states=(*STATES, VIA_ALIAS)),
    # Also HEAD, which the schema does not list: it must answer as GET does.
    ("GET", f"{V}/files/{{path}}"): Rule(
        "ns",
        200,
        action="download",
        states=(*STATES, DEPRECATED, ROOTS_DRAFT, ROOTS_PENDING, VIA_ALIAS),
    ),
    ("PUT", f"{V}/files/{{path}}"): Rule(
        "ns", 201, action="write", states=(*STATES, ROOTS_DRAFT), ok_states=frozenset({DRAFT})
    ),
    ("DELETE", f"{V}/files/{{path}}"): _all(204, "write", ok_states=frozenset({DRAFT}), fresh=True),
    ("POST", f"{V}/rescan"): _all(
        202, "manage", ok_states=frozenset({PENDING, QUARANTINED}), fresh=True
    ),
    ("GET", f"{V}/reviews"): _all(200, "read"),
    ("GET", f"{V}/signatures"): _all(200, "read"),
    # A publisher's bundle, kept with its check's result in any state: the owner's and admins'.
    ("POST", f"{V}/signatures"): Rule("ns", 201, action="write", states=(*STATES, ROOTS_DRAFT)),
    ("GET", f"{NS}/publisher-keys"): Rule("ns", 200, action="read"),
    ("POST", f"{NS}/publisher-keys"): Rule("ns", 201, action="manage"),
    ("DELETE", f"{NS}/publisher-keys/{{key_id}}"): Rule("ns", 204, action="manage", fresh=True),
    ("GET", f"{V}/signatures/{{signature_id}}.sig"): Rule(
        "ns", 200, action="read", states=(APPROVED, DEPRECATED, VIA_ALIAS)
    ),
    ("POST", f"{V}/reviews"): _all(201, "review", ok_states=frozenset({PENDING}), fresh=True),
    ("POST", f"{V}/revoke"): _all(
        200, "manage", ok_states=frozenset(set(STATES) - {REVOKED}), fresh=True
    ),
    ("GET", f"{V}/scans"): _all(200, "read", owner_only_when_quarantined=True),
    ("POST", f"{V}/submit"): _all(202, "write", ok_states=frozenset({DRAFT}), fresh=True),
    ("POST", f"{V}/uploads"): Rule(
        "ns", 201, action="write", states=(*STATES, ROOTS_DRAFT), ok_states=frozenset({DRAFT})
    ),
    # Upload sessions exist only on drafts: a submit freezes the version.
    ("GET", U): Rule("ns", 200, action="write", states=(DRAFT,), fresh=True),
    ("DELETE", U): Rule("ns", 200, action="write", states=(DRAFT,), fresh=True),
    ("POST", f"{U}/complete"): Rule("ns", 201, action="write", states=(DRAFT,), fresh=True),
    ("PUT", f"{U}/parts/{{part}}"): Rule("ns", 200, action="write", states=(DRAFT,), fresh=True),
    ("GET", f"{M}/aliases"): Rule("ns", 200, action="read"),
    # Reviewers and admins move aliases, onto approved versions only; protected ones: admins.
    ("PUT", f"{M}/aliases/{{alias}}"): Rule("ns", 200, action="review", states=ALIAS_PUT_OBJECTS),
    # fresh: the alias is set again before each case.
    ("DELETE", f"{M}/aliases/{{alias}}"): Rule(
        "ns", 204, action="review", states=(UNPROTECTED, PROTECTED), fresh=True
    ),
    ("GET", f"{NS}/webhooks"): Rule("ns", 200, action="manage"),
    ("POST", f"{NS}/webhooks"): Rule("ns", 201, action="manage"),
    ("DELETE", f"{NS}/webhooks/{{webhook_id}}"): Rule(
        "ns", 204, action="manage", states=(HOOK, HOOK_VIA_EVIL), fresh=True
    ),
    ("GET", f"{NS}/webhooks/{{webhook_id}}/deliveries"): Rule(
        "ns", 200, action="manage", states=(HOOK, HOOK_VIA_EVIL)
    ),
    ("GET", f"{NS}/policy"): Rule("ns", 200, action="manage"),
    ("PATCH", f"{NS}/policy"): Rule("ns", 200, action="manage"),
    ("GET", f"{NS}/datasets"): Rule("ns", 200, action="read"),
    # Datasets and their blocks (caps, accountants) are the admins'; reading them is a member's.
    ("POST", f"{NS}/datasets"): Rule("ns", 201, action="manage"),
    ("GET", D): Rule("ns", 200, action="read", states=(DATASET, DATASET_VIA_EVIL)),
    ("GET", f"{D}/blocks"): Rule("ns", 200, action="read"),
    ("POST", f"{D}/blocks"): Rule("ns", 201, action="manage"),
    ("GET", f"{D}/ledger"): Rule("ns", 200, action="read"),
    # A preview reserves nothing: any reader, auditors and viewers included.
    ("POST", f"{D}/ledger/preview"): Rule("ns", 200, action="read"),
    ("GET", f"{D}/budget"): Rule("ns", 200, action="read", states=(DATASET, DATASET_VIA_EVIL)),
    # A declared DP record is a write to the version: its owner's and the admins'. Once per
    # version (fresh); refused on revoked versions (nothing to record).
    ("POST", f"{V}/dp-record"): Rule(
        "ns",
        201,
        action="write",
        states=(*STATES, ROOTS_DRAFT),
        ok_states=frozenset(set(STATES) - {REVOKED}),
        fresh=True,
    ),
    # The body names the namespace: its kind decides the action (JOB_ACTION).
    ("POST", f"{API}/jobs"): Rule(
        "ns", 202, action="read", states=(RETRAIN, AUDIT_APPROVED, AUDIT_DRAFT, RETRAIN_VIA_EVIL)
    ),
    ("POST", CANCEL): Rule("cancel", 200, states=(ALICES_JOB, ROOTS_JOB, FINISHED_JOB), fresh=True),
    ("GET", f"{API}/tokens"): Rule("self", 200),
    ("POST", f"{API}/tokens"): Rule("self", 201),
    # "own": another token of the caller; "carol's": a token of someone else (404 to others).
    ("DELETE", f"{API}/tokens/{{token_id}}"): Rule(
        "self", 204, states=("own", "carol's"), fresh=True
    ),
}

# (method, path, caller, object) -> (the correct status, why the server's answer is wrong).
# The first bug this matrix found (contributors and reviewers downloading every unreleased
# version) is fixed in selectors.version_get_for_user.
# Cases exposing a bug, with the right expectation (checked under xfail(strict=True)).
KNOWN_BUGS: dict[tuple[str, str, str, str], tuple[int, str]] = {}


def schema_operations() -> set[tuple[str, str]]:
    schema = SchemaGenerator().get_schema(request=None, public=True)
    methods = {"get", "post", "put", "patch", "delete", "head", "options"}
    return {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops if m in methods}


def expected(rule: Rule, caller: Caller, obj: str) -> int:
    """The status the specification gives `caller` calling an operation with `rule` on `obj`."""
    if caller.user is None or caller.revoked:
        return 200 if rule.kind == "public" else 401
    if rule.kind == "public":
        return rule.ok
    if rule.kind == "scope":
        return rule.ok if caller.has(rule.scope) else 403
    if rule.kind == "self":
        return _expected_self(rule, caller, obj)
    if rule.kind == "audit_log":
        ok = caller.audits_somewhere or caller.superuser
        return rule.ok if caller.has("read") and ok else 403
    if rule.kind == "verifier":
        ok = caller.auditor_anywhere or caller.superuser
        return rule.ok if caller.has("read") and ok else 403
    if rule.kind == "cancel":
        return _expected_cancel(rule, caller, obj)
    assert rule.kind == "ns", rule
    if caller.superuser and "{job_id}" in template_of(rule):
        return rule.ok if caller.has("read") else 403
    if caller.role is None or obj in VIA_EVIL:
        # Not a member: acme's objects do not exist for them. Through evil, acme's webhook
        # or dataset does not exist for anyone, evil's own admin included.
        return 404
    action = JOB_ACTION.get(obj, rule.action)
    if action not in ROLE_MAY[caller.role] or not caller.has(SCOPE_OF[action]):
        return 403
    if "->" in obj or obj in (PROTECTED, UNPROTECTED):  # aliases
        alias, _, state = obj.partition("->")
        admin = caller.role == "admin" and caller.has("admin")
        if alias == PROTECTED and not admin:
            return 403
        return rule.ok if state in ("", APPROVED) else 409
    owner = caller.user == OWNER.get(obj, "alice")
    owner_or_admin = caller.role == "admin" or owner
    if action == "download":
        # Viewers get released versions, contributors also their own drafts, reviewers also
        # what is pending review; a quarantined version's bytes are its owner's and admins'.
        state = STATE_OF.get(obj, obj)
        if state == REVOKED:
            return 410
        if state == QUARANTINED:
            return rule.ok if owner_or_admin else 403
        may = owner_or_admin or state in RELEASED
        may = may or (state == PENDING and caller.role == "reviewer")
        return rule.ok if may else 403
    if rule.owner_only_when_quarantined and obj == QUARANTINED and not owner_or_admin:
        return 403
    if rule.action == "write" and rule.states is not None and not owner_or_admin:
        return 403  # a version is changed by its owner and the namespace's admins
    if rule.ok_states is not None and STATE_OF.get(obj, obj) not in rule.ok_states:
        return 409
    return rule.ok


def template_of(rule: Rule) -> str:
    return next(key[1] for key, r in RULES.items() if r is rule)


def _expected_cancel(rule: Rule, caller: Caller, obj: str) -> int:
    """A job's creator cancels it with the write scope, a namespace admin with the admin
    scope; operators see every job but cancel only registry-wide ones (none here)."""
    if caller.role is None and not caller.superuser:
        return 404
    own = caller.user == JOB_CREATOR[obj] and caller.role in ("contributor", "admin")
    may = (own and caller.has("write")) or (caller.role == "admin" and caller.has("admin"))
    if not may:
        return 403
    return 409 if obj == FINISHED_JOB else rule.ok


def _expected_self(rule: Rule, caller: Caller, obj: str) -> int:
    if rule.ok == 201:  # POST /tokens asks for read+write: never more than the token holds
        return rule.ok if caller.has("read") and caller.has("write") else 403
    if rule.ok == 204 and obj:  # DELETE /tokens/{id}
        if obj == "carol's" and caller.user != "carol":
            # Revoking another of one's tokens needs the admin scope, checked first.
            return 403 if not caller.has("admin") else 404
        return rule.ok if caller.has("admin") else 403
    return rule.ok


# --- The world -----------------------------------------------------------------------------


class World:
    """acme with alice's versions in every representative state, evil with mallory, and a
    client per caller."""

    def __init__(self, actors) -> None:
        self.actors = actors
        self.acme = actors.acme
        self.users = actors.users
        self.plaintext = dict(actors.tokens)
        for caller in CALLERS:
            if caller.user and ":" in caller.name:
                issued = tokens.token_create(
                    user=self.users[caller.user], scopes=list(caller.scopes)
                )
                self.plaintext[caller.name] = issued.plaintext
                if caller.revoked:
                    tokens.token_revoke(user=issued.token.user, key_id=issued.token.key_id)
        get_user_model().objects.create_user("lena", password="pw-4-lena!")
        get_user_model().objects.create(username="su", is_superuser=True)
        self.plaintext["su"] = tokens.token_create(
            user=self.users_get("su"), scopes=ALL_SCOPES
        ).plaintext
        self.model = "bert"
        catalog.model_create(namespace=self.acme, name=self.model, creator=self.users["alice"])
        self.counter = itertools.count()
        self._versions: dict[str, Any] = {}
        self._dataset: Dataset | None = None
        # Every answer is checked for its signing secret: it is shown once, at creation.
        self.hook, self.hook_secret = self.webhook()

    def webhook(self):
        return webhooks.webhook_create(
            namespace=self.acme, url=HOOK_URL, events=["version.approved"], creator=None
        )

    def dataset(self) -> Dataset:
        """acme's confidential dataset `census`, with one block on a file of a submitted
        version (admission needs a file and a record count; it never reads the bytes)."""
        if self._dataset is None:
            data = self.version(PENDING, model="digits-data")
            root = self.users["root"]
            self._dataset = ledger.dataset_create(
                namespace=self.acme,
                name="census",
                sensitivity="confidential",
                delta=1e-5,
                creator=root,
            )
            ledger.data_block_create(
                dataset=self._dataset,
                name=BLOCK,
                epsilon=1000.0,
                accountant="rdp",
                artifact=Artifact.objects.get(version=data),
                records=1000,
                creator=root,
            )
        return self._dataset

    def retrain_job(self, creator: str) -> Job:
        """A queued dp_retrain job of `creator` (no worker runs here), holding its claim."""
        return dp.dp_retrain_create(
            namespace=self.acme,
            dataset=self.dataset(),
            blocks=[BLOCK],
            model_name=self.model,
            base_version=None,
            params=RETRAIN_PARAMS,
            creator=self.users[creator],
        )

    def alias(self, name: str, version) -> None:
        root = Principal(user=self.users["root"])
        aliases.alias_set(principal=root, model=version.model, name=name, number=version.number)

    def users_get(self, name: str):
        if name not in self.users:
            self.users[name] = get_user_model().objects.get(username=name)
        return self.users[name]

    def shared(self, obj: str):
        """The representative version `obj` of acme/bert, made on first use."""
        if obj == VIA_ALIAS:
            self.alias(PROTECTED, self.shared(APPROVED))
            return self.shared(APPROVED)
        if obj not in self._versions:
            self._versions[obj] = self.version(obj, model=self.model)
        return self._versions[obj]

    def client(self, caller: Caller) -> APIClient:
        client = APIClient()
        if caller.user is not None:
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {self.plaintext[caller.name]}")
        return client

    def fresh_name(self, prefix: str = "m") -> str:
        return f"{prefix}{next(self.counter)}-{uuid.uuid4().hex[:6]}"

    def version(self, obj: str, *, model: str | None = None):
        """A version in state `obj` (alice's unless it says root's; a new model unless `model`
        names one)."""
        state = STATE_OF.get(obj, obj)
        alice, bob = self.users[OWNER.get(obj, "alice")], self.users["bob"]
        name = model or self.fresh_name()
        obj = catalog.RegisteredModel.objects.filter(namespace=self.acme, name=name).first()
        if obj is None:
            obj = catalog.model_create(namespace=self.acme, name=name, creator=alice)
        version = catalog.version_create(model=obj, creator=alice)
        data = MALICIOUS_PICKLE if state == QUARANTINED else b'{"a": 1}'
        path = "model.pkl" if state == QUARANTINED else "config.json"
        artifacts.artifact_upload(
            version=version,
            path=path,
            chunks=[data],
            expected_sha256=None,
            expected_size=len(data),
            creator=alice,
        )
        if state != DRAFT:
            version, job = catalog.version_submit(version=version, submitter=alice)
            scanned = scanning.version_scan(job_id=job.pk)
            assert scanned == (QUARANTINED if state == QUARANTINED else PENDING), scanned
        if state in (APPROVED, DEPRECATED, REVOKED):
            approvals.review_record(version=version, reviewer=bob, decision="approve")
            job = Job.objects.get(version=version, kind=JobKind.SIGN)
            assert signatures.version_sign(job_id=job.pk) is not None
        if state == DEPRECATED:
            approvals.version_deprecate(version=version)
        if state == REVOKED:
            approvals.version_revoke(version=version)
        version.refresh_from_db()
        assert version.state == state
        version.file_path = path
        return version


@dataclass
class Call:
    path: str
    data: Any = None
    format: str | None = "json"
    content_type: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def prepare(world: World, method: str, template: str, rule: Rule, caller: Caller, obj: str) -> Call:
    """The request for one case: path parameters filled in, a minimal valid body, and a new
    object where the operation changes it."""
    version = None
    model = world.model
    if rule.states and (obj in (*STATES, DEPRECATED) or obj in STATE_OF):
        version = world.version(obj) if rule.fresh else world.shared(obj)
        model = version.model.name
    elif rule.states and "->" in obj:
        version = world.shared(obj.partition("->")[2])
    elif template.endswith("/models/{model}") and rule.fresh:
        model = catalog.model_create(
            namespace=world.acme, name=world.fresh_name(), creator=world.users["alice"]
        ).name
    params: dict[str, Any] = {"ns": "acme", "model": model}
    if version is not None:
        number = PROTECTED if obj == VIA_ALIAS else version.number
        params.update(number=number, path=version.file_path)
    call = Call("")
    m = (method, template)
    if m == ("PUT", f"{V}/files/{{path}}"):
        params["path"] = world.fresh_name("f") + ".json"
        call.data, call.format, call.content_type = b"{}", None, "application/octet-stream"
    elif m == ("DELETE", f"{V}/files/{{path}}") and obj == DRAFT:
        pass  # the fresh draft's own file
    elif "{upload_id}" in template:
        session = uploads.upload_session_create(
            version=version,
            path=world.fresh_name("u"),
            size=3,
            sha256=None,
            part_size=None,
            creator=world.users["alice"],
        )
        params.update(upload_id=session.pk, part=1)
        if template.endswith("/complete"):
            uploads.upload_part_put(session=session, number=1, chunks=[b"abc"], length=3)
        if template.endswith("/parts/{part}"):
            call.data, call.format, call.content_type = b"abc", None, "application/octet-stream"
    elif m == ("PUT", f"{M}/aliases/{{alias}}"):
        params["alias"] = obj.partition("->")[0]
        call.data = {"version": version.number}
    elif m == ("DELETE", f"{M}/aliases/{{alias}}"):
        params["alias"] = obj
        world.alias(obj, world.shared(APPROVED))
    elif "{webhook_id}" in template:
        hook = world.webhook()[0] if rule.fresh else world.hook
        params.update(webhook_id=hook.pk, ns="evil" if obj == HOOK_VIA_EVIL else "acme")
    elif m == ("POST", f"{NS}/webhooks"):
        call.data = {"url": HOOK_URL, "events": ["version.approved", "alias.moved"]}
    elif m == ("POST", f"{V}/uploads"):
        call.data = {"path": world.fresh_name("u"), "size": 3}
    elif m == ("POST", f"{V}/reviews"):
        call.data = {"decision": "approve"}
    elif m == ("POST", f"{NS}/models"):
        call.data = {"name": world.fresh_name()}
    elif m in {("PATCH", M), ("PATCH", NS)}:
        call.data = {"description": "matrix"}
    elif m == ("PATCH", V):
        call.data = {"description": "matrix", "tags": {"team": "matrix"}}
    elif m == ("PATCH", f"{NS}/policy"):
        call.data = {"approvals_required": 1}
    elif m == ("POST", f"{NS}/members"):
        get_user_model().objects.get_or_create(username="zed")
        call.data = {"username": "zed", "role": "viewer"}
    elif m == ("DELETE", f"{NS}/members/{{username}}"):
        params["username"] = world.fresh_name("u")
        catalog.member_set(
            namespace=world.acme,
            username=get_user_model().objects.create(username=params["username"]).username,
            role="viewer",
        )
    elif m == ("POST", f"{API}/namespaces"):
        call.data = {"name": world.fresh_name("ns")}
    elif m == ("POST", f"{API}/auth/login"):
        call.data = {"username": "lena", "password": "pw-4-lena!"}
    elif m == ("POST", f"{API}/tokens"):
        # Wider than the narrow callers' tokens: a token never mints more than it holds.
        call.data = {"scopes": ["read", "write"]}
    elif m == ("DELETE", f"{API}/tokens/{{token_id}}"):
        owner = "carol" if obj == "carol's" or caller.user is None else caller.user
        params["token_id"] = tokens.token_create(
            user=world.users[owner], scopes=["read"]
        ).token.key_id
    if m == ("POST", f"{V}/signatures"):
        # A well-formed bundle over the version's files, by a key acme does not trust.
        files = [(a.path, a.sha256, a.size) for a in Artifact.objects.filter(version=version)]
        call.data = {"bundle": bundles.bundle_build(files, "matrix")}
    elif m == ("POST", f"{NS}/publisher-keys"):
        call.data = {"public_key_pem": publisher_pem()}
    elif m == ("DELETE", f"{NS}/publisher-keys/{{key_id}}"):
        params["key_id"] = signatures.publisher_key_add(
            namespace=world.acme, public_key_pem=publisher_pem(), creator=None
        ).key_id
    if "{signature_id}" in template:
        params["signature_id"] = Signature.objects.get(version=version).pk
    if template == CANCEL:
        job = world.shared(PENDING).scan_job if obj == FINISHED_JOB else None
        params["job_id"] = (job or world.retrain_job(JOB_CREATOR[obj])).pk
    elif "{job_id}" in template:
        params["job_id"] = world.shared(PENDING).scan_job_id
    if "{dataset}" in template:
        params.update(
            dataset=world.dataset().name, ns="evil" if obj == DATASET_VIA_EVIL else "acme"
        )
    if m == ("POST", f"{NS}/datasets"):
        call.data = {"name": world.fresh_name("d"), "sensitivity": "internal", "delta": 1e-5}
    elif m == ("POST", f"{D}/blocks"):
        call.data = {"name": world.fresh_name("b"), "epsilon": 1.0, "accountant": "rdp"}
    elif m == ("POST", f"{D}/ledger/preview"):
        call.data = {"blocks": [BLOCK], "event": EVENT}
    elif m == ("POST", f"{V}/dp-record"):
        call.data = {"dataset": world.dataset().name, "blocks": [BLOCK], "event": EVENT}
    elif m == ("POST", f"{API}/jobs"):
        call.data = {
            "namespace": "evil" if obj == RETRAIN_VIA_EVIL else "acme",
            "dataset": world.dataset().name,
            "model": model,
        }
        if version is None:
            call.data.update(kind="dp_retrain", **RETRAIN_PARAMS)
        else:
            call.data.update(kind="privacy_audit", version=version.number)
    call.path = template.format(**params)
    return call


def publisher_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode()


def perform(world: World, method: str, call: Call, caller: Caller):
    client = world.client(caller)
    kwargs: dict[str, Any] = {}
    if call.data is not None:
        kwargs["data"] = call.data
    if call.format:
        kwargs["format"] = call.format
    if call.content_type:
        kwargs["content_type"] = call.content_type
    return getattr(client, method.lower())(call.path, **kwargs)


def cases(key: tuple[str, str]) -> list[tuple[Caller, str]]:
    rule = RULES[key]
    return [(caller, obj) for caller in CALLERS for obj in (rule.states or ("",))]


# --- Tests ---------------------------------------------------------------------------------


def test_rules_cover_the_schema(db):
    operations = schema_operations()
    missing = sorted(operations - set(RULES))
    stale = sorted(set(RULES) - operations)
    assert not missing, f"operations without an access rule (add them to RULES): {missing}"
    assert not stale, f"RULES entries for operations the schema no longer has: {stale}"


@pytest.fixture
def world(actors, settings) -> World:
    # Throttles are not what this test measures; the ones under test live in test_identity.
    settings.SMR_RATE_TOKEN_CREATE = "10000/min"
    settings.SMR_RATE_UPLOAD = "10000/min"
    # Password hashing is not either: a fast hasher for the login cases.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.SMR_WEBHOOK_ALLOW_PRIVATE = True
    return World(actors)


LEAK_CHECKED = {
    f"{API}/namespaces",
    f"{API}/jobs",
    f"{API}/audit/events",
    f"{API}/audit/events/export",
    f"{API}/auth/me",
    f"{API}/tokens",
}


@pytest.mark.parametrize(
    ("method", "template"), sorted(RULES), ids=[f"{m} {p}" for m, p in sorted(RULES)]
)
def test_access_matrix(world, method, template):
    rule = RULES[(method, template)]
    mismatches = []
    for caller, obj in cases((method, template)):
        if (method, template, caller.name, obj) in KNOWN_BUGS:
            continue
        call = prepare(world, method, template, rule, caller, obj)
        response = perform(world, method, call, caller)
        want = expected(rule, caller, obj)
        if caller.name == "mallory" and "{ns}" in template:
            assert want == 404, "BOLA: another namespace's objects are always a 404"
            if response.status_code == 404 and response.json()["code"] != "not_found":
                mismatches.append(f"mallory on {obj or '-'}: {response.json()['code']}")
        if response.status_code != want:
            body = b"" if response.streaming else response.content[:160]
            mismatches.append(
                f"{caller.name} on {obj or '-'}: {response.status_code} != {want} {body!r}"
            )
        elif (method, template) == ("GET", f"{V}/files/{{path}}"):
            head = world.client(caller).head(call.path)
            if head.status_code != want:
                mismatches.append(f"HEAD {caller.name} on {obj}: {head.status_code} != {want}")
        content = b"".join(response.streaming_content) if response.streaming else response.content
        if (method, template, obj, response.status_code) == ("GET", V, QUARANTINED, 200):
            # A quarantined version's findings say how to attack a loader: owner and admins.
            shown = [scan["findings"] is not None for scan in response.json()["scans"]]
            owner_or_admin = caller.role == "admin" or caller.user == "alice"
            if not shown or any(shown) != owner_or_admin:
                mismatches.append(f"{caller.name} on {obj}: findings shown {shown}")
        leak_checked = caller.name == "mallory" and method == "GET" and template in LEAK_CHECKED
        if leak_checked and b"acme" in content:
            mismatches.append(f"mallory on {template}: the answer mentions acme")
        secrets = [world.hook_secret, *world.plaintext.values()]
        if any(secret.encode() in content for secret in secrets):
            mismatches.append(f"{caller.name} on {obj or '-'}: a secret in the answer")
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize(
    ("method", "template", "caller_name", "obj"),
    [
        pytest.param(
            *key,
            marks=pytest.mark.xfail(strict=True, reason=why),
            id=f"{key[0]} {key[1]} {key[2]} on {key[3]}",
        )
        for key, (_, why) in KNOWN_BUGS.items()
    ]
    or [pytest.param("GET", NS, "root", "", marks=pytest.mark.skip(reason="no known bugs"))],
)
def test_known_bug(world, method, template, caller_name, obj):
    caller = next(c for c in CALLERS if c.name == caller_name)
    rule = RULES[(method, template)]
    call = prepare(world, method, template, rule, caller, obj)
    want = KNOWN_BUGS[(method, template, caller_name, obj)][0]
    assert perform(world, method, call, caller).status_code == want
