"""The explorer's payload: a Python reading of the blob format (analysis/explorer.py) gives
back the curves within the quantization error, keeps spikes, and stays small."""

from __future__ import annotations

import base64
import json

import numpy as np
import pandas as pd
import pytest

from analysis.axes import sweep_axes
from analysis.explorer import (
    MAX_BUCKETS,
    MIN_BUCKETS,
    MISSING,
    buckets_for,
    explorer_payload,
    payload_json,
)
from analysis.load import load_run
from analysis.sections import labeled
from study.records import write_curves, write_trials


def decode(blob: str) -> dict:
    raw = base64.b64decode(blob)
    head = np.frombuffer(raw[:32], "<f4").astype(float)
    nb, ne = np.frombuffer(raw[32:36], "<u2")
    offset = 36

    def values(count, lo, hi):
        nonlocal offset
        q = np.frombuffer(raw[offset:offset + 2 * count], "<u2").astype(float)
        offset += 2 * count
        return np.where(q == MISSING, np.nan, 10 ** (lo + (hi - lo) * q / (MISSING - 1)))

    loss = values(2 * nb, head[0], head[1]).reshape(nb, 2)
    grad = values(2 * nb, head[2], head[3]).reshape(nb, 2)
    steps = np.frombuffer(raw[offset:offset + 4 * ne], "<u4")
    offset += 4 * ne
    train = values(ne, head[4], head[5])
    val = values(ne, head[4], head[5])
    assert offset == len(raw)
    return {"width": head[6], "divergence": head[7], "loss": loss, "grad": grad,
            "steps": steps, "train": train, "val": val, "bytes": len(raw)}


def write_long_run(run_dir, n_trials: int = 6, n_steps: int = 5000, n_evals: int = 101):
    trials = pd.DataFrame({"trial": range(n_trials), "status": "converged",
                           "optimizer.lr": [0.1 * (i + 1) for i in range(n_trials)],
                           "seed": 0, "val_loss_initial": 1.0, "val_loss_final": 0.1,
                           "divergence_step": np.nan})
    trials.loc[1, ["status", "divergence_step", "val_loss_final"]] = ["diverged", 700, np.inf]
    write_trials(run_dir, trials, {"sweep": "long", "seeds": [0],
                                   "axes": {"optimizer.lr": trials["optimizer.lr"].tolist()}})
    steps = np.arange(n_steps)
    parts = []
    for t in range(n_trials):
        loss = np.exp(-steps / 2000) * (1 + 0.01 * np.sin(steps))
        loss[3001] = 50.0  # one spike, between bucket edges
        grad = np.full(n_steps, 2.0)
        grad[::2] = 0.0  # a log axis cannot show zeros: they are missing, not errors
        if t == 1:
            loss[700:] = np.inf
        eval_at = np.linspace(0, n_steps - 1, n_evals).astype(int)
        for split, metric, at, values in (("batch", "loss", steps, loss),
                                          ("batch", "grad_norm", steps, grad),
                                          ("train", "loss", eval_at, loss[eval_at]),
                                          ("val", "loss", eval_at, 1.1 * loss[eval_at])):
            parts.append(pd.DataFrame({"trial": t, "step": at, "split": split,
                                       "metric": metric, "value": values}))
    write_curves(run_dir, "pop", pd.concat(parts, ignore_index=True))
    return run_dir


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    run = load_run(write_long_run(tmp_path_factory.mktemp("long")))
    axes = sweep_axes(run.trials, run.meta)
    return explorer_payload(labeled(run.trials, axes), axes, run.run_dir)


def test_long_series_keep_their_spike_and_values(payload):
    curve = decode(payload["curves"][0])
    assert curve["width"] == 25 and len(curve["loss"]) == 200  # 5000 steps in 200 buckets
    assert np.nanmax(curve["loss"]) == pytest.approx(50.0, rel=1e-3)
    assert int(np.nanargmax(curve["loss"][:, 1])) == 3001 // 25
    first = np.exp(-np.arange(25) / 2000) * (1 + 0.01 * np.sin(np.arange(25)))
    assert curve["loss"][0] == pytest.approx([first.min(), first.max()], rel=1e-3)
    assert np.all(curve["grad"] == pytest.approx(2.0, rel=1e-3))  # zeros are left out
    assert len(curve["steps"]) == 101 and curve["steps"][-1] == 4999
    assert curve["val"] == pytest.approx(1.1 * curve["train"], rel=1e-3)
    assert np.isnan(curve["divergence"])


def test_a_diverged_trial_stops_where_it_blew_up(payload):
    curve = decode(payload["curves"][1])
    assert curve["divergence"] == 700
    last_finite = np.flatnonzero(np.isfinite(curve["loss"][:, 1]))[-1]
    assert last_finite == 699 // 25
    assert payload["statuses"][payload["status"][1]] == "diverged"
    assert {"name": "val_loss_final", "values": [0.1, "inf", 0.1, 0.1, 0.1, 0.1]} \
        in payload["metrics"]


def test_axes_and_codes_pick_every_trial_once(payload):
    assert [a["name"] for a in payload["axes"]] == ["optimizer.lr", "seed"]
    keys = list(zip(*payload["codes"], strict=True))
    assert len(set(keys)) == len(payload["trial"]) == 6


def test_payload_size_per_trial_and_how_it_scales(payload):
    per_trial = decode(payload["curves"][0])["bytes"]
    assert per_trial == 36 + 8 * 200 + 8 * 101  # header, 2 series x 200 buckets, evals
    text = payload_json(payload)
    assert len(text) / 6 < 3500  # base64 and JSON: ~3.3 KiB a trial at most
    json.loads(text)
    assert "</" not in text
    # 1,000 trials: the full 200 buckets (~3.3 MB); 10,000: fewer buckets, ~8 MB of blobs.
    assert buckets_for(1000) == MAX_BUCKETS
    assert MIN_BUCKETS < buckets_for(10_000) < MAX_BUCKETS
    assert buckets_for(10_000) * 8 * 10_000 <= 8_000_000


def test_each_blob_holds_its_own_trials_curves_whatever_the_files_hold(tmp_path):
    """Trials listed out of order, one without curves, one whose every value is NaN, rows
    of an unfinished trial, and curves spread over two files: each blob is its trial's."""
    trials = pd.DataFrame({"trial": [7, 2, 4, 9], "status": "converged",
                           "optimizer.lr": [0.1, 0.2, 0.3, 0.4], "seed": 0,
                           "divergence_step": [np.nan, 3.0, np.nan, np.nan]})
    write_trials(tmp_path, trials, {"sweep": "mixed", "seeds": [0],
                                    "axes": {"optimizer.lr": [0.1, 0.2, 0.3, 0.4]}})

    def rows(trial, loss, grad, evals):
        steps = np.arange(len(loss))
        at = np.arange(len(evals)) * 2
        return pd.concat([
            pd.DataFrame({"trial": trial, "step": steps, "split": "batch", "metric": m,
                          "value": v}) for m, v in (("loss", loss), ("grad_norm", grad))]
            + [pd.DataFrame({"trial": trial, "step": at, "split": s, "metric": "loss",
                             "value": np.asarray(evals) * k})
               for s, k in (("train", 1.0), ("val", 2.0))], ignore_index=True)

    write_curves(tmp_path, "first", pd.concat([
        rows(2, [4.0, 2.0, np.inf, np.nan], [1.0, 3.0, 5.0, np.nan], [4.0, np.nan]),
        rows(5, [9.0] * 3, [9.0] * 3, [9.0])], ignore_index=True))  # never finished
    write_curves(tmp_path, "second", pd.concat([
        rows(9, [np.nan] * 5, [0.0] * 5, [np.nan] * 3),
        rows(7, [1.0, 10.0, 100.0], [0.5, 0.25, 0.125], [1.0, 0.1])], ignore_index=True))
    run = load_run(tmp_path)
    axes = sweep_axes(run.trials, run.meta)
    payload = explorer_payload(labeled(run.trials, axes), axes, run.run_dir)
    assert payload["trial"] == [7, 2, 4, 9]
    seven, two, four, nine = (decode(blob) for blob in payload["curves"])

    assert seven["width"] == 1 and seven["loss"][:, 0] == pytest.approx([1, 10, 100], 1e-3)
    assert seven["grad"][:, 1] == pytest.approx([0.5, 0.25, 0.125], rel=1e-3)
    assert list(seven["steps"]) == [0, 2]
    assert seven["train"] == pytest.approx([1.0, 0.1], rel=1e-3)
    assert seven["val"] == pytest.approx([2.0, 0.2], rel=1e-3)

    assert two["divergence"] == 3 and len(two["loss"]) == 4
    assert two["loss"][:2, 0] == pytest.approx([4.0, 2.0], rel=1e-3)
    assert np.isnan(two["loss"][2:]).all()  # inf and NaN are missing
    assert two["grad"][:3, 1] == pytest.approx([1.0, 3.0, 5.0], rel=1e-3)
    # an evaluation with no value at all (both losses NaN) has nothing to draw: left out
    assert list(two["steps"]) == [0] and two["train"] == pytest.approx([4.0], rel=1e-3)

    assert four["bytes"] == 36 and len(four["loss"]) == 0 and len(four["steps"]) == 0
    assert np.isnan(nine["loss"]).all() and np.isnan(nine["grad"]).all()  # 0: not on a log axis
    assert len(nine["steps"]) == 0
