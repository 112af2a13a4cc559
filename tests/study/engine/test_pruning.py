"""Stopping rows at an evaluation from outside (a pruner's decision, `on_eval`)."""

from __future__ import annotations

import numpy as np
import torch

from study.engine import BatchedEngine, ReferenceEngine
from study.models import ModelSpec
from study.optimizers import SGD, Adam
from study.tasks import TeacherMLP
from study.trial import TrainSpec, TrialSpec
from tests.study.engine.test_population import assert_equivalent

CPU = torch.device("cpu")
TASK = TeacherMLP(n_train=64, n_val=64, width=16)


def _trials() -> list[TrialSpec]:
    train = TrainSpec(batch_size=16, epochs=6, dtype="float64")
    return [TrialSpec(TASK, ModelSpec(depth=2, width=16), opt, train, seed)
            for seed in range(3) for opt in (SGD(lr=0.05, momentum=0.9), Adam(lr=0.01))]


def _stop_odd_at_second_eval(seen: list):
    def hook(step: int, values: dict[int, float]) -> set[int]:
        seen.append((step, dict(values)))
        return {i for i in values if i % 2 == 1 and step == 8}  # eval 2 (4 steps per epoch)
    return hook


def test_a_stopped_row_changes_no_other_rows_numbers_and_ends_at_its_evaluation() -> None:
    trials = _trials()
    free = BatchedEngine().run(trials, CPU)
    seen: list = []
    pruned = BatchedEngine().run(trials, CPU, on_eval=_stop_odd_at_second_eval(seen))
    for i, (a, b) in enumerate(zip(pruned, free, strict=True)):
        if i % 2 == 0:
            assert a.equal(b), i  # bit-identical to training without the stopped rows
        else:
            assert a.divergence_step is None and list(a.eval_step) == [0, 4, 8]
            assert len(a.step_loss) == 8  # no update after the stop
            n = len(a.step_loss)
            assert np.array_equal(a.step_loss, b.step_loss[:n])
            assert np.array_equal(a.val_loss, b.val_loss[:3])
    # The hook saw every row's validation loss until it stopped it, then only the others.
    steps = [s for s, _ in seen]
    assert steps == sorted(steps) and steps[0] == 0
    assert set(seen[-1][1]) == {0, 2, 4}
    assert seen[0][1][3] == free[3].val_loss[0]


def test_the_reference_engine_stops_the_same_trials_at_the_same_evaluation() -> None:
    trials = _trials()
    want = ReferenceEngine().run(trials, CPU, on_eval=_stop_odd_at_second_eval([]))
    got = BatchedEngine().run(trials, CPU, on_eval=_stop_odd_at_second_eval([]))
    for a, b in zip(got, want, strict=True):
        assert_equivalent(a, b, 1e-6)


def test_a_lone_trial_can_be_stopped() -> None:
    trial = _trials()[:1]
    got = BatchedEngine().run(trial, CPU, on_eval=lambda step, values: set(values)
                              if step == 4 else set())
    assert list(got[0].eval_step) == [0, 4] and len(got[0].step_loss) == 4
