"""What every task produces: a `Dataset`, and the `Task` protocol; `check_dataset`, the
check that a draw is one."""

from __future__ import annotations

import math
import numbers
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


class InvalidData(ValueError):
    """A task's draw, or a data transform's output, is not a valid `Dataset` of its task."""


def check_dataset(data: object, task: Task) -> None:
    """Raise InvalidData (one line, naming the field) unless `data` is a `Dataset` that `task`
    can train on as its `Dataset` and `Task` docstrings say: tensors on the CPU, features
    float64 `[rows, input_dim]`, targets float64 `[rows, output_dim]` (`mse`) or int64 `[rows]`
    class labels in 0..output_dim-1 (`cross_entropy`), `n_train` and `n_val` rows, the task's
    loss, and a finite `irreducible_loss` >= 0 (every status is judged against it)."""
    if not isinstance(data, Dataset):
        raise InvalidData(f"got {type(data).__name__}, not a study.tasks.Dataset")
    if data.loss != task.loss:
        raise InvalidData(f"its loss is {data.loss!r}; the task's is {task.loss!r}")
    classes = data.loss == "cross_entropy"
    out_dim = int(task.output_dim)
    for split, rows in (("train", task.n_train), ("val", task.n_val)):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        dims = f"n_{split}={rows}"
        want = {f"x_{split}": (x, torch.float64, (rows, task.input_dim),
                               f"{dims}, input_dim={task.input_dim}"),
                f"y_{split}": (y, torch.int64, (rows,), dims) if classes else
                (y, torch.float64, (rows, out_dim), f"{dims}, output_dim={out_dim}")}
        for name, (t, dtype, shape, declared) in want.items():
            if not isinstance(t, torch.Tensor):
                raise InvalidData(f"{name} is a {type(t).__name__}, not a torch.Tensor")
            if t.dtype != dtype or t.device.type != "cpu":
                raise InvalidData(f"{name} is {t.dtype} on {t.device}; a Dataset of a "
                                  f"{data.loss} task holds {dtype} on the CPU")
            if tuple(t.shape) != shape:
                raise InvalidData(f"{name} has shape {tuple(t.shape)}; the task declares "
                                  f"{shape} ({declared})")
        if classes and len(y) and not (int(y.min()) >= 0 and int(y.max()) < out_dim):
            raise InvalidData(f"y_{split} holds class labels {int(y.min())}..{int(y.max())}; "
                              f"the task has {out_dim} classes, labelled 0..{out_dim - 1}")
    floor = data.irreducible_loss
    if isinstance(floor, bool) or not isinstance(floor, numbers.Real) \
            or not (math.isfinite(float(floor)) and floor >= 0):
        raise InvalidData(f"irreducible_loss is {floor!r}; it must be a finite number >= 0 "
                          f"(the noise floor every status is judged against; 0 if unknown)")
    scale = data.target_scale
    if scale is not None and not (isinstance(scale, torch.Tensor)
                                  and tuple(scale.shape) == (out_dim,)):
        raise InvalidData(f"target_scale is {type(scale).__name__} "
                          f"{tuple(getattr(scale, 'shape', ()))}; it must be None or a "
                          f"tensor of shape ({out_dim},)")


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
