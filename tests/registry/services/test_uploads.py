"""Resumable uploads and file uploads under real concurrency: PostgreSQL row locks, threads, and
a real object store. Races are driven deterministically: a request body (or a registration
callback) blocks on a threading.Event at a chosen point while the other side runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from registry.errors import Conflict, VersionNotDraft
from registry.models import (
    Artifact,
    ModelVersion,
    PendingObject,
    UploadPart,
    UploadSession,
    UploadState,
    VersionState,
)
from registry.services import catalog, janitor
from registry.services import uploads as svc
from registry.services.artifacts import artifact_upload
from tests.conftest import s3_client, use_kms
from tests.support.objects import pattern_bytes, read_object

MIB = 1 << 20
WAIT = 30  # seconds a thread may wait for the other side before the test gives up


class Worker(threading.Thread):
    """Runs fn in a thread with its own DB connection; keeps its result or exception."""

    def __init__(self, fn: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc
        finally:
            connection.close()

    def finish(self) -> Worker:
        self.join(timeout=60)
        assert not self.is_alive(), "worker hung"
        return self


class Gated:
    """Chunks of a request body that stop after `gate_at` bytes until `release` is set."""

    def __init__(self, data: bytes, gate_at: int) -> None:
        self.data = data
        self.gate_at = gate_at
        self.reached = threading.Event()
        self.release = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        yield self.data[: self.gate_at]
        self.reached.set()
        if not self.release.wait(WAIT):
            raise OSError("the test never released the body")
        yield self.data[self.gate_at :]


def stored(settings) -> list[str]:
    """Everything in the store, unfinished writes included (fs temp files, S3 multipart)."""
    if settings.SMR_STORAGE == "fs":
        root = settings.SMR_OBJECTS_DIR
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    s3 = s3_client(settings.S3_ENDPOINT_URL)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=settings.S3_BUCKET).get("Contents", [])]
    unfinished = s3.list_multipart_uploads(Bucket=settings.S3_BUCKET).get("Uploads", [])
    return sorted(keys + [f"multipart:{u['Key']}" for u in unfinished])


def artifact_keys() -> list[str]:
    return sorted(Artifact.objects.values_list("object_key", flat=True))


def wait_for_lock_waiters(n: int) -> None:
    """Block until n sessions of this test database wait on a lock (a row lock, here)."""
    deadline = time.monotonic() + WAIT
    while True:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if cursor.fetchone()[0] >= n:
                return
        assert time.monotonic() < deadline, f"{n} lock waiter(s) never showed up"
        time.sleep(0.02)


def fresh(session: UploadSession) -> UploadSession:
    # Each thread gets its own instance: nothing lazily loaded is shared between threads.
    return UploadSession.objects.select_related("version__model__namespace").get(pk=session.pk)


def fresh_version(version: ModelVersion) -> ModelVersion:
    return ModelVersion.objects.select_related("model__namespace").get(pk=version.pk)


def put_file(version, path: str, data: bytes, creator, **kwargs) -> Artifact:
    return artifact_upload(
        version=version,
        path=path,
        chunks=iter([data]),
        expected_sha256=None,
        expected_size=len(data),
        creator=creator,
        **kwargs,
    )


def open_session(version, alice, size: int, part_size: int = MIB) -> UploadSession:
    session = svc.upload_session_create(
        version=version,
        path="w/model.bin",
        size=size,
        sha256=None,
        part_size=part_size,
        creator=alice,
    )
    return fresh(session)


# --- A file upload racing version_submit ---------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_upload_still_streaming_when_submit_runs_is_refused_and_leaves_nothing(
    actors, draft, store_kind, settings
):
    """Bug caught: if _register trusted the draft check made before streaming (instead of
    re-checking under the version row lock), the file would land in a version that is already
    submitted for review, i.e. change files a reviewer is about to approve."""
    alice = actors.users["alice"]
    put_file(draft, "config.json", b"{}", alice)  # submit needs at least one file
    before = stored(settings)
    data = pattern_bytes(3 * MIB, seed=7)
    half = threading.Event()
    release = threading.Event()

    def body():
        yield data[: MIB + 1]
        half.set()
        assert release.wait(WAIT)
        yield data[MIB + 1 :]

    upload = Worker(
        lambda: artifact_upload(
            version=fresh_version(draft),
            path="late.bin",
            chunks=body(),
            expected_sha256=None,
            expected_size=len(data),
            creator=alice,
        )
    )
    upload.start()
    assert half.wait(WAIT)
    # The upload holds no lock while streaming, so submit goes through at once.
    submitted, _job = catalog.version_submit(version=draft)
    assert submitted.state == VersionState.SCANNING
    release.set()
    upload.finish()

    assert isinstance(upload.error, VersionNotDraft), repr(upload.error)
    assert upload.error.code == "version_not_draft" and upload.error.status == 409
    assert list(Artifact.objects.values_list("path", flat=True)) == ["config.json"]
    assert stored(settings) == before  # the streamed ciphertext was deleted, not orphaned
    assert not PendingObject.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_upload_registering_when_submit_runs_lands_before_submit(actors, draft, settings):
    """The other legal outcome: an upload already registering holds the version row lock, so
    submit waits for it and the file is part of what goes to review. Bug caught: a submit that
    does not lock the version row would freeze a version whose file list changes under it."""
    alice = actors.users["alice"]
    put_file(draft, "config.json", b"{}", alice)
    in_tx = threading.Event()
    release = threading.Event()

    def hold(_artifact):
        in_tx.set()
        assert release.wait(WAIT)

    upload = Worker(
        lambda: put_file(fresh_version(draft), "weights.bin", b"w" * 1000, alice, on_register=hold)
    )
    upload.start()
    assert in_tx.wait(WAIT)
    submit = Worker(lambda: catalog.version_submit(version=fresh_version(draft)))
    submit.start()
    wait_for_lock_waiters(1)  # submit is blocked on the version row the upload holds
    assert submit.is_alive()
    release.set()
    upload.finish()
    submit.finish()

    assert upload.error is None, repr(upload.error)
    assert submit.error is None, repr(submit.error)
    version = ModelVersion.objects.get(pk=draft.pk)
    assert version.state == VersionState.SCANNING
    assert sorted(Artifact.objects.filter(version=version).values_list("path", flat=True)) == [
        "config.json",
        "weights.bin",
    ]
    assert sorted(stored(settings)) == artifact_keys()
    assert not PendingObject.objects.exists()


# --- Two completes of one session ----------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_completes_make_one_artifact(actors, draft, store_kind, settings):
    """Both completes pass the open check and assemble the whole file; the version row lock
    (held here by the test until both are waiting) makes them register one after the other.
    Bug caught: without the conditional state UPDATE in mark_completed, the second would
    replace the first's artifact (two 201s, one object orphaned or deleted under a reader)."""
    alice = actors.users["alice"]
    size = 2 * MIB + 10
    data = pattern_bytes(size, seed=3)
    session = open_session(draft, alice, size)
    for number in (1, 2, 3):
        chunk = data[(number - 1) * MIB : number * MIB]
        svc.upload_part_put(session=session, number=number, chunks=[chunk], length=len(chunk))
    part_keys = set(UploadPart.objects.values_list("object_key", flat=True))
    assert len(part_keys) == 3

    locked = threading.Event()
    release = threading.Event()

    def hold_version_row():
        with transaction.atomic():
            ModelVersion.objects.select_for_update().get(pk=draft.pk)
            locked.set()
            assert release.wait(WAIT)

    holder = Worker(hold_version_row)
    holder.start()
    assert locked.wait(WAIT)
    completes = [
        Worker(lambda: svc.upload_session_complete(session=fresh(session), creator=alice))
        for _ in range(2)
    ]
    for w in completes:
        w.start()
    wait_for_lock_waiters(2)  # both assembled their artifact and wait to register it
    release.set()
    holder.finish()
    for w in completes:
        w.finish()

    winners = [w.result for w in completes if w.error is None]
    losers = [w.error for w in completes if w.error is not None]
    assert len(winners) == 1 and len(losers) == 1, [repr(w.error) for w in completes]
    assert isinstance(losers[0], Conflict) and losers[0].status == 409, repr(losers[0])
    artifact = Artifact.objects.get()
    assert artifact.pk == winners[0].pk
    assert artifact.sha256 == hashlib.sha256(data).hexdigest()
    assert UploadSession.objects.get(pk=session.pk).state == UploadState.COMPLETED
    assert UploadSession.objects.get(pk=session.pk).artifact_id == artifact.pk
    # Only the artifact's object is left: the loser's ciphertext and the staged parts are gone.
    assert stored(settings) == [artifact.object_key]
    assert not UploadPart.objects.exists()
    assert not PendingObject.objects.exists()


# --- A part re-sent while its first send is still running ----------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("last", ["first", "second"])
def test_part_resent_while_first_send_runs_keeps_the_last_registered(actors, draft, settings, last):
    """Two sends of part 1, both mid-body at once; `last` says which one registers last.
    Bug caught: a part object key derived from the part number alone would let the two sends
    write (and the loser's cleanup delete) the same object, so `complete` would fail or
    assemble the wrong bytes; a replaced part whose object is not discarded is an orphan.
    Running both orders is the control: the winner follows registration order, not start
    order."""
    alice = actors.users["alice"]
    size = MIB + 10
    tail = pattern_bytes(10, seed=9)
    first = pattern_bytes(MIB, seed=1)
    second = pattern_bytes(MIB, seed=2)
    session = open_session(draft, alice, size)
    svc.upload_part_put(session=session, number=2, chunks=[tail], length=10)

    bodies = {"first": Gated(first, MIB // 2), "second": Gated(second, MIB // 3)}
    sends = {
        name: Worker(
            lambda b=body: svc.upload_part_put(
                session=fresh(session), number=1, chunks=b, length=MIB
            )
        )
        for name, body in bodies.items()
    }
    sends["first"].start()
    assert bodies["first"].reached.wait(WAIT)
    sends["second"].start()
    assert bodies["second"].reached.wait(WAIT)
    order = ["second", "first"] if last == "first" else ["first", "second"]
    for name in order:
        bodies[name].release.set()
        sends[name].finish()
        assert sends[name].error is None, repr(sends[name].error)

    parts = list(UploadPart.objects.filter(session=session, number=1))
    assert len(parts) == 1
    winner = {"first": first, "second": second}[last]
    assert parts[0].sha256 == hashlib.sha256(winner).hexdigest()
    assert parts[0].object_key == sends[last].result.object_key
    # The replaced send's object is gone; only the two current parts are stored.
    assert stored(settings) == sorted(UploadPart.objects.values_list("object_key", flat=True))
    assert not PendingObject.objects.exists()

    artifact = svc.upload_session_complete(session=fresh(session), creator=alice)
    assert artifact.sha256 == hashlib.sha256(winner + tail).hexdigest()
    assert artifact.size == size
    assert stored(settings) == [artifact.object_key]
    assert not PendingObject.objects.exists()
    assert not UploadPart.objects.exists()


# --- Closed sessions -----------------------------------------------------------------------


def test_expired_session_refuses_parts_and_complete(actors, draft, settings):
    alice = actors.users["alice"]
    data = pattern_bytes(MIB + 10, seed=4)
    session = open_session(draft, alice, len(data))
    svc.upload_part_put(session=session, number=1, chunks=[data[:MIB]], length=MIB)
    svc.upload_part_put(session=session, number=2, chunks=[data[MIB:]], length=10)
    staged = stored(settings)
    assert len(staged) == 2
    UploadSession.objects.filter(pk=session.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    session = fresh(session)

    with pytest.raises(Conflict) as resend:
        svc.upload_part_put(session=session, number=1, chunks=[data[:MIB]], length=MIB)
    assert resend.value.status == 409 and resend.value.extra["state"] == "expired"
    with pytest.raises(Conflict) as complete:
        svc.upload_session_complete(session=session, creator=alice)
    assert complete.value.status == 409 and complete.value.extra["state"] == "expired"

    assert not Artifact.objects.exists()
    assert stored(settings) == staged  # the refused re-send wrote nothing
    assert UploadPart.objects.count() == 2
    assert not PendingObject.objects.exists()
    # The staged parts are the janitor's to remove.
    assert janitor.uploads_expire() == 1
    assert stored(settings) == []
    assert not UploadPart.objects.exists()


def test_expired_session_control_completes_when_not_expired(actors, draft, settings):
    # Control for the test above: the same session, not expired, completes.
    alice = actors.users["alice"]
    data = pattern_bytes(MIB + 10, seed=4)
    session = open_session(draft, alice, len(data))
    svc.upload_part_put(session=session, number=1, chunks=[data[:MIB]], length=MIB)
    svc.upload_part_put(session=session, number=2, chunks=[data[MIB:]], length=10)
    artifact = svc.upload_session_complete(session=fresh(session), creator=alice)
    assert artifact.sha256 == hashlib.sha256(data).hexdigest()
    assert stored(settings) == [artifact.object_key]
    assert len(read_object(artifact.object_key)) > artifact.size  # ciphertext, with tags


def test_part_after_abort_is_refused_and_stores_nothing(actors, draft, settings):
    alice = actors.users["alice"]
    data = pattern_bytes(MIB + 10, seed=5)
    session = open_session(draft, alice, len(data))
    svc.upload_part_put(session=session, number=1, chunks=[data[:MIB]], length=MIB)
    svc.upload_session_abort(session=fresh(session))
    assert stored(settings) == []  # abort removed the staged part

    with pytest.raises(Conflict) as part:
        svc.upload_part_put(session=fresh(session), number=2, chunks=[data[MIB:]], length=10)
    assert part.value.status == 409 and part.value.extra["state"] == UploadState.ABORTED
    with pytest.raises(Conflict):
        svc.upload_session_complete(session=fresh(session), creator=alice)
    assert stored(settings) == []
    assert not UploadPart.objects.exists()
    assert not PendingObject.objects.exists()
    assert not Artifact.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_part_whose_send_outlives_an_abort_is_discarded(actors, draft, settings):
    """A part already streaming when the session is aborted must not be registered on the
    aborted session. Bug caught: registering without re-reading the session state under its
    row lock would leave a part row (and its object) that nothing ever cleans up."""
    alice = actors.users["alice"]
    session = open_session(draft, alice, MIB + 10)
    body = Gated(pattern_bytes(MIB, seed=6), MIB // 2)
    send = Worker(
        lambda: svc.upload_part_put(session=fresh(session), number=1, chunks=body, length=MIB)
    )
    send.start()
    assert body.reached.wait(WAIT)
    svc.upload_session_abort(session=fresh(session))
    body.release.set()
    send.finish()

    assert isinstance(send.error, Conflict), repr(send.error)
    assert send.error.extra["state"] == UploadState.ABORTED
    assert not UploadPart.objects.exists()
    assert stored(settings) == []
    assert not PendingObject.objects.exists()


# --- A complete that loses the race while reading the staged parts -------------------------


class GatedProxy:
    """A TCP proxy whose client->server direction can be held shut: requests sent while the
    gate is closed wait (and `held` is set) until it opens. Here it pauses a thread at a KMS
    call, which is a point the service passes through at a known step."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, gated: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if gated and not self.gate.is_set():
                    self.held.set()
                    self.gate.wait(WAIT)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.gate.set()
        self.listener.close()


@pytest.mark.django_db(transaction=True)
def test_complete_losing_while_parts_are_discarded_is_a_conflict(
    actors, draft, settings, moto_endpoint, kms_key_id
):
    """C1 has assembled and waits to register (the test holds the version row); C2 has listed
    the parts and is paused at its KMS unwrap. C1 then wins and discards the staged parts; C2
    resumes. The session was completed under it: the client should get a 409, not an alarm
    about corrupted storage."""
    proxy = GatedProxy(int(moto_endpoint.rsplit(":", 1)[1]))
    use_kms(settings, f"http://127.0.0.1:{proxy.port}", kms_key_id)
    alice = actors.users["alice"]
    data = pattern_bytes(MIB + 10, seed=8)
    session = open_session(draft, alice, len(data))
    svc.upload_part_put(session=session, number=1, chunks=[data[:MIB]], length=MIB)
    svc.upload_part_put(session=session, number=2, chunks=[data[MIB:]], length=10)

    locked = threading.Event()
    release = threading.Event()

    def hold_version_row():
        with transaction.atomic():
            ModelVersion.objects.select_for_update().get(pk=draft.pk)
            locked.set()
            assert release.wait(WAIT)

    try:
        holder = Worker(hold_version_row)
        holder.start()
        assert locked.wait(WAIT)
        c1 = Worker(lambda: svc.upload_session_complete(session=fresh(session), creator=alice))
        c1.start()
        wait_for_lock_waiters(1)
        proxy.gate.clear()
        c2 = Worker(lambda: svc.upload_session_complete(session=fresh(session), creator=alice))
        c2.start()
        assert proxy.held.wait(WAIT)  # C2 listed the parts and waits on KMS
        release.set()
        holder.finish()
        c1.finish()
        assert c1.error is None, repr(c1.error)
        proxy.gate.set()
        c2.finish()
    finally:
        release.set()
        proxy.close()

    artifact = Artifact.objects.get()
    assert artifact.sha256 == hashlib.sha256(data).hexdigest()
    # Whatever C2 answered, it left nothing behind.
    assert stored(settings) == [artifact.object_key]
    assert not PendingObject.objects.exists()
    assert isinstance(c2.error, Conflict), repr(c2.error)
