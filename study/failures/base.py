"""How transforms apply: the seeding of data transforms, the data a trial trains on
(`trial_dataset`) and the folding of spec changes.

A transform is a small frozen dataclass (or a function wrapped by `FunctionTransform`) with
any of:

- `apply_data(data, generator) -> Dataset`: change the data after the task drew it. The
  generator is seeded from the trial's data seed and the transform's class name, so a
  transform draws the same rows whatever else the trial carries (paired arms stay paired).
  Shapes are kept: same splits, same number of rows and features.
- `apply_spec(trial) -> TrialSpec`: change the model, optimizer, training or loop spec
  (`dataclasses.replace`); applied once, when the trial is built.
- `check(task)`: raise ValueError when the transform does not apply to `task` (for example
  class imbalance on a regression task), so a bad combination fails before training.
- `edit_module(module) -> nn.Module`: a change to the reference engine's `nn.Sequential`
  that the batched engine cannot express; trials carrying one train on the reference engine
  (the batched engine falls back and logs it).
"""

from __future__ import annotations

import dataclasses
import importlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from study.tasks import Dataset, Task
from study.tasks.base import InvalidData, check_dataset
from study.transform import Applicability, SpecTransform
from study.trial import TrialSpec


class NotApplicable(ValueError):
    """A transform does not apply to a task (a sweep may skip such points, see grid)."""


def transform_generator(data_seed: int, transform: Any) -> torch.Generator:
    """A generator for `transform`'s draws: from the data seed and the transform's name."""
    name = getattr(transform, "target", None) or type(transform).__name__
    key = zlib.crc32(name.encode())
    state = np.random.SeedSequence(data_seed, spawn_key=(7, key)).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]) >> 1)


def apply_data_transforms(data: Dataset, transforms: Sequence[Any], data_seed: int,
                          task: Task | None = None) -> Dataset:
    """`data` after each transform's `apply_data`, in order. Each output is checked: a
    Dataset of the input's shapes and dtypes and, given the `task`, one it can train on
    (`check_dataset`: class labels in range, a valid floor); InvalidData otherwise."""
    for transform in transforms:
        out = transform.apply_data(data, transform_generator(data_seed, transform))
        if not isinstance(out, Dataset):
            raise InvalidData(f"got {type(out).__name__}, not a study.tasks.Dataset")
        for name in ("x_train", "y_train", "x_val", "y_val"):
            before, after = getattr(data, name), getattr(out, name)
            if not isinstance(after, torch.Tensor):
                raise InvalidData(f"{name} is a {type(after).__name__}, not a torch.Tensor")
            if before.shape != after.shape or before.dtype != after.dtype:
                raise InvalidData(
                    f"{type(transform).__name__} changed {name} from {tuple(before.shape)} "
                    f"{before.dtype} to {tuple(after.shape)} {after.dtype}: data transforms "
                    f"must keep shapes and dtypes"
                )
        if task is not None:
            check_dataset(out, task)
        data = out
    return data


def trial_dataset(trial: TrialSpec, data_seed: int) -> Dataset:
    """The data `trial` trains on: its task's draw for `data_seed` after every data transform
    it carries, in order (deterministic). Raises InvalidData (`check_dataset`) when the draw
    or a transform's output is not valid data of the task: nothing trains on it."""
    data = trial.task.generate(data_seed)
    check_dataset(data, trial.task)
    return apply_data_transforms(data, trial.data_transforms, data_seed, trial.task)


def apply_transforms(trial: TrialSpec, failures: Sequence[tuple[str, Any]],
                     mitigations: Sequence[tuple[str, Any]]) -> TrialSpec:
    """`trial` carrying the (name, transform) pairs, their spec changes folded in.

    Failures apply first, then mitigations, each in the given order, so a mitigation can undo
    a failure's change (`correct_loss` after `bce_by_hand`). Raises ValueError when a
    transform does not apply to the task.
    """
    for _, transform in (*failures, *mitigations):
        if isinstance(transform, Applicability):
            transform.check(trial.task)
    trial = dataclasses.replace(trial, failures=tuple(failures), mitigations=tuple(mitigations))
    for _, transform in (*failures, *mitigations):
        if isinstance(transform, SpecTransform):
            trial = transform.apply_spec(trial)
    return trial


@dataclass(frozen=True)
class FunctionTransform:
    """A data transform written as a plain function, referenced by `_target_`.

    The function is called as `fn(data, generator, **params)` and returns a Dataset; the
    YAML's other keys are `params`. Example: `_target_: mypackage.failures.clip_targets`
    with `limit: 3.0` for `def clip_targets(data, generator, limit): ...`.
    """

    target: str
    params_items: tuple[tuple[str, Any], ...] = ()

    def params(self) -> dict[str, Any]:
        return {"target": self.target, **dict(self.params_items)}

    def apply_data(self, data: Dataset, generator: torch.Generator) -> Dataset:
        module, _, name = self.target.rpartition(".")
        fn = getattr(importlib.import_module(module), name)
        return fn(data, generator, **dict(self.params_items))


def freeze(value: Any) -> Any:
    """Lists (from YAML) as tuples, so transforms stay hashable."""
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    return value
