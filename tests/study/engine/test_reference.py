"""The reference engine is the plain loop, deterministic, and records divergence as data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from study.engine import ReferenceEngine
from study.models import ModelSpec, init_parameters
from study.optimizers import SGD, Adam
from study.seeds import seed_streams
from study.tasks import Blobs, TeacherMLP
from study.trial import TrainSpec, TrialSpec

CPU = torch.device("cpu")


def _trial(**overrides) -> TrialSpec:
    base = dict(task=TeacherMLP(n_train=100, n_val=64), model=ModelSpec(depth=2, width=16),
                optimizer=SGD(lr=0.05, momentum=0.9), train=TrainSpec(batch_size=32, epochs=3),
                seed=7)
    return TrialSpec(**{**base, **overrides})


def _hand_written_loop(trial: TrialSpec) -> list[float]:
    """The ten lines a user writes (nn.Sequential, torch.optim, shuffled minibatches)."""
    s = seed_streams(trial.seed)
    d = trial.task.generate(s.data)
    x, y = d.x_train.float(), d.y_train.float()
    (w1, b1), (w2, b2), (w3, b3) = init_parameters(trial.model, x.shape[1], y.shape[1],
                                                   torch.Generator().manual_seed(s.init))
    net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                              torch.nn.ReLU(), torch.nn.Linear(16, 1))
    with torch.no_grad():
        for layer, (w, b) in zip(net[::2], [(w1, b1), (w2, b2), (w3, b3)], strict=True):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    opt = torch.optim.SGD(net.parameters(), lr=trial.optimizer.lr,
                          momentum=trial.optimizer.momentum)
    g = torch.Generator().manual_seed(s.order)
    losses = []
    for _ in range(trial.train.epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), trial.train.batch_size):
            idx = perm[i:i + trial.train.batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x[idx]), y[idx])
            loss.backward()
            losses.append(loss.item())
            if not np.isfinite(losses[-1]):
                return losses
            opt.step()
    return losses


def test_matches_a_hand_written_loop_step_by_step() -> None:
    trial = _trial()
    (trace,) = ReferenceEngine().run([trial], CPU)
    expected = _hand_written_loop(trial)
    # 100 examples in batches of 32: 4 steps per epoch, the last one partial (4 examples).
    assert len(trace.step_loss) == len(expected) == 12
    np.testing.assert_array_equal(trace.step_loss, np.array(expected))
    assert trace.divergence_step is None
    assert list(trace.eval_step) == [0, 4, 8, 12]


def test_same_trial_twice_is_bit_identical_and_seeds_differ() -> None:
    engine = ReferenceEngine()
    a, b = engine.run([_trial(), _trial()], CPU)
    assert a.equal(b)
    (c,) = engine.run([_trial(seed=8)], CPU)
    assert not np.array_equal(a.step_loss, c.step_loss)
    assert not np.array_equal(a.val_loss, c.val_loss)


def test_huge_learning_rate_diverges_at_the_first_non_finite_step_and_is_recorded() -> None:
    trial = _trial(optimizer=SGD(lr=1e4), train=TrainSpec(batch_size=32, epochs=20))
    (trace,) = ReferenceEngine().run([trial], CPU)
    expected = _hand_written_loop(trial)
    first_bad = next(i for i, v in enumerate(expected) if not np.isfinite(v))
    assert trace.divergence_step == first_bad
    assert len(trace.step_loss) == first_bad + 1
    assert not np.isfinite(trace.step_loss[-1])
    np.testing.assert_array_equal(trace.step_loss[:-1], expected[:-1])
    assert np.isfinite(trace.step_loss[:-1]).all()


def test_classification_records_accuracy_and_float64_runs() -> None:
    trial = _trial(task=Blobs(n_train=64, n_val=64), optimizer=Adam(lr=0.01),
                   train=TrainSpec(batch_size="full", epochs=5, dtype="float64"))
    (trace,) = ReferenceEngine().run([trial], CPU)
    assert trace.val_acc is not None and len(trace.val_acc) == len(trace.eval_step) == 6
    assert ((trace.val_acc >= 0) & (trace.val_acc <= 1)).all()
    assert len(trace.step_loss) == 5  # full batch: one step per epoch
    assert trace.val_loss[-1] < trace.val_loss[0]


@pytest.mark.parametrize("init", ["default", "xavier", "he", "zero", "normal"])
def test_init_schemes_are_deterministic_per_init_seed(init: str) -> None:
    spec = ModelSpec(depth=1, width=8, init=init, init_scale=0.5)
    a = init_parameters(spec, 3, 2, torch.Generator().manual_seed(1))
    b = init_parameters(spec, 3, 2, torch.Generator().manual_seed(1))
    for (wa, ba), (wb, bb) in zip(a, b, strict=True):
        assert torch.equal(wa, wb) and torch.equal(ba, bb)
    if init == "zero":
        assert all(not w.any() for w, _ in a)
    if init == "normal":
        assert 0.2 < a[0][0].std().item() < 1.0  # N(0, 0.5^2)


def test_diagnostics_are_measured_at_eval_steps_and_match_the_analytic_sharpness() -> None:
    from study.tasks import LinearRegression
    from study.trial import DiagnosticsSpec

    task = LinearRegression(dim=5, n_train=64, n_val=32)
    trial = TrialSpec(task, ModelSpec(depth=0, activation="identity"), SGD(lr=0.1),
                      TrainSpec(batch_size=16, epochs=2, dtype="float64"), 3,
                      diagnostics=DiagnosticsSpec(sharpness=True, noise_scale=True))
    (trace,) = ReferenceEngine().run([trial], CPU)
    assert list(trace.diag_step) == list(trace.eval_step) == [0, 4, 8]
    # Linear model + MSE: the Hessian is 2/n [X 1]^T [X 1] whatever the parameters.
    x = task.generate(seed_streams(3).data).x_train
    xa = torch.cat([x, torch.ones(64, 1, dtype=torch.float64)], dim=1)
    exact = torch.linalg.eigvalsh(2 / 64 * xa.T @ xa)[-1].item()
    np.testing.assert_allclose(trace.sharpness, exact, rtol=1e-6)
    assert (trace.noise_scale > 0).all()
