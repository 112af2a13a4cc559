"""The trial explorer: every trial's curves and status in a compact payload embedded in the
report, drawn offline by a small script (templates/explorer.js) when the reader picks a
trial by its axis values.

Payload (JSON, one `<script type="application/json">` block): the axes (seed last) with
their value labels, each trial's axis codes, status, training objective and a few metrics,
and one base64 blob of curves per trial. A blob is little-endian binary:

    float32 x 8   log10 ranges (lo, hi) of: minibatch loss, gradient norm, evaluations;
                  bucket width w (steps); divergence step (NaN when none)
    uint16 x 2    nb buckets, ne evaluations
    uint16 x 2nb  minibatch loss per bucket: min, max   (bucket b = steps [b w, (b+1) w))
    uint16 x 2nb  gradient norm per bucket: min, max
    uint32 x ne   evaluation steps
    uint16 x ne   train loss;  uint16 x ne  validation loss

Values are log10-quantized to 16 bits inside their range (65535 = missing: non-finite or
<= 0), a relative error under 0.02% per decade of range. A minibatch series of at most nb
steps is stored exactly (w = 1, min = max); a longer one keeps each bucket's min and max, so
spikes survive. Size: about 36 + 8 nb + 8 ne bytes per trial before base64 (x 4/3);
`buckets_for` shrinks nb as the sweep grows, so the payload stays near PAYLOAD_BUDGET.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from analysis.aggregate import order_statuses
from analysis.axes import SEED, SweepAxes, format_key, value_key
from study.records import read_curves_table

MAX_BUCKETS = 200
MIN_BUCKETS = 32
MAX_EVALS = 200
PAYLOAD_BUDGET = 8_000_000  # bytes of curve blobs (before base64) the explorer aims for
MISSING = 65535
METRICS = ("val_loss_initial", "val_loss_final", "val_loss_end", "loss_blowup_max",
           "divergence_step", "spike_count", "eval_rise_count", "osc_tv_ratio",
           "grad_norm_max", "steps_to_90pct")


def buckets_for(n_trials: int) -> int:
    """Minibatch buckets per trial: MAX_BUCKETS up to ~5,000 trials, then fewer (at least
    MIN_BUCKETS) so the blobs stay near PAYLOAD_BUDGET (8 bytes a bucket, two series)."""
    fit = PAYLOAD_BUDGET // max(n_trials, 1) // 8 - 2 * 20  # room for ~20 evaluations
    return int(np.clip(fit, MIN_BUCKETS, MAX_BUCKETS))


def _log10(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(v) & (v > 0), np.log10(v), np.nan)


def _ranges(low: np.ndarray, high: np.ndarray, starts: np.ndarray, counts: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Per segment [starts[i], starts[i] + counts[i]) of `low` and `high` (segments back to
    back, covering the arrays): the least of its finite `low` values and the greatest of
    its finite `high` values; (0, 1) for a segment with none."""
    lo, hi = np.zeros(len(starts)), np.ones(len(starts))
    filled = np.flatnonzero(counts > 0)
    if len(filled):
        least = np.fmin.reduceat(low, starts[filled])  # NaN only where all are NaN
        most = np.fmax.reduceat(high, starts[filled])
        some = np.isfinite(least) & np.isfinite(most)
        lo[filled[some]], hi[filled[some]] = least[some], most[some]
    return lo, hi


def quantize(log_values: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float
             ) -> np.ndarray:
    """uint16 codes of log10 values, each in its range [lo, hi] (arrays broadcast against
    `log_values`, or numbers); NaN -> MISSING."""
    span = np.where(hi > lo, np.subtract(hi, lo), 1.0)
    codes = np.rint((log_values - lo) / span * (MISSING - 1))
    return np.where(np.isfinite(log_values), np.clip(codes, 0, MISSING - 1),
                    MISSING).astype("<u2")


def _bucket_extremes(table: pa.Table, position: np.ndarray, n_trials: int,
                     n_buckets: int) -> dict[str, np.ndarray]:
    """Per trial (`position` of each row's trial, -1: not drawn) its minibatch series in
    buckets: `width` and `nb` per trial, `start` of its buckets in the flat arrays
    `loss_min`, `loss_max`, `grad_min`, `grad_max` (log10; NaN where a bucket has none).

    A trial's last step is its last minibatch record of any metric; bucket b holds steps
    [b w, (b + 1) w), w = ceil((last + 1) / n_buckets) (at least 1)."""
    batch = pc.equal(table.column("split"), "batch").to_numpy(zero_copy_only=False)
    batch &= position >= 0
    step = table.column("step").to_numpy()
    at, steps = position[batch], step[batch]
    last = np.full(n_trials, -1, dtype=np.int64)
    np.maximum.at(last, at, steps)
    has = last >= 0
    width = np.where(has, np.maximum(np.ceil((last + 1) / n_buckets), 1), 1).astype(np.int64)
    nb = np.where(has, last // width + 1, 0)
    start = np.concatenate([[0], np.cumsum(nb)[:-1]]).astype(np.int64)
    out = {"width": width, "nb": nb, "start": start}
    metric = table.column("metric")
    values = table.column("value").to_numpy()
    for name, short in (("loss", "loss"), ("grad_norm", "grad")):
        rows = batch & pc.equal(metric, name).to_numpy(zero_copy_only=False)
        where = start[position[rows]] + step[rows] // width[position[rows]]
        logs = _log10(values[rows])
        for stat, ufunc in (("min", np.fmin), ("max", np.fmax)):
            extreme = np.full(int(nb.sum()), np.nan)
            ufunc.at(extreme, where, logs)
            out[f"{short}_{stat}"] = extreme
    return out


def eval_frame(curves: pd.DataFrame) -> pd.DataFrame:
    """Per trial and evaluation step: log10 train and val loss (at most MAX_EVALS evenly
    spaced evaluations per trial), sorted by trial and step."""
    rows = curves[(curves["metric"] == "loss") & curves["split"].isin(["train", "val"])]
    wide = rows.pivot_table(index=["trial", "step"], columns="split", values="value",
                            aggfunc="first").reset_index()
    for split in ("train", "val"):
        wide[split] = _log10(wide[split]) if split in wide else np.nan
    rank = wide.groupby("trial").cumcount()
    count = wide.groupby("trial")["step"].transform("size")
    stride = np.maximum(np.ceil(count / MAX_EVALS), 1)
    keep = (rank % stride == 0) | (rank == count - 1)
    return wide.loc[keep, ["trial", "step", "train", "val"]]


def _evaluation_rows(table: pa.Table, keep: np.ndarray) -> pd.DataFrame:
    """The train and val loss rows of `table` (`keep`: rows of drawn trials) as
    `read_curves` orders them."""
    split, metric = table.column("split"), table.column("metric")
    mask = (pc.equal(metric, "loss").to_numpy(zero_copy_only=False)
            & pc.is_in(split, value_set=pa.array(["train", "val"])).to_numpy(
                zero_copy_only=False) & keep)
    rows = table.filter(pa.array(mask)).to_pandas()
    return rows.sort_values(["trial", "split", "metric", "step"], kind="stable",
                            ignore_index=True)


def encode_trials(table: pa.Table, ids: list[int], divergence: np.ndarray,
                  n_buckets: int) -> list[str]:
    """The base64 blob of each trial of `ids` (module docstring) from the curves `table`
    (`study.records.read_curves_table`), `divergence` its divergence step (NaN: none).
    Each trial's minibatch series in `n_buckets` buckets at most."""
    n = len(ids)
    unique = np.unique(np.asarray(ids, dtype=np.int64))
    trial = table.column("trial").to_numpy()
    found = np.searchsorted(unique, trial).clip(max=max(len(unique) - 1, 0))
    position = (np.where(unique[found] == trial, found, -1) if len(unique)
                else np.full(len(trial), -1))
    buckets = _bucket_extremes(table, position, len(unique), n_buckets)
    evals = eval_frame(_evaluation_rows(table, position >= 0))
    eval_trial = evals["trial"].to_numpy()
    eval_start = np.searchsorted(eval_trial, unique, side="left")
    eval_count = np.searchsorted(eval_trial, unique, side="right") - eval_start
    steps = evals["step"].to_numpy().astype("<u4")
    train = evals["train"].to_numpy(dtype=float)
    val = evals["val"].to_numpy(dtype=float)

    nb, start = buckets["nb"], buckets["start"]
    loss_lo, loss_hi = _ranges(buckets["loss_min"], buckets["loss_max"], start, nb)
    grad_lo, grad_hi = _ranges(buckets["grad_min"], buckets["grad_max"], start, nb)
    eval_lo, eval_hi = _ranges(np.fmin(train, val), np.fmax(train, val), eval_start,
                               eval_count)
    # Each bucket's (min, max) codes side by side, in its trial's range.
    owner = np.repeat(np.arange(len(unique)), nb)
    codes = {}
    for key, lo, hi in (("loss", loss_lo, loss_hi), ("grad", grad_lo, grad_hi)):
        pairs = np.stack([buckets[f"{key}_min"], buckets[f"{key}_max"]], axis=1)
        codes[key] = quantize(pairs, lo[owner][:, None], hi[owner][:, None]).ravel()
    eval_owner = np.repeat(np.arange(len(unique)), eval_count)
    train_codes = quantize(train, eval_lo[eval_owner], eval_hi[eval_owner])
    val_codes = quantize(val, eval_lo[eval_owner], eval_hi[eval_owner])

    of = np.searchsorted(unique, np.asarray(ids, dtype=np.int64))
    header = np.stack([loss_lo[of], loss_hi[of], grad_lo[of], grad_hi[of], eval_lo[of],
                       eval_hi[of], buckets["width"][of].astype(float),
                       np.asarray(divergence, dtype=float)], axis=1).astype("<f4")
    counts = np.stack([nb[of], eval_count[of]], axis=1).astype("<u2")
    blobs = []
    for i in range(n):
        u = of[i]
        b0, b1 = 2 * start[u], 2 * (start[u] + nb[u])
        e0, e1 = eval_start[u], eval_start[u] + eval_count[u]
        raw = b"".join((header[i].tobytes(), counts[i].tobytes(), codes["loss"][b0:b1].tobytes(),
                        codes["grad"][b0:b1].tobytes(), steps[e0:e1].tobytes(),
                        train_codes[e0:e1].tobytes(), val_codes[e0:e1].tobytes()))
        blobs.append(base64.b64encode(raw).decode("ascii"))
    return blobs


def explorer_payload(trials: pd.DataFrame, axes: SweepAxes, run_dir: Path) -> dict[str, Any]:
    """The explorer's data for every trial of `trials` (display-labelled axis columns, as
    sections.labeled gives), curves read from `run_dir`."""
    names = [*axes.names, *([SEED] if SEED in trials.columns else [])]
    axis_values = {name: [format_key(k) for k in axes.values[name]] for name in axes.names}
    if SEED in trials.columns:
        axis_values[SEED] = [str(s) for s in sorted(trials[SEED].unique())]
    codes = []
    for name in names:
        labels = trials[name].map(lambda v: format_key(value_key(v))).astype(str)
        lookup = {label: i for i, label in enumerate(axis_values[name])}
        codes.append([int(lookup.get(label, -1)) for label in labels])
    statuses = order_statuses(trials["status"].astype(str))
    objective = (trials["training_objective"].astype(str) if "training_objective" in trials
                 else pd.Series("task", index=trials.index))
    objectives = sorted(objective.unique())
    ids = trials["trial"].astype(int).tolist()
    divergence = (pd.to_numeric(trials["divergence_step"], errors="coerce")
                  if "divergence_step" in trials else pd.Series(np.nan, index=trials.index))
    n_buckets = buckets_for(len(ids))
    blobs = encode_trials(read_curves_table(run_dir, trials=ids), ids,
                          divergence.to_numpy(dtype=float), n_buckets)
    metrics = [{"name": m, "values": [_number(v) for v in trials[m]]}
               for m in METRICS if m in trials.columns]
    return {"axes": [{"name": n, "values": axis_values[n]} for n in names], "codes": codes,
            "trial": ids, "statuses": statuses,
            "status": [statuses.index(s) for s in trials["status"].astype(str)],
            "objectives": objectives,
            "objective": [objectives.index(o) for o in objective],
            "metrics": metrics, "buckets": n_buckets, "curves": blobs}


def _number(value: Any) -> float | str | None:
    """JSON-safe metric value: 4 significant digits, "inf"/"-inf", None for NaN."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    if np.isnan(x):
        return None
    if np.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(f"{x:.4g}")


def payload_json(payload: dict[str, Any]) -> str:
    """Compact JSON, safe inside a <script> element ("</" cannot close it)."""
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    return text.replace("</", "<\\/")
