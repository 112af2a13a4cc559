"""Model failure modes and mitigations: changes to the trial's `ModelSpec`.

They fold into the spec when the trial is built, so records show the model that trained
(`model.init = zero`, `model.depth = 8`, ...) and both engines need nothing new beyond the
spec's own fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def _with_model(trial, **changes):
    return dataclasses.replace(trial, model=dataclasses.replace(trial.model, **changes))


@dataclass(frozen=True)
class ZeroInit:
    """Every weight and bias starts at 0: hidden units stay identical (symmetry never breaks)."""

    def apply_spec(self, trial):
        return _with_model(trial, init="zero")


@dataclass(frozen=True)
class InitScale:
    """The drawn initial weights multiplied by `factor` (>1: too large, <1: too small)."""

    factor: float = 10.0

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise ValueError(f"init scale factor must be > 0, got {self.factor}")

    def apply_spec(self, trial):
        return _with_model(trial, init_scale=trial.model.init_scale * self.factor)


@dataclass(frozen=True)
class SigmoidStack:
    """A deep stack of sigmoid layers (`depth` hidden layers): gradients vanish toward the
    input, since sigmoid' <= 1/4 per layer."""

    depth: int = 8

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"sigmoid stack depth must be >= 1, got {self.depth}")

    def apply_spec(self, trial):
        width = trial.model.width if trial.model.width > 0 else 64
        return _with_model(trial, depth=self.depth, width=width, activation="sigmoid")


@dataclass(frozen=True)
class Dropout:
    """Dropout with probability `p` after every hidden activation during training; off at
    evaluation (the mitigation) unless `at_eval` (the failure: `model.train()` left on)."""

    p: float = 0.1
    at_eval: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.p < 1:
            raise ValueError(f"dropout p must be in [0, 1), got {self.p}")

    def apply_spec(self, trial):
        return _with_model(trial, dropout=self.p, dropout_at_eval=self.at_eval)
