"""What every task produces: a `Dataset`, and the `Task` protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

LossName = Literal["mse", "cross_entropy"]


@dataclass(frozen=True)
class Dataset:
    """Train and validation splits of one task draw, float64 on the CPU.

    `y_*` is float64 `[N, out_dim]` for regression (loss `mse`) and int64 `[N]` class
    indices for classification (loss `cross_entropy`). `irreducible_loss` is the loss of the
    generating model on the validation split (the noise floor no model can beat, in the
    task's loss units): the noise variance for regression, the Bayes posterior's
    cross-entropy for classification.

    `target_scale` (regression, float64 `[out_dim]`, None = 1): the targets are stored in
    units of this scale (target standardization); evaluation losses are reported in the
    original units, `mean(((out - y) * scale)^2)` (the prediction mapped back), so they stay
    comparable with trials trained on raw targets.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    loss: LossName
    irreducible_loss: float
    target_scale: torch.Tensor | None = None

    @property
    def input_dim(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    def input_free_loss(self) -> float:
        """The validation loss of the best predictor that ignores the inputs and knows only
        the training targets: their mean for regression (in original units, like every eval
        loss), their class frequencies for classification (inf when a validation class never
        occurs in training). A model that ends no better than this learned nothing from x."""
        if self.loss == "mse":
            scale = 1.0 if self.target_scale is None else self.target_scale
            mean = self.y_train.double().mean(dim=0)
            return float((((mean - self.y_val.double()) * scale) ** 2).mean())
        classes = int(max(self.y_train.max(), self.y_val.max())) + 1
        prior = torch.bincount(self.y_train, minlength=classes).double() / len(self.y_train)
        return float(-torch.log(prior[self.y_val]).mean())


class Task(Protocol):
    """A task: knows its loss, dimensions and split sizes, draws data from a seed.

    `n_train` and `n_val` are the row counts of every draw's splits: the planner sizes
    populations and counts steps from them without drawing the data.
    """

    loss: LossName

    @property
    def input_dim(self) -> int: ...

    @property
    def output_dim(self) -> int: ...

    @property
    def n_train(self) -> int: ...

    @property
    def n_val(self) -> int: ...

    def generate(self, seed: int) -> Dataset:
        """Draw a dataset; the same seed gives bit-identical tensors."""
        ...


def check_positive(owner: str, **values: float) -> None:
    """Raise ValueError naming the first non-positive value (config validation)."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{owner}.{name} must be > 0, got {value}")


def check_non_negative(owner: str, **values: float) -> None:
    """Raise ValueError naming the first negative value (config validation)."""
    for name, value in values.items():
        if not value >= 0:
            raise ValueError(f"{owner}.{name} must be >= 0, got {value}")
