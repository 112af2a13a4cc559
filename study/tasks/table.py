"""Real data: a user's table (CSV, Parquet, NumPy) and scikit-learn's shipped data sets.

A real table has no known noise floor: these tasks report `irreducible_loss` 0, so every
status is judged relative to the initial validation loss (docs/failures.md, "Real data").
The rows are split into training and validation by a permutation drawn from the trial's
data seed, so seeds are also resamplings of the split. Features and targets are used as
stored (raw units): scaling them is the `standardize_inputs` / `standardize_targets`
mitigation's job, and raw units are part of what a real table tests.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from study.tasks.base import Dataset, LossName

KINDS = {"regression": "mse", "classification": "cross_entropy"}
FORMATS = (".csv", ".parquet", ".pq", ".npy")
SKLEARN_SETS = {  # name -> (loader in sklearn.datasets, kind)
    "diabetes": ("load_diabetes", "regression"),
    "breast_cancer": ("load_breast_cancer", "classification"),
    "wine": ("load_wine", "classification"),
    "digits": ("load_digits", "classification"),
}


@dataclass(frozen=True)
class Columns:
    """A table read and checked: features x [N, d] float64, targets y [N] (float64 for
    regression, int64 class indices 0..C-1 for classification), `digest` a SHA-256 of both
    (recorded in the trial key, so a changed file is a different task)."""

    x: np.ndarray
    y: np.ndarray
    n_classes: int
    digest: str


@dataclass(frozen=True)
class Table:
    """A user's table: `path` (.csv, .parquet / .pq, or a 2-D numeric .npy), `target` (a
    column name; for .npy a column index, e.g. -1 for the last), `kind` (regression or
    classification); every other column is a feature and must be numeric.

    `val_fraction` of the rows (at least one) are the validation split, drawn by a
    permutation from the data seed; the rest train. Classification labels (any values) are
    encoded as 0..C-1 in sorted order. Refused with one line (ValueError, naming the key):
    a missing or unreadable file, an unknown format, a missing target column, a
    non-numeric feature column, complex values, missing values (NaN, None, pandas' NA), a
    constant target, and a classification target with more classes than half the rows (a
    regression target, most likely).
    """

    path: str
    target: str | int = -1
    kind: str = "regression"
    val_fraction: float = 0.25
    loss: LossName = field(init=False)
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task.kind must be one of {sorted(KINDS)}, got {self.kind!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"task.val_fraction must be in (0, 1), got {self.val_fraction}")
        object.__setattr__(self, "loss", KINDS[self.kind])
        object.__setattr__(self, "digest", self.columns().digest)

    def columns(self) -> Columns:
        """The checked table (read once per file version and cached)."""
        file = Path(self.path).expanduser()
        try:
            stat = file.stat()
        except OSError as err:
            raise ValueError(f"task.path: cannot read {self.path} "
                             f"({err.strerror or err})") from None
        return _read_table(str(file.resolve()), self.target, self.kind, stat.st_mtime_ns,
                           stat.st_size)

    @property
    def input_dim(self) -> int:
        return int(self.columns().x.shape[1])

    @property
    def output_dim(self) -> int:
        return self.columns().n_classes if self.kind == "classification" else 1

    @property
    def n_val(self) -> int:
        return max(1, min(len(self.columns().y) - 1,
                          round(self.val_fraction * len(self.columns().y))))

    @property
    def n_train(self) -> int:
        return len(self.columns().y) - self.n_val

    def generate(self, seed: int) -> Dataset:
        """The rows permuted by `seed`; the first n_val validate, the rest train."""
        return split_rows(self.columns(), self.loss, self.n_val, seed)


@dataclass(frozen=True)
class SklearnData:
    """One of scikit-learn's shipped data sets (no network): `name` in diabetes (regression,
    10 features, 442 rows, sklearn's pre-scaled features), breast_cancer (2 classes, 30
    features in raw units, 569 rows), wine (3 classes, 13 features, 178 rows), digits (10
    classes, 64 pixel features 0-16, 1,797 rows). Split as `Table` splits."""

    name: str = "diabetes"
    val_fraction: float = 0.25
    loss: LossName = field(init=False)

    def __post_init__(self) -> None:
        if self.name not in SKLEARN_SETS:
            raise ValueError(f"task.name must be one of {sorted(SKLEARN_SETS)}, "
                             f"got {self.name!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"task.val_fraction must be in (0, 1), got {self.val_fraction}")
        object.__setattr__(self, "loss", KINDS[SKLEARN_SETS[self.name][1]])
        self.columns()  # scikit-learn must be importable: refused at composition otherwise

    def columns(self) -> Columns:
        return _read_sklearn(self.name)

    @property
    def input_dim(self) -> int:
        return int(self.columns().x.shape[1])

    @property
    def output_dim(self) -> int:
        return self.columns().n_classes if self.loss == "cross_entropy" else 1

    @property
    def n_val(self) -> int:
        return max(1, round(self.val_fraction * len(self.columns().y)))

    @property
    def n_train(self) -> int:
        return len(self.columns().y) - self.n_val

    def generate(self, seed: int) -> Dataset:
        return split_rows(self.columns(), self.loss, self.n_val, seed)


def split_rows(columns: Columns, loss: LossName, n_val: int, seed: int) -> Dataset:
    """A Dataset of `columns`: rows permuted by a generator seeded with `seed`, the first
    `n_val` the validation split. The floor is 0 (unknown for real data)."""
    order = torch.randperm(len(columns.y), generator=torch.Generator().manual_seed(seed))
    # Permuted in numpy: the gathered copies are writable, where the cached columns may be
    # read-only views of pandas' data (torch warns on wrapping those).
    x = torch.from_numpy(columns.x[order.numpy()])
    y = torch.from_numpy(columns.y[order.numpy()])
    if loss == "mse":
        y = y[:, None]
    return Dataset(x[n_val:], y[n_val:], x[:n_val], y[:n_val], loss, 0.0)


@functools.lru_cache(maxsize=16)
def _read_table(path: str, target: str | int, kind: str, mtime_ns: int, size: int) -> Columns:
    """Read and check one file version (`mtime_ns` and `size` key the cache)."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"task.path: {path} is not a table this task reads "
                         f"({', '.join(FORMATS)})")
    if suffix == ".npy":
        x, y, names = _npy_columns(path, target)
    else:
        x, y, names = _frame_columns(path, suffix, target)
    return _checked(x, y, names, kind, f"task.path: {path}")


def _npy_columns(path: str, target: str | int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"task.path: cannot read {path} ({err})") from None
    if np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"task.path: {path} holds complex numbers ({array.dtype}); a "
                         f"table's values must be real")
    if array.ndim != 2 or array.shape[1] < 2 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"task.path: {path} must hold a 2-D numeric array with a target "
                         f"and at least one feature column, got {array.dtype} "
                         f"{array.shape}")
    if isinstance(target, bool) or not isinstance(target, int) \
            or not -array.shape[1] <= target < array.shape[1]:
        raise ValueError(f"task.target: a .npy table names its target by column index "
                         f"(-{array.shape[1]} to {array.shape[1] - 1}), got {target!r}")
    _enough_rows(array.shape[0], f"task.path: {path}")
    column = target % array.shape[1]
    features = [j for j in range(array.shape[1]) if j != column]
    return (array[:, features].astype(np.float64), array[:, column],
            [f"column {j}" for j in features])


def _frame_columns(path: str, suffix: str, target: str | int
                   ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import pandas as pd

    try:
        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except Exception as err:  # pandas raises many kinds; one line names the file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"task.path: cannot read {path} ({reason})") from None
    names = [str(c) for c in frame.columns]
    if str(target) not in names:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise ValueError(f"task.target: no column {target!r} in {path} (columns: {shown})")
    frame.columns = names
    _enough_rows(len(frame), f"task.path: {path}")
    y = frame[str(target)].to_numpy()
    features = frame.drop(columns=[str(target)])
    if features.shape[1] == 0:
        raise ValueError(f"task.path: {path} has no feature column besides {target!r}")
    for name in features.columns:
        column = features[name]
        if not (pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column)):
            raise ValueError(f"task.path: feature column {name!r} of {path} is not numeric "
                             f"({column.dtype}); encode it as numbers or drop it")
    # pandas' NA in a nullable column becomes NaN, refused as missing by `_checked`
    return (features.to_numpy(dtype=np.float64, na_value=np.nan), y,
            list(features.columns))


def _enough_rows(rows: int, where: str) -> None:
    """Refuse a table too short to split (checked before its columns: an empty column
    reads as neither numeric nor constant)."""
    if rows < 2:
        raise ValueError(f"{where} has {rows} row(s); a training and a validation split "
                         f"need at least 2")


def _checked(x: np.ndarray, y: np.ndarray, names: list[str], kind: str, where: str
             ) -> Columns:
    """Refuse missing values and a constant target; encode classes as 0..C-1."""
    missing = np.isnan(x).sum(axis=0)
    if missing.any():
        j = int(np.argmax(missing > 0))
        raise ValueError(f"{where}: feature {names[j]!r} has {int(missing[j])} missing "
                         f"value(s); fill or drop them first")
    if kind == "regression":
        try:
            y = y.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: the target is not numeric ({y.dtype}); "
                             f"task.kind=classification?") from None
        if np.isnan(y).any() or not np.isfinite(x).all() or not np.isfinite(y).all():
            raise ValueError(f"{where}: the target or a feature has missing or infinite "
                             f"values; fill or drop them first")
        if np.ptp(y) == 0:
            raise ValueError(f"{where}: the target is constant ({y[0]}): nothing to learn")
        n_classes = 0
    else:
        if _missing(y).any():
            raise ValueError(f"{where}: the target has missing values; fill or drop them")
        labels, y = np.unique(y.astype(str) if y.dtype == object else y, return_inverse=True)
        n_classes = len(labels)
        if n_classes < 2:
            raise ValueError(f"{where}: the target is constant ({labels[0]}): nothing to learn")
        if n_classes > len(y) / 2:
            raise ValueError(f"{where}: the target has {n_classes} distinct values in "
                             f"{len(y)} rows; task.kind=regression?")
        y = y.astype(np.int64)
        if not np.isfinite(x).all():
            raise ValueError(f"{where}: a feature has infinite values; fix them first")
    digest = hashlib.sha256(np.ascontiguousarray(x).tobytes()
                            + np.ascontiguousarray(y).tobytes()).hexdigest()[:16]
    return Columns(np.ascontiguousarray(x), np.ascontiguousarray(y), n_classes, digest)


def _missing(values: np.ndarray) -> np.ndarray:
    """Which of `values` are missing: NaN, None, or pandas' NA or NaT (a nullable or string
    column of a Parquet file holds pd.NA, which `astype(str)` would make a class "<NA>")."""
    import pandas as pd

    return np.asarray(pd.isna(values), dtype=bool)


@functools.lru_cache(maxsize=8)
def _read_sklearn(name: str) -> Columns:
    try:
        import sklearn.datasets
    except ImportError:
        raise ValueError(f"task: the {name} data set needs scikit-learn "
                         f"(pip install scikit-learn)") from None
    loader, kind = SKLEARN_SETS[name]
    bunch = getattr(sklearn.datasets, loader)()
    x = np.asarray(bunch.data, dtype=np.float64)
    names = [str(n) for n in getattr(bunch, "feature_names", [])]
    return _checked(x, np.asarray(bunch.target), names or [f"column {j}" for j in
                                                           range(x.shape[1])],
                    kind, f"task: {name}")
