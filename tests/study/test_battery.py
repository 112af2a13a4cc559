"""A battery of bad inputs and bad states through the real CLI (docs/scaling.md's table).

Every row: `python -m study ARGS` (or `python -m analysis`) in a subprocess exits with the
expected code, prints exactly one `error:` line holding the expected words and no
traceback, and leaves the run directory as the row says: `none` (no run directory is
created) or `unchanged` (a finished run directory, byte for byte, logs aside).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from study import records

ROOT = Path(__file__).resolve().parents[2]
TINY = ("+sweep=smoke", "train.epochs=1", "model.width=8", "report=false", "progress=false")
ONE = ("train.epochs=1", "progress=false", "report=false")
SLOW = pytest.mark.slow


def _garbage_line(run_dir: Path) -> None:
    _replace_line(run_dir, 10, b"garbage\n")


def _unknown_op(run_dir: Path) -> None:
    _replace_line(run_dir, 10, b'{"op_code": 8}\n')


def _replace_line(run_dir: Path, index: int, line: bytes) -> None:
    journal = run_dir / records.JOURNAL
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[index] = line
    journal.write_bytes(b"".join(lines))


def _bad_env(run_dir: Path) -> None:
    (run_dir / records.ENV).write_text("{not json")


def _old_schema(run_dir: Path) -> None:
    table = pq.read_table(run_dir / records.TRIALS)
    meta = {**json.loads(table.schema.metadata[b"study"]), "schema_version": 0}
    pq.write_table(table.replace_schema_metadata({b"study": json.dumps(meta).encode()}),
                   run_dir / records.TRIALS)


def _bad_curves(run_dir: Path) -> None:
    for path in (run_dir / records.CURVES_DIR).glob("*.parquet"):
        path.write_bytes(b"not parquet")


def _bad_trials(run_dir: Path) -> None:
    (run_dir / records.TRIALS).write_bytes(b"not parquet")


# (id, args, code, words in the error line, state after, preparation of the run directory)
Row = tuple[str, tuple[str, ...], int, str, str, Callable[[Path], None] | None]
ROWS: list[Row] = [
    ("lr_inf", ("optimizer.lr=inf", *ONE), 2, "optimizer.lr: must be a finite number", "none",
     None),
    ("lr_nan", ("optimizer.lr=nan", *ONE), 2, "optimizer.lr: must be a finite number", "none",
     None),
    ("lr_text", ("optimizer.lr=abc", *ONE), 2, "optimizer.lr: expected a number, got 'abc'",
     "none", None),
    ("lr_list", ("optimizer.lr=[0.1]", *ONE), 2, "optimizer.lr: expected a number", "none",
     None),
    ("lr_negative", ("optimizer.lr=-0.1", *ONE), 2, "optimizer.lr is out of range", "none",
     None),
    ("momentum_1.5", ("optimizer.momentum=1.5", *ONE), 2, "optimizer.momentum is out of range",
     "none", None),
    ("adam_betas", ("optimizer=adam", "optimizer.betas=[2,0.9]", *ONE), 2,
     "optimizer.betas is out of range", "none", None),
    ("unknown_key", ("+optimizer.lrr=0.1", *ONE), 2, "optimizer.lrr: unknown key", "none",
     None),
    ("bad_target", ("optimizer._target_=nope.Nope", *ONE), 2,
     "optimizer._target_: cannot import 'nope.Nope'", "none", None),
    ("unknown_option", ("optimizer=adamm", *ONE), 2, "Could not find 'optimizer/adamm'",
     "none", None),
    ("unknown_sweep", ("+sweep=nosuch", *ONE), 2, "Could not find 'sweep/nosuch'", "none",
     None),
    ("override_syntax", ("optimizer.lr==", *ONE), 2, "Error parsing override", "none", None),
    ("workers_text", ("workers=abc", *ONE), 2, "Value 'abc' of type 'str' could not be "
     "converted to Integer", "none", None),
    ("workers_0", ("workers=0", *ONE), 2, "workers: must be >= 1", "none", None),
    ("seed_negative", ("seed=-1", *ONE), 2, "seed: must be >= 0", "none", None),
    ("batch_0", ("train.batch_size=0", *ONE), 2, "train.batch_size must be", "none", None),
    ("batch_text", ("train.batch_size=huge", *ONE), 2,
     "train.batch_size must be a positive integer or 'full'", "none", None),
    ("epochs_0", ("train.epochs=0", "progress=false"), 2, "train.epochs must be >= 1", "none",
     None),
    ("eval_every_0", ("train.eval_every=0", *ONE), 2, "train.eval_every must be >= 1",
     "none", None),
    ("dtype", ("train.dtype=float16", *ONE), 2, "train.dtype must be one of", "none", None),
    ("engine", ("engine=turbo", *ONE), 2, "engine: must be one of", "none", None),
    ("device", ("device=tpu", *ONE), 2, "device: must be one of", "none", None),
    ("metric", ("objective.metric=nope", *ONE), 2, "objective.metric: unknown metric 'nope'",
     "none", None),
    ("accuracy_on_regression", ("objective.metric=val_acc_final", *ONE), 2,
     "val_acc_final is undefined for regression tasks", "none", None),
    ("direction", ("objective.direction=up", *ONE), 2,
     "objective.direction: must be minimize or maximize", "none", None),
    ("activation", ("model.activation=swish", *ONE), 2, "model.activation must be one of",
     "none", None),
    ("depth_negative", ("model.depth=-1", *ONE), 2, "model.depth must be >= 0", "none", None),
    ("width_fraction", ("model.width=8.5", *ONE), 2, "model.width: expected an integer",
     "none", None),
    ("init", ("model.init=bogus", *ONE), 2, "model.init must be one of", "none", None),
    ("init_scale_inf", ("model.init_scale=inf", *ONE), 2,
     "model.init_scale: must be a finite number", "none", None),
    ("not_applicable", ("failure=outliers", "task=blobs", *ONE), 2,
     "TargetOutliers applies to regression tasks only", "none", None),
    ("diagnostics_every_0", ("diagnostics.every=0", *ONE), 2,
     "diagnostics.every must be >= 1", "none", None),
    ("heartbeat_above_grace", ("storage.heartbeat_s=100", *ONE), 2,
     "storage.heartbeat_s: must be > 0 and < storage.grace_s", "none", None),
    ("retries_0", ("storage.retries=0", *ONE), 2, "storage.retries: must be >= 1", "none",
     None),
    ("url_scheme", ("storage.url=redis://u:hunter2@127.0.0.1/0", *ONE), 2,
     "unknown URL scheme 'redis' in 'redis://u:***@127.0.0.1/0'", "none", None),
    ("url_port", ("storage=postgres", "storage.url=postgresql://u:hunter2@127.0.0.1:5x/db",
                  *ONE), 2, "the port '5x' of 'postgresql://u:***@127.0.0.1:5x/db'", "none",
     None),
    ("postgres_without_url", ("storage=postgres", *ONE), 2,
     "storage.url: this storage needs a database URL", "none", None),
    ("sqlite_workers", ("storage=rdb", "storage.url=sqlite:///x.db", "workers=2", *ONE), 2,
     "workers: SQLite cannot serve 2 workers", "none", None),
    ("sweep_axis_override", (*TINY, "optimizer.lr=-1"), 2,
     "optimizer.lr=-1 on the command line, but optimizer.lr is an axis", "none", None),
    ("sweep_group_override", (*TINY, "task=spirals"), 2, "task is an axis of sweep 'smoke'",
     "none", None),
    ("sweep_seed_override", (*TINY, "seed=4"), 2, "set sweep.seeds=[...] instead", "none",
     None),
    ("sweep_no_seeds", (*TINY, "sweep.seeds=[]"), 2, "sweep 'smoke' has no seeds", "none",
     None),
    ("sweep_duplicate_seeds", (*TINY, "sweep.seeds=[0,0]"), 2, "duplicate seeds in [0, 0]",
     "none", None),
    ("resume_not_a_run", (*TINY, "resume=RUN/../nowhere"), 2, "is not a study run directory",
     "none", None),
    ("resume_and_run_dir_differ", (*TINY, "resume=RUN", "hydra.run.dir=RUN/../other"), 2,
     "is not the run directory", "unchanged", None),
    ("run_dir_is_a_file", (*TINY, "hydra.run.dir=RUN/env.json"), 2,
     "env.json is not a directory", "unchanged", None),
    ("run_dir_under_a_file", (*TINY, "hydra.run.dir=RUN/env.json/run"), 2,
     "env.json is not a directory", "unchanged", None),
    # Against a finished run directory: refused, nothing changed.
    ("resume_changed_config", (*TINY, "train.epochs=2"), 2, "train.epochs (was 1, now 2)",
     "unchanged", None),
    ("another_sweep", ("+sweep=lr_batch", "progress=false", "report=false"), 2,
     "holds the study 'smoke'", "unchanged", None),
    ("another_study_name", (*TINY, "storage.study_name=x"), 2, "holds the study 'smoke'",
     "unchanged", None),
    ("journal_garbage_line", TINY, 3, "is corrupt at line 11 (JSONDecodeError", "unchanged",
     _garbage_line),
    ("journal_unknown_record", TINY, 3, "is corrupt at line 11 (a record Optuna cannot apply",
     "unchanged", _unknown_op),
    ("env_json_corrupt", TINY, 3, "env.json is not valid JSON", "unchanged", _bad_env),
    ("trials_other_version", TINY, 3, "has record schema version 0", "unchanged",
     _old_schema),
]
# The report program, on a finished run directory.
ANALYSIS_ROWS: list[Row] = [
    ("analysis_missing_dir", ("RUN/../nowhere",), 2, "does not exist", "none", None),
    ("analysis_bad_metric", ("RUN", "--map-metric", "nope"), 2, "map metric 'nope' is neither "
     "a numeric column", "unchanged", None),
    ("analysis_corrupt_trials", ("RUN",), 2, "is not a readable Parquet file", "unchanged",
     _bad_trials),
    ("analysis_corrupt_curves", ("RUN",), 2, "cannot read curves under", "unchanged",
     _bad_curves),
]
FAST = {"resume_changed_config", "analysis_bad_metric"}  # the rest: in test_bad_input


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.suffix != ".log"}


@pytest.fixture
def finished(tiny_baseline: Path) -> Path:
    """A finished tiny smoke sweep (conftest's, shared: copied before use)."""
    return tiny_baseline


def _params(rows: list[Row]) -> list:
    return [pytest.param(*row, id=row[0], marks=() if row[0] in FAST else SLOW)
            for row in rows]


def _check(done: subprocess.CompletedProcess, code: int, words: str) -> None:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and words in errors[0], done.stderr
    assert "[ERROR]" not in done.stdout + done.stderr  # no library's log lines beside it
    assert "hunter2" not in done.stdout + done.stderr


def _prepare(finished: Path, tmp_path: Path, state: str,
             prepare: Callable[[Path], None] | None) -> Path:
    run_dir = tmp_path / "run"
    if state == "unchanged":
        shutil.copytree(finished, run_dir)
        if prepare is not None:
            prepare(run_dir)
    return run_dir


@pytest.mark.parametrize(("name", "args", "code", "words", "state", "prepare"), _params(ROWS))
def test_study_refuses_in_one_line(finished: Path, tmp_path: Path, name: str,
                                   args: tuple[str, ...], code: int, words: str, state: str,
                                   prepare: Callable[[Path], None] | None) -> None:
    run_dir = _prepare(finished, tmp_path, state, prepare)
    before = _snapshot(run_dir) if state == "unchanged" else None
    args = tuple(a.replace("RUN", str(run_dir)) for a in args)
    if not any(a.startswith(("resume=", "hydra.run.dir=")) for a in args):
        args = (*args, f"hydra.run.dir={run_dir}")
    done = subprocess.run([sys.executable, "-m", "study", *args],
                          cwd=tmp_path, text=True, capture_output=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    _check(done, code, words)
    if state == "none":
        assert not run_dir.exists() and not (tmp_path / "outputs").exists()
        assert not (tmp_path / "x.db").exists()
    else:
        assert _snapshot(run_dir) == before


@pytest.mark.parametrize(("name", "args", "code", "words", "state", "prepare"),
                         _params(ANALYSIS_ROWS))
def test_analysis_refuses_in_one_line(finished: Path, tmp_path: Path, name: str,
                                      args: tuple[str, ...], code: int, words: str, state: str,
                                      prepare: Callable[[Path], None] | None) -> None:
    run_dir = _prepare(finished, tmp_path, state, prepare)
    before = _snapshot(run_dir) if state == "unchanged" else None
    args = tuple(a.replace("RUN", str(run_dir)) for a in args)
    done = subprocess.run([sys.executable, "-m", "analysis", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=600)
    _check(done, code, words)
    if state == "unchanged":
        assert _snapshot(run_dir) == before


def test_the_battery_has_at_least_40_rows() -> None:
    assert len(ROWS) + len(ANALYSIS_ROWS) >= 40
