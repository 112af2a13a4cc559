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
    10 ** (log10(min_scale) + (log10(max_scale) - log10(min_scale)) * j / (d - 1)).

    A one-feature task has no spread to span: its feature is multiplied by `max_scale`
    (an unscaled feature is one too large for the learning rate; before, it got `min_scale`
    and could only be made smaller). `scales` (one positive number per feature) replaces the
    log-spaced scales with explicit ones; its length must equal the task's input dimension.
    """

    min_scale: float = 1e-2
    max_scale: float = 1e2
    scales: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not (self.min_scale > 0 and self.max_scale > 0):
            raise ValueError("failure.unscaled: min_scale and max_scale must be > 0")
        if self.scales is not None:
            # YAML gives a list: kept as a tuple so the transform (part of a frozen,
            # hashed TrialSpec) stays hashable.
            object.__setattr__(self, "scales", tuple(float(v) for v in self.scales))
            if not self.scales or not all(math.isfinite(v) and v > 0 for v in self.scales):
                raise ValueError(f"failure.unscaled.scales: every entry must be a finite "
                                 f"number > 0, got {list(self.scales)}")

    def params(self) -> dict[str, object]:
        """Record fields; `scales` only when given, so a trial without it keeps its key."""
        out: dict[str, object] = {"min_scale": self.min_scale, "max_scale": self.max_scale}
        if self.scales is not None:
            out["scales"] = self.scales
        return out

    def check(self, task) -> None:
        if self.scales is not None and len(self.scales) != task.input_dim:
            raise ValueError(f"failure.unscaled.scales has {len(self.scales)} entries, the "
                             f"task has {task.input_dim} features")

    def scales_for(self, dim: int) -> Tensor:
        """[dim] float64: the factor of each feature."""
        if self.scales is not None:
            return torch.tensor(self.scales, dtype=torch.float64)
        if dim == 1:
            return torch.tensor([self.max_scale], dtype=torch.float64)
        a, b = math.log10(self.min_scale), math.log10(self.max_scale)
        steps = torch.arange(dim, dtype=torch.float64) / (dim - 1)
        return 10 ** (a + (b - a) * steps)

    def apply_data(self, data: Dataset, generator: torch.Generator) -> Dataset:
        s = self.scales_for(data.input_dim)
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


def _feature_index(owner: str, feature: int, task) -> None:
    if not 0 <= feature < task.input_dim:
        raise ValueError(f"{owner}.feature must be in [0, {task.input_dim - 1}] (the task has "
                         f"{task.input_dim} features), got {feature}")


@dataclass(frozen=True)
class InputOutliers:
    """Outliers in the inputs: in `fraction` of the training rows (at least one when
    `fraction` > 0), feature `feature` is multiplied by `magnitude` (a value recorded at
    100x, the classic case for a robust scaler). Targets are untouched, so those rows no
    longer follow the task's function. Training split only: the validation split is clean
    and the task's floor holds for it."""

    fraction: float = 0.02
    magnitude: float = 100.0
    feature: int = 0

    def __post_init__(self) -> None:
        _fraction("failure.input_outliers", "fraction", self.fraction)

    def check(self, task) -> None:
        _feature_index("failure.input_outliers", self.feature, task)

    def apply_data(self, data: Dataset, generator: torch.Generator) -> Dataset:
        n = data.n_train
        k = max(1, _count(self.fraction, n)) if self.fraction > 0 else 0
        rows = torch.randperm(n, generator=generator)[:k]
        x = data.x_train.clone()
        x[rows, self.feature] *= self.magnitude
        return dataclasses.replace(data, x_train=x)


@dataclass(frozen=True)
class MixedUnits:
    """One column in two units across rows (one source in grams, another in kilograms):
    in `fraction` of the training rows, drawn at random, feature `feature` is multiplied by
    `factor`. Unlike `unscaled` (whole columns), the rows of one column disagree. Training
    split only: the validation split is in one unit and the task's floor holds for it."""

    fraction: float = 0.5
    factor: float = 1000.0
    feature: int = 0

    def __post_init__(self) -> None:
        _fraction("failure.mixed_units", "fraction", self.fraction)
        if not self.factor > 0:
            raise ValueError(f"failure.mixed_units.factor must be > 0, got {self.factor}")

    def check(self, task) -> None:
        _feature_index("failure.mixed_units", self.feature, task)

    def apply_data(self, data: Dataset, generator: torch.Generator) -> Dataset:
        n = data.n_train
        rows = torch.randperm(n, generator=generator)[:_count(self.fraction, n)]
        x = data.x_train.clone()
        x[rows, self.feature] *= self.factor
        return dataclasses.replace(data, x_train=x)


@dataclass(frozen=True)
class TargetScale:
    """Targets in other units: y -> offset + factor x y on both splits (targets "in the
    thousands"). Regression only. The noise floor moves with them: it is multiplied by
    factor^2 (an offset does not change it), so statuses stay judged against the right
    floor."""

    factor: float = 1000.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise ValueError(f"failure.target_scale.factor must be > 0, got {self.factor}")

    def check(self, task) -> None:
        _needs(task, "mse", "TargetScale")

    def apply_data(self, data: Dataset, generator: torch.Generator) -> Dataset:
        return dataclasses.replace(
            data, y_train=self.offset + self.factor * data.y_train,
            y_val=self.offset + self.factor * data.y_val,
            irreducible_loss=data.irreducible_loss * self.factor**2)


@dataclass(frozen=True)
class PureNoiseTargets:
    """Nothing to learn: the targets of both splits are replaced by draws independent of
    the inputs. Regression: y ~ N(0, std^2 x var(y_train)) per output (the same spread as
    the task's targets at `std` 1); classification: uniformly drawn classes.

    The floor becomes the loss of the best predictor that ignores x, on the validation
    split: mean(y_val^2) in the evaluation's units (the generating model predicts 0) for
    regression, log(C) (the uniform posterior) for classification."""

    std: float = 1.0

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise ValueError(f"failure.pure_noise.std must be > 0, got {self.std}")

    def apply_data(self, data: Dataset, generator: torch.Generator) -> Dataset:
        if data.loss == "cross_entropy":
            classes = int(max(data.y_train.max(), data.y_val.max())) + 1
            y_train = torch.randint(classes, data.y_train.shape, generator=generator)
            y_val = torch.randint(classes, data.y_val.shape, generator=generator)
            return dataclasses.replace(data, y_train=y_train, y_val=y_val,
                                       irreducible_loss=math.log(classes))
        spread = self.std * data.y_train.std(dim=0)
        y_train = spread * torch.randn(data.y_train.shape, generator=generator,
                                       dtype=torch.float64)
        y_val = spread * torch.randn(data.y_val.shape, generator=generator,
                                     dtype=torch.float64)
        scale = 1.0 if data.target_scale is None else data.target_scale
        floor = float((y_val * scale).square().mean())
        return dataclasses.replace(data, y_train=y_train, y_val=y_val, irreducible_loss=floor)


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
