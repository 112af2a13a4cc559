"""The Optuna driver: exactly once, resumable, divergence as data."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState

from study import queue, records
from study.engine import ReferenceEngine
from study.plan import plan_from_overrides
from study.records import trials_frame
from study.schema import ConfigError
from study.storage import check_same_config, open_study
from study.sweep import run_sweep

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_plan():
    return plan_from_overrides(["+sweep=smoke", "train.epochs=1", "model.width=8"])


def test_every_point_trains_once_and_divergence_is_recorded(tmp_path: Path, tiny_plan) -> None:
    study = open_study(tmp_path, None, "tiny", "minimize")
    progress = []
    outcome = run_sweep(tiny_plan, study, ReferenceEngine(), CPU, tmp_path, "val_loss_final",
                        on_progress=lambda done, total: progress.append((done, total)))
    assert outcome.trained == outcome.total == len(tiny_plan.points) == 16
    assert progress[0] == (0, 16) and progress[-1] == (16, 16)
    frame = trials_frame(queue.finished(study))
    assert sorted(frame["key"]) == sorted(p.trial.key() for p in tiny_plan.points)
    diverged = frame[frame["status"] == "diverged"]
    assert len(diverged) > 0
    assert (diverged["optimizer.lr"] == 10.0).all()
    assert frame["objective"].notna().all()
    again = run_sweep(tiny_plan, study, ReferenceEngine(), CPU, tmp_path, "val_loss_final")
    assert (again.trained, again.already_done) == (0, 16)


def test_taking_reads_the_queue_once_per_pass_not_once_per_trial(tmp_path: Path, tiny_plan,
                                                                    monkeypatch) -> None:
    """Optuna's `ask` reads every waiting trial to pop one (quadratic in the sweep; on
    PostgreSQL 0.7 s a trial at 936 queued). The sweep's takes read the queue once per
    pass, and still record each trial's enqueued params, as `ask` did."""
    study = open_study(tmp_path, None, "tiny", "minimize")
    storage = study._storage
    scans = []
    original = storage.get_all_trials

    def counted(study_id, deepcopy=True, states=None):
        if states == (TrialState.WAITING,):
            scans.append(1)
        return original(study_id, deepcopy=deepcopy, states=states)

    monkeypatch.setattr(storage, "get_all_trials", counted)
    outcome = run_sweep(tiny_plan, study, ReferenceEngine(), CPU, tmp_path, "val_loss_final")
    assert outcome.trained == 16
    assert len(scans) <= 3  # a pass over the 16 queued, and the empty read that ends it
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        assert trial.params == {**{a: trial.user_attrs["config"][a] for a in tiny_plan.axes},
                                "seed": trial.params["seed"]}
        assert set(trial.params) == {*tiny_plan.axes, "seed"}


def test_a_trial_left_running_by_a_dead_worker_is_rerun(tmp_path: Path, tiny_plan) -> None:
    study = open_study(tmp_path, None, "tiny", "minimize")
    run_sweep(tiny_plan, study, ReferenceEngine(), CPU, tmp_path, "val_loss_final")
    # Simulate a worker killed mid-trial: one point's trial is RUNNING, owned by a dead pid.
    dead = subprocess.Popen(["true"])
    dead.wait()
    victim = study.get_trials(states=(TrialState.COMPLETE,))[3]
    study.enqueue_trial(victim.params, user_attrs={"key": "stale"})
    stale = study.ask()
    stale.set_user_attr("worker", {"host": socket.gethostname(),
                                   "pid": dead.pid})
    outcome = run_sweep(tiny_plan, study, ReferenceEngine(), CPU, tmp_path, "val_loss_final")
    assert outcome.trained == 0
    assert study.get_trials(deepcopy=False)[stale.number].state == TrialState.FAIL


def test_a_point_whose_trial_failed_is_trained_again(tmp_path: Path, tiny_plan) -> None:
    study = open_study(tmp_path, None, "tiny", "minimize")
    point = tiny_plan.points[0]
    study.enqueue_trial(point.params, user_attrs={"key": point.trial.key()})
    taken = study.ask()
    taken.set_user_attr("worker", {"host": socket.gethostname(), "pid": 1 << 30})
    outcome = run_sweep(tiny_plan, study, ReferenceEngine(), CPU, tmp_path, "val_loss_final")
    assert outcome.trained == 16  # the orphan was failed and its point re-queued
    assert len(trials_frame(queue.finished(study))) == 16


def test_a_changed_config_is_refused(tmp_path: Path) -> None:
    study = open_study(tmp_path, None, "s", "minimize")
    check_same_config(study, {"train.epochs": 3, "seed": 0})
    check_same_config(study, {"train.epochs": 3, "seed": 0})
    with pytest.raises(ConfigError, match=r"train.epochs \(was 3, now 4\)"):
        check_same_config(study, {"train.epochs": 4, "seed": 0})


def test_curves_are_written_before_trials_are_told(tmp_path: Path, tiny_plan) -> None:
    study = open_study(tmp_path, None, "tiny", "minimize")
    run_sweep(tiny_plan, study, ReferenceEngine(), CPU, tmp_path, "val_loss_final")
    frame = trials_frame(queue.finished(study))
    curves = records.read_curves(tmp_path, frame["trial"])
    per_trial = curves[curves["split"] == "val"].groupby("trial").size()
    assert set(per_trial.index) == set(frame["trial"])


def test_numeric_axes_are_stored_with_numeric_distributions(tmp_path: Path, tiny_plan) -> None:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    from study.grid import numeric_distributions

    assert numeric_distributions({
        "optimizer.lr": [1e-3, 0.01, 0.1], "model.width": [8, 16], "model.depth": [1, 10],
        "train.batch_size": [8, 32, "full"], "train.clip": [True, False],
        "optimizer.momentum": [0.0, 0.9],
    }) == {"optimizer.lr": FloatDistribution(1e-3, 0.1, log=True),
           "model.width": IntDistribution(8, 16),
           "model.depth": IntDistribution(1, 10, log=True),
           "optimizer.momentum": FloatDistribution(0.0, 0.9)}
    study = open_study(tmp_path, None, "tiny", "minimize")
    run_sweep(tiny_plan, study, ReferenceEngine(), CPU, tmp_path, "val_loss_final")
    dists = study.get_trials()[0].distributions
    assert dists["optimizer.lr"] == FloatDistribution(min(tiny_plan.axes["optimizer.lr"]),
                                                      max(tiny_plan.axes["optimizer.lr"]),
                                                      log=True)
    assert isinstance(dists["seed"], CategoricalDistribution)


def test_metrics_are_stored_as_plain_json_and_read_back_as_measured(tmp_path: Path,
                                                                    tiny_plan) -> None:
    import json
    import math

    study = open_study(tmp_path, None, "tiny", "minimize")
    run_sweep(tiny_plan, study, ReferenceEngine(), CPU, tmp_path, "val_loss_final")
    for trial in study.get_trials():
        json.dumps(trial.user_attrs, allow_nan=False)  # no NaN or Infinity in the storage
        assert trial.intermediate_values == {}  # storage.dashboard is off
    frame = trials_frame(queue.finished(study))
    stopped = frame[frame["val_loss_final"] == math.inf]  # stopped at a non-finite loss
    assert len(stopped) and (stopped["status"] == "diverged").all()
    assert frame["osc_tv_ratio"].isna().any() and frame["osc_tv_ratio"].dtype == float


def test_the_dashboard_gets_eval_losses_and_key_metrics(tmp_path: Path, tiny_plan) -> None:
    import math

    from study.records import KEY_METRICS

    study = open_study(tmp_path, None, "tiny", "minimize")
    run_sweep(tiny_plan, study, ReferenceEngine(), CPU, tmp_path, "val_loss_final",
              dashboard=True)
    frame = trials_frame(queue.finished(study)).set_index("trial")
    for trial in study.get_trials():
        curve = trial.intermediate_values
        assert curve and min(curve) == 0 and all(math.isfinite(v) for v in curve.values())
        assert curve[0] == pytest.approx(frame.loc[trial.number, "val_loss_initial"])
        for name in KEY_METRICS:
            stored = trial.user_attrs[name]
            measured = frame.loc[trial.number, name]
            assert (str(measured) == stored if isinstance(stored, str)
                    else stored == pytest.approx(measured, nan_ok=True))


def test_a_study_written_before_numeric_distributions_is_refused(tmp_path: Path,
                                                                  tiny_plan) -> None:
    study = open_study(tmp_path, None, "tiny", "minimize")
    run_sweep(tiny_plan, study, ReferenceEngine(), CPU, tmp_path, "val_loss_final")
    study.set_user_attr(records.STORAGE_VERSION_ATTR, 1)
    with pytest.raises(records.RecordError, match="written in storage format 1"):
        open_study(tmp_path, None, "tiny", "minimize")


def test_the_next_population_trains_while_the_last_is_told(tmp_path: Path, tiny_plan,
                                                          monkeypatch) -> None:
    """With the batched engine, each population is started before the one before it is
    told (its curves written, its trials told): the calls interleave, and the trials'
    records are those of a sweep that trains each population after the last is told."""
    from study import sweep
    from study.engine import BatchedEngine

    calls: list[str] = []
    for name in ("start_population", "finish_population"):
        original = getattr(sweep, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name.split("_")[0])
            return _original(*args, **kwargs)

        monkeypatch.setattr(sweep, name, spy)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    study = open_study(tmp_path / "a", None, "tiny", "minimize")
    run_sweep(tiny_plan, study, BatchedEngine(), CPU, tmp_path / "a", "val_loss_final")
    populations = calls.count("start")
    assert populations >= 3 and calls.count("finish") == populations
    assert calls[:3] == ["start", "start", "finish"] and calls[-2:] == ["finish", "finish"]
    assert all(calls[i:i + 2] == ["start", "finish"] for i in range(1, len(calls) - 2, 2))

    monkeypatch.setattr(BatchedEngine, "in_background", lambda self, *a, **k: False)
    alone = open_study(tmp_path / "b", None, "tiny", "minimize")
    run_sweep(tiny_plan, alone, BatchedEngine(), CPU, tmp_path / "b", "val_loss_final")
    columns = ["status", "objective", "val_loss_final", "divergence_step", "grad_norm_max"]
    got, want = (trials_frame(queue.finished(s)).set_index("key").sort_index()[columns]
                 for s in (study, alone))
    assert len(got) == 16 and got.equals(want)


def test_an_error_while_telling_stops_the_population_training_behind_it(
        tmp_path: Path, tiny_plan, monkeypatch) -> None:
    """An exception while a population is told (a full disk, Ctrl-C) cancels the one
    training in the background before it is raised: no kernel thread outlives the sweep."""
    import threading

    from study import sweep
    from study.engine import BatchedEngine

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sweep, "finish_population", fail)
    cancelled: list[int] = []
    original = sweep.start_population

    def started(*args, **kwargs):
        pending = original(*args, **kwargs)
        cancel = pending.cancel
        pending.cancel = lambda: (cancelled.append(1), cancel())[1]
        return pending

    monkeypatch.setattr(sweep, "start_population", started)
    study = open_study(tmp_path, None, "tiny", "minimize")
    with pytest.raises(RuntimeError, match="disk full"):
        run_sweep(tiny_plan, study, BatchedEngine(), CPU, tmp_path, "val_loss_final")
    assert len(cancelled) == 1  # the one behind it (the one being told had trained)
    assert not [t for t in threading.enumerate() if t.name.startswith("study-kernel")]


def test_the_log_says_which_trials_train_without_the_cpu_kernel_and_why() -> None:
    from study.engine import BatchedEngine
    from study.sweep import describe

    points = plan_from_overrides(["+sweep=smoke", "model.width=8"]).points
    assert describe(points, "cpu", BatchedEngine()) == (
        f"{len(points)} trials in 4 populations", "")
    dropout = plan_from_overrides(["+sweep=smoke", "model.width=8", "mitigation=dropout"]).points
    mixed = [*points, *dropout]
    assert describe(mixed, "cpu", BatchedEngine())[1] == (
        f"; {len(dropout)} of them train layer-major, without the CPU kernel "
        f"({len(dropout)} for dropout)")
    for engine, device in ((BatchedEngine(trial_major=False), "cpu"),
                           (ReferenceEngine(), "cpu"), (BatchedEngine(), "cuda")):
        assert describe(mixed, device, engine)[1] == ""
