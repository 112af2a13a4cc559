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

from analysis.aggregate import order_statuses
from analysis.axes import SEED, SweepAxes, format_key, value_key
from study.records import read_curves

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


def quantize(log_values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """uint16 codes of log10 values in [lo, hi]; NaN -> MISSING."""
    span = hi - lo if hi > lo else 1.0
    codes = np.rint((log_values - lo) / span * (MISSING - 1))
    return np.where(np.isfinite(log_values), np.clip(codes, 0, MISSING - 1),
                    MISSING).astype("<u2")


def _log10(values: pd.Series) -> np.ndarray:
    v = values.to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(v) & (v > 0), np.log10(v), np.nan)


def _range(*parts: np.ndarray) -> tuple[float, float]:
    finite = np.concatenate([p[np.isfinite(p)] for p in parts]) if parts else np.array([])
    return (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)


def bucketed(batch: pd.DataFrame, n_buckets: int) -> pd.DataFrame:
    """Per trial and bucket: min and max log10 of `loss` and `grad_norm` (NaN if none).

    `batch`: curve rows of split "batch" (trial, step, metric, value). Columns: trial,
    bucket, width, loss_min, loss_max, grad_min, grad_max.
    """
    if batch.empty:
        return pd.DataFrame(columns=["trial", "bucket", "width", "loss_min", "loss_max",
                                     "grad_min", "grad_max"])
    last = batch.groupby("trial")["step"].transform("max")
    width = np.maximum(np.ceil((last + 1) / n_buckets), 1).astype(int)
    work = pd.DataFrame({"trial": batch["trial"].to_numpy(),
                         "bucket": (batch["step"] // width).astype(int).to_numpy(),
                         "width": width.to_numpy(), "metric": batch["metric"].to_numpy(),
                         "log": _log10(batch["value"])})
    agg = work.groupby(["trial", "bucket", "width", "metric"])["log"].agg(["min", "max"])
    wide = agg.unstack("metric")
    out = pd.DataFrame(index=wide.index)
    for metric, short in (("loss", "loss"), ("grad_norm", "grad")):
        for stat in ("min", "max"):
            out[f"{short}_{stat}"] = wide.get((stat, metric), np.nan)
    return out.reset_index()


def encode_trial(buckets: dict[str, np.ndarray], evals: dict[str, np.ndarray],
                 divergence_step: float) -> str:
    """The base64 blob of one trial (module docstring). `buckets`: its `bucketed` columns
    as arrays (bucket, width, loss_min, ...); `evals`: its eval_frame columns (step, train,
    val: log10 values)."""
    at = buckets["bucket"].astype(int)
    nb = int(at.max()) + 1 if len(at) else 0
    width = float(buckets["width"][0]) if len(at) else 1.0
    full = {}
    for key in ("loss_min", "loss_max", "grad_min", "grad_max"):
        full[key] = np.full(nb, np.nan)
        full[key][at] = buckets[key]
    steps = evals["step"].astype("<u4")
    train, val = evals["train"].astype(float), evals["val"].astype(float)
    loss_lo, loss_hi = _range(full["loss_min"], full["loss_max"])
    grad_lo, grad_hi = _range(full["grad_min"], full["grad_max"])
    eval_lo, eval_hi = _range(train, val)
    header = np.array([loss_lo, loss_hi, grad_lo, grad_hi, eval_lo, eval_hi, width,
                       divergence_step], dtype="<f4").tobytes()
    body = [np.array([nb, len(steps)], dtype="<u2").tobytes()]
    for key, (lo, hi) in (("loss", (loss_lo, loss_hi)), ("grad", (grad_lo, grad_hi))):
        pairs = np.stack([full[f"{key}_min"], full[f"{key}_max"]], axis=1).ravel()  # (2 nb,)
        body.append(quantize(pairs, lo, hi).tobytes())
    body += [steps.tobytes(), quantize(train, eval_lo, eval_hi).tobytes(),
             quantize(val, eval_lo, eval_hi).tobytes()]
    return base64.b64encode(header + b"".join(body)).decode("ascii")


def split_by_trial(frame: pd.DataFrame, ids: list[int]) -> list[dict[str, np.ndarray]]:
    """`frame`'s columns as arrays, one dict per trial of `ids` (empty arrays if none)."""
    frame = frame.sort_values("trial", kind="stable")
    trial = frame["trial"].to_numpy()
    columns = {c: frame[c].to_numpy() for c in frame.columns if c != "trial"}
    starts = np.searchsorted(trial, ids, side="left")
    ends = np.searchsorted(trial, ids, side="right")
    return [{c: v[s:e] for c, v in columns.items()} for s, e in zip(starts, ends, strict=True)]


def eval_frame(curves: pd.DataFrame) -> pd.DataFrame:
    """Per trial and evaluation step: log10 train and val loss (at most MAX_EVALS evenly
    spaced evaluations per trial)."""
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
    curves = read_curves(run_dir, trials=ids)
    n_buckets = buckets_for(len(ids))
    buckets = bucketed(curves[curves["split"] == "batch"], n_buckets)
    evals = eval_frame(curves)
    divergence = (pd.to_numeric(trials["divergence_step"], errors="coerce")
                  if "divergence_step" in trials else pd.Series(np.nan, index=trials.index))
    blobs = [encode_trial(b, e, d) for b, e, d in zip(
        split_by_trial(buckets, ids), split_by_trial(evals, ids), divergence, strict=True)]
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
