"""Fixture run directories written with study.records, with numbers known by construction.

Sweep: 2 tasks x 2 optimizers x 3 learning rates x 2 batch sizes (32, "full") x 2 seeds.
Initial val loss = SCALE[task] * (1 + 0.1 * seed), so each task's median initial val loss
is 1.05 * SCALE[task]. Converged final val loss = SCALE[task] * lr * (10 if full else 1) *
(1 + seed). Diverged and no-progress finals equal the initial loss (capped).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from study.records import read_trials, write_curves, write_env, write_trials

TASKS = ["teacher_mlp", "blobs"]  # declared order is not alphabetical on purpose
OPTIMIZERS = ["sgd", "adam"]
LRS = [0.001, 0.01, 0.1]
BATCHES = [32, "full"]
SEEDS = [0, 1]
SCALE = {"teacher_mlp": 2.0, "blobs": 1.0}
STEPS = 10
HYDRA_TEXT = "optimizer:\n  lr: 0.1  # <b>not bold</b>\n"


def status_of(task: str, opt: str, lr: float, batch: int | str, seed: int) -> str:
    if opt == "sgd" and lr == 0.1 and batch == 32:
        return "diverged"  # both seeds: majority diverged
    if opt == "sgd" and lr == 0.1 and batch == "full" and seed == 1:
        return "diverged"  # one seed of two: not a majority
    if opt == "adam" and lr == 0.001:
        return "no_progress"
    if task == "blobs" and opt == "adam" and lr == 0.01 and batch == "full" and seed == 0:
        return "unstable"  # a status the analysis does not know specially
    return "converged"


def initial_loss(task: str, seed: int) -> float:
    return SCALE[task] * (1 + 0.1 * seed)


def final_loss(task: str, opt: str, lr: float, batch: int | str, seed: int) -> float:
    if status_of(task, opt, lr, batch, seed) in ("diverged", "no_progress"):
        return initial_loss(task, seed)
    return SCALE[task] * lr * (10 if batch == "full" else 1) * (1 + seed)


def _trial_rows() -> list[dict]:
    rows = []
    for task in TASKS:
        for opt in OPTIMIZERS:
            for lr in LRS:
                for batch in BATCHES:
                    for seed in SEEDS:
                        status = status_of(task, opt, lr, batch, seed)
                        final = final_loss(task, opt, lr, batch, seed)
                        init = initial_loss(task, seed)
                        rows.append({
                            "trial": len(rows), "key": f"k{len(rows)}", "status": status,
                            "objective": final, "task": task, "model": "mlp",
                            "optimizer": opt, "task.type": task.title(),
                            "optimizer.lr": lr, "train.batch_size": batch,
                            "train.epochs": 2, "seed": seed,
                            "train_loss_initial": init, "train_loss_final": final,
                            "val_loss_initial": init, "val_loss_final": final,
                            "val_acc_final": np.nan if task == "teacher_mlp" else 0.9,
                            "grad_norm_max": 3.0,
                            "divergence_step": 7.0 if status == "diverged" else np.nan,
                            "steps": STEPS, "planned_steps": STEPS,
                            "irreducible_loss": 0.01,
                            # issue-4 metrics: the analysis treats any numeric column as one
                            "spike_count": 3 if status == "diverged" else seed,
                            "osc_tv_ratio": 1.0 + lr,
                        })
    return rows


def _curves(trials: pd.DataFrame) -> pd.DataFrame:
    parts = []
    for row in trials.itertuples():
        steps = np.arange(STEPS + 1)
        loss = np.geomspace(row.val_loss_initial, row.val_loss_final, STEPS + 1)
        if row.status == "diverged":
            loss = loss.copy()
            loss[-3:] = [10.0 * row.val_loss_initial, 1e30, np.inf]
        for split, metric, values, at in (
            ("batch", "loss", loss, steps), ("batch", "grad_norm", loss + 1.0, steps),
            ("train", "loss", loss[::5], steps[::5]), ("val", "loss", loss[::5], steps[::5]),
        ):
            parts.append(pd.DataFrame({"trial": row.trial, "step": at, "split": split,
                                       "metric": metric, "value": values}))
    return pd.concat(parts, ignore_index=True)


def write_sweep_run(run_dir: Path) -> Path:
    """The sweep fixture (see module docstring); returns run_dir."""
    trials = pd.DataFrame(_trial_rows())
    meta = {"sweep": "lr_batch", "seeds": SEEDS,
            "axes": {"task": TASKS, "optimizer": OPTIMIZERS, "optimizer.lr": LRS,
                     "train.batch_size": BATCHES},
            "objective": {"metric": "val_loss_final", "direction": "minimize"}}
    write_trials(run_dir, trials, meta)
    curves = _curves(trials)
    half = len(trials) // 2
    write_curves(run_dir, "pop-0", curves[curves["trial"] < half])
    write_curves(run_dir, "pop-1", curves[curves["trial"] >= half])
    # A trial that never finished: its curves must be ignored.
    write_curves(run_dir, "pop-orphan", pd.DataFrame(
        {"trial": [999], "step": [0], "split": ["val"], "metric": ["loss"], "value": [1.0]}))
    write_env(run_dir, {
        "command": "python -m study +sweep=lr_batch", "started": "2024-01-01T00:00:00",
        "finished": "2024-01-01T00:02:05", "wall_time_s": 125.0, "device": "cpu",
        "engine": "population", "git_commit": "abc1234", "hostname": "box",
        "versions": {"torch": "2.3.0", "optuna": "4.0.0"},
    })
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra" / "config.yaml").write_text(HYDRA_TEXT)
    return run_dir


def write_single_run(run_dir: Path) -> Path:
    """One trial, no sweep, no axes, no env.json or .hydra."""
    row = {**_trial_rows()[2], "trial": 0}
    trials = pd.DataFrame([row])
    write_trials(run_dir, trials, {"sweep": None, "axes": {}, "seeds": [0],
                                   "objective": {"metric": "val_loss_final",
                                                 "direction": "minimize"}})
    write_curves(run_dir, "pop-0", _curves(trials))
    return run_dir


def write_diag_run(run_dir: Path) -> Path:
    """The sweep fixture plus opt-in diagnostics: sharpness = 1 / lr, settled at 0.95 of the
    optimizer's threshold, noise scale = 64, and "diag" curves for every trial."""
    write_sweep_run(run_dir)
    trials, meta = read_trials(run_dir)
    lr = trials["optimizer.lr"]
    trials = trials.assign(sharpness_final=1 / lr, sharpness_max=1 / lr,
                           sharpness_ratio_settled=0.95, noise_scale_final=64.0)
    write_trials(run_dir, trials, meta)
    parts = []
    for row in trials.itertuples():
        steps = np.arange(0, STEPS + 1, 5)
        sharpness = np.linspace(0.5, 1.0, len(steps)) / lr[row.Index]
        for metric, values in (("sharpness", sharpness),
                               ("noise_scale", np.full(len(steps), 64.0))):
            parts.append(pd.DataFrame({"trial": row.trial, "step": steps, "split": "diag",
                                       "metric": metric, "value": values}))
    write_curves(run_dir, "diag", pd.concat(parts, ignore_index=True))
    return run_dir


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sweep_run(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_single_run(tmp_path_factory.mktemp("single"))


CLAIMS = pd.DataFrame({"statement": ["larger lr diverges more"], "metric": ["diverged"],
                       "effect": [0.42], "ci_low": [0.2], "ci_high": [0.6],
                       "verdict": ["supported"], "n_trials": [48]})


@pytest.fixture(scope="session")
def sweep_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """report.html of the sweep fixture, built once per session."""
    from analysis import build_report

    run_dir = write_sweep_run(tmp_path_factory.mktemp("sweep_report"))
    path = build_report(run_dir)
    assert path == run_dir / "report.html"
    return path


@pytest.fixture(scope="session")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """report.html with every section: the diagnostics fixture plus a claims table."""
    from analysis import build_report

    return build_report(write_diag_run(tmp_path_factory.mktemp("full_report")), claims=CLAIMS)
