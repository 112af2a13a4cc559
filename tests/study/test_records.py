"""records: round trips, atomic writes, clear errors on bad files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from study import records


def test_trials_round_trip_with_mixed_batch_sizes_and_metadata(tmp_path: Path) -> None:
    frame = pd.DataFrame({"trial": [0, 1], "train.batch_size": [32, "full"],
                          "optimizer.lr": [0.1, 1.0]})
    records.write_trials(tmp_path, frame, {"sweep": "x", "axes": {"train.batch_size": [32,
                                                                                       "full"]}})
    back, meta = records.read_trials(tmp_path)
    assert list(back["train.batch_size"]) == ["32", "full"]
    assert meta["sweep"] == "x" and meta["schema_version"] == records.SCHEMA_VERSION
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_incompatible_version_or_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    pq.write_table(pa.table({"trial": [0]}), tmp_path / records.TRIALS)
    with pytest.raises(records.RecordError, match="schema version None"):
        records.read_trials(tmp_path)
    (tmp_path / records.TRIALS).write_bytes(b"not parquet")
    with pytest.raises(records.RecordError, match="not a readable Parquet file"):
        records.read_trials(tmp_path)
    with pytest.raises(records.RecordError, match="not found"):
        records.read_trials(tmp_path / "nowhere")


def test_curves_filter_by_trial(tmp_path: Path) -> None:
    frame = pd.DataFrame({"trial": [0, 0, 1], "step": [0, 1, 0], "split": "batch",
                          "metric": "loss", "value": [1.0, float("nan"), 2.0]})
    records.write_curves(tmp_path, "a", frame)
    assert list(records.read_curves(tmp_path, [1])["value"]) == [2.0]
    assert len(records.read_curves(tmp_path)) == 3


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    records.atomic_write_bytes(path, b"old")

    with pytest.raises(TypeError):
        records.atomic_write_bytes(path, object())  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
