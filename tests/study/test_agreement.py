"""Every status agrees with its own trial's recorded curves, on every shipped sweep.

The rules are re-derived here from the curves files alone (not from study.metrics), in the
words of docs/metrics.md: the judged signal is the validation loss; E is the median of the
last 10% of its finite evals. A diverged trial stopped at a non-finite value or ended
above 10x its initial loss; a converged trial's E is not above its initial loss; a
no_progress trial's E did not fall by more than 5% of its initial excess, or of the
excess of the input-free loss (the targets' mean or class frequencies) when that is lower;
a recovered
trial went above 2x its initial loss and came back; a pruned trial was stopped by a
search's pruner (`pruned_step`, where its curves end). Measured finals are never overwritten.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from study import records

FAST = ["smoke"]
SLOW = ["loop_bugs", "lr_batch", "outliers_normalization", "failure_modes", "clipping_schedules",
        "optimizer_compare", "init_activation", "real_data", "layer_decay",
        "suspects"]


def _per_trial(curves: pd.DataFrame) -> dict[int, dict[str, np.ndarray]]:
    out: dict[int, dict[str, np.ndarray]] = {}
    for (trial, split, metric), rows in curves.groupby(["trial", "split", "metric"]):
        out.setdefault(int(trial), {})[f"{split}/{metric}"] = rows.sort_values("step")[
            ["step", "value"]].to_numpy(dtype=float)
    return out


def check_agreement(run_dir: Path) -> int:
    """Assert the documented rules for every trial of `run_dir`; returns the trial count."""
    trials, _ = records.read_trials(run_dir)
    curves = _per_trial(records.read_curves(run_dir, trials=trials["trial"].tolist()))
    for row in trials.itertuples():
        own = curves[int(row.trial)]
        val = own["val/loss"]
        stopped = any(not np.isfinite(own[k][:, 1]).all()
                      for k in ("batch/loss", "batch/grad_norm", "train/loss", "val/loss")
                      if k in own)
        finite = val[np.isfinite(val[:, 1])]
        where = f"trial {row.trial} ({row.status})"
        if len(finite) == 0 or finite[0, 0] != 0:  # not even the initialization was finite
            assert stopped and row.status == "diverged", where
            continue
        initial, floor = finite[0, 1], row.irreducible_loss
        tail = finite[-max(1, math.ceil(0.1 * len(finite))):, 1]
        end = float(np.median(tail))
        # Measured values are what the curves say.
        if stopped:
            assert row.val_loss_final == math.inf, where
        else:
            assert row.val_loss_final == val[-1, 1], where
            assert row.val_loss_end == pytest.approx(end), where
        assert row.val_loss_initial == initial, where
        assert row.loss_blowup_max == pytest.approx(finite[:, 1].max() / initial), where
        free = getattr(row, "input_free_loss", math.nan)
        start = min(initial, free) if np.isfinite(free) else initial
        floor = min(floor, start)  # a floor above the start cannot be reached for
        excess_fell = (start - floor) - (end - floor)
        if row.status == "diverged":
            blown_end = len(finite) > 1 and (finite[-3:, 1] > 10 * initial).all()
            assert stopped or blown_end, where
            assert stopped or finite[-1, 1] > initial, where
            if stopped:
                # The mark is where the engine stopped: the last recorded step.
                last = max(own[k][-1, 0] for k in ("batch/loss", "val/loss") if k in own)
                assert row.divergence_step <= last, where
            else:
                assert row.divergence_step in set(finite[:, 0]), where
        else:
            assert not stopped and math.isnan(row.divergence_step), where
        pruned_step = getattr(row, "pruned_step", math.nan)
        if row.status == "pruned":
            assert pruned_step == val[-1, 0] < row.planned_steps, where
        elif not math.isnan(pruned_step):  # the pruner stopped a run that had blown up
            assert row.status == "diverged", where
        if row.status == "converged":
            assert end <= initial, where
        if row.status == "no_progress":
            assert excess_fell <= 0.05 * (start - floor) + 1e-12, where
        if row.status in ("converged", "slow", "unstable", "recovered"):
            assert excess_fell > 0.05 * (start - floor), where
        if row.status == "recovered":
            assert finite[:, 1].max() > 2 * initial, where
        if row.status in ("converged", "slow", "unstable"):
            assert finite[:, 1].max() <= 2 * initial, where
    return len(trials)


def _run(study_cli, tmp_path: Path, sweep: str) -> Path:
    run_dir = tmp_path / sweep
    done = study_cli(f"+sweep={sweep}", "sweep.seeds=[0]", f"hydra.run.dir={run_dir}",
                     "progress=false", "report=false", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("sweep", FAST)
def test_every_status_agrees_with_its_curves(sweep: str, tmp_path: Path, study_cli) -> None:
    assert check_agreement(_run(study_cli, tmp_path, sweep)) > 0


def test_a_pruned_trial_reads_pruned_not_the_status_of_its_cut_curve(tmp_path: Path,
                                                                      study_cli) -> None:
    """A search's pruner stops trials at an evaluation; their curves end there."""
    run_dir = tmp_path / "pruned"
    done = study_cli("+sweep=adam_search", "+sweep.pruner={type:median}", "sweep.trials=32",
                     f"hydra.run.dir={run_dir}", "progress=false", "report=false",
                     timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert check_agreement(run_dir) == 96
    trials, _ = records.read_trials(run_dir)
    assert (trials["status"] == "pruned").sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("sweep", SLOW)
def test_every_status_agrees_with_its_curves_on_the_larger_sweeps(sweep: str, tmp_path: Path,
                                                                  study_cli) -> None:
    assert check_agreement(_run(study_cli, tmp_path, sweep)) > 0
