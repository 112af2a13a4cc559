"""A 10,000-trial run directory (synthetic, written with study.records) gives a report in
under a minute and under 20 MB; galleries and tables sample and say so."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import build_report
from study.records import write_curves, write_env, write_trials

TASKS = ["teacher_mlp", "blobs"]
OPTIMIZERS = ["sgd", "momentum", "adam", "rmsprop"]
LRS = [float(f"{x:.6g}") for x in np.geomspace(1e-4, 10, 25)]
BATCHES = [8, 32, 128, 512, "full"]
SEEDS = list(range(10))
EVALS, STEPS = 6, 40


def write_large_run(run_dir: Path) -> int:
    """2 tasks x 4 optimizers x 25 lrs x 5 batch sizes x 10 seeds; returns the trial count."""
    grid = pd.MultiIndex.from_product([TASKS, OPTIMIZERS, LRS, BATCHES, SEEDS],
                                      names=["task", "optimizer", "optimizer.lr",
                                             "train.batch_size", "seed"]).to_frame(index=False)
    n = len(grid)
    rng = np.random.default_rng(0)
    lr = grid["optimizer.lr"].to_numpy()
    initial = np.where(grid["task"] == "blobs", 1.1, 1.0) * (1 + 0.05 * rng.random(n))
    log_lr = np.log10(lr)
    status = np.select([log_lr > 0.3 + rng.normal(0, 0.3, n), log_lr < -3.3,
                        log_lr < -2.8, rng.random(n) < 0.05],
                       ["diverged", "no_progress", "slow", "unstable"], "converged")
    final = np.where(np.isin(status, ["diverged", "no_progress"]), initial,
                     initial * np.clip(0.02 * (log_lr + 4.5) ** -1.5 + 0.01, 0, 0.9))
    trials = grid.assign(
        trial=np.arange(n), key=[f"k{i}" for i in range(n)], status=status, objective=final,
        model="mlp", val_loss_initial=initial, val_loss_final=final,
        train_loss_initial=initial, train_loss_final=final * 0.9,
        divergence_step=np.where(status == "diverged", STEPS // 2, np.nan),
        spike_count=rng.poisson(1, n), osc_tv_ratio=1 + rng.random(n),
        loss_diff_autocorr=rng.uniform(-1, 1, n), grad_norm_max=rng.lognormal(0, 2, n),
        steps_to_90pct=rng.integers(1, STEPS, n).astype(float), gen_gap=rng.normal(0, .1, n),
    )
    write_trials(run_dir, trials, {
        "sweep": "large", "seeds": SEEDS, "objective": {"metric": "val_loss_final",
                                                        "direction": "minimize"},
        "axes": {"task": TASKS, "optimizer": OPTIMIZERS, "optimizer.lr": LRS,
                 "train.batch_size": BATCHES}})
    steps = np.arange(STEPS + 1)
    decay = np.exp(-steps / STEPS * 3)  # (S,)
    for start in range(0, n, 1000):
        ids = np.arange(start, min(start + 1000, n))
        loss = (initial[ids, None] * (decay[None, :] * (1 - final[ids, None] / initial[ids, None])
                                      + final[ids, None] / initial[ids, None]))  # (T, S)
        eval_at = steps[:: STEPS // (EVALS - 1)]
        parts = [pd.DataFrame({"trial": np.repeat(ids, len(at)), "step": np.tile(at, len(ids)),
                               "split": split, "metric": metric, "value": values.ravel()})
                 for split, metric, at, values in (
                     ("batch", "loss", steps, loss), ("batch", "grad_norm", steps, loss + 1),
                     ("train", "loss", eval_at, loss[:, eval_at]),
                     ("val", "loss", eval_at, loss[:, eval_at]))]
        write_curves(run_dir, f"trials-{start:06d}", pd.concat(parts, ignore_index=True))
    write_env(run_dir, {"command": "synthetic", "wall_time_s": 3600.0})
    return n


@pytest.mark.slow
def test_ten_thousand_trials_report_is_fast_and_small(tmp_path):
    assert write_large_run(tmp_path) == 10_000
    start = time.perf_counter()
    path = build_report(tmp_path)
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    print(f"10,000-trial report: {seconds:.1f} s, {size / 2**20:.2f} MiB")
    assert seconds < 60
    assert size < 20 * 2**20
    html = path.read_text()
    assert "10000 finished trials" in html
    assert "this table shows 500 of 1000 rows" in html  # cell and metric tables sample
    assert "showing 3, evenly spread" in html  # galleries sample


@pytest.mark.slow
def test_thousand_trials_with_long_curves_stay_under_ten_megabytes(tmp_path):
    """1,000 trials of 640 minibatch steps and 42 evaluations each (lr_batch's longest):
    the report, trial explorer included, stays under 10 MB."""
    rng = np.random.default_rng(2)
    n, steps = 1000, np.arange(640)
    grid = pd.DataFrame({"trial": np.arange(n), "optimizer.lr": np.repeat(
        np.geomspace(1e-4, 10, 100), 10), "seed": np.tile(np.arange(10), 100)})
    status = rng.choice(["converged", "unstable", "diverged"], n)
    trials = grid.assign(status=status, val_loss_initial=1.0, val_loss_final=0.1,
                         objective=0.1, divergence_step=np.where(status == "diverged", 300.0,
                                                                 np.nan))
    write_trials(tmp_path, trials, {"sweep": "long", "seeds": list(range(10)),
                                    "axes": {"optimizer.lr": sorted(set(grid["optimizer.lr"]))}})
    eval_at = steps[::16]
    loss = np.exp(-steps[None, :] / 300) * rng.lognormal(0, 0.3, (n, len(steps)))  # (T, S)
    parts = [pd.DataFrame({"trial": np.repeat(np.arange(n), len(at)),
                           "step": np.tile(at, n), "split": split, "metric": metric,
                           "value": values.ravel()})
             for split, metric, at, values in (
                 ("batch", "loss", steps, loss), ("batch", "grad_norm", steps, loss * 3),
                 ("train", "loss", eval_at, loss[:, eval_at]),
                 ("val", "loss", eval_at, loss[:, eval_at]))]
    write_curves(tmp_path, "pop", pd.concat(parts, ignore_index=True))
    path = build_report(tmp_path)
    size = path.stat().st_size
    print(f"1,000 trials x 640 steps: {size / 2**20:.2f} MiB")
    assert size < 10_000_000
    assert 'id="explorer-data"' in path.read_text()
