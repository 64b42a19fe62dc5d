"""Catalog services under real concurrency: PostgreSQL row locks, real transactions, threads."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from django.contrib.auth import get_user_model
from django.db import connection

from registry.errors import Conflict
from registry.models import Membership, ModelVersion, Namespace, Role
from registry.services import catalog

THREADS = 8


def race(fn: Callable[[int], object], n: int) -> tuple[list[object], list[BaseException]]:
    """Run fn(0..n-1) in n threads released together; each thread uses its own connection."""
    barrier = threading.Barrier(n)
    results: list[object] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            value = fn(i)
            with lock:
                results.append(value)
        except BaseException as exc:
            with lock:
                errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hung (lock wait?)"
    return results, errors


@pytest.fixture
def acme(transactional_db):
    User = get_user_model()
    alice = User.objects.create(username="alice")
    namespace = catalog.namespace_create(name="acme", creator=alice)
    model = catalog.model_create(namespace=namespace, name="bert", creator=alice)
    return namespace, model, alice


@pytest.mark.django_db(transaction=True)
def test_concurrent_version_create_numbers_are_1_to_n(acme):
    _namespace, model, alice = acme

    results, errors = race(lambda _i: catalog.version_create(model=model, creator=alice), THREADS)

    assert errors == []
    numbers = sorted(v.number for v in results)
    assert numbers == list(range(1, THREADS + 1))
    stored = sorted(ModelVersion.objects.filter(model=model).values_list("number", flat=True))
    assert stored == list(range(1, THREADS + 1))
    # The next one continues the sequence.
    assert catalog.version_create(model=model, creator=alice).number == THREADS + 1


@pytest.mark.django_db(transaction=True)
def test_versions_of_different_models_do_not_share_numbers(acme):
    namespace, model, alice = acme
    other = catalog.model_create(namespace=namespace, name="gpt", creator=alice)

    results, errors = race(
        lambda i: catalog.version_create(model=model if i % 2 else other, creator=alice), THREADS
    )

    assert errors == []
    for m in (model, other):
        numbers = sorted(v.number for v in results if v.model_id == m.pk)
        assert numbers == list(range(1, THREADS // 2 + 1))


@pytest.mark.django_db(transaction=True)
def test_two_admins_demoting_each_other_at_once_leave_one_admin(acme):
    """Each demotion alone is legal; together they would leave no admin. One must lose,
    with a clean Conflict (a 409), not a deadlock error (a 500)."""
    namespace, _model, _alice = acme
    get_user_model().objects.create(username="bob")
    catalog.member_set(namespace=namespace, username="bob", role=Role.ADMIN)

    def demote(i: int):
        return catalog.member_set(
            namespace=namespace, username=["alice", "bob"][i], role=Role.VIEWER
        )

    for _attempt in range(3):
        results, errors = race(demote, 2)
        assert len(results) == 1, errors
        assert len(errors) == 1
        assert isinstance(errors[0], Conflict), repr(errors[0])
        admins = list(
            Membership.objects.filter(namespace=namespace, role=Role.ADMIN).values_list(
                "user__username", flat=True
            )
        )
        assert len(admins) == 1
        # Restore two admins for the next round.
        catalog.member_set(namespace=namespace, username="alice", role=Role.ADMIN)
        catalog.member_set(namespace=namespace, username="bob", role=Role.ADMIN)
    assert Namespace.objects.get(pk=namespace.pk).memberships.count() == 2


@pytest.mark.django_db(transaction=True)
def test_two_admins_removing_each_other_at_once_leave_one_admin(acme):
    namespace, _model, _alice = acme
    get_user_model().objects.create(username="bob")
    catalog.member_set(namespace=namespace, username="bob", role=Role.ADMIN)

    results, errors = race(
        lambda i: catalog.member_remove(namespace=namespace, username=["alice", "bob"][i]), 2
    )

    assert len(results) == 1
    assert len(errors) == 1 and isinstance(errors[0], Conflict), repr(errors)
    assert Membership.objects.filter(namespace=namespace, role=Role.ADMIN).count() == 1
