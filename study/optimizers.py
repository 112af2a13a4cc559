"""Optimizer specs: what conf/optimizer/*.yaml instantiates.

Each spec's fields are exactly the keyword arguments of the `torch.optim` class it names
(same names, same defaults), so a YAML reads like the `torch.optim` call a user would write.
`build(params)` makes that optimizer for the reference engine; the population engine reads the
same fields as per-trial hyperparameters. `family` groups specs that can share a batched
update (trials of one family may differ in any numeric field).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch


def _check(owner: str, **conditions: tuple[bool, Any]) -> None:
    for name, (ok, value) in conditions.items():
        if not ok:
            raise ValueError(f"{owner}.{name} is out of range: {value!r}")


@dataclass(frozen=True)
class OptimizerSpec:
    """Base of the specs: `lr` and `weight_decay` are common to every family."""

    family: ClassVar[str] = ""
    torch_class: ClassVar[type[torch.optim.Optimizer]]

    def build(self, params) -> torch.optim.Optimizer:
        """The `torch.optim` optimizer over `params` with exactly these hyperparameters."""
        return self.torch_class(params, **self.kwargs())

    def kwargs(self) -> dict[str, Any]:
        kwargs = asdict(self)
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return kwargs


@dataclass(frozen=True)
class SGD(OptimizerSpec):
    """torch.optim.SGD: plain, heavy-ball (`momentum`) and Nesterov (`nesterov=True`)."""

    family: ClassVar[str] = "sgd"
    torch_class: ClassVar[type[torch.optim.Optimizer]] = torch.optim.SGD
    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        _check("optimizer", lr=(self.lr > 0, self.lr),
               momentum=(0 <= self.momentum < 1, self.momentum),
               dampening=(0 <= self.dampening <= 1, self.dampening),
               weight_decay=(self.weight_decay >= 0, self.weight_decay))
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("optimizer.nesterov needs momentum > 0 and dampening = 0")


@dataclass(frozen=True)
class Adam(OptimizerSpec):
    """torch.optim.Adam (L2 weight decay added to the gradient)."""

    family: ClassVar[str] = "adam"
    torch_class: ClassVar[type[torch.optim.Optimizer]] = torch.optim.Adam
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        _check("optimizer", lr=(self.lr > 0, self.lr),
               betas=(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), self.betas),
               eps=(self.eps > 0, self.eps),
               weight_decay=(self.weight_decay >= 0, self.weight_decay))


@dataclass(frozen=True)
class AdamW(Adam):
    """torch.optim.AdamW (decoupled weight decay, torch's default 0.01)."""

    family: ClassVar[str] = "adamw"
    torch_class: ClassVar[type[torch.optim.Optimizer]] = torch.optim.AdamW
    weight_decay: float = 1e-2


@dataclass(frozen=True)
class RMSprop(OptimizerSpec):
    """torch.optim.RMSprop (`centered` subtracts the running mean of the gradient)."""

    family: ClassVar[str] = "rmsprop"
    torch_class: ClassVar[type[torch.optim.Optimizer]] = torch.optim.RMSprop
    lr: float = 1e-2
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False

    def __post_init__(self) -> None:
        _check("optimizer", lr=(self.lr > 0, self.lr), alpha=(0 <= self.alpha < 1, self.alpha),
               eps=(self.eps > 0, self.eps), momentum=(0 <= self.momentum < 1, self.momentum),
               weight_decay=(self.weight_decay >= 0, self.weight_decay))


@dataclass(frozen=True)
class Adagrad(OptimizerSpec):
    """torch.optim.Adagrad."""

    family: ClassVar[str] = "adagrad"
    torch_class: ClassVar[type[torch.optim.Optimizer]] = torch.optim.Adagrad
    lr: float = 1e-2
    lr_decay: float = 0.0
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10

    def __post_init__(self) -> None:
        _check("optimizer", lr=(self.lr > 0, self.lr), lr_decay=(self.lr_decay >= 0, self.lr_decay),
               eps=(self.eps > 0, self.eps),
               initial_accumulator_value=(self.initial_accumulator_value >= 0,
                                          self.initial_accumulator_value),
               weight_decay=(self.weight_decay >= 0, self.weight_decay))
