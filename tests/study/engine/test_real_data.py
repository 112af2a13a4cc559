"""Real-data tasks train to the same numbers in both engines (float64 within 1e-6), with
failure modes and mitigations applied, on the CPU and (marked cuda) on a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import study.failures as f
from study.engine import BatchedEngine, ReferenceEngine
from study.failures import apply_transforms
from study.models import ModelSpec
from study.optimizers import SGD, Adam
from study.tasks import SklearnData, Table
from study.trial import TrainSpec, TrialSpec
from tests.study.engine.test_population import TOL, assert_equivalent

CPU = torch.device("cpu")


def _trial(task, optimizer, seed, failures=(), mitigations=()):
    base = TrialSpec(task, ModelSpec(depth=1, width=8), optimizer,
                     TrainSpec(batch_size=32, epochs=2, dtype="float64"), seed)
    return apply_transforms(base, [(type(t).__name__, t) for t in failures],
                            [(type(t).__name__, t) for t in mitigations])


def _trials(tmp_path: Path) -> list[TrialSpec]:
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 4)) * [1, 3, 10, 0.1]
    frame = pd.DataFrame(x, columns=["a", "b", "c", "d"]).assign(y=np.sin(x[:, 0]) + x[:, 1])
    frame.to_csv(tmp_path / "mine.csv", index=False)
    table = Table(str(tmp_path / "mine.csv"), "y")
    scaled = [f.StandardizeInputs(), f.StandardizeTargets()]
    return [
        _trial(table, SGD(lr=0.01, momentum=0.5), 0),
        _trial(table, SGD(lr=0.02), 1, [f.NoShuffling()], [f.StandardizeInputs()]),
        _trial(SklearnData("diabetes"), SGD(lr=0.05), 0, [], scaled),
        _trial(SklearnData("diabetes"), SGD(lr=0.05), 1, [f.InputOutliers()], scaled),
        _trial(SklearnData("breast_cancer"), Adam(lr=1e-3), 0),
        _trial(SklearnData("breast_cancer"), Adam(lr=3e-3), 1, [], [f.StandardizeInputs()]),
        _trial(SklearnData("wine"), Adam(lr=1e-2), 2, [f.PureNoiseTargets()]),
    ]


def test_real_data_trials_match_the_reference(tmp_path: Path) -> None:
    trials = _trials(tmp_path)
    want = ReferenceEngine().run(trials, CPU)
    got = BatchedEngine().run(trials, CPU)
    for trial, g, w in zip(trials, got, want, strict=True):
        assert_equivalent(g, w, TOL[trial.train.dtype])
        assert w.divergence_step is None  # every case trains: the comparison is not vacuous
    assert got[4].train_acc is not None and got[4].val_acc[-1] > 0.5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_real_data_trials_match_the_cpu_reference(tmp_path: Path) -> None:
    trials = _trials(tmp_path)
    want = ReferenceEngine().run(trials, CPU)
    got = BatchedEngine().run(trials, torch.device("cuda"))
    for trial, g, w in zip(trials, got, want, strict=True):
        assert_equivalent(g, w, TOL[trial.train.dtype])


def test_a_fixed_function_fit_matches_the_reference() -> None:
    from study.tasks import FunctionFit

    trials = [_trial(FunctionFit(function=fn, order=3, noise=noise), opt, seed)
              for fn, noise, opt, seed in (("chebyshev", 0.0, SGD(lr=0.05), 0),
                                           ("sine", 0.1, Adam(lr=1e-2), 1))]
    want = ReferenceEngine().run(trials, CPU)
    got = BatchedEngine().run(trials, CPU)
    for g, w in zip(got, want, strict=True):
        assert_equivalent(g, w, TOL["float64"])
        assert w.divergence_step is None and w.val_loss[-1] < w.val_loss[0]
