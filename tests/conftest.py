"""Shared fixtures: real services only.

S3 and KMS are moto's server in its own process, spoken to over HTTP with boto3 (never patched).
PostgreSQL comes from DATABASE_URL (see the Makefile); pytest-django creates the test database.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import boto3
import pytest
import requests

# moto accepts any credentials; these keep boto3 from looking for real ones.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's server (S3 + KMS) in a child process on a free loopback port."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(f"{url}/moto-api/", timeout=1)
            break
        except requests.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def s3_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION)


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> str:
    """A fresh, empty bucket per test, so tests never see each other's objects."""
    name = f"smr-test-{uuid.uuid4().hex[:12]}"
    s3_client(moto_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def kms_key_id(moto_endpoint: str) -> str:
    kms = boto3.client("kms", endpoint_url=moto_endpoint, region_name=REGION)
    return kms.create_key(Description="smr test KEK")["KeyMetadata"]["Arn"]


# --- Registry fixtures ---------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated_registry(settings, tmp_path):
    """Every test gets its own object folder and keyring; nothing touches var/."""
    from registry import keyconfig, storage

    settings.SMR_STORAGE = "fs"
    settings.SMR_OBJECTS_DIR = tmp_path / "objects"
    settings.SMR_KEY_PROVIDER = "local"
    settings.SMR_KEYRING_FILE = tmp_path / "keys" / "keyring.json"
    settings.SMR_AUDIT_SIGNING_KEY_FILE = tmp_path / "keys" / "audit-ed25519.pem"
    storage.get_object_store.cache_clear()
    keyconfig.reset()
    yield
    storage.get_object_store.cache_clear()
    keyconfig.reset()


@pytest.fixture(autouse=True)
def _no_embedded_broker(settings):
    """Jobs a test commits go to an in-memory broker, not to the `make run` queue folder under
    var/ (a later `make run` worker would execute them). Worker tests set their Redis broker."""
    settings.CELERY_BROKER_URL = "memory://"


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Throttles and the folding of access.denied events count in the cache: none carries over
    from one test to the next."""
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


@pytest.fixture(autouse=True)
def _audit_tables_flushable(request):
    """Let pytest-django empty the append-only audit tables after transactional tests.

    Their triggers reject TRUNCATE, as they should for the application. The test database
    user is a superuser, so for the teardown flush only it switches the session to replica
    mode, in which ordinary triggers do not fire.
    """
    marker = request.node.get_closest_marker("django_db")
    transactional = bool(
        {"transactional_db", "live_server"} & set(request.fixturenames)
        or (marker and marker.kwargs.get("transaction"))
    )
    if transactional:
        request.getfixturevalue("_django_db_helper")
    yield
    if transactional:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("SET session_replication_role = replica")


@pytest.fixture(autouse=True)
def _triggers_on_by_default(django_db_blocker):
    with django_db_blocker.unblock():
        from django.db import connection

        if connection.vendor == "postgresql" and connection.connection is not None:
            with connection.cursor() as cursor:
                cursor.execute("SET session_replication_role = DEFAULT")
    yield


def use_s3(settings, endpoint: str, bucket: str) -> None:
    from registry import storage

    settings.SMR_STORAGE = "s3"
    settings.S3_ENDPOINT_URL = endpoint
    settings.S3_BUCKET = bucket
    settings.S3_REGION = REGION
    settings.S3_PART_SIZE = 5 << 20
    storage.get_object_store.cache_clear()


def use_kms(settings, endpoint: str, key_id: str) -> None:
    from registry import keyconfig

    settings.SMR_KEY_PROVIDER = "aws-kms"
    settings.KMS_KEY_ID = key_id
    settings.KMS_ENDPOINT_URL = endpoint
    settings.KMS_REGION = REGION
    keyconfig.reset()


@pytest.fixture(params=["fs", "s3"])
def store_kind(request, settings) -> str:
    """Run a test against the folder store and against S3 (moto over HTTP)."""
    if request.param == "s3":
        use_s3(
            settings, request.getfixturevalue("moto_endpoint"), request.getfixturevalue("s3_bucket")
        )
    return request.param


@pytest.fixture
def s3_store(settings, moto_endpoint, s3_bucket) -> str:
    use_s3(settings, moto_endpoint, s3_bucket)
    return s3_bucket


class Actors:
    """alice uploads, bob reviews, carol views, dave audits, root administers acme;
    mallory is an admin of another team and must see nothing of acme."""

    def __init__(self) -> None:
        from django.contrib.auth import get_user_model
        from rest_framework.test import APIClient

        from registry.models import Membership, Namespace
        from registry.services.tokens import token_create

        User = get_user_model()
        self.acme = Namespace.objects.create(name="acme")
        self.evil = Namespace.objects.create(name="evil")
        roles = {
            "root": (self.acme, "admin"),
            "alice": (self.acme, "contributor"),
            "bob": (self.acme, "reviewer"),
            "carol": (self.acme, "viewer"),
            "dave": (self.acme, "auditor"),
            "mallory": (self.evil, "admin"),
        }
        self.users = {}
        self.tokens = {}
        for name, (ns, role) in roles.items():
            user = User.objects.create(username=name)
            Membership.objects.create(namespace=ns, user=user, role=role)
            self.users[name] = user
            self.tokens[name] = token_create(
                user=user, scopes=["read", "write", "review", "admin"]
            ).plaintext
        self._client_cls = APIClient

    def client(self, name: str):
        client = self._client_cls()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {self.tokens[name]}")
        return client


@pytest.fixture
def actors(db) -> Actors:
    return Actors()


@pytest.fixture
def draft(actors):
    """acme/bert with a draft version 1, created by alice."""
    from registry.services import catalog

    model = catalog.model_create(namespace=actors.acme, name="bert", creator=actors.users["alice"])
    return catalog.version_create(model=model, creator=actors.users["alice"])


FILES = "/api/v1/namespaces/acme/models/bert/versions/1/files"
