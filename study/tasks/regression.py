"""Regression tasks with Gaussian label noise: the noise variance is the loss floor."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from study.tasks.base import Dataset, LossName, check_non_negative, check_positive


def _per_feature(value: float | Sequence[float], dim: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * dim
    values = [float(s) for s in value]
    if len(values) != dim:
        raise ValueError(f"{name} has {len(values)} entries, expected dim={dim}")
    return values


def _feature_scales(feature_scale: float | Sequence[float], dim: int) -> torch.Tensor:
    scales = _per_feature(feature_scale, dim, "feature_scale")
    if any(not s > 0 for s in scales):
        raise ValueError(f"feature_scale entries must be > 0, got {scales}")
    return torch.tensor(scales, dtype=torch.float64)


def _feature_means(feature_mean: float | Sequence[float], dim: int) -> torch.Tensor:
    means = _per_feature(feature_mean, dim, "feature_mean")
    if not all(math.isfinite(m) for m in means):
        raise ValueError(f"feature_mean entries must be finite, got {means}")
    return torch.tensor(means, dtype=torch.float64)


@dataclass(frozen=True)
class LinearRegression:
    """y = z @ w* / sqrt(dim) + noise * eps, with z ~ N(0, I), w* ~ N(0, 1) and features
    x_j = feature_mean_j + feature_scale_j * z_j, so x_j ~ N(feature_mean_j, feature_scale_j^2).

    `feature_scale` and `feature_mean` are each one number for every feature or one per
    feature (unscaled or uncentered inputs are failure modes: scales spanning orders of
    magnitude make the Hessian ill-conditioned, and a mean couples every weight to the bias,
    adding a large eigenvalue ~ dim * mean^2 to it). The targets are computed from the
    standardized features z, so the signal variance is 1 whatever the scales and means (a
    linear model with a bias still fits them exactly), and the loss floor is `noise**2`.
    With `feature_mean` 0 (the default) nothing is added: the draw is bit-identical to the
    task without the option.
    """

    dim: int = 10
    out_dim: int = 1
    noise: float = 0.1
    feature_scale: float | list[float] = 1.0
    feature_mean: float | list[float] = 0.0
    n_train: int = 256
    n_val: int = 256
    loss: LossName = field(default="mse", init=False)

    def __post_init__(self) -> None:
        check_positive("task", dim=self.dim, out_dim=self.out_dim, n_train=self.n_train,
                       n_val=self.n_val)
        check_non_negative("task", noise=self.noise)
        _feature_scales(self.feature_scale, self.dim)
        _feature_means(self.feature_mean, self.dim)

    @property
    def input_dim(self) -> int:
        return self.dim

    @property
    def output_dim(self) -> int:
        return self.out_dim

    def generate(self, seed: int) -> Dataset:
        g = torch.Generator().manual_seed(seed)
        n = self.n_train + self.n_val
        z = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        w = torch.randn(self.dim, self.out_dim, generator=g, dtype=torch.float64)
        y = z @ w / math.sqrt(self.dim) + self.noise * torch.randn(
            n, self.out_dim, generator=g, dtype=torch.float64
        )
        x = z * _feature_scales(self.feature_scale, self.dim)
        means = _feature_means(self.feature_mean, self.dim)
        if means.any():
            x = x + means
        return _split(x, y, self.n_train, self.loss, self.noise**2)


_TEACHER_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid}


@dataclass(frozen=True)
class TeacherMLP:
    """y = teacher(x) + noise * eps for a random MLP teacher, x ~ N(0, I).

    The teacher has `depth` hidden layers of `width` units with `activation`, weights
    N(0, 1/fan_in) and zero biases (drawn from the data seed, so every trial seed has its
    own teacher). Its outputs are rescaled to unit variance over the drawn inputs so that
    learning rates mean the same thing across teacher shapes. The loss floor is `noise**2`.
    """

    dim: int = 10
    out_dim: int = 1
    width: int = 32
    depth: int = 2
    activation: str = "tanh"
    noise: float = 0.1
    n_train: int = 256
    n_val: int = 256
    loss: LossName = field(default="mse", init=False)

    def __post_init__(self) -> None:
        check_positive("task", dim=self.dim, out_dim=self.out_dim, width=self.width,
                       depth=self.depth, n_train=self.n_train, n_val=self.n_val)
        check_non_negative("task", noise=self.noise)
        if self.activation not in _TEACHER_ACTIVATIONS:
            raise ValueError(
                f"task.activation must be one of {sorted(_TEACHER_ACTIVATIONS)}, "
                f"got {self.activation!r}"
            )

    @property
    def input_dim(self) -> int:
        return self.dim

    @property
    def output_dim(self) -> int:
        return self.out_dim

    def generate(self, seed: int) -> Dataset:
        g = torch.Generator().manual_seed(seed)
        n = self.n_train + self.n_val
        x = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        act = _TEACHER_ACTIVATIONS[self.activation]
        h = x
        sizes = [self.dim] + [self.width] * self.depth
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            w = torch.randn(fan_in, fan_out, generator=g, dtype=torch.float64) / math.sqrt(fan_in)
            h = act(h @ w)
        w_out = torch.randn(sizes[-1], self.out_dim, generator=g, dtype=torch.float64)
        signal = h @ w_out
        signal = (signal - signal.mean(0)) / signal.std(0).clamp_min(1e-12)
        y = signal + self.noise * torch.randn(n, self.out_dim, generator=g, dtype=torch.float64)
        return _split(x, y, self.n_train, self.loss, self.noise**2)


_FUNCTIONS = ("chebyshev", "sine")


@dataclass(frozen=True)
class FunctionFit:
    """A fixed function of one input: training inputs on an even grid of `n_train` points
    over [-1, 1], validation inputs drawn uniformly on [-1, 1] from the data seed, and
    y = f(x) + noise * eps, the small setting of edge-of-stability and catapult studies
    (Cohen et al. 2021 fit Chebyshev polynomials).

    `function` "chebyshev" is the Chebyshev polynomial T_order(x) = cos(order * arccos x);
    "sine" is sin(order * pi * x) (`order` half periods over [-1, 1]). f is the same for
    every seed; the seed draws the validation inputs and the noise. The loss floor is
    `noise**2` (0 by default: an MLP can fit f as closely as it likes).
    """

    function: str = "chebyshev"
    order: int = 4
    noise: float = 0.0
    n_train: int = 64
    n_val: int = 256
    loss: LossName = field(default="mse", init=False)

    def __post_init__(self) -> None:
        check_positive("task", n_train=self.n_train, n_val=self.n_val)
        check_non_negative("task", noise=self.noise, order=self.order)
        if self.function not in _FUNCTIONS:
            raise ValueError(f"task.function must be one of {list(_FUNCTIONS)}, "
                             f"got {self.function!r}")

    @property
    def input_dim(self) -> int:
        return 1

    @property
    def output_dim(self) -> int:
        return 1

    def f(self, x: torch.Tensor) -> torch.Tensor:
        """The target function (noise-free) at inputs `x` in [-1, 1]."""
        if self.function == "chebyshev":
            return torch.cos(self.order * torch.arccos(x.clamp(-1.0, 1.0)))
        return torch.sin(self.order * math.pi * x)

    def generate(self, seed: int) -> Dataset:
        g = torch.Generator().manual_seed(seed)
        grid = torch.linspace(-1.0, 1.0, self.n_train, dtype=torch.float64)
        drawn = torch.rand(self.n_val, generator=g, dtype=torch.float64) * 2.0 - 1.0
        x = torch.cat([grid, drawn])[:, None]
        y = self.f(x) + self.noise * torch.randn(x.shape, generator=g, dtype=torch.float64)
        return _split(x, y, self.n_train, self.loss, self.noise**2)


def _split(x: torch.Tensor, y: torch.Tensor, n_train: int, loss: LossName,
           floor: float) -> Dataset:
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], loss, float(floor))
