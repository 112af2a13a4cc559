"""Loop failure modes and mitigations: changes to the trial's loop, optimizer or training
spec (`LoopSpec`, `OptimizerSpec`, `TrainSpec`), plus the per-trial state the loop keeps
(`Plateau`, `EarlyStopping`) and the class weights of the weighted loss. Both engines use
these very objects, so their numbers cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from study.failures.base import NotApplicable


def _with_loop(trial, **changes):
    return dataclasses.replace(trial, loop=dataclasses.replace(trial.loop, **changes))


def _needs(task, loss: str, owner: str) -> None:
    if task.loss != loss:
        kind = "regression" if loss == "mse" else "classification"
        raise NotApplicable(f"{owner} applies to {kind} tasks only, not {type(task).__name__}")


# -------------------------------------------------------------------------- failure modes
@dataclass(frozen=True)
class MissingZeroGrad:
    """`optimizer.zero_grad()` forgotten: each step uses the sum of every gradient so far."""

    def apply_spec(self, trial):
        return _with_loop(trial, zero_grad=False)


@dataclass(frozen=True)
class NoShuffling:
    """The training split visited in its stored order every epoch (`loop.shuffle = False`,
    a `DataLoader` without `shuffle=True`): the same minibatches, in the same order, every
    epoch. The data are not touched (`sorted` also sorts them: a different suspect)."""

    def apply_spec(self, trial):
        return _with_loop(trial, shuffle=False)


@dataclass(frozen=True)
class HandwrittenBCE:
    """Binary cross-entropy written by hand on raw logits (no sigmoid) against one-hot
    targets: log of a negative logit is NaN. Classification only."""

    def check(self, task) -> None:
        _needs(task, "cross_entropy", "HandwrittenBCE")

    def apply_spec(self, trial):
        return _with_loop(trial, loss="bce_raw")


@dataclass(frozen=True)
class MSEForClassification:
    """MSE between raw logits and one-hot targets as the training loss. Classification only."""

    def check(self, task) -> None:
        _needs(task, "cross_entropy", "MSEForClassification")

    def apply_spec(self, trial):
        return _with_loop(trial, loss="mse_onehot")


@dataclass(frozen=True)
class AbsurdLR:
    """The optimizer's learning rate replaced by `lr` (a typo'd 1e6)."""

    lr: float = 1e6

    def apply_spec(self, trial):
        return dataclasses.replace(trial, optimizer=dataclasses.replace(trial.optimizer,
                                                                        lr=self.lr))


@dataclass(frozen=True)
class OversizedBatch:
    """A batch size of `factor` x the training split: the loader yields one (full) batch per
    epoch, so the epoch budget buys `epochs` updates only."""

    factor: int = 4

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ValueError(f"oversized batch factor must be >= 1, got {self.factor}")

    def apply_spec(self, trial):
        n_train = int(trial.task.n_train)
        return dataclasses.replace(trial, train=dataclasses.replace(
            trial.train, batch_size=self.factor * n_train))


# ---------------------------------------------------------------------------- mitigations
@dataclass(frozen=True)
class HuberLoss:
    """Train on `F.huber_loss(delta=delta)` instead of MSE (outliers pull linearly, not
    quadratically). Regression only; evaluation stays MSE."""

    delta: float = 1.0

    def check(self, task) -> None:
        _needs(task, "mse", "HuberLoss")

    def apply_spec(self, trial):
        return _with_loop(trial, loss="huber", huber_delta=self.delta)


@dataclass(frozen=True)
class GradClip:
    """`clip_grad_norm_(max_norm)` after every backward, per trial."""

    max_norm: float = 1.0

    def apply_spec(self, trial):
        return _with_loop(trial, clip_norm=self.max_norm)


@dataclass(frozen=True)
class Warmup:
    """Linear warm-up from `start_factor` x lr to lr over `fraction` of the planned steps."""

    fraction: float = 0.1
    start_factor: float = 0.01

    def apply_spec(self, trial):
        return _with_loop(trial, warmup_fraction=self.fraction,
                          warmup_start_factor=self.start_factor)


@dataclass(frozen=True)
class StepDecay:
    """StepLR: lr x `gamma` every `epochs` epochs."""

    epochs: int = 5
    gamma: float = 0.3

    def apply_spec(self, trial):
        return _with_loop(trial, step_epochs=self.epochs, step_gamma=self.gamma)


@dataclass(frozen=True)
class CosineDecay:
    """Cosine decay from lr to `min_factor` x lr over the planned steps."""

    min_factor: float = 0.0

    def apply_spec(self, trial):
        return _with_loop(trial, cosine=True, cosine_min_factor=self.min_factor)


@dataclass(frozen=True)
class ReduceOnPlateau:
    """ReduceLROnPlateau on the validation loss, checked at each evaluation."""

    factor: float = 0.1
    patience: int = 2
    threshold: float = 1e-4

    def apply_spec(self, trial):
        return _with_loop(trial, plateau_factor=self.factor, plateau_patience=self.patience,
                          plateau_threshold=self.threshold)


@dataclass(frozen=True)
class WeightDecay:
    """The optimizer's `weight_decay` set to `value` (torch's own argument)."""

    value: float = 1e-3

    def apply_spec(self, trial):
        return dataclasses.replace(trial, optimizer=dataclasses.replace(
            trial.optimizer, weight_decay=self.value))


@dataclass(frozen=True)
class LayerWeightDecay:
    """The optimizer's `weight_decay` set to `value` on the weight matrices of `layers` only
    (0 = first linear layer; `loop.decay_layers`): L2 on one layer, as Keras'
    `kernel_regularizer` or a torch param group. Keras' `l2(l)` adds l x ||W||^2 to the loss,
    so it equals `value` = 2 l with SGD or Adam (not AdamW, whose decay is decoupled)."""

    value: float = 1e-3
    layers: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if not self.layers or min(self.layers) < 0:
            raise ValueError(f"LayerWeightDecay.layers must be layer indices >= 0, got "
                             f"{list(self.layers)}")

    def apply_spec(self, trial):
        n_layers = trial.model.depth + 1
        if max(self.layers) >= n_layers:
            raise ValueError(f"LayerWeightDecay.layers {list(self.layers)}: the model has "
                             f"{n_layers} linear layer(s), 0..{n_layers - 1}")
        trial = dataclasses.replace(trial, optimizer=dataclasses.replace(
            trial.optimizer, weight_decay=self.value))
        return _with_loop(trial, decay_layers=self.layers)


@dataclass(frozen=True)
class ClassWeightedLoss:
    """Cross-entropy with class weights n_train / (C x count_c) from the training labels.
    Classification only."""

    def check(self, task) -> None:
        _needs(task, "cross_entropy", "ClassWeightedLoss")

    def apply_spec(self, trial):
        return _with_loop(trial, loss="weighted_cross_entropy")


@dataclass(frozen=True)
class Shuffling:
    """Reshuffle the training split every epoch (undoes `sorted`'s and `no_shuffle`'s fixed
    order)."""

    def apply_spec(self, trial):
        return _with_loop(trial, shuffle=True)


@dataclass(frozen=True)
class CorrectLoss:
    """Train on the task's own loss (cross-entropy on logits / MSE), undoing a loss bug."""

    def apply_spec(self, trial):
        return _with_loop(trial, loss="task")


@dataclass(frozen=True)
class EarlyStopping:
    """Stop when the validation loss has not improved for `patience` evaluations."""

    patience: int = 3

    def apply_spec(self, trial):
        return _with_loop(trial, early_stopping_patience=self.patience)


# ------------------------------------------------------------------ per-trial loop state
class Plateau:
    """torch's ReduceLROnPlateau rule (mode min, relative threshold, no cooldown, min_lr 0,
    eps 1e-8) as a multiplier of the scheduled learning rate."""

    def __init__(self, factor: float, patience: int, threshold: float) -> None:
        self.factor, self.patience, self.threshold = factor, patience, threshold
        self.best = math.inf
        self.bad = 0
        self.multiplier = 1.0

    def update(self, value: float, lr: float) -> None:
        """One `scheduler.step(value)`; `lr` is the current learning rate (for torch's eps)."""
        if value < self.best * (1 - self.threshold):
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        if self.bad > self.patience:
            if lr - lr * self.factor > 1e-8:
                self.multiplier *= self.factor
            self.bad = 0


class EarlyStopper:
    """Patience on the validation loss: `update` returns True when training should stop."""

    def __init__(self, patience: int) -> None:
        self.patience, self.best, self.bad = patience, math.inf, 0

    def update(self, value: float) -> bool:
        if value < self.best:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        return self.bad >= self.patience


def class_weights(y_train: torch.Tensor, n_classes: int) -> torch.Tensor:
    """n / (C x count_c) per class, float64 [C] (a class absent from training gets n / C)."""
    counts = torch.bincount(y_train, minlength=n_classes).to(torch.float64).clamp_min(1)
    return len(y_train) / (n_classes * counts)
