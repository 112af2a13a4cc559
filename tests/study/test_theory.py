"""Textbook results the harness must reproduce end to end, through `python -m study`.

Each test runs the real CLI in a subprocess (a sweep written to a temporary config
directory on Hydra's search path), reads the records it wrote (`study.records`) and checks
a result from the optimization literature against them:

- gradient descent on a quadratic converges below lr = 2 / lambda_max and diverges above it;
- full-batch gradient descent sharpens to 2 / lr and hovers there (edge of stability,
  Cohen et al. 2021), and Adam's preconditioned sharpness to 38 / lr (Cohen et al. 2022);
- at 2 / lambda_0 < lr < 4 / lambda_0 the loss spikes, the sharpness falls below 2 / lr and
  the run recovers (the catapult of Lewkowycz et al. 2020).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from study import records
from study.seeds import seed_streams
from study.tasks import LinearRegression

QUIET = ("report=false", "progress=false")


def run_sweep(tmp_path: Path, study_cli, sweep: str, *overrides: str) -> Path:
    """Run `sweep` (the body of a sweep YAML) through the CLI; returns the run directory."""
    conf = tmp_path / "conf" / "sweep"
    conf.mkdir(parents=True)
    (conf / "theory.yaml").write_text("# @package _global_\n" + sweep)
    run_dir = tmp_path / "run"
    study_cli("+sweep=theory", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
              f"hydra.run.dir={run_dir}", *QUIET, *overrides, expect=0)
    return run_dir


def curve(curves: pd.DataFrame, trial: int, split: str, metric: str) -> pd.Series:
    """One trial's curve as a Series indexed by step."""
    rows = curves[(curves["trial"] == trial) & (curves["split"] == split)
                  & (curves["metric"] == metric)]
    return rows.set_index("step")["value"].sort_index()


# --- 1. gradient descent on linear regression: stable iff lr < 2 / lambda_max -------------

SPREAD = [float(s) for s in np.logspace(-1, 1, 10)]  # feature scales spanning 100x
GD_SEEDS = [0, 1, 2]


def top_hessian_eigenvalue(task: LinearRegression, seed: int) -> float:
    """lambda_max of the Hessian of the loss the harness minimizes: the MSE mean over the
    rows of the training split (torch's mse_loss, one output), with the model's bias, is
    L(w) = |X_a w - y|^2 / n, so H = 2 / n X_a^T X_a, X_a = [X, 1]."""
    x = task.generate(seed_streams(seed).data).x_train
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    return float(torch.linalg.eigvalsh(2 / len(x) * xa.T @ xa)[-1])
