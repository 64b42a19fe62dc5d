"""DP retraining on a real Celery worker (Redis broker, PostgreSQL): the acceptance run on the
bundled digits at a target epsilon of 4, and a worker SIGKILLed mid-training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis

pytest.importorskip("torch")

from registry.dp import accounting
from registry.models import Job, JobState, LedgerEntry
from tests.support.dp import digits_dataset
from tests.workers import test_scan_worker

BROKER = "redis://127.0.0.1:6379/10"  # the other worker tests use 9, 11, 12, 14 and 15
WAIT = 240


class DpWorkers(test_scan_worker.Workers):
    def start(self, *, beat: bool = False) -> subprocess.Popen:
        args = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--pool", "solo"]
        args += ["-Q", "dp", "--loglevel", "warning", "--without-heartbeat"]
        args += ["--without-gossip", "--without-mingle"]
        env = {**self.env, "CELERY_BROKER_URL": BROKER, "SMR_DP_DEVICE": "cpu"}
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        return proc


@pytest.fixture
def workers(settings, tmp_path):
    redis.Redis.from_url(BROKER).flushdb()
    settings.CELERY_BROKER_URL = BROKER
    w = DpWorkers(settings, tmp_path)
    yield w
    w.stop()
    redis.Redis.from_url(BROKER).flushdb()


def wait_for(predicate, what: str, procs=()) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        for proc in procs:
            if proc.poll() is not None and proc.returncode not in (0, -signal.SIGKILL):
                raise AssertionError(f"worker exited: {proc.stderr.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def job_state(job_id: str) -> str:
    return Job.objects.get(pk=job_id).state


@pytest.mark.django_db(transaction=True)
def test_retraining_at_epsilon_4_produces_a_draft_with_its_guarantee(actors, workers):
    digits_dataset(actors)
    alice = actors.client("alice")
    response = alice.post(
        "/api/v1/jobs",
        {
            "kind": "dp_retrain",
            "namespace": "acme",
            "dataset": "digits",
            "model": "digits-dp",
            "target_epsilon": 4.0,
            "epochs": 8,
            "batch_size": 64,
            "max_grad_norm": 1.0,
        },
        format="json",
    )
    assert response.status_code == 202, response.content
    job_id = response.json()["id"]
    assert response.json()["state"] == "queued"

    proc = workers.start()
    wait_for(lambda: job_state(job_id) not in ("queued", "running"), "the training", [proc])
    job = alice.get(f"/api/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job
    result = job["result"]
    assert result["epsilon"] <= 4.0
    assert result["accuracy"] > 0.5  # ten classes: chance is 0.1

    base = "/api/v1/namespaces/acme/models/digits-dp/versions/1"
    version = alice.get(base).json()
    assert version["state"] == "draft"
    assert {f["path"] for f in version["files"]} == {
        "model.safetensors",
        "config.json",
        "README.md",
    }
    record = version["dp_record"]
    assert record["origin"] == "job" and record["job"] == job_id
    assert record["dataset"] == "digits" and record["blocks"] == ["b1"]
    # The card's epsilon is the accountant's own figure for the steps that ran.
    event = accounting.DpEvent(**record["event"])
    expected = accounting.epsilon([event], delta=1e-5, accountant="rdp")
    assert record["epsilon"] == pytest.approx(expected) and expected <= 4.0

    card = b"".join(alice.get(f"{base}/files/README.md").streaming_content).decode()
    assert f"(epsilon, delta) = ({expected:.4f}, 1e-05)" in card
    assert "AUC" in card and "held-out accuracy" in card
    config = json.loads(b"".join(alice.get(f"{base}/files/config.json").streaming_content))
    assert 0.0 <= config["privacy"]["membership_inference"]["auc"] <= 1.0

    from safetensors.numpy import load

    raw = b"".join(alice.get(f"{base}/files/model.safetensors").streaming_content)
    weights = load(raw)
    assert weights["layers.0.weight"].shape == (10, 64)

    kinds = list(LedgerEntry.objects.filter(job_id=job_id).values_list("kind", flat=True))
    assert sorted(kinds) == ["claim", "commit"]
    budget = alice.get("/api/v1/namespaces/acme/datasets/digits/budget").json()
    assert budget["blocks"][0]["spent_epsilon"] == pytest.approx(expected)
    assert budget["blocks"][0]["reserved_epsilon"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_midway_commits_the_steps_it_ran(actors, workers):
    digits_dataset(actors, epsilon=50)
    alice = actors.client("alice")
    response = alice.post(
        "/api/v1/jobs",
        {
            "kind": "dp_retrain",
            "namespace": "acme",
            "dataset": "digits",
            "model": "digits-dp",
            "noise_multiplier": 1.5,
            "epochs": 400,
            "batch_size": 64,
        },
        format="json",
    )
    assert response.status_code == 202, response.content
    job_id = response.json()["id"]

    proc = workers.start()

    def trained_two_epochs() -> bool:
        return (Job.objects.get(pk=job_id).result or {}).get("epoch", 0) >= 2

    wait_for(trained_two_epochs, "two epochs", [proc])
    progress = alice.get(f"/api/v1/jobs/{job_id}").json()
    assert progress["state"] == "running"
    assert "epsilon spent" in progress["progress_message"]
    assert progress["result"]["epsilon_spent"] > 0
    seen = progress["result"]["steps"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    started = Job.objects.get(pk=job_id).result["steps_started"]
    assert started >= seen

    # The message comes back (acks_late) to a new worker, which settles instead of training.
    second = workers.start()
    wait_for(lambda: job_state(job_id) == JobState.FAILED, "the settlement", [second])
    job = Job.objects.get(pk=job_id)
    assert job.error_code == "worker_lost"
    entries = {e.kind: e.steps for e in LedgerEntry.objects.filter(job_id=job_id)}
    total = Job.objects.get(pk=job_id).params["event"]["steps"]
    assert entries == {"claim": total, "commit": started, "release": total - started}
