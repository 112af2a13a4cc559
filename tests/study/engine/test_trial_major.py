"""The trial-major kernel (study.engine.trial_major) under the equivalence contract of
test_population.py: float64 within 1e-6 and float32 within 1e-4 of the reference engine over
whole runs, diverging trials the same status and divergence step within a few steps, and a
trial's numbers bit-identical whatever population (and however many threads) it trains in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from study import parallel
from study.engine import BatchedEngine, ReferenceEngine
from study.engine import fused as fused_module
from study.engine import population as population_module
from study.engine import population_traces as kernel_module_traces
from study.engine import trial_major as kernel_module
from study.engine.population import _Population
from study.failures import ClassImbalance
from study.models import ModelSpec
from study.optimizers import SGD, Adagrad, Adam, AdamW, RMSprop
from study.tasks import Blobs, LinearRegression, TeacherMLP
from study.trial import DiagnosticsSpec, LoopSpec, TrainSpec, TrialSpec
from tests.study.engine.test_population import TOL, assert_equivalent

CPU = torch.device("cpu")
REGRESSION = TeacherMLP(n_train=100, n_val=64, width=16)
CLASSIFICATION = Blobs(n_train=100, n_val=64)
FAMILIES = [SGD(lr=0.05), SGD(lr=0.02, momentum=0.9, weight_decay=1e-3),
            SGD(lr=0.03, momentum=0.5, dampening=0.5), SGD(lr=0.01, momentum=0.9, nesterov=True),
            Adam(lr=1e-2), Adam(lr=3e-3, betas=(0.8, 0.99), weight_decay=1e-2),
            AdamW(lr=1e-2), AdamW(lr=3e-3, weight_decay=0.1, eps=1e-6),
            Adam(lr=1e-2, amsgrad=True), AdamW(lr=3e-3, betas=(0.3, 0.9), amsgrad=True),
            RMSprop(lr=1e-3), RMSprop(lr=3e-4, alpha=0.9, weight_decay=1e-3),
            RMSprop(lr=1e-3, momentum=0.5), RMSprop(lr=1e-3, centered=True),
            RMSprop(lr=3e-4, alpha=0.3, centered=True, momentum=0.9),
            Adagrad(lr=0.05), Adagrad(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1,
                                      weight_decay=1e-3, eps=1e-6)]


def _trial(optimizer=None, task=REGRESSION, model=None, train=None, seed=0, loop=None,
           diagnostics=None) -> TrialSpec:
    return TrialSpec(task, model or ModelSpec(depth=2, width=16),
                     optimizer or SGD(lr=0.05, momentum=0.9),
                     train or TrainSpec(batch_size=32, epochs=3, dtype="float64"), seed,
                     loop=loop or LoopSpec(),
                     diagnostics=diagnostics or DiagnosticsSpec())


@pytest.fixture
def kernel_only(monkeypatch):
    """The engine under test takes the kernel: the layer-major path raises."""
    def refuse(*args, **kwargs):
        raise AssertionError("the layer-major path ran")

    monkeypatch.setattr(_Population, "__init__", refuse)


def _check(trials, first=None, on_eval=None) -> list:
    want = ReferenceEngine().run(trials, CPU, on_eval)
    got = BatchedEngine().run(trials, CPU, on_eval)
    for trial, g, w in zip(trials, got, want, strict=True):
        assert_equivalent(g, w, TOL[trial.train.dtype], first)
    return got


def test_what_fits_the_kernel() -> None:
    base = _trial()
    assert kernel_module.fits([base], CPU)
    assert kernel_module.fits([_trial(model=ModelSpec(depth=0, width=0,
                                                      activation="identity"))], CPU)
    assert kernel_module.fits([_trial(loop=LoopSpec(loss="huber", huber_delta=0.5))], CPU)
    assert kernel_module.fits([_trial(loop=LoopSpec(clip_norm=1.0))], CPU)
    assert kernel_module.fits([_trial(loop=LoopSpec(zero_grad=False))], CPU)
    assert kernel_module.fits([_trial(loop=LoopSpec(decay_layers=(0,)))], CPU)
    for loss in ("mse_onehot", "weighted_cross_entropy"):
        assert kernel_module.fits([_trial(task=CLASSIFICATION, loop=LoopSpec(loss=loss))], CPU)
    assert kernel_module.fits([_trial(spec) for spec in FAMILIES], CPU)
    refused = {
        "dropout": _trial(model=ModelSpec(depth=2, width=16, dropout=0.1)),
        "the gelu activation": _trial(model=ModelSpec(depth=2, width=16, activation="gelu")),
        "the huber training loss": _trial(task=CLASSIFICATION, loop=LoopSpec(loss="huber")),
        "the mse_onehot training loss": _trial(loop=LoopSpec(loss="mse_onehot")),
        "the bce_raw training loss": _trial(task=CLASSIFICATION, loop=LoopSpec(loss="bce_raw")),
    }
    for reason, trial in refused.items():
        assert not kernel_module.fits([trial], CPU), trial
        assert kernel_module.unfit([trial], CPU) == reason
    assert kernel_module.unfit([base], CPU) is None
    assert kernel_module.unfit([base], torch.device("cuda")) == "a cuda device"
    assert not kernel_module.fits([base], torch.device("cuda"))


@pytest.mark.parametrize("task", [REGRESSION, CLASSIFICATION], ids=["regression", "classify"])
def test_every_family_matches_the_reference(task, kernel_only) -> None:
    _check([_trial(spec, task=task, seed=i) for i, spec in enumerate(FAMILIES)])


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "identity"])
def test_every_activation_matches_the_reference(activation: str, kernel_only) -> None:
    model = ModelSpec(depth=2, width=16, activation=activation)
    trials = [_trial(SGD(lr=0.05), model=model, seed=s) for s in range(2)]
    trials += [_trial(Adam(lr=1e-2), task=CLASSIFICATION, model=model, seed=3)]
    _check(trials)


@pytest.mark.parametrize("batch_size", [1, 7, 32, 100, "full"])
def test_batch_sizes_a_partial_last_batch_and_linear_models(batch_size, kernel_only) -> None:
    train = TrainSpec(batch_size=batch_size, epochs=2, dtype="float64")
    linear = ModelSpec(depth=0, width=0, activation="identity")
    regression = LinearRegression(dim=5, out_dim=2, n_train=72, feature_scale=[1, 2, 3, 4, 0.1])
    _check([_trial(SGD(lr=0.05, momentum=0.9), train=train, seed=0),
            _trial(Adam(lr=1e-2), task=CLASSIFICATION, train=train, seed=1),
            _trial(SGD(lr=0.01), task=regression, model=linear, train=train, seed=2),
            _trial(SGD(lr=0.01), task=regression, train=train, seed=3)])


@pytest.mark.parametrize("task", [REGRESSION, CLASSIFICATION], ids=["regression", "classify"])
def test_float32_within_1e_4(task, kernel_only) -> None:
    train = TrainSpec(batch_size=16, epochs=3, dtype="float32")
    _check([_trial(SGD(lr=0.05, momentum=0.9), task=task, train=train, seed=0),
            _trial(Adam(lr=3e-3), task=task, train=train, seed=5),
            _trial(Adam(lr=3e-3, amsgrad=True), task=task, train=train, seed=6),
            _trial(RMSprop(lr=1e-3, momentum=0.5, centered=True), task=task, train=train,
                   seed=7),
            _trial(Adagrad(lr=0.05, lr_decay=0.01), task=task, train=train, seed=8)])


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_float32_activations_are_within_three_units_of_the_exact_value(activation) -> None:
    # `_activate` over 2 million float32 from -110 to 110, as a [rows, width] block (its
    # vectorised loops and their remainders), against float64.
    x = np.linspace(-110, 110, 2_000_000, dtype=np.float32).reshape(2000, 1000)
    out = np.empty_like(x)
    kernel_module._activate(x, out, kernel_module._ACTIVATIONS[activation])
    wide = x.astype(np.float64)
    exact = np.tanh(wide) if activation == "tanh" else 1 / (1 + np.exp(-wide))
    normal = np.abs(exact) >= np.finfo(np.float32).tiny
    unit = np.spacing(np.abs(exact.astype(np.float32))).astype(np.float64)
    assert (np.abs(out - exact) / unit)[normal].max() <= 3


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_float32_tanh_and_sigmoid_within_1e_4(activation: str, kernel_only) -> None:
    # float32 takes the kernel's own exp and tanh (study.engine.elementary), not the C
    # library's; the cross-entropy's exponentials too.
    train = TrainSpec(batch_size=16, epochs=3, dtype="float32")
    model = ModelSpec(depth=3, width=16, activation=activation)
    _check([_trial(SGD(lr=0.1, momentum=0.9), model=model, train=train, seed=0),
            _trial(Adam(lr=3e-3), task=CLASSIFICATION, model=model, train=train, seed=5)])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_huber_training_loss_matches_the_reference(dtype: str, kernel_only) -> None:
    """Huber's loss (the outliers mitigation): deltas small enough that some residuals are
    past them and some not, every family, and a row far past the stable rate (Huber's
    bounded gradient keeps it finite); the step loss recorded is the training objective's,
    the evaluations the task's MSE."""
    train = TrainSpec(batch_size=16, epochs=3, dtype=dtype)
    specs = [SGD(lr=0.05, momentum=0.9), Adam(lr=1e-2), AdamW(lr=3e-3, weight_decay=0.1)]
    for delta in (0.05, 1.0):
        loop = LoopSpec(loss="huber", huber_delta=delta)
        got = _check([_trial(spec, train=train, loop=loop, seed=i)
                      for i, spec in enumerate(specs)])
        # The same first outputs as with the task's MSE: Huber's value is at most half of it
        mse = BatchedEngine().run([_trial(specs[0], train=train, seed=0)], CPU)[0]
        assert got[0].val_loss[0] == mse.val_loss[0]
        assert got[0].step_loss[0] <= 0.5 * mse.step_loss[0] * (1 + 1e-6)
        assert got[0].step_loss[0] < 0.5 * mse.step_loss[0] * 0.99 or delta == 1.0
        _check([_trial(SGD(lr=1e3), train=train, loop=loop, seed=5)], first=50)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gradient_clipping_matches_the_reference(dtype: str, kernel_only) -> None:
    """clip_grad_norm_ with a threshold per row: some rows clipped every step, some never
    (a threshold above every norm), and rows far past the stable rate, whose clipped steps
    keep them finite (compared in float64: in float32 their huge losses amplify the
    products' rounding past 1e-4); the recorded gradient norm is the one before
    clipping."""
    train = TrainSpec(batch_size=16, epochs=3, dtype=dtype)
    rows = [(SGD(lr=0.05, momentum=0.9), 0.05, 0), (Adam(lr=1e-2), 0.1, 1),
            (AdamW(lr=3e-3, weight_decay=0.1), 1e6, 2), (SGD(lr=0.05, momentum=0.9), 1e6, 0)]
    got = _check([_trial(spec, train=train, seed=seed, loop=LoopSpec(clip_norm=clip))
                  for spec, clip, seed in rows])
    assert got[0].grad_norm.max() > 0.05  # recorded before clipping
    clipped, unclipped = got[0], got[3]  # the same trial but for the threshold
    assert clipped.step_loss[0] == unclipped.step_loss[0]
    assert not np.array_equal(clipped.step_loss[1:], unclipped.step_loss[1:])
    wide = TrainSpec(batch_size=16, epochs=3, dtype="float64")
    _check([_trial(SGD(lr=lr), train=wide, seed=5, loop=LoopSpec(clip_norm=0.5))
            for lr in (3.0, 1e4)], first=50)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_forgotten_zero_grad_matches_the_reference(dtype: str, kernel_only) -> None:
    """Gradients summed step after step (the loop bug): every family, with weight decay
    (added to a copy, never to the sum), with clipping (which scales the sum itself), and
    a row that diverges."""
    train = TrainSpec(batch_size=16, epochs=3, dtype=dtype)
    loop = LoopSpec(zero_grad=False)
    got = _check([_trial(SGD(lr=0.01, momentum=0.9, weight_decay=1e-2), train=train, loop=loop),
                  _trial(Adam(lr=1e-3, weight_decay=1e-2), train=train, loop=loop, seed=1),
                  _trial(AdamW(lr=1e-3, weight_decay=0.1), train=train, loop=loop, seed=2)])
    plain = BatchedEngine().run([_trial(SGD(lr=0.01, momentum=0.9, weight_decay=1e-2),
                                        train=train)], CPU)[0]
    assert got[0].step_loss[0] == plain.step_loss[0]
    assert got[0].grad_norm[5] != plain.grad_norm[5]  # the sum, not the step's gradient
    clipped = LoopSpec(zero_grad=False, clip_norm=0.2)
    _check([_trial(SGD(lr=0.01, momentum=0.9), train=train, loop=clipped, seed=s)
            for s in range(2)])
    wide = TrainSpec(batch_size=16, epochs=3, dtype="float64")  # see the clipping test
    wild = _check([_trial(SGD(lr=5.0), train=wide, loop=loop, seed=3)], first=50)
    assert wild[0].divergence_step is not None


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("layers", [(0,), (1, 2)], ids=["first", "last_two"])
def test_weight_decay_on_some_layers_matches_the_reference(layers, dtype: str,
                                                          kernel_only) -> None:
    """Weight decay on the weights of `layers` only (biases and the other layers' weights
    spared): SGD with momentum, Adam's L2 term and AdamW's decoupled factor; the spared
    weights train as with no decay at all."""
    train = TrainSpec(batch_size=16, epochs=3, dtype=dtype)
    loop = LoopSpec(decay_layers=layers)
    specs = [SGD(lr=0.05, momentum=0.9, weight_decay=0.5), Adam(lr=1e-2, weight_decay=0.5),
             AdamW(lr=1e-2, weight_decay=0.5), SGD(lr=0.05)]
    got = _check([_trial(spec, train=train, loop=loop, seed=i)
                  for i, spec in enumerate(specs)])
    everywhere = BatchedEngine().run([_trial(specs[2], train=train, seed=2)], CPU)[0]
    assert got[2].step_loss[0] == everywhere.step_loss[0]
    assert got[2].step_loss[-1] != everywhere.step_loss[-1]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mse_on_one_hot_targets_matches_the_reference(dtype: str, kernel_only) -> None:
    """The loop bug of MSE on raw logits against one-hot targets: the step loss is that
    MSE, the evaluations the task's cross-entropy and accuracy."""
    train = TrainSpec(batch_size=16, epochs=3, dtype=dtype)
    loop = LoopSpec(loss="mse_onehot")
    specs = [SGD(lr=0.1, momentum=0.9), Adam(lr=1e-2), AdamW(lr=1e-2, weight_decay=0.1)]
    got = _check([_trial(spec, task=CLASSIFICATION, train=train, loop=loop, seed=i)
                  for i, spec in enumerate(specs)])
    task = BatchedEngine().run([_trial(specs[0], task=CLASSIFICATION, train=train)], CPU)[0]
    assert got[0].val_loss[0] == task.val_loss[0] and got[0].train_acc is not None
    assert got[0].step_loss[0] != task.step_loss[0]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_weighted_cross_entropy_matches_the_reference(dtype: str, kernel_only) -> None:
    """Class weights n / (C x count) from each trial's own training labels (the class
    imbalance mitigation), on imbalanced classes, every family and a row far past the
    stable rate (its loss grows to 1e47; cross-entropy's bounded gradient keeps it
    finite)."""
    def imbalanced(spec, **kwargs) -> TrialSpec:
        trial = _trial(spec, task=CLASSIFICATION, **kwargs)
        return dataclasses.replace(trial, failures=(("class_imbalance", ClassImbalance()),))

    train = TrainSpec(batch_size=16, epochs=3, dtype=dtype)
    loop = LoopSpec(loss="weighted_cross_entropy")
    specs = [SGD(lr=0.1, momentum=0.9), Adam(lr=1e-2), AdamW(lr=1e-2, weight_decay=0.1)]
    got = _check([imbalanced(spec, train=train, loop=loop, seed=i)
                  for i, spec in enumerate(specs)])
    plain = BatchedEngine().run([imbalanced(specs[0], train=train)], CPU)[0]
    assert got[0].val_loss[0] == plain.val_loss[0]
    assert got[0].step_loss[0] != plain.step_loss[0]
    wide = TrainSpec(batch_size=16, epochs=3, dtype="float64")
    _check([imbalanced(SGD(lr=1e4), train=wide, loop=loop, seed=4)], first=50)


def test_no_shuffle_and_eval_every(kernel_only) -> None:
    train = TrainSpec(batch_size=24, epochs=2, eval_every=3, dtype="float64")
    got = _check([_trial(SGD(lr=0.05), train=train, seed=s, loop=LoopSpec(shuffle=False))
                  for s in range(2)])
    assert list(got[0].eval_step[:3]) == [0, 3, 6]


def test_diverging_trials_freeze_and_cut_as_the_reference(kernel_only) -> None:
    """lr 1e3 and 30 beside lr 1e-2, and an init so large that the first evaluation is not
    finite (divergence at step 0, before any minibatch)."""
    train = TrainSpec(batch_size=16, epochs=3, dtype="float32")
    trials = [_trial(SGD(lr=lr), train=train, seed=i % 2)
              for i, lr in enumerate([1e-2, 1e3, 1e-2, 30.0])]
    trials.append(_trial(SGD(lr=1e-2), train=train, seed=3,
                         model=ModelSpec(depth=2, width=16, init="normal", init_scale=1e30)))
    got = _check(trials, first=50)
    assert got[1].divergence_step is not None and got[4].divergence_step == 0
    assert got[0].divergence_step is None
    for g in got:
        if g.divergence_step is not None:  # the non-finite value is the last entry
            at_eval = len(g.step_loss) == g.divergence_step
            last = (g.train_loss[-1] + g.val_loss[-1]) if at_eval else g.step_loss[-1]
            assert not np.isfinite(last)
            assert np.isfinite(g.step_loss[:g.divergence_step]).all()
    assert got[0].equal(got[2])  # the same trial twice in one population: the same bits


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_product_entry_is_the_same_bits_in_any_block(dtype) -> None:
    # Rows go through blocks of 6 (`_product_tall`), of 4 and one by one, columns through
    # blocks of 2 vectors, 1 vector and one by one: every entry must be the same in-order
    # chain of fused multiply-adds wherever it falls, and as close to the exact product
    # as a sum.
    rng = np.random.default_rng(0)
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 14, 16, 22, 23):
        for inner, cols in ((10, 64), (64, 37), (7, 3), (130, 32)):
            a = rng.standard_normal((rows, inner)).astype(dtype)
            w = rng.standard_normal((inner, cols)).astype(dtype)
            b = rng.standard_normal(cols).astype(dtype)
            z = np.empty((rows, cols), dtype)
            kernel_module._product(a, w, b, z, False)
            np.testing.assert_allclose(z, b + a.astype(np.float64) @ w,
                                       rtol=1e-4 if dtype == np.float32 else 1e-12,
                                       atol=1e-4 if dtype == np.float32 else 1e-12)
            for r in range(rows):  # each row alone: the one-row loops
                alone = np.empty((1, cols), dtype)
                kernel_module._product(a[r:r + 1], w, b, alone, False)
                assert alone.tobytes() == z[r:r + 1].tobytes(), (rows, inner, cols, r)
            h = np.ascontiguousarray(a.T)  # the weight gradient's transposed view
            for product in (kernel_module._product, kernel_module._product_tall):
                zt = np.empty((rows, cols), dtype)
                product(h.T, w, b, zt, False)
                assert zt.tobytes() == z.tobytes(), (product, rows, inner, cols)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_rectified_product_is_relu_of_the_product_bit_for_bit(dtype) -> None:
    # The forward pass of a relu layer stores relu(z) as each block is done
    # (`rectify`): every entry, on every path (6-row, 4-row and one-row blocks; columns in
    # 2 vectors, 1 vector and one by one), must be `_activate`'s relu of the plain
    # product's entry: NaN kept, -0 and negatives made +0.
    rng = np.random.default_rng(3)
    for rows in (1, 3, 4, 6, 7, 10, 13, 64, 70):
        for inner, cols in ((10, 64), (64, 37), (7, 3), (20, 16)):
            a = rng.standard_normal((rows, inner)).astype(dtype)
            a[rng.random((rows, inner)) < 0.05] = np.nan
            a[0] = np.abs(rng.standard_normal(inner))  # with w[:, 0] = b[0] = -0: z = -0
            if rows > 1:
                a[-1, 0] = np.nan
            w = rng.standard_normal((inner, cols)).astype(dtype)
            w[:, 0] = -0.0
            b = rng.standard_normal(cols).astype(dtype)
            b[0] = -0.0
            for product in (kernel_module._product, kernel_module._product_tall):
                z, fused = np.empty((rows, cols), dtype), np.empty((rows, cols), dtype)
                product(a, w, b, z, False)
                product(a, w, b, fused, True)
                relu = np.empty_like(z)
                kernel_module._activate(z, relu, kernel_module._RELU)
                assert fused.tobytes() == relu.tobytes(), (product, rows, inner, cols)
                assert (np.signbit(z) & (z == 0)).any() and not np.signbit(fused).any()
                assert rows == 1 or np.isnan(fused).any()


def test_the_relu_probe_marks_a_unit_live_iff_some_row_is_above_zero_or_nan() -> None:
    # The flags are those of every row: units that come alive late, dead units (all rows
    # <= 0, -0 included) and NaN (not dead), for probes of 1 to 40 rows.
    rng = np.random.default_rng(5)
    for rows in (1, 5, 8, 9, 17, 40):
        for dead, late, positive in ((0, False, 0.9), (0, True, 0.3), (1, False, 0.9),
                                     (5, True, 0.5)):
            z = -np.abs(rng.standard_normal((rows, 24))).astype(np.float32)
            z[rng.random(z.shape) < positive] *= -1  # positive: live
            z[:, :dead] = -0.0 if dead == 1 else -1.0  # dead units
            if late:  # a unit live only from the last row, by a NaN
                z[:, 23] = -1.0
                z[-1, 23] = np.nan
            live = np.zeros(24, dtype=np.uint8)
            kernel_module._health(z, live, kernel_module._RELU, 0.0)
            expected = (~(z <= 0)).any(axis=0).astype(np.uint8)
            assert live.tolist() == expected.tolist(), (rows, dead, late)
            assert not live[:dead].any() and (live[23] or not late)


def test_a_trial_is_bit_identical_alone_in_a_crowd_and_on_one_thread(kernel_only) -> None:
    rng = np.random.default_rng(0)
    crowd = [_trial(Adam(lr=float(10 ** rng.uniform(-4, 0))), task=CLASSIFICATION,
                    seed=int(rng.integers(0, 20))) for _ in range(40)]
    me = _trial(Adam(lr=3e-3), task=CLASSIFICATION, seed=42)
    got = BatchedEngine().run(crowd[:20] + [me] + crowd[20:], CPU)[20]
    alone = BatchedEngine().run([me], CPU)[0]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = BatchedEngine().run([crowd[3], me], CPU)[1]
    finally:
        torch.set_num_threads(threads)
    assert got.equal(alone) and got.equal(one_thread)


def test_schedules_plateau_and_early_stopping_match_the_reference(kernel_only) -> None:
    train = TrainSpec(batch_size=20, epochs=6, dtype="float64")
    loops = [LoopSpec(warmup_fraction=0.2, cosine=True), LoopSpec(step_epochs=2, step_gamma=0.5),
             LoopSpec(plateau_factor=0.5, plateau_patience=0, plateau_threshold=0.5),
             LoopSpec(early_stopping_patience=1)]
    for loop in loops:
        trials = [_trial(spec, train=train, seed=i, loop=loop)
                  for i, spec in enumerate([SGD(lr=0.05, momentum=0.9), AdamW(lr=1e-2),
                                            SGD(lr=0.5), Adam(lr=1e-2, amsgrad=True),
                                            RMSprop(lr=1e-3, momentum=0.5, centered=True),
                                            Adagrad(lr=0.05, lr_decay=0.01)])]
        got = _check(trials)
        if loop.early_stopping_patience is not None:
            assert any(len(g.eval_step) < 7 for g in got)


def test_an_evaluation_hook_stops_its_rows_and_changes_no_other_number(kernel_only) -> None:
    train = TrainSpec(batch_size=20, epochs=4, dtype="float64")
    trials = [_trial(SGD(lr=0.05 * (i + 1)), train=train, seed=i) for i in range(4)]
    seen: list[tuple[int, dict]] = []

    def hook(step: int, values: dict[int, float]) -> set[int]:
        seen.append((step, dict(values)))
        return {1} if step == 10 else set()

    _check(trials, on_eval=lambda step, values: {1} if step == 10 and 1 in values else set())
    got = BatchedEngine().run(trials, CPU, hook)
    plain = BatchedEngine().run(trials, CPU)
    assert [s for s, _ in seen][:3] == [0, 5, 10]
    assert set(seen[0][1]) == {0, 1, 2, 3} and 1 not in seen[3][1]
    assert list(got[1].eval_step) == [0, 5, 10] and got[1].divergence_step is None
    for i in (0, 2, 3):
        assert got[i].equal(plain[i])


def test_diagnostics_match_the_reference_and_change_no_training_number(kernel_only) -> None:
    diagnostics = DiagnosticsSpec(sharpness=True, noise_scale=True, every=4, iterations=10)
    train = TrainSpec(batch_size=16, epochs=2, dtype="float64")
    task = TeacherMLP(n_train=48, n_val=16)
    specs = [Adam(lr=1e-2), SGD(lr=1e30), AdamW(lr=3e-3, betas=(0.8, 0.99))]
    trials = [_trial(spec, task=task, train=train, seed=s, diagnostics=diagnostics,
                     model=ModelSpec(1, 8, "tanh")) for s, spec in enumerate(specs)]
    got = _check(trials, first=50)
    assert got[1].divergence_step is not None and got[1].precond_sharpness is None
    assert np.isfinite(got[0].sharpness).all() and np.isfinite(got[0].noise_scale).all()
    plain = BatchedEngine().run([_trial(spec, task=task, train=train, seed=s,
                                        model=ModelSpec(1, 8, "tanh"))
                                 for s, spec in enumerate(specs)], CPU)
    for a, b in zip(got, plain, strict=True):
        for name in ("step_loss", "grad_norm", "val_loss", "update_norm", "update_cosine"):
            assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True), name


def test_the_kernel_and_the_layer_major_path_agree_on_the_lr_batch_shapes() -> None:
    """Both CPU paths on lr_batch's model and tasks (2 x 64 relu, float32, batch 8 and full):
    every stable trial within the float32 bound of the other path, statuses equal."""
    model = ModelSpec(depth=2, width=64)
    trials = []
    for task in (TeacherMLP(n_train=64, n_val=32), Blobs(n_train=64, n_val=32)):
        for batch in (8, "full"):
            train = TrainSpec(batch_size=batch, epochs=3, dtype="float32")
            trials += [_trial(spec, task=task, model=model, train=train, seed=s)
                       for s, spec in enumerate([SGD(lr=0.01), SGD(lr=0.01, momentum=0.9),
                                                 Adam(lr=1e-3)])]
    kernel = BatchedEngine().run(trials, CPU)
    layer = BatchedEngine(trial_major=False).run(trials, CPU)
    for a, b in zip(kernel, layer, strict=True):
        assert_equivalent(a, b, TOL["float32"])


@pytest.mark.parametrize("batch_size", ["full", 16, 64])
def test_one_call_or_one_per_evaluation_give_the_same_bits(batch_size, kernel_only) -> None:
    """Without a hook the kernel runs a population in one call, and a step after an
    evaluation takes its forward pass from the evaluation's (a whole-split step as it is,
    a smaller batch's rows gathered from it); with one (stopping nothing), one call per
    evaluation and every step's own forward pass. The same bits either way, whichever
    product computed a row (an evaluation's 100 training rows take `_product_tall`; a
    batch's first layer, 10 inputs, under 64 rows `_product`: `_product_best`)."""
    train = TrainSpec(batch_size=batch_size, epochs=4, dtype="float32")
    trials = [_trial(spec, task=task, train=train, seed=s)
              for s, (spec, task) in enumerate([(SGD(lr=0.05, momentum=0.9), REGRESSION),
                                                (Adam(lr=1e-2), CLASSIFICATION),
                                                (SGD(lr=30.0), REGRESSION)])]
    together = BatchedEngine().run(trials, CPU)
    apart = BatchedEngine().run(trials, CPU, lambda step, values: set())
    for a, b in zip(together, apart, strict=True):
        assert a.equal(b)
    assert together[2].divergence_step is not None


def test_batch_orders_drawn_window_by_window_give_the_same_bits(monkeypatch,
                                                                 kernel_only) -> None:
    """A population whose batch orders do not fit `ORDER_BYTES` runs one call per window of
    epochs, drawing each window's orders as it comes: the same orders, the same bits."""
    train = TrainSpec(batch_size=16, epochs=4, dtype="float32")
    trials = [_trial(spec, train=train, seed=s)
              for s, spec in enumerate([SGD(lr=0.05, momentum=0.9), Adam(lr=1e-2),
                                        SGD(lr=30.0)])]
    whole = BatchedEngine().run(trials, CPU)
    assert whole[2].divergence_step is not None  # a row that stops drawing its orders
    monkeypatch.setattr(kernel_module, "ORDER_BYTES", 1)  # one epoch per call
    for a, b in zip(whole, BatchedEngine().run(trials, CPU), strict=True):
        assert a.equal(b)
    # and a call per evaluation as well: calls inside a window draw nothing new
    for a, b in zip(whole, BatchedEngine().run(trials, CPU, lambda step, values: set()),
                    strict=True):
        assert a.equal(b)


def test_rows_sharing_an_order_seed_draw_its_orders_once(monkeypatch, kernel_only) -> None:
    """Rows of one order seed share its generator: the first live row of each draws a
    window's orders, the others copy them; when that row stops, the next live one draws.
    Every row gets the bits it gets alone."""
    train = TrainSpec(batch_size=16, epochs=4, dtype="float32")
    specs = [SGD(lr=30.0), SGD(lr=0.05, momentum=0.9), Adam(lr=1e-2), SGD(lr=0.02)]
    trials = [_trial(spec, train=train, seed=seed) for spec, seed in zip(specs, [0, 0, 1, 1],
                                                                          strict=True)]
    draws = []
    real = kernel_module.draw_orders
    monkeypatch.setattr(kernel_module, "draw_orders",
                        lambda generator, into: (draws.append(generator), real(generator, into)))
    monkeypatch.setattr(kernel_module, "ORDER_BYTES", 1)  # a window per epoch
    got = BatchedEngine().run(trials, CPU)
    assert got[0].divergence_step is not None  # the first row of seed 0 stops early
    assert len(draws) == 2 * 4 and len({id(g) for g in draws}) == 2  # per seed and epoch
    for trial, g in zip(trials, got, strict=True):
        assert g.equal(BatchedEngine().run([trial], CPU)[0])


def test_a_started_population_trains_while_the_caller_runs_python(kernel_only) -> None:
    """`start` returns with the kernel under way; the caller's thread runs Python (which
    holds the GIL) meanwhile; the traces are `run`'s, bit for bit, in the order given
    (rows of one optimizer type are trained together, then put back)."""
    train = TrainSpec(batch_size=8, epochs=6, dtype="float32")
    optimizers = [Adam(lr=1e-2), SGD(lr=0.05, momentum=0.9), AdamW(lr=3e-3), SGD(lr=40.0)]
    trials = [_trial(o, task=CLASSIFICATION, train=train, seed=i)
              for i, o in enumerate(optimizers * 6)]
    want = BatchedEngine().run(trials, CPU)
    pending = BatchedEngine().start(trials, CPU)
    busy = time.perf_counter() + 0.3
    while time.perf_counter() < busy:  # pure Python: never releases the GIL by itself
        sum(range(1000))
    got = pending.result()
    assert any(t.divergence_step is not None for t in got)
    for a, b in zip(want, got, strict=True):
        assert a.equal(b)


def test_a_population_with_an_evaluation_hook_trains_before_start_returns(kernel_only) -> None:
    """A hook runs between evaluations, in the caller's thread: such a population trains
    in `start` itself, as `run` trains it."""
    trials = [_trial(SGD(lr=0.05 * (i + 1)), seed=i) for i in range(3)]
    asked: list[int] = []

    def hook(step: int, values: dict[int, float]) -> set[int]:
        asked.append(step)
        return set()

    pending = BatchedEngine().start(trials, CPU, hook)
    assert asked  # every evaluation asked before start returned
    for a, b in zip(BatchedEngine().run(trials, CPU), pending.result(), strict=True):
        assert a.equal(b)


def test_cancel_stops_the_threads_after_the_trial_each_is_on(monkeypatch, kernel_only) -> None:
    """`cancel` right after `start`: the kernel's threads take no trial after it (each
    finishes the one it is on), and they have ended when it returns."""
    made: list = []

    class Seen(kernel_module_traces.TraceBuffers):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(population_module, "TraceBuffers", Seen)
    train = TrainSpec(batch_size=4, epochs=200, dtype="float64")  # about 10 ms a trial
    trials = [_trial(SGD(lr=0.01), train=train, seed=i) for i in range(64)]
    BatchedEngine().start(trials, CPU).cancel()
    trained = int(np.isfinite(made[0].steps[0, 0].numpy()).sum())
    assert trained < len(trials) // 4  # the threads may take a few before the halt
    assert not [t for t in threading.enumerate() if t.name.startswith("study-kernel")]


def test_a_thread_that_fails_stops_the_others_and_is_raised_by_wait() -> None:
    """`Running`: an exception in one thread sets the halt that every thread's loop
    checks between trials, and `wait` raises it in the caller."""
    halt = np.zeros(1, dtype=np.int64)
    taken = iter(range(1000))
    done: list[int] = []

    def work() -> None:
        for t in taken:
            if halt[0]:
                return
            if t == 5:
                raise RuntimeError("trial 5 failed")
            time.sleep(0.001)
            done.append(t)

    running = kernel_module.Running(work, 2, halt)
    with pytest.raises(RuntimeError, match="trial 5 failed"):
        running.wait()
    assert halt[0] == 1 and len(done) < 100


def test_two_calls_in_flight_share_one_thread_budget() -> None:
    """`Running`: a call started while another works waits for seats, so the process never
    has more kernel threads working than a call's budget (two populations in flight with
    2 threads each: 2 at a time, not 4); the call behind takes each seat as the call ahead
    frees it, and both finish."""
    lock, working, most, done = threading.Lock(), [0], [0], []

    def work(name: str):
        def trials() -> None:
            for _ in range(3):
                with lock:
                    working[0] += 1
                    most[0] = max(most[0], working[0])
                time.sleep(0.02)
                with lock:
                    working[0] -= 1
            done.append(name)
        return trials

    ahead = kernel_module.Running(work("ahead"), 2, np.zeros(1, dtype=np.int64))
    behind = kernel_module.Running(work("behind"), 2, np.zeros(1, dtype=np.int64))
    ahead.wait()
    behind.wait()
    assert most[0] == 2
    assert sorted(done) == ["ahead", "ahead", "behind", "behind"]
    assert behind.cpu_s >= 0 and len(behind._cpu) == 2


def test_a_call_waiting_for_seats_is_cancelled_at_once() -> None:
    """`cancel` of a call whose threads wait for seats ends them without running its work,
    however long the call ahead holds the seats."""
    release, ran = threading.Event(), []
    ahead = kernel_module.Running(release.wait, 1, np.zeros(1, dtype=np.int64))
    behind = kernel_module.Running(lambda: ran.append(1), 1, np.zeros(1, dtype=np.int64))
    timer = threading.Timer(3.0, release.set)  # the seat frees itself in 3 s at the latest
    timer.start()
    started = time.monotonic()
    behind.cancel()
    assert time.monotonic() - started < 1.0 and not ran
    release.set()
    ahead.wait()
    timer.cancel()
    assert not [t for t in threading.enumerate() if t.name.startswith("study-kernel")]


@pytest.mark.slow
def test_a_fresh_compilation_says_so_and_specialises_each_function_once(tmp_path) -> None:
    """Compiled from scratch (an empty numba cache), the kernel says once that it is
    compiling, and each kernel function is specialised once for a dtype: a literal argument
    or a stray layout would compile a callee again, seconds of every first run
    (docs/performance.md). With two cores `_evaluate`, `_backward`, `_update` and
    `_loss_grad` are compiled in forked processes and only loaded here: had
    `callee_signatures` missed their argument types, they would be compiled here too.
    Loaded from the cache, it says nothing."""
    import json
    import os
    import subprocess
    import sys

    script = """
import json, logging, torch
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
from numba.core import event
from numba.core.registry import CPUDispatcher
from study.engine import BatchedEngine
from study.engine import trial_major
from study.models import ModelSpec
from study.optimizers import SGD, Adam
from study.tasks import Blobs, TeacherMLP
from study.trial import TrainSpec, TrialSpec
compiled_here = []
class Seen(event.Listener):
    def on_start(self, ev):
        function = ev.data["dispatcher"].py_func
        if function.__module__.startswith("study."):
            compiled_here.append(function.__name__)
    def on_end(self, ev):
        pass
event.register("numba:compile", Seen())
train = TrainSpec(batch_size=32, epochs=1, dtype="float64")
for task in (Blobs(n_train=64, n_val=64), TeacherMLP(n_train=64, n_val=64, width=8)):
    for optimizers in ((SGD(lr=0.1),), (SGD(lr=0.1), Adam(lr=1e-2))):
        BatchedEngine().run([TrialSpec(task, ModelSpec(depth=2, width=16), o, train, 0)
                             for o in optimizers], torch.device("cpu"))
own = trial_major.__name__
print(json.dumps({"here": compiled_here,
                  "signatures": {n: len(d.signatures) for n, d in vars(trial_major).items()
                                 if isinstance(d, CPUDispatcher)
                                 and d.py_func.__module__ == own}}))
"""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    notice = ("study.engine.trial_major: compiling the CPU kernel for float64 (first use on "
              "this machine or of this version: about 20-30 s, then cached on disk)")
    runs = []
    for fresh in (True, False):
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        said = [line for line in done.stderr.splitlines() if "compiling" in line]
        assert said == ([notice] if fresh else [])
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    compiled, loaded = runs
    here, counts = compiled["here"], compiled["signatures"]
    ahead = {"_evaluate", "_forward", "_backward", "_update", "_loss_grad"}
    twice = {n: here.count(n) for n in set(here) if here.count(n) > 1}
    # the kernel compiles once: `_segment` inlined into `_rows`, not compiled apart
    assert here.count("_rows") == 1 and "_segment" not in here
    if parallel.workers_available() >= 2:
        # compiled in the children, loaded here; their own callees never reach this process
        assert not (ahead | {"_product"}) & set(here)
        assert all(counts[n] == 1 for n in ahead)
        assert twice == {} and {n: c for n, c in counts.items() if c > 1} == {}
    else:  # all here, in turn; the products once per layout of `a` (C: a batch; F: the
        # transposed view h^T of a weight gradient; A: the rows of that view `_product_tall`
        # leaves to `_product`) and per `rectify` (True: a relu layer's forward pass, C only)
        products = {"_product": 4, "_product_tall": 3}
        assert twice == products
        assert {n: c for n, c in counts.items() if c > 1} == products
    assert loaded["here"] == []
    counts = loaded["signatures"]
    assert counts["_rows"] == 1 and counts["_forward"] == 0  # the cache holds the rest


@pytest.mark.parametrize("module", [fused_module, kernel_module], ids=["fused", "trial_major"])
def test_the_cached_kernels_name_the_digest_of_what_they_inline(module) -> None:
    """numba's disk cache of a function is keyed by its own file alone: a change to a file
    whose functions it inlines must change that file too (`INLINED_DIGEST`), or a stale
    kernel would be loaded. fused.py comes before trial_major.py (whose digest covers it)."""
    here = Path(module.__file__).parent
    digest = hashlib.sha256(b"".join((here / name).read_bytes().replace(b"\r\n", b"\n")
                                     for name in module.INLINED)).hexdigest()
    assert digest == module.INLINED_DIGEST, (
        f"{module.__name__}.INLINED_DIGEST is stale: set it to \"{digest}\"")
