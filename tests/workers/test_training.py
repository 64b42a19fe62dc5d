"""DP-SGD training on scikit-learn's bundled digits (1,797 8x8 images, 10 classes, no download):
table reading, Opacus' real step schedule, accuracy, the membership-inference audit, weights."""

from __future__ import annotations

import csv
import dataclasses
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")
datasets = pytest.importorskip("sklearn.datasets")

from workers.training import (  # noqa: E402
    ModelSpec,
    Table,
    TrainingDataError,
    TrainParams,
    TrainResult,
    accuracy,
    membership_inference,
    model_build,
    module_from_weights,
    predict_proba,
    sampling_rate,
    state_load,
    steps_per_epoch,
    table_read,
    table_split,
    tables_concat,
    train,
    weights_load,
    weights_save,
)

torch.set_num_threads(2)

Run = tuple[TrainResult, list[tuple[str, int, int]]]

LOGREG = ModelSpec(family="logreg", n_features=64, n_classes=10)
MLP = ModelSpec(family="mlp", n_features=64, n_classes=10, hidden=(64,))


@pytest.fixture(scope="module")
def digits() -> Table:
    data = datasets.load_digits()
    return Table(
        X=data.data.astype(np.float32),
        y=data.target.astype(np.int64),
        classes=[str(i) for i in range(10)],
    )


@pytest.fixture(scope="module")
def split(digits: Table) -> tuple[Table, Table]:
    return table_split(digits, holdout_fraction=0.2, seed=0)


@pytest.fixture(scope="module")
def private_run(split: tuple[Table, Table]) -> Run:
    events: list[tuple[str, int, int]] = []
    result = train(
        LOGREG,
        TrainParams(epochs=15, batch_size=64, max_grad_norm=1.0, noise_multiplier=1.0),
        split[0],
        before_epoch=lambda epoch, steps: events.append(("before", epoch, steps)),
        after_epoch=lambda done, total: events.append(("after", done, total)),
    )
    return result, events


def csv_write(path: Path, X: np.ndarray, labels: list[str], header: list[str]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for label, row in zip(labels, X, strict=True):
            writer.writerow([label, *(repr(float(v)) for v in row)])


# ---------------------------------------------------------------- tables


def test_npz_and_csv_of_digits_read_back_identical(digits: Table, tmp_path: Path) -> None:
    data = datasets.load_digits()
    np.savez(tmp_path / "digits.npz", X=data.data, y=data.target)
    # The label column comes first: it is found by name, not position.
    header = ["digit", *(f"px{i}" for i in range(64))]
    csv_write(tmp_path / "digits.csv", data.data, [str(v) for v in data.target], header)

    from_npz = table_read(tmp_path / "digits.npz")
    from_csv = table_read(tmp_path / "digits.csv", label_column="digit")

    for table in (from_npz, from_csv):
        assert table.X.dtype == np.float32 and table.y.dtype == np.int64
        np.testing.assert_array_equal(table.X, digits.X)
        np.testing.assert_array_equal(table.y, digits.y)
        assert table.classes == digits.classes


def test_integer_labels_sort_numerically_in_both_formats(tmp_path: Path) -> None:
    X = np.zeros((3, 2))
    np.savez(tmp_path / "t.npz", X=X, y=np.array([10, 2, 9]))
    csv_write(tmp_path / "t.csv", X, ["10", "2", "9"], ["label", "a", "b"])
    for name in ("t.npz", "t.csv"):
        table = table_read(tmp_path / name)
        assert table.classes == ["2", "9", "10"]
        assert table.y.tolist() == [2, 0, 1]


class _Detonator:
    """Unpickling it records the event: proof that a loader ran pickle."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_detonate, ())


DETONATIONS: list[int] = []


def _detonate() -> None:
    DETONATIONS.append(1)


def test_object_array_npz_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, X=np.array([[_Detonator(), 1.0]], dtype=object), y=np.array([0]))
    DETONATIONS.clear()

    with pytest.raises(TrainingDataError, match="never unpickled"):
        table_read(path)
    assert DETONATIONS == []

    # Control: the file really does run code when unpickled.
    with np.load(path, allow_pickle=True) as npz:
        npz["X"]
    assert DETONATIONS == [1]


def test_npz_header_declaring_more_data_than_the_file_holds_is_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 64)}
    )
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("X.npy", buf.getvalue() + b"\0" * 64)
        zf.writestr("y.npy", b"")
    with pytest.raises(TrainingDataError, match="truncated or corrupt"):
        table_read(path)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X": np.zeros((3, 2))}, "no array 'y'"),
        ({"X": np.zeros(3), "y": np.arange(3)}, "must be 2-D"),
        ({"X": np.zeros((3, 2)), "y": np.arange(2)}, "3 feature rows but 2 labels"),
        ({"X": np.array([[0.0, np.nan], [1, 1]]), "y": np.arange(2)}, "row 0 holds a NaN"),
        ({"X": np.zeros((4, 2)), "y": np.array([7, 7, 7, 7])}, "at least 2 classes"),
        ({"X": np.zeros((2, 10_001)), "y": np.arange(2)}, "10001 features"),
        ({"X": np.zeros((0, 2)), "y": np.arange(0)}, "no rows"),
    ],
)
def test_bad_npz_tables_are_refused(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(TrainingDataError, match=message):
        table_read(tmp_path / "bad.npz")


def test_csv_with_a_non_numeric_cell_names_its_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("label,a,b\n0,1.5,2\n1,3,oops\n")
    with pytest.raises(TrainingDataError, match=r"line 3, column 'b': 'oops'"):
        table_read(path)

    path.write_text("label,a,b\n0,1.5,2\n1,,4\n")
    with pytest.raises(TrainingDataError, match=r"line 3, column 'a'"):
        table_read(path)


def test_csv_with_one_class_or_no_label_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "one.csv"
    path.write_text("label,a\ncat,1\ncat,2\n")
    with pytest.raises(TrainingDataError, match="at least 2 classes"):
        table_read(path)
    with pytest.raises(TrainingDataError, match="no label column 'target'"):
        table_read(path, label_column="target")


def test_concat_unions_classes_and_keeps_every_row_label(tmp_path: Path) -> None:
    first = Table(X=np.zeros((2, 3), np.float32), y=np.array([0, 1]), classes=["cat", "dog"])
    second = Table(X=np.ones((3, 3), np.float32), y=np.array([1, 0, 1]), classes=["dog", "eel"])

    both = tables_concat([first, second])

    assert both.classes == ["cat", "dog", "eel"]
    assert [both.classes[i] for i in both.y] == ["cat", "dog", "eel", "dog", "eel"]
    with pytest.raises(TrainingDataError, match="different feature counts"):
        tables_concat([first, Table(X=np.zeros((2, 4), np.float32), y=first.y, classes=["a", "b"])])


def test_split_is_deterministic_disjoint_and_complete(digits: Table) -> None:
    train_a, hold_a = table_split(digits, holdout_fraction=0.2, seed=7)
    train_b, hold_b = table_split(digits, holdout_fraction=0.2, seed=7)
    _, hold_c = table_split(digits, holdout_fraction=0.2, seed=8)

    np.testing.assert_array_equal(hold_a.X, hold_b.X)
    np.testing.assert_array_equal(train_a.y, train_b.y)
    assert not np.array_equal(hold_a.X, hold_c.X)
    assert (len(train_a.y), len(hold_a.y)) == (1438, 359)
    rows = {row.tobytes() + bytes([label]) for row, label in zip(digits.X, digits.y, strict=True)}
    parts = [(t.X, t.y) for t in (train_a, hold_a)]
    seen = [x.tobytes() + bytes([int(y)]) for X, Y in parts for x, y in zip(X, Y, strict=True)]
    assert set(seen) == rows


# ---------------------------------------------------------------- specs and schedule


def test_model_spec_config_round_trip_and_validation() -> None:
    assert ModelSpec.from_config(MLP.to_config()) == MLP
    assert list(model_build(MLP).state_dict()) == [
        "input.mean",
        "input.std",
        "layers.0.weight",
        "layers.0.bias",
        "layers.2.weight",
        "layers.2.bias",
    ]
    for bad in (
        {**MLP.to_config(), "family": "svm"},
        {**MLP.to_config(), "hidden": []},
        {**MLP.to_config(), "hidden": [64] * 5},
        {**MLP.to_config(), "n_classes": True},
        {**LOGREG.to_config(), "hidden": [8]},
        {**MLP.to_config(), "dropout": 0.5},
    ):
        with pytest.raises(TrainingDataError):
            ModelSpec.from_config(bad)


@pytest.mark.parametrize(("n", "batch"), [(1437, 64), (1000, 10), (93, 1), (99, 1), (5, 64)])
def test_schedule_matches_what_opacus_samples(n: int, batch: int) -> None:
    from opacus.data_loader import DPDataLoader

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(n, 1)), batch)
    dp_loader = DPDataLoader.from_data_loader(loader)

    assert sampling_rate(n, batch) == dp_loader.sample_rate
    assert steps_per_epoch(n, batch) == len(dp_loader) == sum(1 for _ in dp_loader)
    # Opacus' float round trip: a 93-batch loader yields 92 Poisson batches per epoch.
    if (n, batch) == (93, 1):
        assert steps_per_epoch(n, batch) == 92


def test_train_params_refuse_zero_noise_for_a_private_run() -> None:
    with pytest.raises(TrainingDataError, match="noise_multiplier > 0"):
        TrainParams(epochs=1, batch_size=8, max_grad_norm=1.0, noise_multiplier=0.0)
    TrainParams(epochs=1, batch_size=8, max_grad_norm=1.0, noise_multiplier=0.0, private=False)


# ---------------------------------------------------------------- training


def test_private_training_learns_and_reports_every_step_before_it_runs(
    split: tuple[Table, Table], private_run: Run
) -> None:
    result, events = private_run
    per_epoch = steps_per_epoch(len(split[0].y), 64)

    assert accuracy(result.module, split[1]) > 0.6
    assert (result.steps, result.epochs_done, result.stopped) == (15 * per_epoch, 15, False)
    expected = []
    for epoch in range(15):
        expected += [("before", epoch, per_epoch), ("after", epoch + 1, (epoch + 1) * per_epoch)]
    assert events == expected


def test_training_is_deterministic_for_a_seed(split: tuple[Table, Table], private_run: Run) -> None:
    params = TrainParams(epochs=15, batch_size=64, max_grad_norm=1.0, noise_multiplier=1.0)
    again = train(LOGREG, params, split[0]).module
    other_seed = train(LOGREG, dataclasses.replace(params, seed=1), split[0]).module

    first = private_run[0].module.state_dict()
    assert all(torch.equal(first[k], v) for k, v in again.state_dict().items())
    assert not torch.equal(first["layers.0.weight"], other_seed.state_dict()["layers.0.weight"])


def test_should_stop_ends_the_run_between_epochs(split: tuple[Table, Table]) -> None:
    befores: list[int] = []
    afters: list[int] = []
    result = train(
        MLP,
        TrainParams(epochs=15, batch_size=64, max_grad_norm=1.0, noise_multiplier=1.0),
        split[0],
        before_epoch=lambda epoch, steps: befores.append(steps),
        after_epoch=lambda done, total: afters.append(done),
        should_stop=lambda: len(afters) >= 2,
    )
    assert (result.epochs_done, result.stopped) == (2, True)
    assert result.steps == sum(befores) == 2 * steps_per_epoch(len(split[0].y), 64)


def test_noise_costs_accuracy(split: tuple[Table, Table]) -> None:
    noisy_params = TrainParams(epochs=5, batch_size=64, max_grad_norm=1.0, noise_multiplier=20.0)
    clean_params = dataclasses.replace(noisy_params, noise_multiplier=0.0, private=False)
    baseline = train(LOGREG, clean_params, split[0])
    noisy = train(LOGREG, noisy_params, split[0])

    assert accuracy(baseline.module, split[1]) > 0.9
    assert accuracy(baseline.module, split[1]) >= accuracy(noisy.module, split[1])


def test_training_refuses_a_table_the_spec_does_not_fit(split: tuple[Table, Table]) -> None:
    params = TrainParams(epochs=1, batch_size=64, max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(TrainingDataError, match="64 features, the model expects 32"):
        train(ModelSpec("logreg", n_features=32, n_classes=10), params, split[0])
    with pytest.raises(TrainingDataError, match="set n_classes"):
        train(ModelSpec("logreg", n_features=64, n_classes=5), params, split[0])


# ---------------------------------------------------------------- membership inference


def test_membership_inference_detects_an_overfit_model_and_not_chance(digits: Table) -> None:
    rest, members = table_split(digits, holdout_fraction=100 / len(digits.y), seed=3)
    unseen, _ = table_split(rest, holdout_fraction=0.5, seed=4)
    overfit = train(
        ModelSpec("mlp", n_features=64, n_classes=10, hidden=(128,)),
        TrainParams(
            epochs=200, batch_size=32, max_grad_norm=1.0, noise_multiplier=0.0, private=False
        ),
        members,
    ).module
    assert accuracy(overfit, members) == 1.0

    attack = membership_inference(overfit, members, unseen)
    assert attack["auc"] > 0.6 and attack["advantage"] > 0.2
    assert attack["members"] == attack["nonmembers"] == 100

    # Control: two halves of data the model never saw are indistinguishable.
    half_a, half_b = table_split(unseen, holdout_fraction=0.5, seed=5)
    chance = membership_inference(overfit, half_a, half_b)
    assert 0.35 < chance["auc"] < 0.65


# ---------------------------------------------------------------- weights


def test_saved_weights_predict_identically_from_raw_features(
    split: tuple[Table, Table],
    private_run: Run,
    tmp_path: Path,
) -> None:
    module = private_run[0].module
    path = tmp_path / "model.safetensors"
    weights_save(module, LOGREG, path, extra_metadata={"version": "v3"})

    tensors = weights_load(path)
    loaded = module_from_weights(LOGREG, tensors)

    assert set(tensors) == {"input.mean", "input.std", "layers.0.weight", "layers.0.bias"}
    assert all(t.dtype == np.float32 for t in tensors.values())
    np.testing.assert_array_equal(
        predict_proba(loaded, split[1].X), predict_proba(module, split[1].X)
    )
    assert accuracy(loaded, split[1]) > 0.6


def test_weights_from_elsewhere_are_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"layers.0.weight": np.zeros((10, 64), np.float32)}, str(path))
    with pytest.raises(TrainingDataError, match="not written by this registry"):
        weights_load(path)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(TrainingDataError, match="not a readable safetensors"):
        weights_load(tmp_path / "junk.safetensors")


def test_training_from_a_base_version_starts_from_its_weights(
    split: tuple[Table, Table],
    private_run: Run,
    tmp_path: Path,
) -> None:
    path = tmp_path / "base.safetensors"
    weights_save(private_run[0].module, LOGREG, path)
    base = weights_load(path)
    # A learning rate too small to move anything: the result is the base model.
    still = TrainParams(
        epochs=1,
        batch_size=64,
        max_grad_norm=1.0,
        noise_multiplier=0.0,
        private=False,
        learning_rate=1e-12,
        seed=9,
    )

    tuned = train(LOGREG, still, split[1], init=base).module.state_dict()
    fresh = train(LOGREG, still, split[1]).module.state_dict()

    for key, value in base.items():
        np.testing.assert_allclose(tuned[key].numpy(), value, atol=1e-6)
    # Control: without init the same run is a different (untrained) model.
    assert not np.allclose(fresh["layers.0.weight"].numpy(), base["layers.0.weight"])
    assert not np.allclose(fresh["input.mean"].numpy(), base["input.mean"])


def test_base_weights_of_another_shape_are_refused(
    private_run: Run, tmp_path: Path, split: tuple[Table, Table]
) -> None:
    path = tmp_path / "base.safetensors"
    weights_save(private_run[0].module, LOGREG, path)
    base = weights_load(path)
    params = TrainParams(epochs=1, batch_size=64, max_grad_norm=1.0, noise_multiplier=1.0)

    with pytest.raises(TrainingDataError, match="base version weights do not match"):
        train(MLP, params, split[0], init=base)
    wider = ModelSpec("logreg", n_features=64, n_classes=12)
    with pytest.raises(TrainingDataError, match=r"layers.0.weight has shape \(10, 64\)"):
        module_from_weights(wider, base)
    with pytest.raises(TrainingDataError, match="non-positive scale"):
        state_load(model_build(LOGREG), {**base, "input.std": np.zeros(64, np.float32)})
    with pytest.raises(TrainingDataError, match="does not match its model spec"):
        weights_save(model_build(MLP), LOGREG, tmp_path / "wrong.safetensors")
