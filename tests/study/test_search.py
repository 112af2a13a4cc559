"""Sampler sweeps: proposals asked as populations, every run told exactly once, resumable."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import torch
from hydra.errors import MissingConfigException
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from study import parallel, queue, records
from study.engine import make_engine
from study.lease import Lease
from study.plan import plan_from_overrides
from study.preflight import check_memory
from study.records import trials_frame
from study.schema import ConfigError
from study.search import (
    PROPOSAL,
    SEED,
    SearchPlan,
    distribution,
    make_pruner,
    proposals_spent,
    run_search,
    set_key,
)
from study.storage import open_study

CPU = torch.device("cpu")
SMALL = ["+sweep=adam_search", "sweep.trials=6", "sweep.population=4", "sweep.seeds=[0,1]",
         "train.epochs=1", "model.width=8", "task.n_train=64"]


@pytest.fixture(scope="module")
def plan() -> SearchPlan:
    return plan_from_overrides(SMALL)


def _told(study) -> list:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def test_every_proposal_trains_once_per_seed_and_is_told_once(tmp_path: Path, plan) -> None:
    assert isinstance(plan, SearchPlan) and plan.total == 12
    study = open_study(tmp_path, None, "search", "minimize")
    progress = []
    outcome = run_search(plan, study, make_engine("batched"), CPU, tmp_path, "val_loss_final",
                         on_progress=lambda done, total: progress.append((done, total)))
    told = _told(study)
    assert outcome.trained == len(told) == 12 and progress[-1] == (12, 12)
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING, TrialState.FAIL))
    runs = Counter((t.user_attrs[PROPOSAL], t.user_attrs[SEED]) for t in told)
    assert len(runs) == 12 and set(runs.values()) == {1}
    assert {s for _, s in runs} == {0, 1} and len({p for p, _ in runs}) == 6
    by_proposal = {}
    for t in told:  # the copies of a proposal carry its params exactly
        by_proposal.setdefault(t.user_attrs[PROPOSAL], []).append(t.params)
    assert all(a == b for a, b in by_proposal.values())
    assert len({t.user_attrs["key"] for t in told}) == 12
    # Stored with their real distributions (optuna-dashboard draws a log-lr axis).
    dists = told[0].distributions
    assert dists["optimizer.lr"] == FloatDistribution(1e-5, 10.0, log=True)
    assert isinstance(dists["train.batch_size"], CategoricalDistribution)
    # The first round asked a whole population: 4 proposals x 2 seeds trained together.
    first = sorted(told, key=lambda t: t.number)[:8]
    assert len({t.user_attrs[PROPOSAL] for t in first}) == 4
    frame = trials_frame(queue.finished(study))
    assert {"optimizer.betas.0", "optimizer.lr", "seed", "status"} <= set(frame.columns)
    again = run_search(plan, study, make_engine("batched"), CPU, tmp_path, "val_loss_final")
    assert again.trained == 0 and len(_told(study)) == 12  # the budget is spent


@pytest.mark.parametrize("sampler", ["gp", "qmc", "cmaes", "random"])
def test_every_sampler_spends_its_budget_once_and_says_nothing_per_proposal(
        tmp_path: Path, sampler: str, caplog, recwarn) -> None:
    # Optuna's own samplers, as a user picks them: each proposal once per seed. CMA-ES draws
    # the categorical batch size at random, which the plan says once (Optuna would warn at
    # every proposal), and QMC's "experimental" warning is not shown.
    with caplog.at_level("INFO"):
        plan = plan_from_overrides([*SMALL, f"sweep.sampler={sampler}"])
    study = open_study(tmp_path, None, "search", "minimize")
    optuna.logging.enable_propagation()  # Optuna's records reach caplog
    try:
        with caplog.at_level("WARNING", logger="optuna"):
            outcome = run_search(plan, study, make_engine("batched"), CPU, tmp_path,
                                 "val_loss_final")
    finally:
        optuna.logging.disable_propagation()
    told = _told(study)
    assert outcome.trained == len(told) == 12
    assert len({(t.user_attrs[PROPOSAL], t.user_attrs[SEED]) for t in told}) == 12
    fallback = [r for r in caplog.records if "CMA-ES samples no categorical key" in r.message]
    assert len(fallback) == (1 if sampler == "cmaes" else 0)
    assert not [r for r in caplog.records if r.name.startswith("optuna")
                and "sampled independently" in r.getMessage()]
    assert not [w for w in recwarn if "experimental" in str(w.message)]


def test_cmaes_without_its_package_is_refused_before_anything_is_written(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "cmaes" else real(name, *a))
    with pytest.raises(ConfigError, match=re.escape(
            "sweep.sampler: cmaes needs the cmaes package (pip install cmaes)")):
        plan_from_overrides([*SMALL, "sweep.sampler=cmaes"])


def test_a_stopped_search_resumes_without_losing_or_duplicating_a_run(tmp_path: Path,
                                                                      plan) -> None:
    study = open_study(tmp_path, None, "search", "minimize")
    rounds = []
    first = run_search(plan, study, make_engine("batched"), CPU, tmp_path, "val_loss_final",
                       on_progress=lambda done, total: rounds.append(done),
                       stop=lambda: len(rounds) > 1)  # after the first population
    assert first.stopped and first.trained == 8
    # A process killed while training a proposal: both its runs are left RUNNING.
    lost = study.ask(plan.space)
    lost.set_user_attr(PROPOSAL, lost.number)
    lost.set_user_attr(SEED, 0)
    study.enqueue_trial(lost.params, user_attrs={PROPOSAL: lost.number, SEED: 1})
    study.ask(plan.space)
    assert proposals_spent(study) == 5
    time.sleep(0.2)  # older than the grace period below: their worker is gone
    resumed = run_search(plan, study, make_engine("batched"), CPU, tmp_path, "val_loss_final",
                         leases=Lease(heartbeat_s=0.05, grace_s=0.1))
    assert resumed.reclaimed == 2 and resumed.trained == 4  # the lost proposal + one new
    told = _told(study)
    runs = Counter((t.user_attrs[PROPOSAL], t.user_attrs[SEED]) for t in told)
    assert len(told) == 12 and set(runs.values()) == {1}
    assert {(lost.number, 0), (lost.number, 1)} <= set(runs)  # trained under its proposal
    assert len(study.get_trials(states=(TrialState.FAIL,))) == 2
    assert len({p for p, _ in runs}) == 6


@pytest.mark.slow
def test_the_cli_runs_a_search_and_writes_its_records(tmp_path: Path, study_cli) -> None:
    run_dir = tmp_path / "run"
    done = study_cli(*SMALL, f"hydra.run.dir={run_dir}", "progress=false", "report=false")
    assert done.returncode == 0, done.stderr[-2000:]
    trials, meta = records.read_trials(run_dir)
    assert len(trials) == 12 and trials["objective"].notna().all()
    assert meta["axes"] == {"train.batch_size": [8, 32, 128]}
    assert meta["searched"] == ["optimizer.lr", "optimizer.betas.0"]  # no axis levels
    assert records.read_claims(run_dir) is not None


@pytest.mark.parametrize("override, message", [
    ("sweep.sampler=annealing", "sweep.sampler: must be grid or one of"),
    ("sweep.trials=0", "sweep.trials: the budget"),
    ("sweep.population=0", "sweep.population: must be >= 1, got 0"),
    ("+sweep.axes={optimizer.lr: [0.1]}", "sweep.axes: a sampler sweep declares sweep.space"),
    ("workers=2", "workers: a sampler sweep"),
    ("+sweep.claims=[{statement: s, metric: diverged, expect: higher, compare: {axis: "
     "train.batch_size, arm: 8, baseline: 128}}]",
     "compare: a search's trials have no pairs"),
])
def test_a_bad_search_is_refused_before_training(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        plan_from_overrides([*SMALL, override])


@pytest.mark.parametrize("spec, message", [
    ({"low": 1, "high": 0.1}, "sweep.space.optimizer.lr: "),
    ({"low": 0.1}, "expected {low, high"),
    ({"low": 0.1, "high": 1, "logg": True}, "logg: unknown key"),
    ([], "no choices"),
    ([[1, 2], [1, 2]], "duplicate choices in [[1, 2], [1, 2]]"),
    # a step of 0 ran as 1; the others are no range a sampler can draw from
    ({"low": 2, "high": 8, "step": 0}, "sweep.space.optimizer.lr.step: must be > 0, got 0"),
    ({"low": 0.1, "high": 1, "step": -0.1}, "optimizer.lr.step: must be > 0, got -0.1"),
    ({"low": 0.1, "high": 1, "step": float("inf")}, "optimizer.lr.step: must be a finite"),
    ({"low": float("-inf"), "high": 1}, "optimizer.lr.low: must be a finite number, got -inf"),
    ({"low": 0.1, "high": float("nan")}, "optimizer.lr.high: must be a finite number, got nan"),
    ({"low": 1, "high": 10**400}, "optimizer.lr.high: must be a finite number"),
    ({"low": 1.5, "high": 8, "int": True}, "optimizer.lr.low: expected an integer, got 1.5"),
])
def test_a_bad_space_entry_names_its_key(spec, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        distribution("optimizer.lr", spec)


@pytest.mark.parametrize("entry, message", [
    # Each is in the composed config, so a trial's sampled value was set and then ignored.
    ("seed={low: 0, high: 5}", "sweep.space.seed: seeds are declared by sweep.seeds"),
    ("workers=[1, 2]", "sweep.space.workers: not part of a trial's configuration"),
    ("storage.grace_s=[60, 120]", "sweep.space.storage.grace_s: not part of a trial's"),
    ("objective.metric=[val_loss_final, train_loss_final]",
     "sweep.space.objective.metric: not part of a trial's"),
    ("sweep.trials=[2, 3]", "sweep.space.sweep.trials: not part of a trial's"),
    ("train=[1, 2]", "sweep.space.train: not a config group"),
    # adam_search searches optimizer.betas.0: a list of betas overwrote its draw
    ("optimizer.betas=[[0.9, 0.99], [0.5, 0.9]]", "sweep.space.optimizer.betas.0: lies under "
                                                  "sweep.space.optimizer.betas"),
])
def test_a_space_key_outside_a_trials_configuration_is_refused(entry: str,
                                                              message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        plan_from_overrides([*SMALL, f"++sweep.space.{entry}"])


def test_a_space_range_takes_its_step() -> None:
    assert distribution("train.epochs", {"low": 2, "high": 8, "step": 2}) == IntDistribution(
        2, 8, step=2)
    assert distribution("train.epochs", {"low": 2, "high": 8}) == IntDistribution(2, 8)
    assert distribution("optimizer.lr", {"low": 0.1, "high": 0.5, "step": 0.1}
                        ) == FloatDistribution(0.1, 0.5, step=0.1)


def test_list_choices_are_stored_as_text_and_trained_as_the_lists(tmp_path: Path,
                                                                  recwarn) -> None:
    # Optuna warns once per choice of a list, at every invocation (it stores only None,
    # bool, int, float and str).
    plan = plan_from_overrides([*SMALL, "sweep.trials=2", "sweep.population=2",
                                "sweep.seeds=[0]", "task=linear_regression", "task.dim=2",
                                "++sweep.space.task.feature_scale=[[1, 3], [1, 10]]"])
    assert plan.space["task.feature_scale"] == CategoricalDistribution(["[1, 3]", "[1, 10]"])
    assert plan.axes["task.feature_scale"] == [[1, 3], [1, 10]]
    study = open_study(tmp_path, None, "lists", "minimize")
    run_search(plan, study, make_engine("batched"), CPU, tmp_path, "val_loss_final")
    assert not [w for w in recwarn if "categorical distribution" in str(w.message)]
    told = _told(study)
    assert len(told) == 2
    for t in told:  # each trained its list: its config record (JSON text) and its key
        scale = {"[1, 3]": [1, 3], "[1, 10]": [1, 10]}[t.params["task.feature_scale"]]
        assert t.user_attrs["config"]["task.feature_scale"] == json.dumps(scale)
        built = plan.build(dict(t.params), 0).trial
        assert list(built.task.feature_scale) == scale and built.key() == t.user_attrs["key"]
    frame = trials_frame(queue.finished(study))  # the column holds the config record
    assert sorted(frame["task.feature_scale"]) == sorted(
        t.user_attrs["config"]["task.feature_scale"] for t in told)


def test_the_memory_check_sees_the_largest_trial_a_proposal_can_draw(plan) -> None:
    # The space's lower corner trains 1 epoch; a proposal may draw 10**10 (TBs of records).
    huge = plan_from_overrides([*SMALL, "++sweep.space.train.epochs={low: 1, high: "
                                "10000000000}"])
    with pytest.raises(ConfigError, match=r"^train\.epochs: a trial of this plan needs about"):
        check_memory(huge, CPU)
    assert huge.peak["train.epochs"] == 10**10
    # Fewer examples per batch are more steps: the peak takes each numeric key's end that
    # makes the larger trial.
    wide = dataclasses.replace(plan, space={
        **plan.space, "train.epochs": IntDistribution(1, 1000),
        "train.batch_size": IntDistribution(1, 64), "model.width": IntDistribution(2, 512)})
    assert {k: wide.peak[k] for k in ("train.epochs", "train.batch_size", "model.width")} == {
        "train.epochs": 1000, "train.batch_size": 1, "model.width": 512}
    largest = wide.points[-1].trial
    assert (largest.train.epochs, largest.train.batch_size, largest.model.width) == (
        1000, 1, 512)
    assert [p.params for p in wide.points[:-1]] == [  # the corners, as before
        {**c, SEED: 0} for c in wide.corners()]


def test_a_trial_too_large_is_refused_before_its_data_is_drawn(tmp_path: Path,
                                                               monkeypatch) -> None:
    # A proposal may draw 10**12 training rows: the memory check, which draws no data,
    # refuses it before the data check would try to draw them.
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from study import run
    from study.config import validate
    from study.grid import CONF_DIR

    overrides = [*SMALL, "++sweep.space.task.n_train={low: 64, high: 1000000000000}"]
    plan = plan_from_overrides(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)

    def drawn(_plan) -> None:
        raise AssertionError("the data was drawn before the memory check")

    monkeypatch.setattr(run, "check_data", drawn)
    with pytest.raises(ConfigError, match=r"a trial of this plan needs about"):
        run.execute(cfg, validate(cfg), plan, tmp_path / "run", overrides, None)
    assert not (tmp_path / "run").exists()


def test_a_space_key_that_the_config_lacks_is_refused() -> None:
    plain = {"optimizer": {"lr": 0.1, "betas": [0.9, 0.999]}}
    set_key(plain, "optimizer.betas.0", 0.5)
    assert plain["optimizer"]["betas"] == [0.5, 0.999]
    with pytest.raises(ConfigError, match=r"sweep\.space\.optimizer\.momentum: no such key"):
        set_key(plain, "optimizer.momentum", 0.9)


def test_a_pruner_stops_rows_inside_the_population_and_they_are_told_pruned(
        tmp_path: Path) -> None:
    plan = plan_from_overrides([*SMALL, "sweep.trials=8", "sweep.population=8",
                                "train.epochs=8", "+sweep.pruner={type: successive_halving, "
                                "min_resource: 2, reduction_factor: 2}"])
    study = open_study(tmp_path, None, "pruned", "minimize")
    outcome = run_search(plan, study, make_engine("batched"), CPU, tmp_path, "val_loss_final")
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert outcome.trained == len(pruned) + len(complete) == 16
    # Successive halving prunes within the very first population: at each rung a row goes
    # on only if its loss is in the better half of the rows that reached the rung so far.
    assert pruned and complete
    frame = trials_frame(queue.finished(study))
    assert len(frame) == 16 and frame["pruned_step"].notna().sum() == len(pruned)
    cut = frame["pruned_step"].notna()
    assert set(frame.loc[cut, "status"]) <= {"pruned", "diverged"}
    assert "pruned" not in set(frame.loc[~cut, "status"])
    curves = records.read_curves(tmp_path)
    for t in pruned:
        step = t.user_attrs["pruned_step"]
        assert t.intermediate_values and max(t.intermediate_values) == step
        mine = curves[(curves["trial"] == t.number) & (curves["split"] == "batch")]
        assert mine["step"].max() == step - 1  # no update after the pruning evaluation
    assert proposals_spent(study) == 8
    again = run_search(plan, study, make_engine("batched"), CPU, tmp_path, "val_loss_final")
    assert again.trained == 0


@pytest.mark.parametrize("pruner, message", [
    # Optuna's HyperbandPruner takes these and fails when it first decides, mid-training.
    ("{type: hyperband, min_resource: 0, max_resource: 10}",
     "sweep.pruner.min_resource: must be an integer >= 1, got 0"),
    ("{type: hyperband, min_resource: -3}",
     "sweep.pruner.min_resource: must be an integer >= 1, got -3"),
    ("{type: hyperband, min_resource: auto}",
     "sweep.pruner.min_resource: must be an integer >= 1, got 'auto'"),
    ("{type: hyperband, reduction_factor: 1}",
     "sweep.pruner.reduction_factor: must be an integer >= 2, got 1"),
    ("{type: hyperband, min_resource: 5, max_resource: 2}",
     "sweep.pruner.max_resource: must be >= min_resource (5), got 2"),
    ("{type: hyperband, max_resource: 0}",
     "sweep.pruner.max_resource: must be an integer >= 1 or 'auto', got 0"),
    ("{type: successive_halving, min_resource: 0}",
     "sweep.pruner.min_resource: must be an integer >= 1 or 'auto', got 0"),
    ("{type: successive_halving, reduction_factor: 2.5}",
     "sweep.pruner.reduction_factor: must be an integer >= 2, got 2.5"),
    ("{type: median, interval_steps: 0}",
     "sweep.pruner.interval_steps: must be an integer >= 1, got 0"),
    ("{type: median, n_warmup: 3}", "sweep.pruner.n_warmup: unknown key for median"),
    ("{type: percentile}", "sweep.pruner.percentile: the percentile pruner needs it"),
    ("{type: percentile, percentile: 101}",
     "sweep.pruner.percentile: must be a number from 0 to 100, got 101"),
])
def test_a_pruner_argument_optuna_checks_only_when_deciding_is_refused_at_the_plan(
        pruner: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        plan_from_overrides([*SMALL, f"+sweep.pruner={pruner}"])


def test_a_hyperband_pruner_in_range_is_planned_and_decides(tmp_path: Path) -> None:
    plan = plan_from_overrides([*SMALL, "+sweep.pruner={type: hyperband, min_resource: 1, "
                                "max_resource: 4, reduction_factor: 2}"])
    study = open_study(tmp_path, None, "hyperband", "minimize")
    study.pruner = make_pruner(plan.pruner)
    for value in (1.0, 2.0, 3.0):
        trial = study.ask()
        trial.report(value, 2)
        trial.should_prune()  # Optuna counts its brackets here


@pytest.mark.slow  # a PostgreSQL server and two CLI runs: ~40 s
def test_a_search_on_postgres_gives_the_journal_search_and_resumes(tmp_path: Path, postgres,
                                                                   study_cli) -> None:
    url = postgres.database()
    on_disk, in_db = tmp_path / "journal", tmp_path / "db"
    study_cli(*SMALL, f"hydra.run.dir={on_disk}", "progress=false", "report=false", expect=0)
    study_cli(*SMALL, "storage=postgres", f"hydra.run.dir={in_db}", "progress=false",
              "report=false", env={"STUDY_STORAGE_URL": url}, expect=0)
    journal, _ = records.read_trials(on_disk)
    db, _ = records.read_trials(in_db)
    columns = ["trial", "optimizer.lr", "optimizer.betas.0", "train.batch_size", "seed",
               "objective", "status"]
    assert len(db) == 12
    assert db[columns].equals(journal[columns])  # same proposals, same numbers
    again = study_cli(*SMALL, "storage=postgres", f"resume={in_db}", "progress=false",
                      "report=false", env={"STUDY_STORAGE_URL": url}, expect=0)
    assert "0 trials trained, 12 already done" in again.stdout
    assert records.read_trials(in_db)[0][columns].equals(db[columns])


GROUP_SPACE = [*SMALL, "+sweep.space.task=[teacher_mlp,blobs]", "+sweep.space.model=[mlp,linear]"]


@pytest.mark.skipif(parallel.workers_available() < 2, reason="needs Linux and two cores")
def test_the_corners_group_options_composed_side_by_side_build_the_same_points(
        monkeypatch) -> None:
    side_by_side = plan_from_overrides(GROUP_SPACE).points
    monkeypatch.setattr(parallel, "workers_available", lambda: 1)
    in_turn = plan_from_overrides(GROUP_SPACE).points
    assert side_by_side == in_turn
    assert {(p.params["task"], p.params["model"]) for p in in_turn} == {
        ("teacher_mlp", "mlp"), ("blobs", "mlp"), ("teacher_mlp", "linear")}
    assert {p.trial.labels["model"] for p in in_turn} == {"mlp", "linear"}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_missing_group_option_in_the_space_raises_hydras_error(monkeypatch,
                                                                  workers: int) -> None:
    monkeypatch.setattr(parallel, "workers_available", lambda: workers)
    with pytest.raises(MissingConfigException, match="model/no_such_model'"):
        plan_from_overrides([*SMALL, "+sweep.space.model=[mlp,no_such_model,no_such_b]"])
