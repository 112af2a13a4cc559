"""Classification tasks; the loss floor is the Bayes posterior's cross-entropy."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from study.tasks.base import Dataset, LossName, check_non_negative, check_positive


@dataclass(frozen=True)
class Blobs:
    """Isotropic Gaussian mixture: class c ~ uniform, x ~ N(mu_c, cluster_std^2 I).

    Centers are drawn mu_c ~ N(0, center_scale^2 I) from the data seed. The loss floor is
    the mean cross-entropy of the exact posterior p(c | x) (equal priors, known Gaussians)
    on the validation split.
    """

    dim: int = 2
    n_classes: int = 4
    cluster_std: float = 1.0
    center_scale: float = 2.0
    n_train: int = 256
    n_val: int = 256
    loss: LossName = field(default="cross_entropy", init=False)

    def __post_init__(self) -> None:
        check_positive("task", dim=self.dim, n_train=self.n_train, n_val=self.n_val,
                       cluster_std=self.cluster_std)
        check_non_negative("task", center_scale=self.center_scale)
        if self.n_classes < 2:
            raise ValueError(f"task.n_classes must be >= 2, got {self.n_classes}")

    @property
    def input_dim(self) -> int:
        return self.dim

    @property
    def output_dim(self) -> int:
        return self.n_classes

    def generate(self, seed: int) -> Dataset:
        g = torch.Generator().manual_seed(seed)
        n = self.n_train + self.n_val
        centers = self.center_scale * torch.randn(
            self.n_classes, self.dim, generator=g, dtype=torch.float64
        )
        y = torch.randint(self.n_classes, (n,), generator=g)
        x = centers[y] + self.cluster_std * torch.randn(n, self.dim, generator=g,
                                                        dtype=torch.float64)
        # Exact posterior logits: -|x - mu_c|^2 / (2 sigma^2) (+ equal log-priors).
        logits = -torch.cdist(x, centers).square() / (2 * self.cluster_std**2)
        floor = torch.nn.functional.cross_entropy(logits[self.n_train:], y[self.n_train:])
        return Dataset(x[: self.n_train], y[: self.n_train], x[self.n_train:],
                       y[self.n_train:], self.loss, float(floor))


@dataclass(frozen=True)
class Spirals:
    """Two interleaved Archimedean spirals in 2-D with Gaussian jitter `noise`.

    A point of class c at radius r in (0, 1] sits at angle 2*pi*turns*r + pi*c. The classes
    are almost separable for small `noise`; the loss floor is taken as 0 (the Bayes
    cross-entropy has no closed form here and is negligible at the default noise).
    """

    turns: float = 1.5
    noise: float = 0.05
    n_train: int = 256
    n_val: int = 256
    loss: LossName = field(default="cross_entropy", init=False)

    def __post_init__(self) -> None:
        check_positive("task", turns=self.turns, n_train=self.n_train, n_val=self.n_val)
        check_non_negative("task", noise=self.noise)

    @property
    def input_dim(self) -> int:
        return 2

    @property
    def output_dim(self) -> int:
        return 2

    def generate(self, seed: int) -> Dataset:
        g = torch.Generator().manual_seed(seed)
        n = self.n_train + self.n_val
        y = torch.randint(2, (n,), generator=g)
        r = torch.rand(n, generator=g, dtype=torch.float64).clamp_min(1e-3)
        angle = 2 * math.pi * self.turns * r + math.pi * y.to(torch.float64)
        x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)
        x = x + self.noise * torch.randn(n, 2, generator=g, dtype=torch.float64)
        return Dataset(x[: self.n_train], y[: self.n_train], x[self.n_train:],
                       y[self.n_train:], self.loss, 0.0)
