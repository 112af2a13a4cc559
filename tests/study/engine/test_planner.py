"""The planner: populations by structure, chunks within the memory budget, cheapest first."""

from __future__ import annotations

import pytest
import torch

from study.engine import population_key
from study.engine.planner import (
    HELD_BYTES_PER_EVAL,
    HELD_BYTES_PER_STEP,
    default_budget,
    estimate_trial_bytes,
    plan_populations,
)
from study.models import ModelSpec
from study.optimizers import SGD, Adagrad, Adam, RMSprop
from study.plan import plan_from_overrides
from study.tasks import Blobs, LinearRegression
from study.trial import TrainSpec, TrialSpec
from tests.study.engine.test_fused import Unfused


def _trial(lr=0.1, batch=32, width=16, optimizer=None, dtype="float32", seed=0, task=None,
           epochs=2):
    return TrialSpec(task or Blobs(n_train=128, n_val=64), ModelSpec(depth=2, width=width),
                     optimizer or SGD(lr=lr),
                     TrainSpec(batch_size=batch, epochs=epochs, dtype=dtype), seed)


def test_lr_batch_plans_one_population_per_structure() -> None:
    trials = [p.trial for p in plan_from_overrides(["+sweep=lr_batch"]).points]
    chunks = plan_populations(trials, "cpu")
    assert sorted(i for c in chunks for i in c) == list(range(len(trials)))
    # 2 tasks x 4 batch sizes; the three optimizers share each population.
    assert len(chunks) == 8
    for chunk in chunks:
        assert len({repr(population_key(trials[i])) for i in chunk}) == 1
        assert {trials[i].labels["optimizer"] for i in chunk} == {"sgd", "momentum", "adam"}
    assert {len(c) for c in chunks} == {117}
    # cheapest first: full-batch populations (20 steps) before batch-8 ones (640 steps)
    assert trials[chunks[0][0]].train.batch_size == "full"
    assert trials[chunks[-1][0]].train.batch_size == 8


def test_a_population_over_budget_splits_into_near_equal_chunks() -> None:
    trials = [_trial(lr=10 ** (-k / 10), seed=k % 3) for k in range(50)]
    per_trial = estimate_trial_bytes(trials[0])
    chunks = plan_populations(trials, "cpu", budget_bytes=12 * per_trial)
    assert [len(c) for c in chunks] == [10] * 5
    assert [i for c in chunks for i in c] == list(range(50))  # trial order kept
    assert [len(c) for c in plan_populations(trials, "cpu", budget_bytes=1)] == [1] * 50
    assert sorted(len(c) for c in plan_populations(trials, "cpu", max_trials=20)) == [16, 17, 17]


def test_mixed_structures_never_share_a_chunk() -> None:
    trials = [_trial(), _trial(optimizer=Adam()), _trial(batch=8), _trial(seed=4),
              _trial(task=LinearRegression(feature_scale=[1.0] * 10, n_train=64))]
    chunks = plan_populations(trials, "cpu")
    # Optimizer families share a population (one forward/backward, per-family updates).
    assert sorted(map(sorted, chunks)) == [[0, 1, 3], [2], [4]]


def test_on_the_cpu_every_family_shares_a_population_and_one_without_the_fused_update_not(
        ) -> None:
    """Every family study ships takes the CPU's fused update, so they share a population.
    A family without it would take the eager update, and beside it every row would: on the
    CPU it trains apart (each trial as alone); on a GPU every row takes the eager update,
    so all share the population."""
    trials = [_trial(), _trial(optimizer=RMSprop()), _trial(optimizer=Adam()),
              _trial(optimizer=Adagrad()), _trial(optimizer=Adam(amsgrad=True)),
              _trial(optimizer=Unfused())]
    assert sorted(map(sorted, plan_populations(trials, "cpu"))) == [[0, 1, 2, 3, 4], [5]]
    on_gpu = plan_populations(trials, "cuda", budget_bytes=2**30)
    assert sorted(map(sorted, on_gpu)) == [[0, 1, 2, 3, 4, 5]]


def test_a_mixed_family_population_is_sized_for_its_hungriest_optimizer() -> None:
    sgd = [_trial(lr=0.1 * (k + 1)) for k in range(10)]
    adam = [_trial(optimizer=Adam(lr=0.01 * (k + 1))) for k in range(10)]
    budget = 8 * estimate_trial_bytes(adam[0])
    assert estimate_trial_bytes(adam[0]) > estimate_trial_bytes(sgd[0])
    assert max(len(c) for c in plan_populations(sgd + adam, "cpu", budget_bytes=budget)) <= 8


def test_memory_estimate_scales_with_the_work() -> None:
    base = estimate_trial_bytes(_trial())
    assert estimate_trial_bytes(_trial(width=64)) > 4 * base
    assert estimate_trial_bytes(_trial(optimizer=Adam())) > base
    assert (estimate_trial_bytes(_trial(optimizer=Adam(amsgrad=True)))
            > estimate_trial_bytes(_trial(optimizer=Adam())))
    assert estimate_trial_bytes(_trial(batch="full")) > base
    assert 1.8 * base < estimate_trial_bytes(_trial(dtype="float64")) < 2.2 * base


def test_memory_estimate_counts_what_the_run_holds_of_each_step_and_evaluation() -> None:
    """A long trial's records, as the run holds them until its population is written, are
    most of its memory: 10x the epochs adds their steps' and evaluations' bytes, and a
    population of long trials is split to fit the budget."""
    short, long = _trial(), _trial(epochs=20)
    steps = long.train.total_steps(128) - short.train.total_steps(128)
    evals = long.train.eval_count(128) - short.train.eval_count(128)
    assert (steps, evals) == (72, 18)
    assert estimate_trial_bytes(long) - estimate_trial_bytes(short) == (
        HELD_BYTES_PER_STEP * steps + HELD_BYTES_PER_EVAL * evals)
    longest = [_trial(lr=0.01 * (k + 1), epochs=100_000) for k in range(6)]
    assert estimate_trial_bytes(longest[0]) > HELD_BYTES_PER_STEP * 400_000
    assert [len(c) for c in plan_populations(longest, "cpu", budget_bytes=2**30)] == [3, 3]


@pytest.mark.parametrize("n_train, batch, epochs, every", [
    (128, 32, 2, None), (100, 32, 3, None), (100, 32, 3, 5), (128, "full", 7, 3),
    (10, 3, 1, 1), (256, 8, 20, 7), (256, 8, 20, 640)])
def test_eval_count_is_the_number_of_eval_steps(n_train, batch, epochs, every) -> None:
    train = TrainSpec(batch_size=batch, epochs=epochs, eval_every=every)
    assert train.eval_count(n_train) == len(train.eval_steps(n_train))


def test_budget_defaults_and_validation() -> None:
    assert 0 < default_budget("cpu") <= 4 * 2**30
    with pytest.raises(ValueError, match="budget_bytes"):
        plan_populations([_trial()], "cpu", budget_bytes=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_budget_is_half_the_free_memory() -> None:
    free, _ = torch.cuda.mem_get_info()
    assert 0.4 * free < default_budget("cuda") <= 0.5 * free
