"""The engine contract: `Engine` (who trains) returns one `Trace` (`study.trace`) per trial;
`start` trains in the background where the engine can (`Pending`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch

from study.optimizers import SGD, Adagrad, Adam, AdamW, OptimizerSpec, RMSprop
from study.trace import Trace
from study.trial import TrialSpec

__all__ = ["Engine", "OnEval", "Pending", "Trace", "batch_key", "population_key", "start"]


# Called after every evaluation with the validation loss of each trial still training (by
# its index in the `trials` given to `Engine.run`); returns the indices to stop there.
OnEval = Callable[[int, dict[int, float]], Iterable[int]]


class Engine(Protocol):
    """Trains a population: `run(trials, device)` returns one Trace per trial, in order.

    `run(..., on_eval=hook)` calls `hook(step, {index: validation loss})` after every
    evaluation; the trials it names stop there, as early stopping stops them (their traces
    end at that evaluation, not diverged). A pruner decides through it.

    Contract: a trial's trace depends only on its own spec (never on the other trials in
    `trials`), divergence is recorded and never raised, and trials may share nothing but
    structure (see `population_key`).
    """

    name: str
    population_limit: int | None  # most trials one `run` call should take (None: no limit)

    def run(self, trials: Sequence[TrialSpec], device: torch.device,
            on_eval: OnEval | None = None) -> list[Trace]: ...


class Pending:
    """Traces under way: `result()` waits for them (one per trial, in the order given) and
    raises what the training raised; `cancel()` stops the training and waits for it to end
    (its traces are lost; after `result()` it does nothing). `result()` is called once.
    `thread_cpu_s()`: the CPU-seconds that threads other than the caller's spent on it
    (the kernel's; 0 for traces trained in the caller's thread), once `result()` returned."""

    def __init__(self, result: Callable[[], list[Trace]],
                 cancel: Callable[[], None] = lambda: None,
                 thread_cpu_s: Callable[[], float] = lambda: 0.0) -> None:
        self.result, self.cancel, self.thread_cpu_s = result, cancel, thread_cpu_s

    @classmethod
    def done(cls, traces: list[Trace]) -> Pending:
        """Traces already trained."""
        return cls(lambda: traces)


def start(engine: Engine, trials: Sequence[TrialSpec], device: torch.device,
          on_eval: OnEval | None = None) -> Pending:
    """`engine.run(trials, device, on_eval)` in the background where the engine can
    (its `start`: it returns once the training is under way, the caller's thread free until
    `Pending.result`), else trained here and returned done."""
    begin = getattr(engine, "start", None)
    if begin is not None:
        return begin(trials, device, on_eval)
    return Pending.done(engine.run(trials, device, on_eval))


def population_key(trial: TrialSpec) -> tuple:
    """Trials with equal keys share structure and may train as one batched computation.

    Structure = task (whole spec: same data shapes and loss), model shape, activation and
    dropout, training schedule and dtype, and the loop (training loss,
    zero_grad, shuffling, whether gradients are clipped, the learning-rate schedule, early
    stopping). Trials of different optimizer families share the forward and backward pass
    and differ only in their update (`batched_optimizers.MixedOptimizer`; on the CPU, those
    with the fused update apart from the others: `batch_key`). Numbers that differ
    within a population: learning rate and every other optimizer hyperparameter, init scheme
    and scale, clipping threshold, seeds, and the data
    (failure modes and mitigations that transform the data keep its shapes: each trial
    trains on its own draw).
    """
    model = trial.model
    return (
        trial.task,
        (model.depth, model.width, model.activation, model.dropout, model.dropout_at_eval),
        trial.train,
        trial.diagnostics,
        trial.loop.structure(),
    )


def batch_key(trial: TrialSpec, device: torch.device | str) -> str:
    """`population_key`, and on the CPU whether the trial's optimizer has the fused update
    (`fused_family`): trials with equal keys train as one population.

    On the CPU a population takes the fused update (on the trial-major kernel or layer-major)
    only when every row's optimizer has it, and the fused and eager updates round
    differently: a trial of a family with it, beside one without, would take the eager
    update, alone the fused one. Apart, each trial takes the update it takes alone, so its
    numbers are the same alone and in any population. Every family study ships has it;
    the split guards one added without it. On a GPU every population takes the eager update.
    """
    fused = torch.device(device).type == "cpu" and fused_family(trial.optimizer)
    return repr((population_key(trial), fused))  # repr: a task may hold lists


def fused_family(spec: OptimizerSpec) -> bool:
    """Whether the CPU's fused update (`study.engine.fused`, and the trial-major kernel) has
    `spec`'s formulas: torch.optim's SGD, Adam, AdamW, RMSprop and Adagrad."""
    return type(spec) in (SGD, Adam, AdamW, RMSprop, Adagrad)
