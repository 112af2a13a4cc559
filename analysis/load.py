"""Read a run directory into plain data (files only; study.records knows the formats)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from study import records
from study.records import REPORT, RecordError, read_env, read_trials

REQUIRED_COLUMNS = ("trial", "status")
HYDRA_FILES = ("config.yaml", "overrides.yaml")


@dataclass(frozen=True)
class RunData:
    """Everything the report shows except the curves (read later, for chosen trials only).

    `trials` has one row per finished trial with `status` as str; `meta` is the
    trials.parquet metadata; `hydra` maps file names under .hydra/ to their text; `files`
    lists the run directory's files (relative paths, sizes in bytes), report excluded;
    `claims` is the run's claims.parquet (`analysis.claims.COLUMNS`), when it holds one.
    """

    run_dir: Path
    trials: pd.DataFrame
    meta: Mapping[str, Any]
    env: Mapping[str, Any]
    hydra: Mapping[str, str]
    files: tuple[tuple[str, int], ...]
    claims: pd.DataFrame | None = None
    edges: pd.DataFrame | None = None  # an edge search's edges.parquet (else None)


def load_run(run_dir: Path) -> RunData:
    """Load `run_dir`; raise RecordError naming the problem when it is not a readable run."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RecordError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise RecordError(f"{run_dir} is not a directory")
    trials, meta = read_trials(run_dir)
    missing = [c for c in REQUIRED_COLUMNS if c not in trials.columns]
    if missing:
        raise RecordError(f"{run_dir}/trials.parquet lacks columns {missing}")
    trials = trials.assign(status=trials["status"].astype(str)).sort_values(
        "trial", ignore_index=True)
    return RunData(run_dir=run_dir, trials=trials, meta=meta, env=read_env(run_dir),
                   hydra=_read_hydra(run_dir), files=list_files(run_dir),
                   claims=records.read_claims(run_dir), edges=records.read_edges(run_dir))


def _read_hydra(run_dir: Path) -> dict[str, str]:
    hydra_dir = run_dir / ".hydra"
    texts = {}
    for name in HYDRA_FILES:
        path = hydra_dir / name
        if path.is_file():
            texts[name] = path.read_text(errors="replace")
    return texts


def list_files(run_dir: Path) -> tuple[tuple[str, int], ...]:
    """Relative paths and sizes; the report itself and half-written temp files are skipped."""
    found = []
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir).as_posix()
        if not path.is_file() or rel == REPORT or path.name.endswith(".tmp"):
            continue
        found.append((rel, path.stat().st_size))
    return tuple(found)
