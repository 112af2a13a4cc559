"""A composed config's plan: one point, a grid, a search or an edge search.

`expand` reads the sweep's kind and hands the config to its expansion (`study.grid`,
`study.search`, `study.edge`); this module sits above the three, so none of them imports
another's dispatcher.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from study import cli
from study.compositions import Compose, Ready
from study.config import build_trial, plain_config, validate
from study.edge import EdgePlan, expand_edge
from study.grid import (
    CONF_DIR,
    GROUPS,
    GridPoint,
    SweepPlan,
    expand_grid,
    group_label,
    reseeded,
)
from study.schema import ConfigError, StudyConfig, register
from study.search import expand_search


def expand(cfg: DictConfig, compose: Compose, overrides: Sequence[str],
           choices: dict[str, str], *, typed: StudyConfig | None = None,
           ready: Ready | None = None) -> SweepPlan:
    """Expand `cfg` (composed from `overrides`) into its grid points.

    `compose(overrides)` composes the config again with extra overrides (one call per
    combination of group-axis options); `choices` are the config-group options chosen for
    `cfg` (Hydra's runtime choices), used as labels. `typed` is `validate(cfg)` when the
    caller has already run it (it is not run again); without it `cfg` is validated here.
    Every config composed for a group axis is validated; those in `ready` were composed
    ahead (`study.compositions.Ahead`) and are not composed again. Without a sweep, the
    plan has one point: the config itself with seed `cfg.seed`.
    """
    if typed is None:
        typed = validate(cfg)
    base_labels = {g: group_label(cfg, g, choices.get(g)) for g in GROUPS}
    if typed.sweep is None:
        trial = build_trial(plain_config(cfg), typed.seed, base_labels)
        return SweepPlan(None, {}, [typed.seed], [GridPoint({"seed": typed.seed}, trial)])
    if typed.sweep.sampler != "grid":
        return expand_search(cfg, compose, overrides, choices, typed)
    if typed.sweep.space:
        raise ConfigError("sweep.space: a grid sweep declares axes; set sweep.sampler to "
                          "search a space")
    if typed.sweep.pruner:
        raise ConfigError("sweep.pruner: only a sampler sweep prunes (a grid trains every "
                          "point to the end)")
    if typed.sweep.edge:
        return _expand_edge(cfg, compose, overrides, choices, typed, base_labels, ready)
    return expand_grid(cfg, compose, overrides, typed, base_labels, ready)


def _expand_edge(cfg: DictConfig, compose: Compose, overrides: Sequence[str],
                 choices: dict[str, str], typed: StudyConfig, base_labels: dict[str, str],
                 ready: Ready | None) -> EdgePlan:
    """The EdgePlan (study.edge) of the grid of the sweep's axes, or of the one config."""
    if typed.workers > 1:
        raise ConfigError("workers: an edge search runs its rounds from one process "
                          "(each round is one batched population); use workers=1")
    edge, claims = dict(typed.sweep.edge), list(typed.sweep.claims)
    if typed.sweep.axes:
        grid = dataclasses.replace(typed, sweep=dataclasses.replace(
            typed.sweep, edge={}, claims=[]))
        base = expand(cfg, compose, overrides, choices, typed=grid, ready=ready)
    else:  # the edge of the one configuration composed
        trial = build_trial(plain_config(cfg), typed.sweep.seeds[0], base_labels)
        base = SweepPlan(typed.sweep.name, {}, list(typed.sweep.seeds), [
            GridPoint({"seed": s}, reseeded(trial, s)) for s in typed.sweep.seeds])
    return expand_edge(base, edge, claims)




def plan_from_overrides(overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> SweepPlan:
    """Compose `conf/config.yaml` with `overrides` outside a Hydra app and expand it.

    For tests, benchmarks and notebooks: `plan_from_overrides(["+sweep=lr_batch"])`.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        choices = dict(cfg.hydra.runtime.choices)

        def recompose(extra: Sequence[str]) -> DictConfig:
            return compose("config", overrides=list(extra))

        return expand(cfg, recompose, list(overrides), choices)


def plan_for_command(overrides: Sequence[str] = ()) -> SweepPlan:
    """`plan_from_overrides` for a command line (the benches'): whatever makes the
    workload's config unusable, an error Hydra or OmegaConf raises while composing it (an
    unknown option, a value of the wrong type) included, is a ConfigError of one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return plan_from_overrides(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(cli.composition_error(err)) from None

