"""DP-SGD benchmarks on scikit-learn's bundled digits (no download), side by side in one run.

    .venv/bin/python benchmarks/bench_dp.py [--epochs 30] [--batch-size 64] [--repeat 3]
        [--jobs 3] [--family logreg --family mlp] [--part utility|speed|overhead]
        [--torch-threads 1] [--quick]

The digits (1,797 rows, 64 features, 10 classes) are written as an .npz, read back with
workers.training.table_read (the dp worker's training loop) and split 80/20 with seed 0, as a
dp_retrain job does. Every run has the same epochs, batch size, clipping norm 1, learning rate
and seed; the noise of a target epsilon is calibrated with registry.dp.accounting's
noise_calibrate (RDP, delta 1e-5) for the run's exact sampling rate and step count. Models:
logreg and an MLP with one hidden layer of 64 units (--family to pick). torch runs on one
thread unless --torch-threads says otherwise; one short warm-up run per family and mode comes
first.

1. utility: held-out accuracy and the loss-threshold membership-inference attack
   (training.membership_inference: ROC AUC, advantage) at target epsilon 1, 2, 4, 8 and
   without privacy. One `dp_utility` line per point, a table on stderr.
2. speed: training.train with DP-SGD (noise of epsilon 4) against the same loop without it
   (TrainParams private=False: same Poisson batches, no clipping or noise), median of
   --repeat interleaved runs each: `dp_train_time_ratio` = DP seconds / non-DP seconds.
3. overhead: the registry's own path in this process against a real database: the digits
   .npz uploaded as a file of a submitted, scanned version, a dataset and a block of 1,797
   records registered, then dp.dp_retrain_create (admission: plan, calibrate, claim,
   enqueue) and dp.dp_retrain_run (decrypt the data, train, evaluate, write three encrypted
   files, settle the ledger, audit) at target epsilon 4, --jobs times per family.
   The run gets the training loop the way a worker hands it over (`training=`), wrapped so
   that train, accuracy and membership_inference are timed around the real calls; the
   job's progress callbacks (a database write and an epsilon per epoch) run inside train()
   and are counted as registry time, not training.
   `dp_registry_overhead`: (admission + run - training) / (admission + run), median job,
   target <= 0.05. The accountant's result cache is cleared before admission and before the
   run: the web server and the worker are separate processes in production.

Database: `smr_bench_dp` next to $DATABASE_URL's (dropped and recreated each run: the audit
and ledger tables are append-only), or a temporary SQLite file without a PostgreSQL
DATABASE_URL (a `note` line says so). Jobs are published to kombu's in-memory broker (nothing
consumes them: the run is called here); SMR_DP_DEVICE picks the device (default auto).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from common import emit, log  # noqa: E402

from registry.dp import accounting  # noqa: E402
from workers import training  # noqa: E402

DB_NAME = "smr_bench_dp"
EPSILONS = (1.0, 2.0, 4.0, 8.0)
JOB_EPSILON = 4.0
DELTA = 1e-5
ACCOUNTANT = "rdp"
HOLDOUT = 0.2
SEED = 0
MAX_GRAD_NORM = 1.0
FAMILIES: dict[str, tuple[int, ...]] = {"logreg": (), "mlp": (64,)}
OVERHEAD_TARGET = 0.05
PARTS = ("utility", "speed", "overhead")


def device() -> str:
    """What a dp worker uses: SMR_DP_DEVICE (the registry's setting), default auto."""
    return os.environ.get("SMR_DP_DEVICE", "auto")


def digits_npz(path: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    np.savez(path, X=digits.data.astype(np.float32), y=digits.target.astype(np.int64))
    return path


class Setup:
    """The split and the DP event every run shares."""

    def __init__(self, npz: Path, args: argparse.Namespace) -> None:
        self.train, self.holdout = training.table_split(
            training.table_read(npz), holdout_fraction=HOLDOUT, seed=SEED
        )
        self.epochs = args.epochs
        self.batch_size = args.batch_size
        self.n_train = len(self.train.y)
        self.q = accounting.sampling_rate(self.n_train, self.batch_size)
        self.steps = self.epochs * accounting.steps_per_epoch(self.n_train, self.batch_size)
        self._sigmas: dict[float, float] = {}

    def sigma(self, epsilon: float) -> float:
        if epsilon not in self._sigmas:
            self._sigmas[epsilon] = accounting.noise_calibrate(
                sampling_rate=self.q,
                steps=self.steps,
                target_epsilon=epsilon,
                delta=DELTA,
                accountant=ACCOUNTANT,
                max_grad_norm=MAX_GRAD_NORM,
            )
        return self._sigmas[epsilon]

    def spec(self, family: str) -> training.ModelSpec:
        return training.ModelSpec(
            family=family,
            n_features=int(self.train.X.shape[1]),
            n_classes=len(self.train.classes),
            hidden=FAMILIES[family],
        )

    def params(self, epsilon: float | None) -> training.TrainParams:
        return training.TrainParams(
            epochs=self.epochs,
            batch_size=self.batch_size,
            max_grad_norm=MAX_GRAD_NORM,
            noise_multiplier=0.0 if epsilon is None else self.sigma(epsilon),
            seed=SEED,
            private=epsilon is not None,
            device=device(),
        )

    def warm_up(self, families: list[str]) -> None:
        """One short run each way per family: the first use of torch and Opacus is slow."""
        for family in families:
            for private in (True, False):
                params = training.TrainParams(
                    epochs=1,
                    batch_size=self.batch_size,
                    max_grad_norm=MAX_GRAD_NORM,
                    noise_multiplier=1.0 if private else 0.0,
                    private=private,
                    device=device(),
                )
                training.train(self.spec(family), params, self.train)

    def fit(self, family: str, epsilon: float | None) -> tuple[training.TrainResult, float]:
        params = self.params(epsilon)  # calibrated (once per epsilon) before the clock starts
        started = time.perf_counter()
        result = training.train(self.spec(family), params, self.train)
        return result, time.perf_counter() - started


# --- 1. accuracy and membership inference against epsilon ----------------------------------


def bench_utility(setup: Setup, families: list[str]) -> None:
    rows = []
    for family in families:
        for epsilon in (*EPSILONS, None):
            result, seconds = setup.fit(family, epsilon)
            mia = training.membership_inference(result.module, setup.train, setup.holdout)
            spent = (
                accounting.epsilon(
                    [accounting.DpEvent(setup.q, setup.sigma(epsilon), result.steps)],
                    delta=DELTA,
                    accountant=ACCOUNTANT,
                )
                if epsilon is not None
                else None
            )
            row = emit(
                {
                    "bench": "dp_utility",
                    "family": family,
                    "target_epsilon": epsilon,
                    "epsilon": None if spent is None else round(spent, 4),
                    "delta": DELTA if epsilon is not None else None,
                    "noise_multiplier": None if epsilon is None else round(setup.sigma(epsilon), 4),
                    "accuracy": round(training.accuracy(result.module, setup.holdout), 4),
                    "mia_auc": round(mia["auc"], 4),
                    "mia_advantage": round(mia["advantage"], 4),
                    "mia_samples": mia["members"],
                    "epochs": setup.epochs,
                    "batch_size": setup.batch_size,
                    "steps": result.steps,
                    "sampling_rate": round(setup.q, 6),
                    "train_s": round(seconds, 3),
                }
            )
            rows.append(row)
    log("family  target_eps  epsilon  sigma   accuracy  mia_auc  mia_adv  train_s")
    for row in rows:
        target = "none" if row["target_epsilon"] is None else f"{row['target_epsilon']:g}"
        spent = "inf" if row["epsilon"] is None else f"{row['epsilon']:.3f}"
        sigma = "0" if row["noise_multiplier"] is None else f"{row['noise_multiplier']:.3f}"
        log(
            f"{row['family']:<7} {target:>10}  {spent:>7}  {sigma:>6}  {row['accuracy']:>8.4f}"
            f"  {row['mia_auc']:>7.4f}  {row['mia_advantage']:>7.4f}  {row['train_s']:>7.2f}"
        )


# --- 2. DP-SGD against the same loop without privacy ----------------------------------------


def bench_speed(setup: Setup, families: list[str], repeat: int) -> dict[str, dict[str, float]]:
    """Per family, the median DP training seconds and the accuracy reached: the direct twin
    of a job's training (same data, split, noise and seed)."""
    twins = {}
    for family in families:
        dp_s: list[float] = []
        plain_s: list[float] = []
        for _ in range(repeat):  # interleaved, so a change in load hits both alike
            result, seconds = setup.fit(family, JOB_EPSILON)
            dp_s.append(seconds)
            plain_s.append(setup.fit(family, None)[1])
        dp_median, plain_median = statistics.median(dp_s), statistics.median(plain_s)
        twins[family] = {
            "train_s": dp_median,
            "accuracy": training.accuracy(result.module, setup.holdout),
        }
        emit(
            {
                "bench": "dp_train_time_ratio",
                "family": family,
                "ratio": round(dp_median / plain_median, 3),
                "target": None,
                "ok": None,
                "dp_s": round(dp_median, 3),
                "nondp_s": round(plain_median, 3),
                "dp_runs_s": [round(s, 3) for s in dp_s],
                "nondp_runs_s": [round(s, 3) for s in plain_s],
                "epochs": setup.epochs,
                "batch_size": setup.batch_size,
                "steps": setup.steps,
                "target_epsilon": JOB_EPSILON,
                "device": device(),
            }
        )
    return twins


# --- 3. the registry's overhead on a DP job -------------------------------------------------


def database_url(tmp: Path) -> tuple[str, str]:
    """(url, "postgresql" | "sqlite"): smr_bench_dp, recreated, next to $DATABASE_URL's."""
    url = os.environ.get("DATABASE_URL", "")
    sqlite = f"sqlite:///{tmp / 'registry.sqlite3'}"
    if not url.startswith(("postgres://", "postgresql://")):
        emit({"bench": "note", "db": "sqlite", "message": "no PostgreSQL DATABASE_URL"})
        return sqlite, "sqlite"
    parts = urllib.parse.urlsplit(url)
    try:
        import psycopg

        admin = urllib.parse.urlunsplit(parts._replace(path="/postgres"))
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {DB_NAME}")
    except Exception as exc:
        reason = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else repr(exc)
        emit({"bench": "note", "db": "sqlite", "message": f"{DB_NAME} unusable: {reason}"})
        return sqlite, "sqlite"
    return urllib.parse.urlunsplit(parts._replace(path="/" + DB_NAME)), "postgresql"


def setup_django(tmp: Path) -> str:
    url, db = database_url(tmp)
    var = tmp / "var"
    var.mkdir()
    os.environ.update(
        {
            "DATABASE_URL": url,
            "DJANGO_SETTINGS_MODULE": "registry.settings",
            "SMR_VAR_DIR": str(var),
            "SECRET_KEY": "bench-" + uuid.uuid4().hex,
            "SMR_STORAGE": "fs",
            "SMR_OBJECTS_DIR": str(var / "objects"),
            "SMR_KEY_PROVIDER": "local",
            "CELERY_BROKER_URL": "memory://",
            "LOG_LEVEL": "WARNING",
        }
    )
    import django

    django.setup()
    from django.core.management import call_command

    from registry.keyconfig import local_keyring

    call_command("migrate", verbosity=0)
    local_keyring()
    return db


class TimedTraining:
    """The training loop a dp worker hands to dp.dp_retrain_run, with call-through timers on
    train, accuracy and membership_inference; every other name is the module's own."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def __getattr__(self, name: str) -> Any:
        return getattr(training, name)

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started

        return wrapper

    def train(self, *args: Any, **kwargs: Any) -> Any:
        # The job's callbacks (a progress write and an epsilon per epoch) are registry work
        # that runs inside train(): timed apart and taken out of the training time.
        for key in ("before_epoch", "after_epoch", "should_stop"):
            if kwargs.get(key) is not None:
                kwargs[key] = self._timed("callbacks", kwargs[key])
        return self._timed("train", training.train)(*args, **kwargs)

    def accuracy(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("evaluate", training.accuracy)(*args, **kwargs)

    def membership_inference(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("evaluate", training.membership_inference)(*args, **kwargs)


def registered_dataset(npz: Path) -> tuple[Any, Any, Any]:
    """(namespace, dataset, user): the digits as a scanned file and a block of 1,797 records."""
    from django.contrib.auth.models import User

    from registry.models import VersionState
    from registry.services import catalog, ledger, scanning
    from registry.services.artifacts import artifact_upload

    suffix = uuid.uuid4().hex[:8]
    user = User.objects.create(username=f"alice-{suffix}")
    namespace = catalog.namespace_create(name=f"dp-{suffix}", creator=user)
    model = catalog.model_create(namespace=namespace, name="digits-data", creator=user)
    version = catalog.version_create(model=model, creator=user)
    artifact = artifact_upload(
        version=version,
        path="digits.npz",
        chunks=iter([npz.read_bytes()]),
        expected_sha256=None,
        expected_size=None,
        creator=user,
    )
    version, job = catalog.version_submit(version=version, submitter=user)
    state = scanning.version_scan(job_id=job.pk)
    if state != VersionState.PENDING_REVIEW:
        raise RuntimeError(f"the digits version was {state} after its scan, not pending_review")
    artifact.refresh_from_db()
    dataset = ledger.dataset_create(
        namespace=namespace, name="digits", sensitivity="confidential", delta=DELTA, creator=user
    )
    ledger.data_block_create(
        dataset=dataset,
        name="b1",
        epsilon=1000.0,  # room for every job of the run
        accountant=ACCOUNTANT,
        artifact=artifact,
        records=1797,
        creator=user,
    )
    return namespace, dataset, user


def one_job(family: str, setup: Setup, namespace: Any, dataset: Any, user: Any) -> dict[str, Any]:
    from registry.models import Job, JobState
    from registry.services import dp

    timed = TimedTraining()
    # The web server admits, a worker runs: neither finds the other's accountant results in
    # its cache, nor those of an earlier job of this run.
    accounting._epsilon_cached.cache_clear()
    started = time.perf_counter()
    job = dp.dp_retrain_create(
        namespace=namespace,
        dataset=dataset,
        blocks=["b1"],
        model_name=f"digits-dp-{family}",
        base_version=None,
        params={
            "family": family,
            **({"hidden": list(FAMILIES[family])} if FAMILIES[family] else {}),
            "epochs": setup.epochs,
            "batch_size": setup.batch_size,
            "max_grad_norm": MAX_GRAD_NORM,
            "holdout_fraction": HOLDOUT,
            "seed": SEED,
            "target_epsilon": JOB_EPSILON,
        },
        creator=user,
    )
    admission_s = time.perf_counter() - started
    accounting._epsilon_cached.cache_clear()
    started = time.perf_counter()
    number = dp.dp_retrain_run(job_id=job.pk, training=timed)
    run_s = time.perf_counter() - started
    job = Job.objects.get(pk=job.pk)
    if job.state != JobState.SUCCEEDED or number is None:
        raise RuntimeError(f"the {family} job ended {job.state}: {job.error_message}")
    t = timed.seconds
    train_s = t["train"] - t["callbacks"]
    total_s = admission_s + run_s
    overhead_s = total_s - train_s - t["evaluate"]
    return {
        "fraction": overhead_s / total_s,
        "job_s": total_s,
        "admission_s": admission_s,
        "run_s": run_s,
        "train_s": train_s,
        "evaluate_s": t["evaluate"],
        "overhead_s": overhead_s,
        "callbacks_s": t["callbacks"],
        "rest_of_run_s": overhead_s - admission_s - t["callbacks"],
        "accuracy": job.result["accuracy"],
        "epsilon": job.result["epsilon"],
        "steps": job.result["event"]["steps"],
        "noise_multiplier": job.result["event"]["noise_multiplier"],
    }


def accountant_costs(setup: Setup) -> dict[str, float]:
    """What the accountant alone takes, cold: one calibration (admission) and one epsilon
    (admission, the claim, every epoch's progress, the result)."""
    accounting._epsilon_cached.cache_clear()
    started = time.perf_counter()
    sigma = accounting.noise_calibrate(
        sampling_rate=setup.q,
        steps=setup.steps,
        target_epsilon=JOB_EPSILON,
        delta=DELTA,
        accountant=ACCOUNTANT,
        max_grad_norm=MAX_GRAD_NORM,
    )
    calibrate_s = time.perf_counter() - started
    started = time.perf_counter()
    accounting.epsilon(
        [accounting.DpEvent(setup.q, sigma, setup.steps)], delta=DELTA, accountant=ACCOUNTANT
    )
    return {"calibrate_s": calibrate_s, "epsilon_call_s": time.perf_counter() - started}


def bench_overhead(
    setup: Setup,
    families: list[str],
    jobs: int,
    npz: Path,
    tmp: Path,
    twins: dict[str, dict[str, float]],
) -> None:
    db = setup_django(tmp)
    namespace, dataset, user = registered_dataset(npz)
    costs = accountant_costs(setup)
    for family in families:
        runs = [one_job(family, setup, namespace, dataset, user) for _ in range(jobs)]
        runs.sort(key=lambda run: run["fraction"])
        median = runs[len(runs) // 2]
        # The job trains with the same data, split, noise and seed as the direct runs: on the
        # CPU it must reach exactly the same accuracy.
        twin = twins.get(family)
        if twin is None:
            result, seconds = setup.fit(family, JOB_EPSILON)
            twin = {"train_s": seconds, "accuracy": training.accuracy(result.module, setup.holdout)}
        emit(
            {
                "bench": "dp_registry_overhead",
                "family": family,
                "fraction": round(median["fraction"], 4),
                "target": f"<={OVERHEAD_TARGET}",
                "ok": median["fraction"] <= OVERHEAD_TARGET,
                **{key: round(value, 4) for key, value in median.items() if key != "fraction"},
                "fractions": [round(run["fraction"], 4) for run in runs],
                "direct_train_s": round(twin["train_s"], 4),
                "same_accuracy_as_direct": median["accuracy"] == twin["accuracy"],
                **{key: round(value, 4) for key, value in costs.items()},
                "jobs": jobs,
                "epochs": setup.epochs,
                "batch_size": setup.batch_size,
                "target_epsilon": JOB_EPSILON,
                "device": device(),
                "db": db,
            }
        )
        log(
            f"{family}: job {median['job_s']:.2f}s = admission {median['admission_s']:.2f}s"
            f" + run {median['run_s']:.2f}s; training {median['train_s']:.2f}s (direct "
            f"{twin['train_s']:.2f}s), evaluation {median['evaluate_s']:.3f}s; registry "
            f"{median['overhead_s']:.2f}s = admission + progress callbacks "
            f"{median['callbacks_s']:.2f}s + the rest of the run {median['rest_of_run_s']:.2f}s"
            f" (one calibration {costs['calibrate_s']:.2f}s, one epsilon "
            f"{costs['epsilon_call_s'] * 1000:.0f} ms)"
        )


# --- main ----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=30, help="every run (default 30)")
    parser.add_argument("--batch-size", type=int, default=64, help="expected batch (64)")
    parser.add_argument("--repeat", type=int, default=3, help="speed: runs each, median (3)")
    parser.add_argument("--jobs", type=int, default=3, help="overhead: jobs per family (3)")
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES))
    parser.add_argument("--part", action="append", choices=PARTS, help="only this part")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1; 0 keeps torch's default, one per core)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="10 epochs, logreg only, 1 run and 1 job"
    )
    args = parser.parse_args()
    if args.torch_threads > 0:
        # These models are tiny (64 features): a second intra-op thread buys nothing, and
        # on cores shared with other work OpenMP's spinning threads made runs 10x slower
        # and 5x noisier here.
        torch.set_num_threads(args.torch_threads)
    if args.quick:
        args.epochs, args.repeat, args.jobs = 10, 1, 1
        args.family = args.family or ["logreg"]
    families = args.family or list(FAMILIES)
    # dp-accounting warns for every RDP order its series misses while calibration tries small
    # noise; the order is left out and the epsilon stays an upper bound: not worth a screen.
    logging.getLogger("absl").addFilter(lambda record: "failed to converge" not in str(record.msg))
    parts = args.part or list(PARTS)
    # A plain SIGTERM would skip the finally block that removes the temp dir.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="smr-bench-dp-"))
    failed = []
    try:
        setup = Setup(digits_npz(tmp / "digits.npz"), args)
        emit(
            {
                "bench": "dp_setup",
                "dataset": "sklearn load_digits",
                "n_train": setup.n_train,
                "n_holdout": len(setup.holdout.y),
                "epochs": setup.epochs,
                "batch_size": setup.batch_size,
                "sampling_rate": round(setup.q, 6),
                "steps": setup.steps,
                "accountant": ACCOUNTANT,
                "delta": DELTA,
                "families": families,
                "device": device(),
                "torch_threads": torch.get_num_threads(),
            }
        )
        setup.warm_up(families)
        twins: dict[str, dict[str, float]] = {}
        for part in parts:
            log(f"dp: {part}")
            started = time.perf_counter()
            try:
                if part == "utility":
                    bench_utility(setup, families)
                elif part == "speed":
                    twins = bench_speed(setup, families, args.repeat)
                else:
                    bench_overhead(setup, families, args.jobs, tmp / "digits.npz", tmp, twins)
            except Exception as exc:
                failed.append(part)
                emit({"bench": f"dp_{part}", "error": f"{type(exc).__name__}: {exc}"[-2000:]})
            log(f"dp: {part} done in {time.perf_counter() - started:.1f}s")
    finally:
        if "django" in sys.modules:
            with contextlib.suppress(Exception):
                from django.db import connections

                connections.close_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
