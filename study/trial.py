"""A trial: one full configuration plus one seed, as plain frozen data (no Hydra)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from typing import Any

import torch

from study.models import ModelSpec
from study.optimizers import OptimizerSpec
from study.tasks import Task
from study.transform import DataTransform, ObjectiveNote, Parametrized

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class TrainSpec:
    """How a trial trains.

    `batch_size` is a number of examples or `"full"` (the whole training split; a batch
    larger than the split is also the whole split). `epochs` fixes the budget in examples
    seen, so every batch size sees the same number of examples: a trial takes
    `epochs * ceil(n_train / batch_size)` steps, the last batch of an epoch being partial when
    the batch size does not divide `n_train`. Full-split evaluations run at step 0 and then
    every `eval_every` steps (`None`: at the end of every epoch) and at the last step.
    """

    batch_size: int | str = 32
    epochs: int = 20
    eval_every: int | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, str):
            if self.batch_size != "full":
                raise ValueError(
                    f"train.batch_size must be a positive integer or 'full', "
                    f"got {self.batch_size!r}"
                )
        elif isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise ValueError(f"train.batch_size must be an integer or 'full', "
                             f"got {self.batch_size!r}")
        elif self.batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1 or 'full', got {self.batch_size}")
        for name in ("epochs", "eval_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"train.{name} must be an integer, got {value!r}")
        if self.epochs < 1:
            raise ValueError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"train.eval_every must be >= 1 or null, got {self.eval_every}")
        if self.dtype not in DTYPES:
            raise ValueError(f"train.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    def resolved_batch_size(self, n_train: int) -> int:
        """Examples per step: `batch_size` capped at the training split."""
        return n_train if self.batch_size == "full" else min(int(self.batch_size), n_train)

    def steps_per_epoch(self, n_train: int) -> int:
        return math.ceil(n_train / self.resolved_batch_size(n_train))

    def total_steps(self, n_train: int) -> int:
        return self.epochs * self.steps_per_epoch(n_train)

    def eval_count(self, n_train: int) -> int:
        """len(eval_steps(n_train)), without listing them."""
        total = self.total_steps(n_train)
        every = self.eval_every or self.steps_per_epoch(n_train)
        return total // every + 1 + (total % every != 0)

    def eval_steps(self, n_train: int) -> list[int]:
        """Steps (updates done so far) after which the full splits are evaluated."""
        total = self.total_steps(n_train)
        every = self.eval_every or self.steps_per_epoch(n_train)
        steps = list(range(0, total + 1, every))
        if steps[-1] != total:
            steps.append(total)
        return steps

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class DiagnosticsSpec:
    """Opt-in diagnostics, measured on the side (they never change the training numbers).

    `sharpness`: top Hessian eigenvalue of the full-batch training loss (Lanczos with
    `iterations` Hessian-vector products). `noise_scale`: gradient noise scale B_simple from
    per-example gradients of the first `max_examples` training examples. Measured at step 0
    and every `every` steps (`None`: at every evaluation), and at the last step.
    """

    sharpness: bool = False
    noise_scale: bool = False
    every: int | None = None
    iterations: int = 20
    max_examples: int = 256

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 1:
            raise ValueError(f"diagnostics.every must be >= 1 or null, got {self.every}")
        if self.iterations < 1:
            raise ValueError(f"diagnostics.iterations must be >= 1, got {self.iterations}")
        if self.max_examples < 2:
            raise ValueError(f"diagnostics.max_examples must be >= 2, got {self.max_examples}")

    @property
    def enabled(self) -> bool:
        return self.sharpness or self.noise_scale

    def steps(self, train: TrainSpec, n_train: int) -> list[int]:
        """Steps (updates done) at which the diagnostics are measured; [] when disabled."""
        if not self.enabled:
            return []
        if self.every is None:
            return train.eval_steps(n_train)
        total = train.total_steps(n_train)
        steps = list(range(0, total + 1, self.every))
        return steps if steps[-1] == total else [*steps, total]


LOSSES = ("task", "huber", "mse_onehot", "bce_raw", "weighted_cross_entropy")
OBJECTIVE_NAMES = {"huber": "huber", "mse_onehot": "mse on one-hot targets",
                   "bce_raw": "bce on raw logits",
                   "weighted_cross_entropy": "weighted cross-entropy"}


@dataclass(frozen=True)
class LoopSpec:
    """How the training loop departs from the plain one (failure modes and mitigations set it).

    - `loss`: the training objective. `task` = the task's loss (MSE / cross-entropy);
      `huber` = `F.huber_loss(delta=huber_delta)` (regression); `mse_onehot` = MSE between
      raw logits and one-hot targets (classification); `bce_raw` = binary cross-entropy
      written by hand on raw logits, `-(y log z + (1 - y) log(1 - z)).mean()` against one-hot
      targets, no sigmoid; `weighted_cross_entropy` = cross-entropy with class weights
      n_train / (C * count_c) from the training labels. Evaluations always use the task's loss,
      so arms with different training objectives stay comparable.
    - `zero_grad`: False = gradients accumulate across steps (the missing `zero_grad()`).
    - `shuffle`: False = every epoch visits the training split in stored order.
    - `clip_norm`: `clip_grad_norm_(max_norm=clip_norm)` per trial after backward (None: off).
    - Learning-rate schedule, a product of factors of the optimizer's `lr` at step k (k updates
      done): warm-up `LinearLR(start_factor=warmup_start_factor)` over the first
      `round(warmup_fraction * planned steps)` steps; `StepLR`: x `step_gamma` every
      `step_epochs` epochs; cosine decay to `cosine_min_factor` over the planned steps; and
      `ReduceLROnPlateau` on the validation loss at each evaluation after step 0
      (`plateau_factor`, `plateau_patience`, relative `plateau_threshold`).
    - `early_stopping_patience`: stop once the validation loss has not improved on its best
      for that many consecutive evaluations (the trace ends there, not diverged).
    - `decay_layers`: the linear layers (0 = first, input to output) whose weight matrices
      take the optimizer's `weight_decay`; every other parameter (their biases included)
      takes none, as torch param groups `[{"params": [layer.weight, ...]}, {"params": rest,
      "weight_decay": 0}]` or Keras' `kernel_regularizer` on those layers only. None: every
      parameter, torch's single group.
    """

    loss: str = "task"
    huber_delta: float = 1.0
    zero_grad: bool = True
    shuffle: bool = True
    clip_norm: float | None = None
    warmup_fraction: float = 0.0
    warmup_start_factor: float = 0.01
    step_epochs: int | None = None
    step_gamma: float = 0.1
    cosine: bool = False
    cosine_min_factor: float = 0.0
    plateau_factor: float | None = None
    plateau_patience: int = 2
    plateau_threshold: float = 1e-4
    early_stopping_patience: int | None = None
    decay_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.decay_layers is not None:  # a YAML list arrives as a list
            layers = tuple(sorted({int(i) for i in self.decay_layers}))
            object.__setattr__(self, "decay_layers", layers)
        if self.loss not in LOSSES:
            raise ValueError(f"loop.loss must be one of {list(LOSSES)}, got {self.loss!r}")
        checks = {
            "huber_delta": self.huber_delta > 0,
            "clip_norm": self.clip_norm is None or self.clip_norm > 0,
            "warmup_fraction": 0 <= self.warmup_fraction <= 1,
            "warmup_start_factor": 0 < self.warmup_start_factor <= 1,
            "step_epochs": self.step_epochs is None or self.step_epochs >= 1,
            "step_gamma": 0 < self.step_gamma <= 1,
            "cosine_min_factor": 0 <= self.cosine_min_factor <= 1,
            "plateau_factor": self.plateau_factor is None or 0 < self.plateau_factor < 1,
            "plateau_patience": self.plateau_patience >= 0,
            "plateau_threshold": self.plateau_threshold >= 0,
            "early_stopping_patience": (self.early_stopping_patience is None
                                        or self.early_stopping_patience >= 1),
            "decay_layers": self.decay_layers is None or (
                len(self.decay_layers) > 0 and self.decay_layers[0] >= 0),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"loop.{name} is out of range: {getattr(self, name)!r}")

    @property
    def tracks_validation(self) -> bool:
        """Whether each evaluation's validation loss steers training (a plateau or early
        stopping)."""
        return self.plateau_factor is not None or self.early_stopping_patience is not None

    @property
    def scheduled(self) -> bool:
        """Whether the learning rate changes during training."""
        return (self.warmup_fraction > 0 or self.step_epochs is not None or self.cosine
                or self.plateau_factor is not None)

    def lr_factor(self, step: int, steps_per_epoch: int, total_steps: int) -> float:
        """The schedule's factor of `lr` for the update after `step` updates (no plateau).

        The closed forms of torch's LinearLR, StepLR (stepped every `step_epochs` epochs)
        and CosineAnnealingLR (T_max = planned steps, eta_min = cosine_min_factor * lr),
        in Python floats (tests/study/test_failures.py compares them with torch's).
        """
        factor = 1.0
        warmup = round(self.warmup_fraction * total_steps)
        if warmup > 0:
            factor *= (self.warmup_start_factor
                       + (1.0 - self.warmup_start_factor) * min(warmup, step) / warmup)
        if self.step_epochs is not None:
            factor *= self.step_gamma ** (step // (self.step_epochs * steps_per_epoch))
        if self.cosine:
            m = self.cosine_min_factor
            factor *= m + (1.0 - m) * (1 + math.cos(math.pi * step / total_steps)) / 2
        return factor

    def structure(self) -> tuple:
        """What a population must share: everything but the per-trial clipping threshold."""
        return tuple((f.name, getattr(self, f.name)) for f in fields(self)
                     if f.name != "clip_norm") + (("clip", self.clip_norm is not None),)


# Loop options that a run's records and keys hold only where a trial uses them, so every
# trial without them has the same record and key whichever version of study wrote it.
_OPTIONAL_LOOP_FIELDS = frozenset({"decay_layers"})


@dataclass(frozen=True)
class TrialSpec:
    """Everything that determines one trial's numbers.

    `labels` are the config-group choices that produced the specs (for example
    `{"task": "blobs", "optimizer": "momentum"}`): names for tables and reports, they do not
    change the numbers.

    `failures` and `mitigations` are the (config entry name, transform) pairs the trial
    carries (`study.failures`), in the order they apply (failures first). Their changes to
    the model, optimizer, training and loop are already folded into `model`, `optimizer`,
    `train` and `loop` (see `study.failures.apply_transforms`); their data changes apply when
    the data is drawn (`study.failures.trial_dataset`).
    """

    task: Task
    model: ModelSpec
    optimizer: OptimizerSpec
    train: TrainSpec
    seed: int
    labels: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    diagnostics: DiagnosticsSpec = field(default_factory=DiagnosticsSpec)
    loop: LoopSpec = field(default_factory=LoopSpec)
    failures: tuple[tuple[str, Any], ...] = ()
    mitigations: tuple[tuple[str, Any], ...] = ()

    @property
    def training_objective(self) -> str:
        """What the minibatch loss (curves split `batch`) measures, in words: `task` when it
        is the task's own loss in original units (the evaluations' loss), else the objective
        the optimizer minimizes (e.g. `huber`, `mse (standardized targets)`)."""
        notes = [t.objective_note for t in self.transforms if isinstance(t, ObjectiveNote)]
        base = OBJECTIVE_NAMES.get(self.loop.loss, self.loop.loss)
        if self.loop.loss == "task" and not notes:
            return "task"
        if self.loop.loss == "task":
            base = "mse" if self.task.loss == "mse" else "cross-entropy"
        return base + (f" ({', '.join(notes)})" if notes else "")

    @property
    def transforms(self) -> tuple[Any, ...]:
        """Every transform, failures first (without their config entry names)."""
        return tuple(t for _, t in (*self.failures, *self.mitigations))

    @property
    def data_transforms(self) -> tuple[Any, ...]:
        """The transforms that change the data, in the order they apply."""
        return tuple(t for t in self.transforms if isinstance(t, DataTransform))

    def flat(self) -> dict[str, Any]:
        """One flat record: group labels, `<group>.<field>` for every field, and `seed`.

        Non-scalar fields (lists, tuples) are rendered as JSON strings so every value is a
        scalar a table column can hold.
        """
        row: dict[str, Any] = dict(self.labels)
        for group in ("task", "model", "optimizer", "train", "diagnostics", "loop"):
            spec = getattr(self, group)
            if group not in ("diagnostics", "loop"):
                row[f"{group}.type"] = type(spec).__name__
            for f in fields(spec):
                if not f.init:
                    continue
                value = getattr(spec, f.name)
                if group == "loop" and f.name in _OPTIONAL_LOOP_FIELDS and value is None:
                    continue  # a record has the column only where the option is in use
                if isinstance(value, (list, tuple)):
                    value = json.dumps(list(value))
                row[f"{group}.{f.name}"] = value
        for group, transforms in (("failure", self.failures), ("mitigation", self.mitigations)):
            for entry, transform in transforms:
                row[f"{group}.{entry}.type"] = type(transform).__name__
                for name, value in transform_params(transform).items():
                    if isinstance(value, (list, tuple)):
                        value = json.dumps(list(value))
                    row[f"{group}.{entry}.{name}"] = value
        row["training_objective"] = self.training_objective
        row["seed"] = self.seed
        return row

    def key(self) -> str:
        """Canonical hash of the numbers-determining content (labels excluded)."""
        return self._key

    @cached_property
    def _key(self) -> str:
        # Computed once per spec (the sweep driver asks for it many times per trial): the
        # spec is frozen, and cached_property writes the instance dict, not a field.
        content = {
            group: {"type": type(getattr(self, group)).__name__, **asdict(getattr(self, group))}
            for group in ("task", "model", "optimizer", "train")
        }
        # Options at their defaults stay out of the key, so adding an option never changes the
        # key (and the stored results) of a trial that does not use it.
        if self.model.dropout == 0 and not self.model.dropout_at_eval:
            del content["model"]["dropout"], content["model"]["dropout_at_eval"]
        if self.diagnostics.enabled:
            content["diagnostics"] = asdict(self.diagnostics)
        if self.loop != LoopSpec():
            content["loop"] = asdict(self.loop)
            for name in _OPTIONAL_LOOP_FIELDS:
                if content["loop"][name] is None:
                    del content["loop"][name]
        for group, transforms in (("failure", self.failures), ("mitigation", self.mitigations)):
            if transforms:
                content[group] = [{"type": type(t).__name__, **transform_params(t)}
                                  for _, t in transforms]
        content["seed"] = self.seed
        blob = json.dumps(content, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


def transform_params(transform: Any) -> dict[str, Any]:
    """A transform's parameters (its init fields), for records and keys."""
    if isinstance(transform, Parametrized):
        return transform.params()
    return {f.name: getattr(transform, f.name) for f in fields(transform) if f.init}
