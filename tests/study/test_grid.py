"""The flagship expands to exactly the declared grid; compositions side by side change
nothing."""

from __future__ import annotations

import itertools

import pytest
from hydra.errors import MissingConfigException

from study import parallel
from study.plan import plan_from_overrides

forks = pytest.mark.skipif(parallel.workers_available() < 2, reason="needs Linux and two cores")


def test_lr_batch_is_2_tasks_x_3_optimizers_x_13_lrs_x_4_batches_x_3_seeds() -> None:
    plan = plan_from_overrides(["+sweep=lr_batch"])
    assert len(plan.points) == 2 * 3 * 13 * 4 * 3 == 936
    assert plan.axes["task"] == ["teacher_mlp", "blobs"]
    assert plan.axes["optimizer"] == ["sgd", "momentum", "adam"]
    assert plan.axes["train.batch_size"] == [8, 32, 128, "full"]
    lrs = plan.axes["optimizer.lr"]
    assert len(lrs) == 13 and lrs[0] == 1e-4 and lrs[-1] == 10.0
    seen = {tuple(p.params[a] for a in [*plan.axes, "seed"]) for p in plan.points}
    assert seen == set(itertools.product(*plan.axes.values(), plan.seeds))
    assert len({p.trial.key() for p in plan.points}) == 936


def test_point_specs_carry_their_axis_values() -> None:
    plan = plan_from_overrides(["+sweep=lr_batch"])
    for p in plan.points[::37]:
        t = p.trial
        assert t.optimizer.lr == p.params["optimizer.lr"]
        assert t.train.batch_size == p.params["train.batch_size"]
        assert t.seed == p.params["seed"]
        assert t.labels["task"] == p.params["task"]
        assert t.labels["optimizer"] == p.params["optimizer"]
        expected_momentum = 0.9 if p.params["optimizer"] == "momentum" else None
        if expected_momentum is not None:
            assert t.optimizer.momentum == expected_momentum
    # Same budget in examples for every batch size: 20 epochs of 256 examples.
    steps = {p.params["train.batch_size"]: p.trial.train.total_steps(256) for p in plan.points}
    assert steps == {8: 640, 32: 160, 128: 40, "full": 20}


def test_user_overrides_apply_to_every_point() -> None:
    plan = plan_from_overrides(["+sweep=smoke", "train.epochs=2", "model.width=8"])
    assert {p.trial.train.epochs for p in plan.points} == {2}
    assert {p.trial.model.width for p in plan.points} == {8}


@forks
def test_compositions_side_by_side_give_the_plan_composed_in_turn(monkeypatch) -> None:
    # layer_decay: a spec axis (optimizer, 3 options) and a transform axis (failure, 2).
    side_by_side = plan_from_overrides(["+sweep=layer_decay"])
    monkeypatch.setattr(parallel, "workers_available", lambda: 1)
    in_turn = plan_from_overrides(["+sweep=layer_decay"])
    assert side_by_side == in_turn
    assert len(in_turn.points) == 3 * 5 * 2 * len(in_turn.seeds)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_composition_that_fails_raises_its_own_error_the_first_in_grid_order(
        monkeypatch, workers: int) -> None:
    monkeypatch.setattr(parallel, "workers_available", lambda: workers)
    with pytest.raises(MissingConfigException, match="failure/no_such_a'") as raised:
        plan_from_overrides(["+sweep=layer_decay",
                             "sweep.axes.failure=[none,no_such_a,no_such_b]"])
    assert "Available options in 'failure'" in str(raised.value)


def test_setting_axis_values_copies_only_the_path_and_leaves_the_config_alone() -> None:
    from study.grid import _with_values
    from study.schema import ConfigError

    plain = {"optimizer": {"lr": 0.1, "betas": [0.9, 0.99]}, "train": {"batch_size": 8},
             "task": {"dim": 2}}
    out = _with_values(plain, {"optimizer.lr": 1.0, "train.batch_size": 32})
    assert out == {"optimizer": {"lr": 1.0, "betas": [0.9, 0.99]},
                   "train": {"batch_size": 32}, "task": {"dim": 2}}
    assert plain == {"optimizer": {"lr": 0.1, "betas": [0.9, 0.99]},
                     "train": {"batch_size": 8}, "task": {"dim": 2}}
    assert out["task"] is plain["task"]  # untouched groups are shared, not copied
    with pytest.raises(ConfigError, match="sweep.axes.optimizer.momentum: no such key"):
        _with_values(plain, {"optimizer.momentum": 0.9})
    with pytest.raises(ConfigError, match="sweep.axes.train.batch_size.x: no such key"):
        _with_values(plain, {"train.batch_size.x": 1})
    assert plain["optimizer"] == {"lr": 0.1, "betas": [0.9, 0.99]}
