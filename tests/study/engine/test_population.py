"""The batched engine reproduces the reference engine trial by trial (the equivalence contract).

float64: max relative difference <= 1e-6; float32: <= 1e-4, over the whole run for trials that
converge. Trials past the stability limit: the first 50 steps within the same bound, the same
status, and the divergence step within a few steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from study.engine import BatchedEngine, ReferenceEngine, make_engine
from study.engine.base import Trace
from study.engine.population import _Population
from study.models import ACTIVATIONS, ModelSpec
from study.optimizers import SGD, Adagrad, Adam, AdamW, RMSprop
from study.tasks import Blobs, LinearRegression, Spirals, TeacherMLP
from study.trial import DiagnosticsSpec, TrainSpec, TrialSpec

CPU = torch.device("cpu")
TOL = {"float64": 1e-6, "float32": 1e-4}
REGRESSION = TeacherMLP(n_train=100, n_val=64, width=16)
CLASSIFICATION = Blobs(n_train=100, n_val=64)


def _trial(optimizer=None, task=REGRESSION, model=None, train=None, seed=0) -> TrialSpec:
    return TrialSpec(task, model or ModelSpec(depth=2, width=16),
                     optimizer or SGD(lr=0.05, momentum=0.9),
                     train or TrainSpec(batch_size=32, epochs=3, dtype="float64"), seed)


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def assert_equivalent(got: Trace, want: Trace, tol: float, first: int | None = None) -> None:
    """Same structure; loss, grad-norm and eval traces within `tol` (the first `first`
    steps only for trials past the stability limit, whose divergence step may move a little)."""
    assert got.planned_steps == want.planned_steps
    assert got.irreducible_loss == want.irreducible_loss
    assert (got.train_acc is None) == (want.train_acc is None)
    if first is None:
        assert got.divergence_step == want.divergence_step
        assert np.array_equal(got.eval_step, want.eval_step)
        n, n_eval = len(want.step_loss), len(want.eval_step)
        assert len(got.step_loss) == len(got.grad_norm) == n
    else:
        assert (got.divergence_step is None) == (want.divergence_step is None)
        if want.divergence_step is not None:
            assert abs(got.divergence_step - want.divergence_step) <= 3
        n = min(first, len(got.step_loss), len(want.step_loss))
        n_eval = int(np.searchsorted(want.eval_step, n, side="right"))
        n_eval = min(n_eval, len(got.eval_step))
    for name in ("step_loss", "grad_norm"):
        a, b = getattr(got, name)[:n], getattr(want, name)[:n]
        finite = np.isfinite(b)
        assert np.array_equal(np.isfinite(a), finite), name
        assert _max_rel(a[finite], b[finite]) <= tol, (name, _max_rel(a[finite], b[finite]))
    for name in ("train_loss", "val_loss"):
        a, b = getattr(got, name)[:n_eval], getattr(want, name)[:n_eval]
        finite = np.isfinite(b)
        assert np.array_equal(np.isfinite(a), finite), name
        assert _max_rel(a[finite], b[finite]) <= tol, (name, _max_rel(a[finite], b[finite]))
    n_upd = min(n, len(want.param_norm))
    for name in ("grad_norm_first", "grad_norm_last", "param_norm", "update_norm"):
        a, b = getattr(got, name), getattr(want, name)
        assert len(a) == len(b) if first is None else len(a) >= n_upd, name
        a, b = a[:n_upd], b[:n_upd]
        finite = np.isfinite(b)
        assert np.array_equal(np.isfinite(a), finite), name
        assert _max_rel(a[finite], b[finite]) <= tol, (name, _max_rel(a[finite], b[finite]))
    a, b = got.update_cosine[:n_upd], want.update_cosine[:n_upd]  # in [-1, 1]: absolute
    assert np.array_equal(np.isnan(a), np.isnan(b))
    assert np.nanmax(np.abs(a - b), initial=0.0) <= 10 * tol
    # Activation health where the evaluation is finite: at the evaluation that finds a trial
    # diverged its activations hold inf, and inf - inf is NaN or not by summation order.
    healthy = np.isfinite(want.train_loss[:n_eval]) & np.isfinite(want.val_loss[:n_eval])
    for name in ("dead_fraction", "saturation_fraction"):
        a, b = getattr(got, name)[:n_eval][healthy], getattr(want, name)[:n_eval][healthy]
        assert np.array_equal(np.isnan(a), np.isnan(b)), name
        assert np.nanmax(np.abs(a - b), initial=0.0) <= 0.01, name
    assert (got.diag_step is None) == (want.diag_step is None)
    if want.diag_step is not None:
        assert np.array_equal(got.diag_step, want.diag_step)
        assert (got.precond_sharpness is None) == (want.precond_sharpness is None)
        for name in ("sharpness", "noise_scale", "precond_sharpness"):
            a, b = getattr(got, name), getattr(want, name)
            if b is None:
                continue
            assert np.array_equal(np.isnan(a), np.isnan(b)), name
            finite = np.isfinite(b)
            assert _max_rel(a[finite], b[finite]) <= tol, (name, _max_rel(a[finite], b[finite]))
    if want.train_acc is not None:
        for name in ("train_acc", "val_acc"):
            a, b = getattr(got, name)[:n_eval], getattr(want, name)[:n_eval]
            # an exact tie in argmax may fall either way: at most one example apart
            assert np.max(np.abs(a - b), initial=0.0) <= 1 / 64 + 1e-12, name


def _check(trials: list[TrialSpec], first: int | None = None,
           engine: BatchedEngine | None = None) -> list[Trace]:
    want = ReferenceEngine().run(trials, CPU)
    got = (engine or BatchedEngine()).run(trials, CPU)
    for trial, g, w in zip(trials, got, want, strict=True):
        assert_equivalent(g, w, TOL[trial.train.dtype], first)
    return got


OPTIMIZERS = {
    "sgd": [SGD(lr=0.05), SGD(lr=0.02, momentum=0.9, weight_decay=1e-3),
            SGD(lr=0.03, momentum=0.5, dampening=0.5), SGD(lr=0.01, momentum=0.9, nesterov=True)],
    "adam": [Adam(lr=1e-2), Adam(lr=3e-3, betas=(0.8, 0.99), weight_decay=1e-2),
             Adam(lr=1e-2, amsgrad=True)],
    "adamw": [AdamW(lr=1e-2), AdamW(lr=3e-3, weight_decay=0.1, eps=1e-6)],
    "rmsprop": [RMSprop(lr=1e-3), RMSprop(lr=1e-3, centered=True, momentum=0.5),
                RMSprop(lr=3e-4, alpha=0.9, weight_decay=1e-3)],
    "adagrad": [Adagrad(lr=0.05), Adagrad(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1)],
}


PATHS = {"trial_major": {}, "fused": {"trial_major": False}, "eager": {"fused": False}}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("task", [REGRESSION, CLASSIFICATION], ids=["regression", "classify"])
@pytest.mark.parametrize("family", sorted(OPTIMIZERS))
def test_every_optimizer_family_matches_the_reference(family: str, task, path: str) -> None:
    """Every CPU path: the trial-major kernel, the layer-major fused update and the eager
    optimizers."""
    trials = [_trial(opt, task=task, seed=i) for i, opt in enumerate(OPTIMIZERS[family])]
    _check(trials, engine=BatchedEngine(**PATHS[path]))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation_and_init_matches_the_reference(activation: str) -> None:
    inits = [("default", 1.0), ("xavier", 0.5), ("he", 1.0), ("normal", 0.3), ("zero", 1.0)]
    trials = [_trial(SGD(lr=0.1, momentum=0.5), model=ModelSpec(2, 16, activation, init, scale),
                     seed=i) for i, (init, scale) in enumerate(inits)]
    _check(trials)


@pytest.mark.parametrize("batch_size", [1, 32, 100, "full", 500])
def test_batch_sizes_including_full_and_a_partial_last_batch(batch_size) -> None:
    train = TrainSpec(batch_size=batch_size, epochs=2, dtype="float64")
    trials = [_trial(Adam(lr=lr), task=CLASSIFICATION, train=train, seed=s)
              for lr, s in [(1e-2, 0), (3e-3, 1)]]
    got = _check(trials)
    steps = {1: 100, 32: 4, 100: 1, "full": 1, 500: 1}[batch_size]
    assert got[0].planned_steps == 2 * steps


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
@pytest.mark.parametrize("eval_every", [None, 3])
def test_full_batch_shares_the_evaluation_forward_and_matches_the_reference(
        eval_every, activation: str, dtype: str, monkeypatch) -> None:
    """A full batch trains on the split as stored, and each step after an evaluation reuses
    that evaluation's forward pass: one forward per step in all, within the contract of
    the reference's shuffled batches, diverging rows included."""
    train = TrainSpec(batch_size="full", epochs=12, eval_every=eval_every, dtype=dtype)
    model = ModelSpec(2, 16, activation)
    specs = [SGD(lr=0.05, momentum=0.9), Adam(lr=1e-2), RMSprop(lr=1e-3)]
    trials = [_trial(opt, task=task, model=model, train=train, seed=s)
              for s, opt in enumerate(specs) for task in (REGRESSION, CLASSIFICATION)]
    # A row that diverges (tanh's bounded units grow chaotic instead, where any rounding
    # difference is amplified, so it has none).
    diverging = activation != "tanh"
    if diverging:
        trials.append(_trial(SGD(lr=3.0), model=model, train=train, seed=3))
    own: dict[_Population, list[bool]] = {}  # per layer-major population and step: own forward?
    original = _Population.train_step

    def counted(self, step, xb, yb):
        own.setdefault(self, []).append(self.shared is None)
        return original(self, step, xb, yb)

    monkeypatch.setattr(_Population, "train_step", counted)
    want = ReferenceEngine().run(trials, CPU)
    got = BatchedEngine().run(trials, CPU)
    for trial, g, w in zip(trials, got, want, strict=True):
        converges = trial.optimizer.lr < 1
        assert_equivalent(g, w, TOL[dtype], None if converges else 50)
        assert (g.divergence_step is None) == converges
    # A step runs its own forward when no evaluation came just before it, or when the
    # diverged row was dropped in between (its forward was the evaluation's). A task's
    # rows train layer-major where the kernel has no such activation (gelu).
    after_eval = sum(s in set(train.eval_steps(100)) for s in range(12))
    assert len(own) == (2 if activation == "gelu" else 0)
    for steps in own.values():
        assert len(steps) == 12
        assert steps.count(False) >= after_eval - 1 > 0
        assert steps.count(True) <= 12 - after_eval + 1


@pytest.mark.parametrize("task", [REGRESSION, CLASSIFICATION], ids=["regression", "classify"])
def test_float32_within_1e_4(task) -> None:
    train = TrainSpec(batch_size=16, epochs=3, dtype="float32")
    trials = [_trial(opt, task=task, train=train, seed=s)
              for s, opt in enumerate([SGD(lr=0.05, momentum=0.9), Adam(lr=3e-3)][:1])]
    trials += [_trial(Adam(lr=3e-3), task=task, train=train, seed=5)]
    _check(trials)


def test_other_tasks_linear_models_and_eval_every() -> None:
    train = TrainSpec(batch_size=24, epochs=2, eval_every=3, dtype="float64")
    linear = ModelSpec(depth=0, width=0, activation="identity")
    tasks = [LinearRegression(dim=5, out_dim=2, n_train=72, feature_scale=[1, 2, 3, 4, 0.1]),
             Spirals(n_train=72, n_val=40)]
    for task in tasks:
        for model in (linear, ModelSpec(depth=1, width=8, activation="tanh")):
            trials = [_trial(SGD(lr=0.05), task=task, model=model, train=train, seed=s)
                      for s in range(2)]
            got = _check(trials)
            assert list(got[0].eval_step) == [0, 3, 6]


def test_a_diverging_trial_is_frozen_and_cut_without_touching_the_others() -> None:
    """lr 1e3 next to lr 1e-2: the big step diverges, its neighbours do not notice."""
    train = TrainSpec(batch_size=16, epochs=3, dtype="float32")
    lrs = [1e-2, 1e3, 1e-2, 30.0, 1e-2]
    trials = [_trial(SGD(lr=lr), train=train, seed=i % 2) for i, lr in enumerate(lrs)]
    trials.append(_trial(SGD(lr=1e-2), train=train, seed=3,
                         model=ModelSpec(depth=2, width=16, init="normal", init_scale=1e30)))
    want = ReferenceEngine().run(trials, CPU)
    layer_major = BatchedEngine(trial_major=False)  # the kernel's own: test_trial_major.py
    got = layer_major.run(trials, CPU)
    alone = layer_major.run([trials[0]], CPU)[0]
    assert want[1].divergence_step is not None and want[5].divergence_step == 0
    for g, w in zip(got, want, strict=True):
        assert_equivalent(g, w, TOL["float32"], first=50)
        if g.divergence_step is not None:  # the non-finite value is the last entry
            at_eval = len(g.step_loss) == g.divergence_step
            last = (g.train_loss[-1] + g.val_loss[-1]) if at_eval else g.step_loss[-1]
            assert not np.isfinite(last)
            assert np.isfinite(g.step_loss[:g.divergence_step]).all()
    assert want[0].divergence_step is None
    assert got[0].equal(alone)
    assert got[0].equal(got[2])  # the same trial twice in one population: the same bits
    assert not got[0].equal(got[4 - 3])


def test_compaction_of_diverged_rows_changes_nothing() -> None:
    train = TrainSpec(batch_size=8, epochs=2, dtype="float64")
    lrs = [1e-2, 1e3, 3e2, 1e-2, 1e2, 1e3, 1e-2, 1e4]
    trials = [_trial(SGD(lr=lr, momentum=0.9), train=train, seed=i) for i, lr in enumerate(lrs)]
    often = BatchedEngine(check_every=1, compact_below=1.0, trial_major=False)
    never = BatchedEngine(check_every=10**9, trial_major=False)
    got = _check(trials, first=50, engine=often)
    for g, n in zip(got, never.run(trials, CPU), strict=True):
        assert g.equal(n)


def test_rows_sharing_a_seed_share_its_draws_also_after_compaction(monkeypatch) -> None:
    """Trials of one model and init seed get one initialisation draw, and trials of one
    order seed one batch order per epoch, drawn once for them all. Each row's numbers are
    those it gets alone, also after compaction drops every row of a seed (and its
    generator)."""
    from study.engine import population as population_module

    train = TrainSpec(batch_size=8, epochs=3, dtype="float64")
    lrs_seeds = [(1e3, 0), (1e-2, 1), (2e3, 0), (3e-2, 1), (5e-2, 2), (1e-2, 2)]
    trials = [_trial(SGD(lr=lr, momentum=0.9), train=train, seed=seed)
              for lr, seed in lrs_seeds]
    draws = []
    real = population_module.init_parameters
    monkeypatch.setattr(population_module, "init_parameters",
                        lambda *args: (draws.append(args[-1]), real(*args))[1])
    engine = BatchedEngine(check_every=1, compact_below=1.0, trial_major=False)
    got = engine.run(trials, CPU)
    assert len(draws) == 3  # one per init seed
    assert [g.divergence_step is not None for g in got] == [True, False, True] + [False] * 3
    for trial, g in zip(trials, got, strict=True):
        assert g.equal(engine.run([trial], CPU)[0])


def test_rows_sharing_a_seed_share_its_dropout_masks_also_after_compaction(monkeypatch
                                                                           ) -> None:
    """Trials of one seed draw the same dropout masks: one draw per seed, layer and step,
    each row taking its seed's; every row's numbers are those it gets alone, also after
    compaction drops every row of a seed."""
    from study.engine import population_loop

    train = TrainSpec(batch_size=16, epochs=2, dtype="float64")
    model = ModelSpec(depth=2, width=16, dropout=0.25)
    lrs_seeds = [(1e3, 0), (1e-2, 1), (2e3, 0), (3e-2, 1), (5e-2, 2), (1e-2, 2)]
    trials = [_trial(SGD(lr=lr, momentum=0.9), model=model, train=train, seed=seed)
              for lr, seed in lrs_seeds]
    draws = []
    real = population_loop.dropout_mask
    monkeypatch.setattr(population_loop, "dropout_mask",
                        lambda *args: (draws.append(args[2]), real(*args))[1])
    engine = BatchedEngine(check_every=1, compact_below=1.0)
    got = engine.run(trials, CPU)
    assert [g.divergence_step is not None for g in got] == [True, False, True] + [False] * 3
    assert len({id(g) for g in draws}) == 3  # one generator per seed
    steps = train.total_steps(REGRESSION.n_train)
    assert len(draws) <= 3 * 2 * steps  # per seed, hidden layer and step, not per row
    for trial, g in zip(trials, got, strict=True):
        assert g.equal(engine.run([trial], CPU)[0])
    want = ReferenceEngine().run(trials[1:2], CPU)[0]
    assert_equivalent(got[1], want, TOL["float64"])


def test_the_cpu_all_alive_shortcut_changes_no_bit(monkeypatch) -> None:
    """While every row is alive the CPU skips the frozen-row masking (`mark_diverged`
    returns None); masking on every step instead must give the same bits, before and after
    some trials diverge, for every optimizer family sharing the population."""
    train = TrainSpec(batch_size=8, epochs=2, dtype="float32")
    specs = [SGD(lr=1e-2, momentum=0.9), SGD(lr=1e3, momentum=0.9), SGD(lr=1e6), Adam(lr=1e-2),
             Adam(lr=3e-3, weight_decay=0.1), RMSprop(lr=1e-2), Adagrad(lr=0.1)]
    trials = [_trial(spec, task=CLASSIFICATION, train=train, seed=i)
              for i, spec in enumerate(specs)]
    layer_major = BatchedEngine(trial_major=False)
    shortcut = layer_major.run(trials, CPU)
    diverged = [t.divergence_step for t in shortcut]
    assert diverged[1] is not None and diverged[2] is not None and diverged[0] is None

    def always_mask(self, values):
        self.alive &= torch.isfinite(values).all(dim=0)
        return self.alive

    monkeypatch.setattr(_Population, "mark_diverged", always_mask)
    for fast, masked in zip(shortcut, layer_major.run(trials, CPU), strict=True):
        assert fast.equal(masked)


def test_a_population_where_every_trial_diverges_stops_early() -> None:
    train = TrainSpec(batch_size=8, epochs=3, dtype="float32")
    trials = [_trial(SGD(lr=lr), train=train, seed=i) for i, lr in enumerate([1e4, 1e5])]
    got = _check(trials, first=50, engine=BatchedEngine(check_every=4, trial_major=False))
    assert all(t.divergence_step is not None for t in got)


@pytest.mark.parametrize("trial_major", [True, False], ids=["trial_major", "layer_major"])
def test_a_trial_alone_equals_the_same_trial_in_a_population_of_64(trial_major: bool) -> None:
    """Bit-identical on the CPU, on either path: the rows never interact and every kernel is
    per row."""
    rng = np.random.default_rng(0)
    crowd = [_trial(Adam(lr=float(10 ** rng.uniform(-4, 0))), task=CLASSIFICATION,
                    seed=int(rng.integers(0, 20))) for _ in range(63)]
    me = _trial(Adam(lr=3e-3), task=CLASSIFICATION, seed=42)
    population = crowd[:20] + [me] + crowd[20:]
    engine = BatchedEngine(trial_major=trial_major)
    got = engine.run(population, CPU)[20]
    alone = engine.run([me], CPU)[0]
    assert got.equal(alone)
    assert_equivalent(alone, ReferenceEngine().run([me], CPU)[0], TOL["float64"])


def test_mixed_structures_are_split_and_returned_in_order() -> None:
    trials = [_trial(SGD(lr=0.05), seed=0), _trial(Adam(lr=1e-2), seed=1),
              _trial(SGD(lr=0.02), task=CLASSIFICATION, seed=2), _trial(Adam(lr=3e-3), seed=3)]
    got = _check(trials)
    assert got[2].train_acc is not None and got[0].train_acc is None
    assert make_engine("batched").name == "batched"


def test_opt_in_diagnostics_match_the_reference() -> None:
    diagnostics = DiagnosticsSpec(sharpness=True, noise_scale=True, every=3, iterations=8,
                                  max_examples=32)
    train = TrainSpec(batch_size=16, epochs=2, dtype="float64")
    trials = [TrialSpec(TeacherMLP(n_train=48, n_val=16), ModelSpec(1, 8, "tanh"), SGD(lr=lr),
                        train, seed, diagnostics=diagnostics)
              for lr, seed in [(0.1, 0), (0.03, 1), (1e4, 2)]]
    got = _check(trials, first=50)
    assert list(got[0].diag_step) == [0, 3, 6]
    assert all(t.precond_sharpness is None for t in got)  # SGD: no preconditioner


@pytest.mark.parametrize("path", sorted(PATHS))
def test_preconditioned_sharpness_matches_the_reference_and_changes_no_training_number(
        path: str) -> None:
    """Every adaptive family (and SGD beside them) in one population: the preconditioned
    sharpness within the float64 bound of the reference's (NaN at step 0, None for SGD and
    without sharpness), and training numbers bit-identical to a run without diagnostics."""
    diagnostics = DiagnosticsSpec(sharpness=True, every=4, iterations=10)
    train = TrainSpec(batch_size=16, epochs=2, dtype="float64")
    specs = [Adam(lr=1e-2), SGD(lr=1e30), AdamW(lr=3e-3, amsgrad=True), Adam(lr=1e3),
             RMSprop(lr=1e-3), RMSprop(lr=1e-3, centered=True, momentum=0.5),
             Adagrad(lr=0.05, lr_decay=0.01)]
    task = TeacherMLP(n_train=48, n_val=16)
    trials = [TrialSpec(task, ModelSpec(1, 8, "tanh"), spec, train, seed,
                        diagnostics=diagnostics) for seed, spec in enumerate(specs)]
    engine = BatchedEngine(**PATHS[path])
    got = _check(trials, first=50, engine=engine)
    for spec, trace in zip(specs, got, strict=True):
        if isinstance(spec, SGD):
            assert trace.precond_sharpness is None
            continue
        assert np.isnan(trace.precond_sharpness[0])
        assert len(trace.precond_sharpness) == len(trace.diag_step)
        if trace.divergence_step is None:
            assert np.isfinite(trace.precond_sharpness[1:]).all()
    assert got[1].divergence_step is not None  # a diverging row beside them
    plain = engine.run([TrialSpec(task, ModelSpec(1, 8, "tanh"), spec, train, seed)
                        for seed, spec in enumerate(specs)], CPU)
    for a, b in zip(got, plain, strict=True):
        assert b.precond_sharpness is None and b.diag_step is None
        for name in ("step_loss", "grad_norm", "val_loss", "update_norm"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_the_cpu_reference() -> None:
    trials = [_trial(opt, task=task, seed=i) for i, opt in enumerate(
        [SGD(lr=0.05, momentum=0.9), Adam(lr=1e-2), RMSprop(lr=1e-3, centered=True)])
        for task in (REGRESSION, CLASSIFICATION)]
    want = ReferenceEngine().run(trials, CPU)
    got = BatchedEngine().run(trials, torch.device("cuda"))
    for g, w in zip(got, want, strict=True):
        assert_equivalent(g, w, TOL["float64"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("task", [REGRESSION, CLASSIFICATION], ids=["regression", "classify"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cuda_every_family_with_diverging_rows_matches_the_reference(task, dtype: str,
                                                                     device: str) -> None:
    """On the GPU the batched engine (eager update, device-side freezing, compaction) against
    the reference engine on the CPU and on the GPU: every optimizer family, a last partial
    batch, rows that diverge at different steps.

    The rows far past the stability limit (lr 1e2-1e6) run in float64 only: each of their
    steps multiplies a difference by about lr * curvature, so float32's rounding (cuBLAS and
    MKL sum in different orders) is 1e-4 apart within two steps while their loss is 1e10
    and still finite. In float64 the same amplification stays far inside 1e-6 over 50 steps.
    """
    cuda = torch.device("cuda")
    train = TrainSpec(batch_size=24, epochs=3, dtype=dtype)
    specs = [s for family in sorted(OPTIMIZERS) for s in OPTIMIZERS[family]]
    if dtype == "float64":
        specs += [SGD(lr=1e3, momentum=0.9), Adam(lr=1e3), RMSprop(lr=1e2), SGD(lr=1e6)]
    trials = [_trial(spec, task=task, train=train, seed=i) for i, spec in enumerate(specs)]
    trials.append(_trial(SGD(lr=1e-2), task=task, train=train, seed=3,  # diverges at once
                         model=ModelSpec(depth=2, width=16, init="normal", init_scale=1e30)))
    want = ReferenceEngine().run(trials, torch.device(device))
    got = BatchedEngine(check_every=2).run(trials, cuda)
    assert want[-1].divergence_step <= 2
    for g, w in zip(got, want, strict=True):
        converged = w.divergence_step is None and g.divergence_step is None
        assert_equivalent(g, w, TOL[dtype], None if converged else 50)
    alone = BatchedEngine().run([trials[3]], cuda)[0]
    assert_equivalent(alone, got[3], TOL[dtype])


def test_optimizer_families_sharing_a_population_each_match_the_reference() -> None:
    """SGD, Adam, RMSprop and Adagrad rows interleaved in the input, in one population,
    with diverging rows in several families, compacted often: each row is its own
    family's run, bit-identical to training its family alone."""
    train = TrainSpec(batch_size=8, epochs=2, dtype="float64")
    specs = [Adam(lr=1e-2), SGD(lr=0.05, momentum=0.9), RMSprop(lr=1e-2), SGD(lr=1e3),
             Adam(lr=1e3), Adagrad(lr=0.1), SGD(lr=0.02), Adam(lr=3e-3), RMSprop(lr=1e2)]
    trials = [_trial(spec, train=train, seed=i) for i, spec in enumerate(specs)]
    eager = {"fused": False}  # the eager MixedOptimizer (SGD and Adam would fuse)
    got = _check(trials, first=50, engine=BatchedEngine(check_every=1, compact_below=1.0,
                                                        **eager))
    assert any(t.divergence_step is not None for t in got)
    for family in (SGD, Adam, RMSprop, Adagrad):
        index = [i for i, s in enumerate(specs) if type(s) is family]
        alone = BatchedEngine(**eager).run([trials[i] for i in index], CPU)
        for i, trace in zip(index, alone, strict=True):
            assert got[i].equal(trace), (family.__name__, i)


@pytest.mark.parametrize("trial_major", [True, False], ids=["trial_major", "layer_major"])
def test_a_trial_alone_equals_itself_beside_every_optimizer_family(trial_major: bool) -> None:
    """The default engine on a grid that crosses optimizers: SGD, Adam, AdamW, amsgrad,
    RMSprop and Adagrad rows in one population, each row bit-identical to itself alone."""
    train = TrainSpec(batch_size=8, epochs=2, dtype="float32")
    specs = [Adam(lr=1e-2), RMSprop(lr=1e-2), SGD(lr=0.05, momentum=0.9),
             Adagrad(lr=0.1), AdamW(lr=3e-3, weight_decay=0.1), Adam(lr=1e-2, amsgrad=True),
             SGD(lr=1e3)]
    trials = [_trial(spec, train=train, seed=i) for i, spec in enumerate(specs)]
    engine = BatchedEngine(trial_major=trial_major)
    together = engine.run(trials, CPU)
    for i, trial in enumerate(trials):
        assert together[i].equal(engine.run([trial], CPU)[0]), type(specs[i]).__name__
    assert together[-1].divergence_step is not None


def test_a_population_draws_each_dataset_once_even_past_the_cache_size(monkeypatch) -> None:
    """A population with more distinct data seeds than the dataset cache holds generates
    each draw once (asking the cache per trial regenerated them: 30x slower set-up for
    populations of thousands of trials)."""
    from study.engine import population_data

    calls = []
    real = population_data.trial_dataset

    def counted(trial, seed):
        calls.append(seed)
        return real(trial, seed)

    monkeypatch.setattr(population_data, "trial_dataset", counted)
    train = TrainSpec(batch_size="full", epochs=1, dtype="float32")
    task = TeacherMLP(n_train=16, n_val=8, width=4)
    trials = [_trial(SGD(lr=lr), task=task, train=train, seed=s,
                     model=ModelSpec(depth=1, width=4)) for lr in (0.1, 0.01) for s in range(6)]
    engine = BatchedEngine()
    engine.datasets.size = 2  # fewer than the 6 distinct draws
    got = engine.run(trials, CPU)
    assert len(calls) == len(set(calls)) == 6
    assert all(t.divergence_step is None for t in got)
