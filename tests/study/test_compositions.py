"""A grid's configurations composed ahead (`study.compositions.Ahead`) give the plan composed
where it is needed, error for error, and leave no process behind."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import DictConfig

from study import parallel
from study.compositions import Ahead, compositions, grid_axes
from study.config import validate, validate_plain
from study.grid import CONF_DIR
from study.plan import expand
from study.schema import ConfigError, plain_config, register

forks = pytest.mark.skipif(parallel.workers_available() < 2, reason="needs Linux and two cores")


@pytest.fixture
def hydra_app() -> Iterator[None]:
    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


class Recompose:
    """`compose` as `python -m study` passes it, counting the calls made in this process."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, extra: Sequence[str]) -> DictConfig:
        self.calls.append(list(extra))
        return compose("config", overrides=list(extra))


def _plan(overrides: list[str], ready=None):
    cfg = compose("config", overrides=overrides, return_hydra_config=True)
    recompose = Recompose()
    plan = expand(cfg, recompose, overrides, dict(cfg.hydra.runtime.choices), ready=ready)
    return plan, recompose


@forks
def test_the_plan_from_compositions_done_ahead_is_the_plan_composed_here(hydra_app) -> None:
    # layer_decay: a spec axis (optimizer, 3 options) and a transform axis (failure, 2).
    overrides = ["+sweep=layer_decay", "train.epochs=2"]
    cfg = compose("config", overrides=overrides, return_hydra_config=True)
    ahead = Ahead.start(cfg, Recompose(), overrides)
    assert ahead is not None
    pid = ahead._pid
    ready = ahead.take(timeout=120)
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # ended and reaped
    assert len(ready) == 3 + 2 and all(plain is not None for plain in ready.values())
    with_ready, recompose = _plan(overrides, ready)
    assert recompose.calls == []  # nothing composed again
    here, _ = _plan(overrides)
    assert with_ready == here
    assert {p.trial.train.epochs for p in here.points} == {2}


@forks
def test_a_composition_that_failed_ahead_raises_its_own_error_here(hydra_app) -> None:
    overrides = ["+sweep=layer_decay", "sweep.axes.failure=[none,no_such_a,no_such_b]"]
    cfg = compose("config", overrides=overrides, return_hydra_config=True)
    ready = Ahead.start(cfg, Recompose(), overrides).take(timeout=120)
    assert [whole[-1] for whole, plain in ready.items() if plain is None] == [
        "failure=no_such_a", "failure=no_such_b"]
    with pytest.raises(MissingConfigException, match="failure/no_such_a'"):
        _plan(overrides, ready)


@forks
def test_compositions_not_reached_are_composed_here(hydra_app) -> None:
    overrides = ["+sweep=layer_decay"]
    cfg = compose("config", overrides=overrides, return_hydra_config=True)
    ahead = Ahead.start(cfg, Recompose(), overrides)
    ready = ahead.take(timeout=120)
    first = dict(list(ready.items())[:2])  # as if the process had reached only two
    partial, recompose = _plan(overrides, first)
    assert len(recompose.calls) == 0 or parallel.workers_available() < 2  # forked workers
    here, _ = _plan(overrides)
    assert partial == here


def test_no_process_without_a_grid_of_group_options(hydra_app) -> None:
    for overrides in (["+sweep=adam_search"],  # a search composes as it samples
                      ["+sweep=smoke", "~sweep.axes.task"],  # scalar axes only
                      []):  # one configuration
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        assert grid_axes(cfg) == {}
        assert Ahead.start(cfg, Recompose(), overrides) is None


def test_grid_axes_are_the_group_axes_as_the_grid_reads_them(hydra_app) -> None:
    cfg = compose("config", overrides=["+sweep=layer_decay",
                                       "sweep.axes.failure=[none,[outliers,unscaled]]"],
                  return_hydra_config=True)
    axes = grid_axes(cfg)
    assert axes == {"optimizer": ["sgd", "momentum", "adam"],
                    "failure": ["none", "outliers+unscaled"]}
    assert [extra for extra, _ in compositions(axes).values()] == [
        ["optimizer=sgd"], ["failure=none"], ["failure=[outliers,unscaled]"],
        ["optimizer=momentum"], ["optimizer=adam"]]


def test_validate_plain_is_validate_of_the_composed_config(hydra_app) -> None:
    good = compose("config", overrides=["optimizer=adam"])
    assert validate_plain(plain_config(good)) == validate(good)
    for bad in (["seed=-1"], ["storage.retries=0"], ["+train.epochz=3"]):
        cfg = compose("config", overrides=bad)
        with pytest.raises(ConfigError) as want:
            validate(cfg)
        with pytest.raises(ConfigError) as got:
            validate_plain(plain_config(cfg))
        assert str(got.value) == str(want.value)
