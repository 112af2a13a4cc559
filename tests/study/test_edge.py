"""The stability edge by search: brackets, resumability, and 2/lambda_max on a quadratic."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from study import queue, records
from study.edge import EdgeSpec, bracket, edges_frame, run_edge
from study.engine import make_engine
from study.grid import CONF_DIR
from study.plan import plan_from_overrides
from study.records import trials_frame
from study.schema import ConfigError
from study.storage import open_study

CPU = torch.device("cpu")


def test_the_bracket_is_the_largest_stable_rate_below_the_first_divergence() -> None:
    tried = {0.01: False, 0.1: False, 1.0: True, 0.5: False, 10.0: True, 0.05: True}
    b = bracket(tried)
    assert (b.lo, b.hi) == (0.01, 0.05)  # 0.1 and 0.5 trained, but 0.05 already diverged
    spec = EdgeSpec(low=0.01, high=10, precision=0.1, candidates=3)
    assert np.allclose(b.next_rates(spec), np.geomspace(0.01, 0.05, 5)[1:-1])
    assert bracket({0.01: False, 10.0: False}).resolved(spec)  # nothing diverged: above high
    assert bracket({0.01: True, 10.0: True}).resolved(spec)  # even low diverged: below low
    assert bracket({1.0: False, 1.05: True}).resolved(spec)


def test_rounds_needed_reach_the_precision() -> None:
    spec = EdgeSpec(low=1e-4, high=10, precision=0.1, candidates=4)
    width = (10 / 1e-4) ** (1 / 3)  # first-round spacing
    n = spec.rounds_needed()
    assert math.log(width) / 5 ** n <= math.log(1.1) < math.log(width) / 5 ** (n - 1)


QUADRATIC = """# @package _global_
sweep:
  name: edge_quadratic
  seeds: [0, 1]
  edge: {low: 1e-5, high: 1, precision: 0.02, candidates: 4}
"""
LINEAR = ["+sweep=edge_quadratic", "task=linear_regression", "task.dim=4",
          "task.feature_scale=[1,3,10,30]", "task.n_train=64", "task.n_val=64", "model=linear",
          "optimizer=sgd", "train.batch_size=full", "train.epochs=300", "train.dtype=float64",
          "train.eval_every=20"]


@pytest.fixture(scope="module")
def conf(tmp_path_factory) -> Path:
    """The shipped config directory plus a sweep of the one configuration's edge."""
    root = tmp_path_factory.mktemp("conf")
    shutil.copytree(CONF_DIR, root / "conf")
    (root / "conf" / "sweep" / "edge_quadratic.yaml").write_text(QUADRATIC)
    return root / "conf"


def _lambda_max(trial) -> float:
    """Top eigenvalue of the Hessian of the mean squared error (bias included)."""
    data = trial.task.generate(_data_seed(trial))
    x = torch.cat([data.x_train, torch.ones(len(data.x_train), 1, dtype=torch.float64)], 1)
    return float(torch.linalg.eigvalsh(2 / len(x) * x.T @ x)[-1])


def _data_seed(trial) -> int:
    from study.seeds import seed_streams

    return seed_streams(trial.seed).data


def test_the_edge_of_gradient_descent_on_a_quadratic_is_2_over_lambda_max(tmp_path: Path,
                                                                          conf: Path) -> None:
    plan = plan_from_overrides(LINEAR, conf)
    study = open_study(tmp_path, None, "edge", "minimize")
    outcome = run_edge(plan, study, make_engine("batched"), CPU, tmp_path, "val_loss_final")
    edges = edges_frame(plan, study)
    assert len(edges) == 1 and bool(edges.loc[0, "resolved"])
    # Each seed draws its own data: the edge of all seeds is the smallest 2 / lambda_max.
    threshold = min(2 / _lambda_max(p.trial) for p in plan.configs[0])
    edge, high = edges.loc[0, "edge"], edges.loc[0, "edge_high"]
    assert edges.loc[0, "precision"] <= 0.02
    assert edge <= threshold * 1.005 and high >= threshold * 0.995, (edge, high, threshold)
    assert edge >= threshold / 1.03
    # The search cost a fraction of a grid of the same precision (log10(1e5)/log10(1.02)).
    assert edges.loc[0, "rates_tried"] < 30 and outcome.trained == 2 * edges.loc[0, "rates_tried"]
    frame = trials_frame(queue.finished(study))
    assert frame["optimizer.lr"].between(1e-5, 1).all()
    # Resuming recomputes the brackets from the storage and trains nothing more.
    again = run_edge(plan, study, make_engine("batched"), CPU, tmp_path, "val_loss_final")
    assert again.trained == 0 and again.already_done == outcome.trained  # said "0 done"


@pytest.mark.slow
def test_the_cli_writes_the_edges(tmp_path: Path, conf: Path, study_cli) -> None:
    run_dir = tmp_path / "run"
    done = study_cli(*LINEAR, "sweep.edge.precision=0.2", f"hydra.run.dir={run_dir}",
                     f"hydra.searchpath=[file://{conf}]", "progress=false")
    assert done.returncode == 0, done.stderr[-2000:]
    edges = records.read_edges(run_dir)
    assert edges is not None and len(edges) == 1 and edges["resolved"].all()
    report = (run_dir / records.REPORT).read_text()
    assert 'id="stability-edge"' in report and "Bars: the same rule" in report


@pytest.mark.parametrize("override, message", [
    ("sweep.edge.low=0", r"^sweep\.edge\.low: out of range \(0 < low < high finite, "
                         r"precision > 0, candidates >= 2\): 0\.0$"),
    ("sweep.edge.high=-1", r"^sweep\.edge\.high: out of range .*: -1\.0$"),
    ("sweep.edge.low=abc", r"^sweep\.edge: could not convert string to float: 'abc'$"),
    ("+sweep.edge.step=2", "sweep.edge.step: unknown key"),
    ("+sweep.axes={optimizer.lr: [0.1]}", "an edge search finds the learning rate"),
    # Each passed the range checks and failed counting the rounds, after the run directory
    # was written (candidates 2.7 ran as 2).
    ("sweep.edge.precision=inf", r"^sweep\.edge\.precision: must be a finite number, got inf$"),
    ("sweep.edge.precision=1e-320", r"^sweep\.edge\.precision: must be >= 1e-12 "),
    ("sweep.edge.high=1e308", r"^sweep\.edge\.high: high / low must be a float above 1 and "
                              r"below 1\.798e\+308, got high 1e\+308 for low 1e-05$"),
    ("sweep.edge.low=1e-320", r"^sweep\.edge\.low: must be >= 2\.225e-308 \(the smallest "
                              r"normal float64\), got 1e-320$"),
    ("sweep.edge.candidates=2.7", r"^sweep\.edge\.candidates: expected an integer >= 2, got "
                                  r"2\.7$"),
    ("sweep.edge.candidates=1", r"^sweep\.edge\.candidates: expected an integer >= 2, got 1$"),
])
def test_a_bad_edge_search_is_refused(override: str, message: str, conf: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_from_overrides([*LINEAR, override], conf)


@pytest.mark.parametrize("edge", [{"low": 1e-300, "high": 1e8, "precision": 1e-12},
                                  {"low": 1e-4, "high": 1e300, "precision": 1e300},
                                  {"low": 2.3e-308, "high": 1.0, "candidates": 50}])
def test_an_edge_spec_it_accepts_counts_its_rounds(edge) -> None:
    spec = EdgeSpec(**edge)
    assert spec.rounds_needed() >= 0 and len(spec.first_round()) == spec.candidates


def test_edges_with_a_mixed_axis_are_written(tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame({"train.batch_size": [16, "full"], "edge": [0.8, 0.8]})
    records.write_edges(tmp_path, frame)
    assert list(records.read_edges(tmp_path)["train.batch_size"]) == ["16", "full"]
