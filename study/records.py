"""The only module that knows file formats: run-directory layout, Parquet, JSON, Optuna storage.

`analysis` imports this module (and of `study` only the claim language, `study.claims`), so
it must not import torch.

Run directory (see docs/design.md):

    .hydra/            composed config and overrides
    study.journal      Optuna JournalStorage (source of truth for trials)
    curves/*.parquet   per-step traces, long format: trial, step, split, metric, value
    trials.parquet     one row per finished trial (derived from the storage)
    env.json           command, versions, git commit, device
    claims.parquet     the sweep's evaluated claims (when it declares any)
    report.html        written by `analysis`
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

SCHEMA_VERSION = 1
# What the Optuna study holds (user attributes key/config/status/metrics/worker, the run's
# config and this number in the study's user attribute STORAGE_VERSION_ATTR). A study
# without the attribute predates it and is read as version 1. Version 2: numeric grid axes
# recorded with numeric distributions (log-float learning rates), non-finite metrics as
# strings.
STORAGE_VERSION = 2
STORAGE_VERSION_ATTR = "storage_version"
JOURNAL = "study.journal"
CURVES_DIR = "curves"
TRIALS = "trials.parquet"
ENV = "env.json"
REPORT = "report.html"
CLAIMS = "claims.parquet"
EDGES = "edges.parquet"
# claims.parquet: one row per claim a sweep declared, evaluated on its trials. Columns:
# statement, metric, effect, ci_low, ci_high, verdict (supported | contradicted |
# inconclusive), n_trials, then whatever the evaluator adds (comparison, p_value, q_value...).
CLAIM_COLUMNS = ("statement", "metric", "effect", "ci_low", "ci_high", "verdict", "n_trials")

# Long-format curves. split: "batch" (minibatch at each step), "train" / "val" (full-split
# evaluations), "diag" (opt-in diagnostics); metric: "loss", "grad_norm" (batch only),
# "accuracy" (classification only), "sharpness" / "noise_scale" (diag only).
CURVE_COLUMNS = ("trial", "step", "split", "metric", "value")
_CURVE_SCHEMA = pa.schema([
    ("trial", pa.int64()), ("step", pa.int64()), ("split", pa.string()),
    ("metric", pa.string()), ("value", pa.float64()),
])
# A curves file's values are nearly all distinct, so a dictionary of them is built only to be
# dropped; their bytes split by position (sign and exponent bytes together, the float32
# traces' zero low bytes together) compress well instead. lr_batch's curves: written in half
# the time, 42% smaller, read as fast.
_CURVE_ENCODING = {"use_dictionary": ["trial", "step", "split", "metric"],
                   "use_byte_stream_split": ["value"]}
# trials.parquet: one row per COMPLETE trial. Fixed columns first, then the flat config
# (`task`, `optimizer`, `task.dim`, `optimizer.lr`, `train.batch_size`, ..., `seed`), then every
# summary metric (see study/metrics/). Schema metadata key b"study" holds JSON with
# "schema_version", "sweep" (name), "axes" ({axis: [values]}), "objective", and for a search
# "searched" (its numeric keys, whose every proposal draws its own value: no axis levels).
TRIAL_COLUMNS = ("trial", "key", "status", "objective")
# Summary metrics also stored as trial user attributes of their own with
# `storage.dashboard` (a dashboard lists attributes, not the members of one).
KEY_METRICS = ("val_loss_end", "val_loss_final", "train_loss_final", "divergence_step",
               "spike_count", "eval_rise_count", "sharpness_ratio_max")


_UMASK = os.umask(0)
os.umask(_UMASK)


class RecordError(RuntimeError):
    """A run directory file is missing, corrupt or from an incompatible version."""


class MissingRecordError(RecordError):
    """A run directory file that should be there is not."""


class UnreadableRecordError(RecordError):
    """A run directory file cannot be parsed (corrupt, cut short)."""


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `run_dir` (flock on the directory itself: no file is
    added) while files that invocations sharing the directory all rewrite (env.json,
    trials.parquet and what is built from it) are read and rewritten; where the filesystem
    has no flock, go on without it. Not reentrant: a second `run_lock` on the same
    directory in the same process waits for ever."""
    try:
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):  # say which file (not the temporary one), and how
            err.filename = str(path)  # much a full disk needed
            err.needed_bytes = len(data)
        raise


def read_snapshot(path: Path) -> pa.Table:
    """A Parquet file read from one open of it: another process may replace it meanwhile
    (`atomic_write_bytes`), and pyarrow opening the path twice (footer, then pages) could
    mix the old file's footer with the new one's pages."""
    return pq.read_table(pa.BufferReader(Path(path).read_bytes()))


def _read_optional(path: Path) -> pd.DataFrame | None:
    """A derived Parquet record as a frame, None when absent; RecordError when unreadable."""
    if not path.is_file():
        return None
    try:
        return read_snapshot(path).to_pandas()
    except (pa.ArrowInvalid, OSError) as err:
        raise RecordError(f"{path} is not a readable Parquet file: {err}") from err


def _atomic_parquet(table: pa.Table, path: Path, **options: Any) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", **options)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


# ---------------------------------------------------------------------------------- curves
def write_curves(run_dir: Path, name: str, rows: pd.DataFrame | pa.Table) -> Path:
    """Write one curves file (`curves/<name>.parquet`, atomically) from long-format rows:
    a frame or an Arrow table (`curves_table`) with the `CURVE_COLUMNS`."""
    missing = set(CURVE_COLUMNS) - set(rows.column_names if isinstance(rows, pa.Table)
                                       else rows.columns)
    if missing:
        raise ValueError(f"curves frame lacks columns {sorted(missing)}")
    if isinstance(rows, pa.Table):
        table = rows.select(list(CURVE_COLUMNS)).cast(_CURVE_SCHEMA)
    else:
        table = pa.Table.from_pandas(rows[list(CURVE_COLUMNS)], schema=_CURVE_SCHEMA,
                                     preserve_index=False)
    path = Path(run_dir) / CURVES_DIR / f"{name}.parquet"
    _atomic_parquet(table, path, **_CURVE_ENCODING)
    return path


def read_curves(run_dir: Path, trials: Iterable[int] | None = None) -> pd.DataFrame:
    """All curves of the run (optionally only `trials`), long format, sorted by trial/step.

    Files may hold rows of trials that never finished (a worker died between writing the
    curves and telling the storage); callers pass `trials` from trials.parquet to skip them.
    """
    frame = read_curves_table(run_dir, trials).to_pandas()
    return frame.sort_values(["trial", "split", "metric", "step"], kind="stable",
                             ignore_index=True)


def read_curves_table(run_dir: Path, trials: Iterable[int] | None = None) -> pa.Table:
    """`read_curves`' rows as one Arrow table (`CURVE_COLUMNS`), file after file in their
    stored order, unsorted (no rows without a curves file), for readers that work on whole
    columns: no pandas frame is built."""
    files = sorted((Path(run_dir) / CURVES_DIR).glob("*.parquet"))
    if not files:
        return _CURVE_SCHEMA.empty_table()
    filters = None if trials is None else [("trial", "in", sorted(set(int(t) for t in trials)))]
    try:
        return pa.concat_tables([pq.read_table(f, filters=filters).select(list(CURVE_COLUMNS))
                                 for f in files])
    except (pa.ArrowInvalid, KeyError, OSError) as err:
        raise RecordError(f"cannot read curves under {run_dir}/{CURVES_DIR}: {err}") from err


def held_results(run_dir: Path) -> list[str]:
    """The results of a run `run_dir` holds: trials.parquet, and curves/ when it holds a
    curves file (what a run numbered from 0 again would write over)."""
    run_dir = Path(run_dir)
    held = [TRIALS] if (run_dir / TRIALS).is_file() else []
    if any((run_dir / CURVES_DIR).glob("*.parquet")):
        held.append(f"{CURVES_DIR}/")
    return held


def curve_trials(run_dir: Path) -> set[int]:
    """The trial numbers that have rows in the run's curves files (reads that column only)."""
    found: set[int] = set()
    for path in sorted((Path(run_dir) / CURVES_DIR).glob("*.parquet")):
        try:
            found.update(pq.read_table(path, columns=["trial"]).column("trial").unique()
                         .to_pylist())
        except (pa.ArrowInvalid, OSError, KeyError) as err:
            raise RecordError(f"cannot read curves under {run_dir}/{CURVES_DIR}: {err}"
                              ) from err
    return found


def curves_table(numbers: Sequence[int], traces: Sequence[Any]) -> pa.Table:
    """Traces (`study.engine.Trace`, of trials `numbers`) as the rows of a curves file
    (`CURVE_COLUMNS`, long format), trial by trial. Built from whole arrays in Arrow: the
    split and metric names are taken from a short list by index, never converted one row
    at a time."""
    trial, step, value, runs = [], [], [], []

    def add(number: int, split_name: str, metric_name: str, steps, values) -> None:
        if values is not None and len(values):
            trial.append(np.full(len(values), number, dtype=np.int64))
            step.append(np.asarray(steps, dtype=np.int64))
            runs.append((split_name, metric_name, len(values)))
            value.append(np.asarray(values, dtype=np.float64))

    for number, trace in zip(numbers, traces, strict=True):
        steps = np.arange(len(trace.step_loss))
        add(number, "batch", "loss", steps, trace.step_loss)
        add(number, "batch", "grad_norm", steps, trace.grad_norm)
        add(number, "train", "loss", trace.eval_step, trace.train_loss)
        add(number, "train", "accuracy", trace.eval_step, trace.train_acc)
        add(number, "val", "loss", trace.eval_step, trace.val_loss)
        add(number, "val", "accuracy", trace.eval_step, trace.val_acc)
        if trace.diag_step is not None:
            for name, values in (("sharpness", trace.sharpness),
                                 ("noise_scale", trace.noise_scale),
                                 ("precond_sharpness", trace.precond_sharpness)):
                if values is not None and not np.isnan(values).all():
                    add(number, "diag", name, trace.diag_step, values)
    if not runs:
        return _CURVE_SCHEMA.empty_table()
    counts = [n for _, _, n in runs]

    def labels(which: int) -> pa.Array:
        names, index = np.unique([r[which] for r in runs], return_inverse=True)
        return pa.array(names.tolist(), pa.string()).take(
            pa.array(np.repeat(index.astype(np.int32), counts)))

    # NaN values are stored as nulls, as `pa.Table.from_pandas` stores a frame's.
    return pa.table([np.concatenate(trial), np.concatenate(step), labels(0), labels(1),
                     pa.array(np.concatenate(value), from_pandas=True)], schema=_CURVE_SCHEMA)


# ------------------------------------------------------------------------ storage values
def encode_value(value: Any) -> Any:
    """`value` as plain JSON for a trial attribute: a non-finite float as its name ("nan",
    "inf", "-inf"), which JSON cannot hold."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def decode_value(value: Any) -> Any:
    """The inverse of `encode_value`."""
    return float(value) if value in ("nan", "inf", "-inf") else value


def encode_metrics(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's user attribute `metrics`: every summary metric but `status`, encoded."""
    return {k: encode_value(v) for k, v in summary.items() if k != "status"}


# ---------------------------------------------------------------------------------- trials
def trials_frame(trials: Iterable[FrozenTrial]) -> pd.DataFrame:
    """One row per finished trial (pass the COMPLETE and PRUNED ones, `study.queue.finished`):
    number, key, status, objective, flat config, its params (a sampler sweep's
    `optimizer.betas.0` is a param, not a config key), metrics, and for a pruned trial
    `pruned_step` (its objective is then its last reported loss). Trials without a key (not
    the sweep's) are left out."""
    rows = []
    for t in trials:
        if "key" not in t.user_attrs:
            continue
        extra = ({"pruned_step": t.user_attrs.get("pruned_step")}
                 if t.state.name == "PRUNED" else {})
        rows.append({"trial": t.number, "key": t.user_attrs["key"], **extra,
                     "status": t.user_attrs.get("status"), "objective": t.value,
                     **t.params, **t.user_attrs.get("config", {}),
                     **{k: decode_value(v) for k, v in t.user_attrs.get("metrics", {}).items()}})
    return pd.DataFrame(rows)


def _column_to_arrow_safe(series: pd.Series) -> pd.Series:
    """Mixed-type columns (e.g. batch sizes 8, 32, 'full') become strings."""
    kinds = {type(v) for v in series.dropna()}
    if len(kinds) > 1 and not kinds <= {int, float}:
        return series.map(lambda v: v if v is None else str(v))
    return series


def write_trials(run_dir: Path, frame: pd.DataFrame, meta: Mapping[str, Any]) -> Path:
    """Write trials.parquet atomically, with `meta` (JSON) in the schema metadata."""
    frame = frame.apply(_column_to_arrow_safe)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    payload = {"schema_version": SCHEMA_VERSION, **meta}
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), b"study": json.dumps(payload, default=str).encode()}
    )
    path = Path(run_dir) / TRIALS
    _atomic_parquet(table, path)
    return path


def read_trials(run_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """trials.parquet as a frame plus its metadata (see TRIAL_COLUMNS)."""
    path = Path(run_dir) / TRIALS
    if not path.is_file():
        raise MissingRecordError(_missing_trials(Path(run_dir), path))
    try:
        table = read_snapshot(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise UnreadableRecordError(f"{path} is not a readable Parquet file: {err}") from err
    raw = (table.schema.metadata or {}).get(b"study")
    meta = json.loads(raw) if raw else {}
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RecordError(
            f"{path} has record schema version {version!r}; this study reads {SCHEMA_VERSION}"
        )
    return table.to_pandas(), meta


# ------------------------------------------------------------------------------------- env
def write_env(run_dir: Path, env: Mapping[str, Any]) -> Path:
    path = Path(run_dir) / ENV
    atomic_write_bytes(path, json.dumps(env, indent=2, default=str).encode())
    return path


def resume_command(run_dir: Path) -> str | None:
    """The command that finishes the run in `run_dir` (env.json's `resume_command`); None
    where env.json is missing or unreadable."""
    try:
        return read_env(run_dir).get("resume_command")
    except (RecordError, OSError, AttributeError):
        return None


def _missing_trials(run_dir: Path, path: Path) -> str:
    """Why `path` (trials.parquet) is missing from `run_dir`, and what to do: a run that
    started (env.json or a journal) writes it when it ends."""
    resume = resume_command(run_dir)
    if resume or (run_dir / JOURNAL).is_file():
        return (f"{path} not found: the run in {run_dir} has not finished (its trials table "
                f"is written when it ends)" + (f"; finish it with: {resume}" if resume else ""))
    return f"{path} not found: is {run_dir} a study run directory?"


def read_env(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / ENV
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RecordError(f"{path} is not valid JSON: {err}") from err


# ---------------------------------------------------------------------------------- claims
def write_claims(run_dir: Path, frame: pd.DataFrame) -> Path:
    """Write claims.parquet atomically (columns: CLAIM_COLUMNS first, then any others)."""
    missing = set(CLAIM_COLUMNS) - set(frame.columns)
    if missing:
        raise ValueError(f"claims frame lacks columns {sorted(missing)}")
    ordered = [*CLAIM_COLUMNS, *(c for c in frame.columns if c not in CLAIM_COLUMNS)]
    path = Path(run_dir) / CLAIMS
    _atomic_parquet(pa.Table.from_pandas(frame[ordered], preserve_index=False), path)
    return path


def read_claims(run_dir: Path) -> pd.DataFrame | None:
    """The run's evaluated claims, or None when the sweep declared none."""
    return _read_optional(Path(run_dir) / CLAIMS)


# ----------------------------------------------------------------------------------- edges
def write_edges(run_dir: Path, frame: pd.DataFrame) -> Path:
    """Write edges.parquet atomically: an edge search's one row per configuration (its axis
    values, then `study.edge.EDGE_COLUMNS`)."""
    path = Path(run_dir) / EDGES
    frame = frame.apply(_column_to_arrow_safe)
    _atomic_parquet(pa.Table.from_pandas(frame, preserve_index=False), path)
    return path


def read_edges(run_dir: Path) -> pd.DataFrame | None:
    """The run's stability edges, or None when it was not an edge search."""
    return _read_optional(Path(run_dir) / EDGES)
