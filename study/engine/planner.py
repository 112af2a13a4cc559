"""Plan the work of a sweep: trials -> populations -> chunks that fit the device's memory.

`plan_populations(trials, device)` groups trials by `batch_key` (trials of one group
train as one batched computation), splits a group whose estimated peak memory exceeds the
budget into near-equal chunks (an estimate from layer sizes, never trial and error), and
orders the chunks cheapest first, so the first results arrive within seconds and a progress
bar moves from the start. The sweep driver then calls `engine.run(chunk_trials, device)` per
chunk.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Sequence

import torch

from study.engine.base import batch_key
from study.optimizers import OptimizerSpec
from study.trial import TrialSpec

CPU_BUDGET_CAP = 4 * 2**30  # bytes: a few GB are plenty for these models on a CPU
CPU_BUDGET_FRACTION = 0.25  # of physical RAM, when that is smaller than the cap
CUDA_BUDGET_FRACTION = 0.5  # of the free device memory (the rest: allocator slack, other users)

# Parameter-sized [P] tensors one trial holds at the peak of a step: parameters (old and
# new), gradient (+ its per-layer parts), two temporaries of the update, and the optimizer
# state twice (old and new, before `torch.where` picks).
_PARAM_COPIES = 6
_STATE = {"sgd": 1, "adam": 2, "adamw": 2, "rmsprop": 3, "adagrad": 1}  # amsgrad: one more
# What a run holds per planned step (evaluation) of a trial until its population's results
# are written: the records, their trace, the metrics' inputs and the curves table's rows.
# Measured on the CPU: 390-550 bytes per step at the peak of runs of 1,600-115,200 steps;
# rounded up.
HELD_BYTES_PER_STEP = 640
HELD_BYTES_PER_EVAL = 256


def _split_sizes(trial: TrialSpec) -> tuple[int, int]:
    return int(trial.task.n_train), int(trial.task.n_val)


def trial_steps(trial: TrialSpec) -> int:
    """Planned optimizer steps of `trial`."""
    return trial.train.total_steps(_split_sizes(trial)[0])


def parameter_count(trial: TrialSpec) -> int:
    """Weights and biases of `trial`'s model."""
    task = trial.task
    return sum(fi * fo + fo for fi, fo in trial.model.layer_sizes(task.input_dim,
                                                                   task.output_dim))


def _states(spec: OptimizerSpec) -> int:
    """Parameter-sized state tensors of `spec`'s optimizer (amsgrad keeps a third, the
    largest second moment so far)."""
    return _STATE.get(spec.family, 3) + int(getattr(spec, "amsgrad", False))


def estimate_trial_bytes(trial: TrialSpec) -> int:
    """Peak device memory one trial adds to a population, in bytes (a generous estimate).

    Counts, per trial and times the dtype size: parameter-sized tensors (parameters,
    gradient, temporaries, optimizer state before and after the masked update); training
    activations (pre-activation, activation and gradient of every layer for one batch);
    the evaluation forward over the train and validation splits at once; the trial's copy
    of both splits and of the shuffled training split; and its step and evaluation records
    as the run holds them until its population's results are written (`HELD_BYTES_PER_STEP`).
    """
    task, train = trial.task, trial.train
    n_train, n_val = _split_sizes(trial)
    n_params = parameter_count(trial)
    units = sum(fo for _, fo in trial.model.layer_sizes(task.input_dim, task.output_dim))
    batch = train.resolved_batch_size(n_train)
    n_all = n_train + n_val
    columns = task.input_dim + task.output_dim
    floats = (
        (_PARAM_COPIES + 2 * _states(trial.optimizer)) * n_params
        + batch * (3 * units + task.input_dim)
        + n_all * (2 * units + task.output_dim)
        + (n_all + n_train) * columns
    )
    dtype_size = torch.empty((), dtype=train.torch_dtype).element_size()
    records = (HELD_BYTES_PER_STEP * train.total_steps(n_train)
               + HELD_BYTES_PER_EVAL * train.eval_count(n_train))
    return dtype_size * floats + records


def machine_bytes(device: torch.device | str) -> int | None:
    """The memory a trial can have at most: the physical RAM (a run's records reach it on
    every device) and, on CUDA, the device's total memory; None where neither is known."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return total if ram is None else min(ram, total)
    return ram


def default_budget(device: torch.device | str) -> int:
    """Bytes a population may use: half the free CUDA memory; on the CPU a quarter of the
    RAM, at most `CPU_BUDGET_CAP`."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_BUDGET_FRACTION)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return CPU_BUDGET_CAP
    return int(min(CPU_BUDGET_CAP, CPU_BUDGET_FRACTION * ram))


def plan_populations(trials: Sequence[TrialSpec], device: torch.device | str,
                     budget_bytes: int | None = None,
                     max_trials: int | None = None) -> list[list[int]]:
    """Chunks of indices into `trials`; each chunk is one population that fits the budget.

    Trials with equal `batch_key` share a chunk; a group larger than
    `budget_bytes // estimate_trial_bytes` (or than `max_trials`) is split into near-equal
    chunks, in the trials' order. Chunks come cheapest first (estimated trial-steps times
    parameters), ties in order of first appearance. Every index appears exactly once.
    """
    budget = default_budget(device) if budget_bytes is None else int(budget_bytes)
    if budget <= 0:
        raise ValueError(f"budget_bytes must be > 0, got {budget}")
    if max_trials is not None and max_trials < 1:
        raise ValueError(f"max_trials must be >= 1, got {max_trials}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, trial in enumerate(trials):
        groups[batch_key(trial, device)].append(i)
    chunks: list[tuple[float, int, list[int]]] = []
    for order, members in enumerate(groups.values()):
        first = trials[members[0]]
        # Optimizer families share a population: size it for the hungriest one present.
        by_type = {type(trials[i].optimizer): trials[i] for i in members}
        per_trial = max(estimate_trial_bytes(t) for t in by_type.values())
        cap = max(1, budget // per_trial)
        if max_trials is not None:
            cap = min(cap, max_trials)
        n_chunks = math.ceil(len(members) / cap)
        size = math.ceil(len(members) / n_chunks)
        n_params = parameter_count(first)
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            work = len(chunk) * trial_steps(first) * n_params
            chunks.append((work, order, chunk))
    chunks.sort(key=lambda c: (c[0], c[1]))
    return [chunk for _, _, chunk in chunks]
