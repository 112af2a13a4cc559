"""A trial: one full configuration plus one seed, as plain frozen data (no Hydra)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from study.models import ModelSpec
from study.optimizers import OptimizerSpec
from study.tasks import Task

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


@dataclass(frozen=True)
class TrialSpec:
    """Everything that determines one trial's numbers.

    `labels` are the config-group choices that produced the specs (for example
    `{"task": "blobs", "optimizer": "momentum"}`): names for tables and reports, they do not
    change the numbers.
    """

    task: Task
    model: ModelSpec
    optimizer: OptimizerSpec
    train: TrainSpec
    seed: int
    labels: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    diagnostics: DiagnosticsSpec = field(default_factory=DiagnosticsSpec)

    def flat(self) -> dict[str, Any]:
        """One flat record: group labels, `<group>.<field>` for every field, and `seed`.

        Non-scalar fields (lists, tuples) are rendered as JSON strings so every value is a
        scalar a table column can hold.
        """
        row: dict[str, Any] = dict(self.labels)
        for group in ("task", "model", "optimizer", "train", "diagnostics"):
            spec = getattr(self, group)
            if group != "diagnostics":
                row[f"{group}.type"] = type(spec).__name__
            for f in fields(spec):
                if not f.init:
                    continue
                value = getattr(spec, f.name)
                if isinstance(value, (list, tuple)):
                    value = json.dumps(list(value))
                row[f"{group}.{f.name}"] = value
        row["seed"] = self.seed
        return row

    def key(self) -> str:
        """Canonical hash of the numbers-determining content (labels excluded)."""
        content = {
            group: {"type": type(getattr(self, group)).__name__, **asdict(getattr(self, group))}
            for group in ("task", "model", "optimizer", "train")
        }
        if self.diagnostics.enabled:  # keys of runs without diagnostics stay as they were
            content["diagnostics"] = asdict(self.diagnostics)
        content["seed"] = self.seed
        blob = json.dumps(content, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]
