"""The fused CPU update against the eager optimizers it replaces (study/engine/fused.py).

The eager path is bit-equal to torch.optim (test_batched_optimizers.py) and to the reference
engine (test_population.py); the fused kernel rounds each operation on its own where torch
may fuse a multiply-add, so here the two engines agree to a few units in the last place:
1e-10 relative in float64 and 1e-5 in float32 over whole converging runs, with the same
divergence steps.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from study.engine import BatchedEngine
from study.engine.base import Trace
from study.engine.fused import FusedUpdate, fusable
from study.models import ModelSpec
from study.optimizers import SGD, Adagrad, Adam, AdamW, RMSprop
from study.tasks import Blobs, TeacherMLP
from study.trial import LoopSpec, TrainSpec, TrialSpec

CPU = torch.device("cpu")
FIELDS = ("step_loss", "grad_norm", "grad_norm_first", "grad_norm_last", "param_norm",
          "update_norm", "update_cosine", "train_loss", "val_loss")
SPECS = [SGD(lr=0.05), SGD(lr=0.02, momentum=0.9, weight_decay=1e-3),
         SGD(lr=0.03, momentum=0.5, dampening=0.5), SGD(lr=0.01, momentum=0.9, nesterov=True),
         SGD(lr=1e5, momentum=0.9),  # diverges
         Adam(lr=1e-2), Adam(lr=3e-3, betas=(0.8, 0.99), weight_decay=1e-2),
         Adam(lr=1e-2, betas=(0.3, 0.999)),  # 1 - beta1 >= 0.5: lerp's second branch
         AdamW(lr=1e-2), AdamW(lr=3e-3, weight_decay=0.1, eps=1e-6),
         Adam(lr=1e-2, amsgrad=True), AdamW(lr=3e-3, betas=(0.3, 0.9), amsgrad=True),
         RMSprop(lr=1e-3), RMSprop(lr=3e-4, alpha=0.9, weight_decay=1e-3),
         RMSprop(lr=1e-3, momentum=0.5), RMSprop(lr=1e-3, centered=True),
         RMSprop(lr=3e-4, alpha=0.3, centered=True, momentum=0.9),  # 1 - alpha >= 0.5
         Adagrad(lr=0.05), Adagrad(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1,
                                   weight_decay=1e-3, eps=1e-6),
         SGD(lr=1e3, momentum=0.9), SGD(lr=1e6)]  # the last two diverge


def _trials(dtype: str, task=None, loop: LoopSpec | None = None, depth: int = 2
            ) -> list[TrialSpec]:
    task = task or TeacherMLP(n_train=100, n_val=64, width=16)
    train = TrainSpec(batch_size=16, epochs=3, dtype=dtype)
    return [TrialSpec(task, ModelSpec(depth=depth, width=16), spec, train, seed=i,
                      loop=loop or LoopSpec()) for i, spec in enumerate(SPECS)]


def _close(fused: Trace, eager: Trace, rtol: float) -> None:
    assert fused.divergence_step == eager.divergence_step
    for name in FIELDS:
        a, b = getattr(fused, name), getattr(eager, name)
        assert a.shape == b.shape, name
        n = len(a) if eager.divergence_step is None else min(len(a), 40)  # past the limit:
        a, b = a[:n], b[:n]  # rounding differences grow, compare the start
        assert np.array_equal(np.isfinite(a), np.isfinite(b)), name
        ok = np.isfinite(b)
        scale = np.maximum(np.abs(b[ok]), 1e-3 * np.abs(b[ok]).max(initial=0) + 1e-30)
        if name == "update_cosine":  # in [-1, 1], crossing 0: its error is absolute
            scale = np.ones_like(scale)
        assert np.all(np.abs(a[ok] - b[ok]) <= rtol * scale), name


@pytest.mark.parametrize("trial_major", [True, False], ids=["trial_major", "layer_major"])
@pytest.mark.parametrize(("dtype", "rtol"), [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("task", [TeacherMLP(n_train=100, n_val=64, width=16),
                                  Blobs(n_train=100, n_val=64)], ids=["regression", "classify"])
def test_fused_equals_eager(dtype: str, rtol: float, task, trial_major: bool) -> None:
    """On the kernel and layer-major (whose diverged rows are dropped as they freeze:
    `FusedUpdate.select`)."""
    trials = _trials(dtype, task)
    fused = BatchedEngine(check_every=4, compact_below=1.0,
                          trial_major=trial_major).run(trials, CPU)
    eager = BatchedEngine(check_every=4, compact_below=1.0, fused=False).run(trials, CPU)
    assert fused[0].divergence_step is None
    if isinstance(task, TeacherMLP):  # regression blows up (a dead ReLU net's CE may not)
        assert fused[-1].divergence_step is not None and fused[-2].divergence_step is not None
    for f, e in zip(fused, eager, strict=True):
        _close(f, e, rtol)


@pytest.mark.parametrize("loop", [
    LoopSpec(warmup_fraction=0.3, cosine=True),
    LoopSpec(step_epochs=1, step_gamma=0.5),
    LoopSpec(plateau_factor=0.5, plateau_patience=0),
], ids=["warmup_cosine", "step", "plateau"])
def test_fused_follows_learning_rate_schedules(loop: LoopSpec) -> None:
    trials = _trials("float64", loop=loop)
    fused = BatchedEngine().run(trials, CPU)
    eager = BatchedEngine(fused=False).run(trials, CPU)
    for f, e in zip(fused, eager, strict=True):
        _close(f, e, 1e-10)


def test_depth_one_and_deep_networks() -> None:
    for depth in (1, 5):
        trials = _trials("float64", depth=depth)[:6]
        for f, e in zip(BatchedEngine().run(trials, CPU),
                        BatchedEngine(fused=False).run(trials, CPU), strict=True):
            _close(f, e, 1e-10)


def test_a_trial_alone_equals_itself_in_a_population() -> None:
    trials = _trials("float32")
    crowd = BatchedEngine().run(trials, CPU)
    for i in (1, 5, 7, 9, 15, 17):
        assert BatchedEngine().run([trials[i]], CPU)[0].equal(crowd[i])


def test_a_frozen_row_keeps_params_and_state() -> None:
    specs = [SGD(lr=0.1, momentum=0.9), Adam(lr=1e-2), AdamW(lr=1e-2, weight_decay=0.1),
             Adam(lr=1e-2, amsgrad=True), RMSprop(lr=1e-2, momentum=0.5, centered=True),
             Adagrad(lr=0.1, initial_accumulator_value=0.1)]
    rows, frozen_rows = len(specs), [1, 3, 4, 5]
    sizes = [(3, 4), (4, 2)]
    n_params = sum(fi * fo + fo for fi, fo in sizes)
    offsets = np.cumsum([0] + [n for fi, fo in sizes for n in (fi * fo, fo)])
    params = torch.randn(rows, n_params, dtype=torch.float64)
    update = FusedUpdate(specs, params)
    previous = torch.zeros_like(params)
    alive = torch.ones(rows, dtype=torch.bool)

    def step(grad_rows: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        # blocks: the per-layer [T, n] gradient blocks, one after another
        blocks = torch.cat([grad_rows[:, a:b].reshape(-1)
                            for a, b in zip(offsets[:-1], offsets[1:], strict=True)])
        rec = torch.zeros(7, rows, dtype=torch.float64)
        update.step(params, blocks, offsets, previous, rec, loss, alive)
        return rec

    def held() -> list[torch.Tensor]:
        return [t[frozen_rows].clone()
                for t in (params, update.state1, update.state2, update.state3)]

    for _ in range(3):
        step(torch.randn(rows, n_params, dtype=torch.float64),
             torch.ones(rows, dtype=torch.float64))
    frozen = held()
    loss = torch.ones(rows, dtype=torch.float64)
    loss[frozen_rows] = float("nan")
    rec = step(torch.randn(rows, n_params, dtype=torch.float64), loss)
    assert alive.tolist() == [r not in frozen_rows for r in range(rows)]
    assert torch.all(rec[5, frozen_rows] == 0) and torch.all(previous[frozen_rows] == 0)
    for _ in range(2):
        grad = torch.randn(rows, n_params, dtype=torch.float64)
        grad[frozen_rows] = float("inf")  # garbage in a frozen row goes nowhere
        step(grad, torch.ones(rows, dtype=torch.float64))
    for before, after in zip(frozen, held(), strict=True):
        assert torch.equal(before, after)
    assert torch.isfinite(params).all()


def test_select_keeps_each_rows_state_and_hyperparameters_with_it() -> None:
    specs = [Adam(lr=1e-2, amsgrad=True), RMSprop(lr=1e-2, momentum=0.5, centered=True),
             Adagrad(lr=0.1, lr_decay=0.1), SGD(lr=0.1, momentum=0.9)]
    sizes = [(3, 4), (4, 2)]
    n_params = sum(fi * fo + fo for fi, fo in sizes)
    offsets = np.cumsum([0] + [n for fi, fo in sizes for n in (fi * fo, fo)])
    params = torch.randn(len(specs), n_params, dtype=torch.float64)
    update = FusedUpdate(specs, params)
    for _ in range(2):
        grad = torch.randn(len(specs), n_params, dtype=torch.float64)
        blocks = torch.cat([grad[:, a:b].reshape(-1)
                            for a, b in zip(offsets[:-1], offsets[1:], strict=True)])
        update.step(params, blocks, offsets, torch.zeros_like(params),
                    torch.zeros(7, len(specs), dtype=torch.float64),
                    torch.ones(len(specs), dtype=torch.float64),
                    torch.ones(len(specs), dtype=torch.bool))
    index = torch.tensor([2, 0, 1])
    before = [update.state1, update.state2, update.state3, update.hp.T, update.kind]
    update.select(index)
    after = [update.state1, update.state2, update.state3, update.hp.T, update.kind]
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old[index], new)
    assert torch.equal(update.step_lr.at(3), FusedUpdate([specs[i] for i in index.tolist()],
                                                         params[index]).step_lr.at(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scheduled_step_scalars_are_the_rows_own_python_floats(dtype) -> None:
    """`FusedUpdate.scheduled` over all rows at once gives each row's `_step_lr` and
    1 - lr * weight_decay, computed in Python floats and rounded to the dtype, bit for bit,
    also after compaction reorders the rows."""
    from study.engine.fused import _KINDS, _step_lr

    specs = [SGD(lr=0.1, momentum=0.9), Adam(lr=1e-2), AdamW(lr=1e-2, weight_decay=0.1),
             Adam(lr=3e-3, betas=(0.8, 0.99), weight_decay=1e-2), SGD(lr=0.05),
             AdamW(lr=3e-4, betas=(0.95, 0.999), weight_decay=0.3), RMSprop(lr=1e-3),
             Adagrad(lr=0.05, lr_decay=0.01), Adagrad(lr=0.1, weight_decay=1e-3)]
    update = FusedUpdate(specs, torch.zeros(len(specs), 5, dtype=dtype))
    rng = np.random.default_rng(5)

    def check(specs) -> None:
        for t in (1, 2, 7, 100, 5000):
            lrs = [float(x) for x in 10 ** rng.uniform(-5, 1, len(specs))]
            step_lr, decay = update.scheduled(t, lrs)
            want_lr = torch.tensor([_step_lr(t, lr, _KINDS[type(s)],
                                             getattr(s, "betas", (0.0, 0.0))[0],
                                             getattr(s, "lr_decay", 0.0))
                                    for lr, s in zip(lrs, specs, strict=True)],
                                   dtype=torch.float64).to(dtype)
            want_decay = torch.tensor([1 - lr * s.weight_decay
                                       for lr, s in zip(lrs, specs, strict=True)],
                                      dtype=torch.float64).to(dtype)
            assert torch.equal(step_lr, want_lr) and torch.equal(decay, want_decay), t

    check(specs)
    index = torch.tensor([5, 7, 2, 0, 6, 3])
    update.select(index)
    check([specs[i] for i in index.tolist()])


@dataclasses.dataclass(frozen=True)
class Unfused(SGD):
    """A family the fused update has no formulas for (a new one, say)."""


def test_what_fuses() -> None:
    every = [SGD(), Adam(), AdamW(), Adam(amsgrad=True), RMSprop(centered=True), Adagrad()]
    assert fusable(every, clip=False, zero_grad=True)
    assert not fusable([Unfused(), SGD()], clip=False, zero_grad=True)
    assert not fusable([SGD()], clip=True, zero_grad=True)
    assert not fusable([SGD()], clip=False, zero_grad=False)
    with pytest.raises(ValueError, match="FusedUpdate"):
        FusedUpdate([Unfused()], torch.zeros(1, 3))


@pytest.mark.parametrize("loop", [LoopSpec(clip_norm=0.5), LoopSpec(zero_grad=False)],
                         ids=["clipping", "accumulation"])
def test_clipping_and_accumulation_take_the_eager_update_layer_major(loop) -> None:
    """Layer-major, populations the fused update does not cover train with the eager one."""
    trials = _trials("float64", loop=loop)[:4]
    for f, e in zip(BatchedEngine(trial_major=False).run(trials, CPU),
                    BatchedEngine(fused=False).run(trials, CPU), strict=True):
        assert f.equal(e)


@pytest.mark.slow
def test_the_fused_update_keeps_torchs_thread_count() -> None:
    """numba's thread pool, started by the first fused update, resets the OpenMP thread
    count it shares with torch; `python -m study.bench --threads 1` and the workers' thread
    shares depend on it staying. A fresh process: the pool starts once per process."""
    import os
    import subprocess
    import sys

    script = (
        "import torch; torch.set_num_threads(1)\n"
        "from study.plan import plan_from_overrides\n"
        "from study.engine import BatchedEngine\n"
        "plan = plan_from_overrides(['+sweep=smoke', 'train.epochs=1', 'model.width=8'])\n"
        "BatchedEngine().run([p.trial for p in plan.points], torch.device('cpu'))\n"
        "print(torch.get_num_threads())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "NUMBA_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "1"


def test_numba_loads_its_implementations_without_scipy_linalg() -> None:
    # In a fresh process (this one may hold scipy already): numba's implementations load
    # without importing scipy.linalg, and its BLAS functions still compile afterwards.
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from numba import njit
        from study.engine import fused
        fused.load_implementations()
        fused.load_implementations()
        norm = njit(lambda a: np.sqrt((a * a).sum()))
        assert norm(np.ones(4)) == 2.0
        assert "scipy.linalg" not in sys.modules, "scipy.linalg was imported"
        product = njit(lambda a, b: np.dot(a, b))
        assert product(np.ones((2, 3)), np.ones((3, 2)))[1, 1] == 3.0
        print("ok")
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_a_fused_update_loads_numbas_implementations_first(monkeypatch) -> None:
    from study.engine import fused

    calls = []
    monkeypatch.setattr(fused, "load_implementations", lambda: calls.append(1))
    fused.FusedUpdate([SGD(lr=0.1), Adam(lr=1e-3)], torch.zeros(2, 5))
    assert calls == [1]


LENGTHS = [0, 1, 3, 4, 31, 32, 33, 63, 64, 100, 4929]  # rounds of 32 and the rest


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_norms_sums_are_float64_sums_in_one_written_order(dtype) -> None:
    """`_sumsq` and `_dot` against math.fsum (float64, exactly rounded) on every length of
    their rounds, and in the order they are written: eight accumulators of 4 lanes over
    rounds of 32 entries, then the rest one by one. At 2**53 a float64 steps by 2, so
    2**53 + 1 rounds back to 2**53 (to even): 2**53 + 1 + 1 is 2**53 + 2 where the ones
    meet first and 2**53 where each meets 2**53."""
    import math

    from study.engine.fused import _dot, _sumsq

    rng = np.random.default_rng(3)
    for n in LENGTHS:
        a = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(dtype)
        b = rng.standard_normal(n).astype(dtype)
        square = math.fsum(float(x) * float(x) for x in a)
        dot = math.fsum(float(x) * float(y) for x, y in zip(a, b, strict=True))
        assert abs(_sumsq(a) - square) <= 1e-14 * square, n
        assert abs(_dot(a, b) - dot) <= 1e-14 * math.fsum(abs(float(x) * float(y))
                                                          for x, y in zip(a, b, strict=True))
    big, ones = np.zeros(33), np.zeros(33)
    big[0], ones[0] = 2.0**27, 2.0**26  # 2**53 in the first accumulator's first lane
    for a, b, total in (
            (8, 12, 2.0**53 + 2),  # the third and fourth accumulators: added together first
            (4, 32, 2.0**53),  # the second accumulator, then the entry after the round
            (2, 3, 2.0**53 + 2),  # lanes of one accumulator: (l0 + l1) + (l2 + l3)
            (1, 2, 2.0**53)):
        x, y = big.copy(), ones.copy()
        x[[a, b]] = y[[a, b]] = 1.0
        assert _dot(x, y) == total, (a, b)
    squares = np.zeros(40, dtype=dtype)
    squares[0], squares[8:16] = 2.0**26, 0.5  # 2**52 (steps by 1 there), then eight 0.25s:
    assert _sumsq(squares) == 2.0**52 + 1  # lane by lane 0.5 each, lane 0's tied away
    nan = np.ones(40, dtype=dtype)
    nan[35] = np.nan
    assert np.isnan(_sumsq(nan)) and np.isnan(_dot(nan, np.ones(40, dtype=dtype)))
    inf = np.ones(40, dtype=dtype)
    inf[3] = np.inf
    assert _sumsq(inf) == np.inf


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_sums_after_an_update_are_the_norms_own_bits(dtype) -> None:
    """`_update_sums(u, last, p)` is (_sumsq(u), _dot(u, last), _sumsq(p)) bit for bit: the
    kernel takes a step's parameter norm from the pass after the update before it, or
    from `_sumsq` at the start of a call, and both must give the same record."""
    from study.engine.fused import _dot, _sumsq, _update_sums

    rng = np.random.default_rng(4)
    for n in LENGTHS:
        u, last, p = (rng.standard_normal(n).astype(dtype) * dtype(s)
                      for s in (1e-3, 1e-3, 1.0))
        assert _update_sums(u, last, p) == (_sumsq(u), _dot(u, last), _sumsq(p)), n
