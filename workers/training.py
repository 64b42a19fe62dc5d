"""DP-SGD training, evaluation and a membership-inference audit for small tabular models.

The worker reads an uploaded table (.npz or .csv, never unpickled), trains a logistic
regression or a small MLP with Opacus' DP-SGD (Poisson sampling, per-example clipping,
Gaussian noise), and saves the weights as safetensors together with the standardization
statistics, so a saved model predicts from raw features.

Privacy accounting is the caller's job (`registry.dp.accounting`); this module tells it the
exact sampling rate and step count Opacus uses (`sampling_rate`, `steps_per_epoch`) and
reports every epoch's steps before they run (`before_epoch`).

No Django here. torch, opacus, scikit-learn and safetensors are the optional `dp` extra: only
the worker and the benchmarks import this module, lazily.
"""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from registry.dp import accounting

FORMAT = "smr-dp-v1"
FAMILIES = ("logreg", "mlp")
ACTIVATIONS = ("relu", "tanh")
DEVICES = ("cpu", "cuda", "auto")
MAX_FEATURES = 10_000
MAX_CLASSES = 10_000
MAX_HIDDEN_LAYERS = 4
MAX_HIDDEN_WIDTH = 4096
MAX_EPOCHS = 100_000
# Features that are constant in the training set (digits has always-blank pixels) keep a
# unit scale instead of dividing by ~0.
MIN_STD = 1e-6
PREDICT_CHUNK = 65_536

_INT_LABEL = re.compile(r"-?(0|[1-9][0-9]{0,17})")


class TrainingDataError(ValueError):
    """Bad input data or parameters; the message says what is wrong and how to fix it."""


# ---------------------------------------------------------------- tables


@dataclass(frozen=True)
class Table:
    X: np.ndarray  # float32, shape (n, d)
    y: np.ndarray  # int64 class ids, shape (n,)
    classes: list[str]  # original label values; index = class id

    def __post_init__(self) -> None:
        if self.X.dtype != np.float32 or self.X.ndim != 2:
            raise TrainingDataError("Table.X must be a 2-D float32 array.")
        if self.y.dtype != np.int64 or self.y.shape != (self.X.shape[0],):
            raise TrainingDataError("Table.y must be an int64 array with one label per row.")
        if self.X.shape[0] == 0:
            raise TrainingDataError("The table has no rows.")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise TrainingDataError("Table.classes must name at least 2 distinct classes.")
        if int(self.y.min()) < 0 or int(self.y.max()) >= len(self.classes):
            raise TrainingDataError("Table.y holds a class id outside Table.classes.")


def _label_order(labels: Sequence[str]) -> list[str]:
    # Integer labels sort numerically, so "10" follows "9" and the .npz and .csv copies of
    # one dataset get the same class ids.
    unique = set(labels)
    if all(_INT_LABEL.fullmatch(label) for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def _table_make(X: np.ndarray, labels: Sequence[str], source: str) -> Table:
    if X.ndim != 2:
        raise TrainingDataError(f"{source}: X must be 2-D (rows x features), got {X.ndim}-D.")
    if X.shape[0] == 0:
        raise TrainingDataError(f"{source}: the table has no rows.")
    if X.shape[0] != len(labels):
        raise TrainingDataError(
            f"{source}: {X.shape[0]} feature rows but {len(labels)} labels; give every row "
            "exactly one label."
        )
    if X.shape[1] == 0 or X.shape[1] > MAX_FEATURES:
        raise TrainingDataError(
            f"{source}: {X.shape[1]} features; between 1 and {MAX_FEATURES} are supported."
        )
    if not np.isfinite(X).all():
        row = int(np.argwhere(~np.isfinite(X))[0][0])
        raise TrainingDataError(
            f"{source}: row {row} holds a NaN or infinite value (or one too large for "
            "float32); clean or impute it."
        )
    classes = _label_order(labels)
    if len(classes) < 2:
        raise TrainingDataError(
            f"{source}: every row has the label {classes[0]!r}; a classifier needs at least "
            "2 classes."
        )
    index = {label: i for i, label in enumerate(classes)}
    y = np.fromiter((index[label] for label in labels), dtype=np.int64, count=len(labels))
    return Table(X=X, y=y, classes=classes)


def _npz_header_check(path: Path, zf: zipfile.ZipFile, name: str) -> None:
    # np.load preallocates the shape a header declares before reading any data: check the
    # declared size against the member's real size so a tiny file cannot ask for terabytes.
    try:
        info = zf.getinfo(f"{name}.npy")
    except KeyError:
        raise TrainingDataError(
            f"{path.name}: no array {name!r}; save the table with "
            "np.savez(path, X=features, y=labels)."
        ) from None
    with zf.open(info) as fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise TrainingDataError(f"{path.name}: array {name!r} uses an unsupported format.")
    if dtype.hasobject:
        raise TrainingDataError(
            f"{path.name}: array {name!r} holds Python objects, which are never unpickled; "
            "save numbers (X) and integers or strings (y)."
        )
    if math.prod(shape) * dtype.itemsize > info.file_size:
        raise TrainingDataError(f"{path.name}: array {name!r} is truncated or corrupt.")


def _npz_labels(y: np.ndarray, source: str) -> list[str]:
    if y.ndim != 1:
        raise TrainingDataError(f"{source}: y must be 1-D (one label per row).")
    if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
        y = y.astype(np.int64)
    if y.dtype.kind in "iub":
        return [str(int(v)) for v in y]
    if y.dtype.kind == "U":
        return [str(v) for v in y]
    raise TrainingDataError(
        f"{source}: labels of dtype {y.dtype} are not supported; use integers or strings."
    )


def _npz_read(path: Path) -> Table:
    try:
        with zipfile.ZipFile(path) as zf:
            for name in ("X", "y"):
                _npz_header_check(path, zf, name)
        with np.load(path, allow_pickle=False) as npz:
            X, y = npz["X"], npz["y"]
    except TrainingDataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise TrainingDataError(
            f"{path.name}: not a readable .npz file ({exc}); save it with "
            "np.savez(path, X=features, y=labels)."
        ) from exc
    if X.dtype.kind not in "iuf":
        raise TrainingDataError(f"{path.name}: X must be numeric, got dtype {X.dtype}.")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused
        features = X.astype(np.float32)
    return _table_make(features, _npz_labels(y, path.name), path.name)


def _csv_read(path: Path, label_column: str) -> Table:
    source = path.name
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise TrainingDataError(f"{source}: the file is empty; add a header row.")
            if len(set(header)) != len(header):
                raise TrainingDataError(f"{source}: the header repeats a column name.")
            if label_column not in header:
                raise TrainingDataError(
                    f"{source}: no label column {label_column!r} in the header; name the "
                    "column or pass label_column."
                )
            if len(header) - 1 > MAX_FEATURES:
                raise TrainingDataError(
                    f"{source}: {len(header) - 1} features; at most {MAX_FEATURES} are supported."
                )
            label_at = header.index(label_column)
            feature_at = [i for i in range(len(header)) if i != label_at]
            rows: list[list[float]] = []
            labels: list[str] = []
            for cells in reader:
                line = reader.line_num
                if len(cells) != len(header):
                    raise TrainingDataError(
                        f"{source}: line {line} has {len(cells)} cells, the header {len(header)}."
                    )
                label = cells[label_at].strip()
                if not label:
                    raise TrainingDataError(
                        f"{source}: line {line}, column {label_column!r}: empty label."
                    )
                try:
                    values = [float(cells[i]) for i in feature_at]
                except ValueError:
                    values = []
                if len(values) != len(feature_at) or not all(map(math.isfinite, values)):
                    bad = next(i for i in feature_at if not _finite_cell(cells[i]))
                    raise TrainingDataError(
                        f"{source}: line {line}, column {header[bad]!r}: {cells[bad]!r} is "
                        "not a finite number; every column but the label must be numeric."
                    )
                rows.append(values)
                labels.append(label)
    except UnicodeDecodeError as exc:
        raise TrainingDataError(f"{source}: not UTF-8 text; save the CSV as UTF-8.") from exc
    except csv.Error as exc:
        raise TrainingDataError(f"{source}: not a valid CSV file ({exc}).") from exc
    X = np.array(rows, dtype=np.float32).reshape(len(rows), len(feature_at))
    return _table_make(X, labels, source)


def _finite_cell(cell: str) -> bool:
    try:
        return math.isfinite(float(cell))
    except ValueError:
        return False


def table_read(path: Path, *, fmt: str | None = None, label_column: str = "label") -> Table:
    """Read a labelled table from `.npz` (arrays "X" and "y") or `.csv` (a header row, a
    label column, every other column numeric). Labels become contiguous class ids in
    sorted order; nothing is ever unpickled."""
    kind = (fmt or path.suffix).lower().lstrip(".")
    if kind == "npz":
        return _npz_read(path)
    if kind == "csv":
        return _csv_read(path, label_column)
    raise TrainingDataError(f"{path.name}: unknown table format {kind!r}; use .npz or .csv.")


def tables_concat(tables: Sequence[Table]) -> Table:
    """One table from several with the same feature count; class ids are remapped onto the
    union of their classes."""
    if not tables:
        raise TrainingDataError("No tables to concatenate.")
    width = tables[0].X.shape[1]
    if any(table.X.shape[1] != width for table in tables):
        raise TrainingDataError(
            "The tables have different feature counts: "
            f"{[table.X.shape[1] for table in tables]}; every file needs the same columns."
        )
    classes = _label_order([label for table in tables for label in table.classes])
    index = {label: i for i, label in enumerate(classes)}
    ys = [np.array([index[c] for c in table.classes], dtype=np.int64)[table.y] for table in tables]
    return Table(
        X=np.concatenate([table.X for table in tables]), y=np.concatenate(ys), classes=classes
    )


def table_split(table: Table, *, holdout_fraction: float, seed: int) -> tuple[Table, Table]:
    """(train, holdout) after a seeded shuffle; both parts keep the full class list."""
    n = table.X.shape[0]
    if not 0.0 < holdout_fraction < 1.0:
        raise TrainingDataError("holdout_fraction must be between 0 and 1 (exclusive).")
    if n < 2:
        raise TrainingDataError("A table needs at least 2 rows to be split.")
    n_holdout = min(max(round(n * holdout_fraction), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    parts = order[n_holdout:], order[:n_holdout]
    train, holdout = (Table(X=table.X[p], y=table.y[p], classes=table.classes) for p in parts)
    return train, holdout


# ---------------------------------------------------------------- models


def _config_int(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TrainingDataError(f"Model config {key!r} must be an integer, got {value!r}.")
    return value


@dataclass(frozen=True)
class ModelSpec:
    family: str
    n_features: int
    n_classes: int
    hidden: tuple[int, ...] = ()
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise TrainingDataError(f"Model family must be one of {list(FAMILIES)}.")
        if not 1 <= self.n_features <= MAX_FEATURES:
            raise TrainingDataError(f"n_features must be between 1 and {MAX_FEATURES}.")
        if not 2 <= self.n_classes <= MAX_CLASSES:
            raise TrainingDataError(f"n_classes must be between 2 and {MAX_CLASSES}.")
        if self.activation not in ACTIVATIONS:
            raise TrainingDataError(f"activation must be one of {list(ACTIVATIONS)}.")
        if self.family == "logreg" and self.hidden:
            raise TrainingDataError("A logreg model has no hidden layers; use family 'mlp'.")
        if self.family == "mlp" and not (
            1 <= len(self.hidden) <= MAX_HIDDEN_LAYERS
            and all(1 <= width <= MAX_HIDDEN_WIDTH for width in self.hidden)
        ):
            raise TrainingDataError(
                f"An mlp needs 1 to {MAX_HIDDEN_LAYERS} hidden layers of 1 to "
                f"{MAX_HIDDEN_WIDTH} units, e.g. hidden=[64]."
            )

    def to_config(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "n_features": self.n_features,
            "n_classes": self.n_classes,
            "hidden": list(self.hidden),
            "activation": self.activation,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelSpec:
        unknown = set(config) - {"family", "n_features", "n_classes", "hidden", "activation"}
        if unknown:
            raise TrainingDataError(f"Unknown model config keys: {sorted(unknown)}.")
        family, activation = config.get("family"), config.get("activation", "relu")
        if not isinstance(family, str) or not isinstance(activation, str):
            raise TrainingDataError("Model config 'family' and 'activation' must be strings.")
        hidden = config.get("hidden", [])
        if not isinstance(hidden, list | tuple) or any(
            isinstance(width, bool) or not isinstance(width, int) for width in hidden
        ):
            raise TrainingDataError("Model config 'hidden' must be a list of integers.")
        return cls(
            family=family,
            n_features=_config_int(config, "n_features"),
            n_classes=_config_int(config, "n_classes"),
            hidden=tuple(hidden),
            activation=activation,
        )


class _Standardize(nn.Module):
    # Buffers, not parameters: saved with the weights, never trained, and Opacus (which only
    # hooks modules with trainable parameters) leaves this module alone.
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class _Classifier(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.input = _Standardize(spec.n_features)
        layers: list[nn.Module] = []
        width = spec.n_features
        for hidden in spec.hidden:
            layers += [
                nn.Linear(width, hidden),
                nn.ReLU() if spec.activation == "relu" else nn.Tanh(),
            ]
            width = hidden
        layers.append(nn.Linear(width, spec.n_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(self.input(x))
        return out


def model_build(spec: ModelSpec) -> nn.Module:
    """A fresh model: state_dict keys are "input.mean", "input.std" and "layers.<i>.weight" /
    "layers.<i>.bias" (logreg: one Linear; mlp: Linear/activation pairs, then a Linear)."""
    return _Classifier(spec)


def state_load(module: nn.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Load `tensors` into `module`, strictly: the same keys, the same shapes, finite floats."""
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    problems = []
    if missing := sorted(set(expected) - set(tensors)):
        problems.append(f"missing {missing}")
    if unexpected := sorted(set(tensors) - set(expected)):
        problems.append(f"unexpected {unexpected}")
    for key in sorted(set(expected) & set(tensors)):
        array = tensors[key]
        if tuple(array.shape) != expected[key]:
            problems.append(f"{key} has shape {tuple(array.shape)}, expected {expected[key]}")
        elif array.dtype.kind != "f" or not np.isfinite(array).all():
            problems.append(f"{key} is not finite floating point")
    std = tensors.get("input.std")
    if not problems and std is not None and not (std > 0).all():
        problems.append("input.std has a non-positive scale")
    if problems:
        raise TrainingDataError(
            "base version weights do not match the model spec ("
            + "; ".join(problems)
            + "); train from scratch or pick a base version with the same family, features, "
            "classes and hidden layers."
        )
    device = _module_device(module)
    module.load_state_dict(
        {
            key: torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)
            for key, array in tensors.items()
        },
        strict=True,
    )


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainParams:
    epochs: int
    batch_size: int  # expected batch size; see sampling_rate for the rate Opacus uses
    max_grad_norm: float
    noise_multiplier: float  # already calibrated by the caller
    learning_rate: float = 0.1
    seed: int = 0
    private: bool = True  # False: the same loop and sampling without clipping or noise
    device: str = "cpu"  # "cpu", "cuda", or "auto" (cuda when available)

    def __post_init__(self) -> None:
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise TrainingDataError(f"epochs must be between 1 and {MAX_EPOCHS}.")
        if self.batch_size < 1:
            raise TrainingDataError("batch_size must be at least 1.")
        if not (self.max_grad_norm > 0.0 and math.isfinite(self.max_grad_norm)):
            raise TrainingDataError("max_grad_norm must be a positive number.")
        if not (self.noise_multiplier >= 0.0 and math.isfinite(self.noise_multiplier)):
            raise TrainingDataError("noise_multiplier must be a non-negative number.")
        if self.private and self.noise_multiplier == 0.0:
            raise TrainingDataError(
                "A private run needs noise_multiplier > 0; calibrate it for the target epsilon."
            )
        if not (self.learning_rate > 0.0 and math.isfinite(self.learning_rate)):
            raise TrainingDataError("learning_rate must be a positive number.")
        if self.device not in DEVICES:
            raise TrainingDataError(f"device must be one of {list(DEVICES)}.")


def sampling_rate(n_train: int, batch_size: int) -> float:
    """Opacus' Poisson sampling rate (registry.dp.accounting.sampling_rate, torch-free so the
    web server plans runs with the same number)."""
    try:
        return accounting.sampling_rate(n_train, batch_size)
    except accounting.AccountingError as exc:
        raise TrainingDataError(str(exc)) from exc


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Batches (= DP-SGD steps) Opacus' Poisson loader yields per epoch."""
    return int(1 / sampling_rate(n_train, batch_size))


@dataclass
class TrainResult:
    module: nn.Module  # on the CPU, in eval mode, Opacus hooks removed
    steps: int  # Poisson batches processed; in a private run each one is a DP-SGD step
    epochs_done: int
    stopped: bool  # should_stop() ended the run before params.epochs


def _device_resolve(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingDataError("device 'cuda' was asked for but no GPU is available here.")
    return torch.device(name)


def train(
    spec: ModelSpec,
    params: TrainParams,
    train_table: Table,
    *,
    init: Mapping[str, np.ndarray] | None = None,
    before_epoch: Callable[[int, int], None] | None = None,
    after_epoch: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train `spec` on `train_table` with DP-SGD (or, with params.private False, the same
    loop without clipping and noise), deterministically for a given seed.

    `before_epoch(epoch_index, steps)` runs before an epoch's steps so the caller can record
    them as spent first: a worker killed mid-epoch then over-counts, never under-counts.
    `after_epoch(epochs_done, total_steps)` runs after each epoch; `should_stop()` is asked
    before each epoch. Features are standardized with the training table's mean and std,
    stored in the model; with `init` (a saved model's tensors) the base model's statistics
    are kept instead, since its weights were learned on that scale. Those statistics are
    computed without noise: the DP-SGD guarantee covers the weights' updates, not them.
    """
    n, width = train_table.X.shape
    if width != spec.n_features:
        raise TrainingDataError(
            f"The training table has {width} features, the model expects {spec.n_features}."
        )
    if int(train_table.y.max()) >= spec.n_classes:
        raise TrainingDataError(
            f"The training table has {len(train_table.classes)} classes, the model "
            f"{spec.n_classes}; set n_classes to the number of classes."
        )
    device = _device_resolve(params.device)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(params.seed)
        module = model_build(spec)
    X = torch.from_numpy(train_table.X)
    std = X.double().std(dim=0, correction=0)
    module.load_state_dict(
        {
            **module.state_dict(),
            "input.mean": X.double().mean(dim=0).float(),
            "input.std": torch.where(std < MIN_STD, 1.0, std).float(),
        }
    )
    if init is not None:
        state_load(module, init)
    module.to(device)

    from opacus import PrivacyEngine  # type: ignore[import-untyped]
    from opacus.data_loader import DPDataLoader  # type: ignore[import-untyped]

    dataset = torch.utils.data.TensorDataset(X, torch.from_numpy(train_table.y))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=params.batch_size,
        generator=torch.Generator().manual_seed(params.seed),
    )
    # Momentum SGD at lr 0.1 reaches ~0.95 holdout accuracy on standardized digits at
    # sigma 1; momentum only post-processes the noised gradients, so it costs no privacy.
    optimizer: torch.optim.Optimizer = torch.optim.SGD(
        module.parameters(), lr=params.learning_rate, momentum=0.9
    )
    model: nn.Module = module
    with warnings.catch_warnings():
        # Opacus warns that its RNG is not cryptographically secure (secure_mode needs
        # torchcsprng and forbids seeding); we keep runs reproducible instead.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        if params.private:
            model, optimizer, loader = PrivacyEngine().make_private(
                module=module,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=params.noise_multiplier,
                max_grad_norm=params.max_grad_norm,
                poisson_sampling=True,
                noise_generator=torch.Generator(device=device).manual_seed(params.seed + 1),
            )
        else:
            loader = DPDataLoader.from_data_loader(loader)
    per_epoch = steps_per_epoch(n, params.batch_size)
    if len(loader) != per_epoch:
        # The ledger charges steps_per_epoch(); an Opacus that samples differently would
        # make every recorded epsilon wrong.
        raise RuntimeError(f"Opacus yields {len(loader)} batches per epoch, not {per_epoch}.")

    criterion = nn.CrossEntropyLoss()
    steps = epochs_done = 0
    stopped = False
    model.train()
    with warnings.catch_warnings():
        # Inputs never require grad, so torch notes that Opacus' backward hooks see only
        # output gradients, which is all they use.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for epoch in range(params.epochs):
            if should_stop is not None and should_stop():
                stopped = True
                break
            if before_epoch is not None:
                before_epoch(epoch, per_epoch)
            for xb, yb in loader:
                optimizer.zero_grad(set_to_none=True)
                # An empty Poisson batch is still a private step (Opacus adds pure noise,
                # which the accountant charged for); without privacy it has no gradient.
                if params.private or len(xb):
                    loss = criterion(model(xb.to(device)), yb.to(device))
                    loss.backward()
                    optimizer.step()
                steps += 1
            epochs_done += 1
            if after_epoch is not None:
                after_epoch(epochs_done, steps)
    if params.private:
        model.cleanup()  # type: ignore[operator]
    module.to("cpu").eval()
    return TrainResult(module=module, steps=steps, epochs_done=epochs_done, stopped=stopped)


# ---------------------------------------------------------------- evaluation


def _log_proba(module: nn.Module, X: np.ndarray) -> np.ndarray:
    expected = module.get_buffer("input.mean").shape[0]
    if X.ndim != 2 or X.shape[1] != expected:
        raise TrainingDataError(f"Expected rows of {expected} features, got shape {X.shape}.")
    features = np.asarray(X, dtype=np.float32)
    if not np.isfinite(features).all():
        raise TrainingDataError("The features hold NaN or infinite values.")
    device = _module_device(module)
    module.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(features), PREDICT_CHUNK):
            chunk = torch.from_numpy(features[start : start + PREDICT_CHUNK]).to(device)
            out.append(torch.log_softmax(module(chunk), dim=1).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def predict_proba(module: nn.Module, X: np.ndarray) -> np.ndarray:
    """Class probabilities (n, n_classes) for raw, unstandardized features."""
    proba: np.ndarray = np.exp(_log_proba(module, X))
    return proba


def accuracy(module: nn.Module, table: Table) -> float:
    return float((_log_proba(module, table.X).argmax(axis=1) == table.y).mean())


def membership_inference(module: nn.Module, members: Table, nonmembers: Table) -> dict[str, float]:
    """The loss-threshold attack of Yeom et al. (2018): an example whose loss is low is
    guessed to be a training member. Returns the attack's ROC AUC (0.5: no leak) and its
    membership advantage, max over thresholds of TPR - FPR, on equal-size samples."""
    from sklearn.metrics import roc_auc_score, roc_curve  # type: ignore[import-untyped]

    rng = np.random.default_rng(0)
    size = min(len(members.y), len(nonmembers.y))
    losses = []
    for table in (members, nonmembers):
        # Equal sizes so that 0.5 means no leak whatever the split sizes were.
        rows = np.sort(rng.choice(len(table.y), size=size, replace=False))
        log_p = _log_proba(module, table.X[rows])
        if int(table.y.max()) >= log_p.shape[1]:
            raise TrainingDataError("The audit table has more classes than the model.")
        losses.append(-log_p[np.arange(size), table.y[rows]])
    scores = -np.concatenate(losses)
    truth = np.concatenate([np.ones(size), np.zeros(size)])
    fpr, tpr, _ = roc_curve(truth, scores)
    return {
        "auc": float(roc_auc_score(truth, scores)),
        "advantage": float(np.max(tpr - fpr)),
        "members": size,
        "nonmembers": size,
    }


# ---------------------------------------------------------------- weights


def weights_save(
    module: nn.Module,
    spec: ModelSpec,
    path: Path,
    *,
    extra_metadata: Mapping[str, str] | None = None,
) -> None:
    """Save the model's tensors (weights and standardization statistics) as float32
    safetensors, with metadata {"family", "format": "smr-dp-v1", "spec": <JSON>, ...}."""
    from safetensors.torch import save_file

    tensors = {
        key: value.detach().to("cpu", torch.float32).contiguous()
        for key, value in module.state_dict().items()
    }
    with torch.device("meta"):  # shapes only: no memory for a throwaway model
        reference = model_build(spec)
    expected = {key: tuple(v.shape) for key, v in reference.state_dict().items()}
    if {key: tuple(v.shape) for key, v in tensors.items()} != expected:
        raise TrainingDataError("The module does not match its model spec; not saved.")
    metadata = {"family": spec.family, "format": FORMAT, "spec": json.dumps(spec.to_config())}
    if clash := set(metadata) & set(extra_metadata or {}):
        raise ValueError(f"extra_metadata may not set {sorted(clash)}.")
    save_file(tensors, str(path), metadata={**metadata, **(extra_metadata or {})})


def weights_load(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a file written by weights_save (safetensors: nothing is unpickled)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as fh:
            if (fh.metadata() or {}).get("format") != FORMAT:
                raise TrainingDataError(
                    f"{path.name} was not written by this registry's DP trainer "
                    f"(format {FORMAT!r}); train or upload the weights through it."
                )
            # Copies: the arrays must outlive the memory-mapped file.
            return {key: np.array(value) for key, value in fh.get_tensors().items()}
    except (SafetensorError, OSError) as exc:
        raise TrainingDataError(f"{path.name} is not a readable safetensors file.") from exc


def module_from_weights(spec: ModelSpec, tensors: Mapping[str, np.ndarray]) -> nn.Module:
    """A CPU model in eval mode built from `spec` and loaded strictly from `tensors`."""
    module = model_build(spec)
    state_load(module, tensors)
    return module.eval()
