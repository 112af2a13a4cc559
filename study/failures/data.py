"""Data failure modes and data mitigations: functions of a Dataset, deterministic per seed.

Each class is what one YAML under conf/failure/ or conf/mitigation/ instantiates; its fields
are the YAML's keys. Every transform keeps shapes (rows, features, classes): a trial's
population and budget do not change, only its numbers. Validation rows are the test of
generalization: failures corrupt the training split unless said otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from study.failures.base import NotApplicable
from study.tasks import Dataset

Tensor = torch.Tensor


def _needs(task, loss: str, owner: str) -> None:
    if task.loss != loss:
        kind = "regression" if loss == "mse" else "classification"
        raise NotApplicable(f"{owner} applies to {kind} tasks only, not {type(task).__name__}")


def _fraction(owner: str, name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{owner}.{name} must be in [0, 1], got {value}")


def _count(fraction: float, n: int) -> int:
    return int(round(fraction * n))


# -------------------------------------------------------------------------- failure modes
@dataclass(frozen=True)
class TargetOutliers:
    """Corrupt `fraction` of the training targets: each picked row gets
    +-`magnitude` x (std of the training targets) added (random sign). Regression only."""

    fraction: float = 0.05
    magnitude: float = 20.0

    def __post_init__(self) -> None:
        _fraction("failure.outliers", "fraction", self.fraction)

    def check(self, task) -> None:
        _needs(task, "mse", "TargetOutliers")

    def apply_data(self, data: Dataset, generator: torch.Generator) -> Dataset:
        n = data.n_train
        rows = torch.randperm(n, generator=generator)[:_count(self.fraction, n)]
        sign = torch.randint(2, (len(rows), 1), generator=generator).to(torch.float64) * 2 - 1
        y = data.y_train.clone()
        y[rows] += sign * self.magnitude * data.y_train.std(dim=0)
        return dataclasses.replace(data, y_train=y)


@dataclass(frozen=True)
class UnscaledFeatures:
    """Features in wildly different units: feature j of both splits is multiplied by
    10 ** (log10(min_scale) + (log10(max_scale) - log10(min_scale)) * j / (d - 1))."""

    min_scale: float = 1e-2
    max_scale: float = 1e2

    def __post_init__(self) -> None:
        if not (self.min_scale > 0 and self.max_scale > 0):
            raise ValueError("failure.unscaled: min_scale and max_scale must be > 0")

    def scales(self, dim: int) -> Tensor:
        a, b = math.log10(self.min_scale), math.log10(self.max_scale)
        steps = torch.arange(dim, dtype=torch.float64) / max(dim - 1, 1)
        return 10 ** (a + (b - a) * steps)

    def apply_data(self, data: Dataset, generator: torch.Generator) -> Dataset:
        s = self.scales(data.input_dim)
        return dataclasses.replace(data, x_train=data.x_train * s, x_val=data.x_val * s)


@dataclass(frozen=True)
class LabelNoise:
    """Noisy training labels. Classification: `fraction` of the training labels replaced by
    a uniformly drawn class (possibly the same). Regression: Gaussian noise of `std` x (std
    of the training targets) added to every training target."""

    fraction: float = 0.2
    std: float = 0.5

    def __post_init__(self) -> None:
        _fraction("failure.label_noise", "fraction", self.fraction)
        if self.std < 0:
            raise ValueError(f"failure.label_noise.std must be >= 0, got {self.std}")

    def apply_data(self, data: Dataset, generator: torch.Generator) -> Dataset:
        if data.loss == "cross_entropy":
            n = data.n_train
            rows = torch.randperm(n, generator=generator)[:_count(self.fraction, n)]
            classes = int(max(data.y_train.max(), data.y_val.max())) + 1
            y = data.y_train.clone()
            y[rows] = torch.randint(classes, (len(rows),), generator=generator)
            return dataclasses.replace(data, y_train=y)
        noise = torch.randn(data.y_train.shape, generator=generator, dtype=torch.float64)
        return dataclasses.replace(
            data, y_train=data.y_train + self.std * data.y_train.std(dim=0) * noise)


@dataclass(frozen=True)
class NaNFeatures:
    """Missing values: each feature entry of both splits is NaN with probability `fraction`
    (one NaN anywhere in a batch makes its loss NaN: the trial diverges at once)."""

    fraction: float = 0.01

    def __post_init__(self) -> None:
        _fraction("failure.nan_features", "fraction", self.fraction)

    def apply_data(self, data: Dataset, generator: torch.Generator) -> Dataset:
        def holes(x: Tensor) -> Tensor:
            mask = torch.rand(x.shape, generator=generator, dtype=torch.float64) < self.fraction
            return x.masked_fill(mask, math.nan)

        return dataclasses.replace(data, x_train=holes(data.x_train), x_val=holes(data.x_val))


@dataclass(frozen=True)
class ClassImbalance:
    """Imbalanced training classes: the training split is redrawn (same size, with
    replacement) with class c weighted ratio ** (-c / (C - 1)), so class 0 is `ratio` times
    as frequent as class C-1. Validation stays balanced. Classification only."""

    ratio: float = 10.0

    def __post_init__(self) -> None:
        if self.ratio < 1:
            raise ValueError(f"failure.class_imbalance.ratio must be >= 1, got {self.ratio}")

    def check(self, task) -> None:
        _needs(task, "cross_entropy", "ClassImbalance")

    def apply_data(self, data: Dataset, generator: torch.Generator) -> Dataset:
        classes = int(max(data.y_train.max(), data.y_val.max())) + 1
        weights = self.ratio ** (-torch.arange(classes, dtype=torch.float64) / max(classes - 1, 1))
        present = torch.bincount(data.y_train, minlength=classes) > 0
        weights = weights * present
        n = data.n_train
        picked = torch.multinomial(weights, n, replacement=True, generator=generator)
        rows = torch.empty(n, dtype=torch.int64)
        for c in range(classes):
            where = picked == c
            members = (data.y_train == c).nonzero().squeeze(1)
            if where.any():
                draw = torch.randint(len(members), (int(where.sum()),), generator=generator)
                rows[where] = members[draw]
        return dataclasses.replace(data, x_train=data.x_train[rows], y_train=data.y_train[rows])


@dataclass(frozen=True)
class SortedByTarget:
    """Training rows sorted by target (regression: first output; classification: class) and
    never shuffled (`loop.shuffle = False`): every epoch walks the targets in order."""

    def apply_data(self, data: Dataset, generator: torch.Generator) -> Dataset:
        key = data.y_train if data.y_train.dim() == 1 else data.y_train[:, 0]
        rows = torch.sort(key, stable=True).indices
        return dataclasses.replace(data, x_train=data.x_train[rows], y_train=data.y_train[rows])

    def apply_spec(self, trial):
        return dataclasses.replace(trial, loop=dataclasses.replace(trial.loop, shuffle=False))


@dataclass(frozen=True)
class NormalizationMismatch:
    """Train and validation normalized differently. The features arrive in raw units
    (x -> offset + scale * x, both splits); the training split is standardized with its own
    statistics and the validation split is left raw (the scaler was never applied to it)."""

    offset: float = 2.0
    scale: float = 5.0

    def apply_data(self, data: Dataset, generator: torch.Generator) -> Dataset:
        raw_train = self.offset + self.scale * data.x_train
        raw_val = self.offset + self.scale * data.x_val
        mean, std = _moments(raw_train)
        return dataclasses.replace(data, x_train=(raw_train - mean) / std, x_val=raw_val)


@dataclass(frozen=True)
class Leakage:
    """Validation rows leak into training: the first round(fraction x min(n_train, n_val))
    training rows are replaced by copies of the first validation rows (x and y). The
    validation loss then flatters the model."""

    fraction: float = 0.5

    def __post_init__(self) -> None:
        _fraction("failure.leakage", "fraction", self.fraction)

    def apply_data(self, data: Dataset, generator: torch.Generator) -> Dataset:
        k = _count(self.fraction, min(data.n_train, int(data.x_val.shape[0])))
        x, y = data.x_train.clone(), data.y_train.clone()
        x[:k], y[:k] = data.x_val[:k], data.y_val[:k]
        return dataclasses.replace(data, x_train=x, y_train=y)


# ---------------------------------------------------------------------------- mitigations
def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-column mean and std (1/N) of `x`, ignoring NaN; std floored at 1e-12."""
    mean = torch.nanmean(x, dim=0)
    std = torch.nanmean((x - mean).square(), dim=0).sqrt()
    return torch.nan_to_num(mean), torch.nan_to_num(std, nan=1.0).clamp_min(1e-12)


@dataclass(frozen=True)
class StandardizeInputs:
    """Features standardized with statistics fitted on the training split only:
    x -> (x - mean_train) / std_train for both splits (NaN entries ignored and kept)."""

    def apply_data(self, data: Dataset, generator: torch.Generator) -> Dataset:
        mean, std = _moments(data.x_train)
        return dataclasses.replace(data, x_train=(data.x_train - mean) / std,
                                   x_val=(data.x_val - mean) / std)


@dataclass(frozen=True)
class StandardizeTargets:
    """Targets standardized with training statistics, y -> (y - mean) / std (both splits);
    evaluation losses stay in the original units (`Dataset.target_scale`). Regression only.

    The training objective is then MSE in standardized units (`objective_note`)."""

    objective_note = "standardized targets"

    def check(self, task) -> None:
        _needs(task, "mse", "StandardizeTargets")

    def apply_data(self, data: Dataset, generator: torch.Generator) -> Dataset:
        mean, std = _moments(data.y_train)
        scale = std if data.target_scale is None else data.target_scale * std
        return dataclasses.replace(data, y_train=(data.y_train - mean) / std,
                                   y_val=(data.y_val - mean) / std, target_scale=scale)


@dataclass(frozen=True)
class MeanImputation:
    """NaN features replaced by the training split's per-feature mean (both splits)."""

    def apply_data(self, data: Dataset, generator: torch.Generator) -> Dataset:
        mean, _ = _moments(data.x_train)
        return dataclasses.replace(data, x_train=torch.where(data.x_train.isnan(), mean,
                                                             data.x_train),
                                   x_val=torch.where(data.x_val.isnan(), mean, data.x_val))
