"""records: round trips, atomic writes, clear errors on bad files."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
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


def test_a_curves_file_keeps_every_value_bit_for_bit_in_its_encodings(tmp_path: Path) -> None:
    """Values are byte-split, not dictionary-encoded (`records._CURVE_ENCODING`); what is read
    back is what was written: float32 numbers widened, extremes, signed zeros, inf, NaN as
    null."""
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(5000).astype(np.float32).astype(np.float64),
                             [0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324, 1.7976931348623157e308]])
    frame = pd.DataFrame({"trial": np.arange(len(values)) // 100, "step": np.arange(len(values)),
                          "split": "batch", "metric": "loss", "value": values})
    records.write_curves(tmp_path, "a", frame)
    path = tmp_path / records.CURVES_DIR / "a.parquet"
    file = pq.ParquetFile(path)
    column = file.metadata.row_group(0).column(file.schema_arrow.get_field_index("value"))
    assert "BYTE_STREAM_SPLIT" in column.encodings
    assert not any("DICTIONARY" in e for e in column.encodings)
    back = records.read_curves(tmp_path)["value"].to_numpy()
    assert np.isnan(back[-3]) and np.array_equal(np.isnan(back), np.isnan(values))
    finite = ~np.isnan(values)
    assert back[finite].tobytes() == values[finite].tobytes()


def _trace(n_steps: int, diag: bool) -> SimpleNamespace:
    nan = float("nan")
    evals = np.array([0, n_steps])
    return SimpleNamespace(
        step_loss=np.linspace(1.0, 2.0, n_steps), grad_norm=np.full(n_steps, 0.5),
        eval_step=evals, train_loss=np.array([1.0, nan]), train_acc=np.array([0.1, 0.2]),
        val_loss=np.array([float("inf"), 3.0]), val_acc=None,
        diag_step=np.array([0]) if diag else None, sharpness=np.array([4.0]),
        noise_scale=np.array([nan]), precond_sharpness=None)


def test_a_curves_table_holds_what_a_frame_of_the_same_rows_holds(tmp_path: Path) -> None:
    """`curves_table` builds the rows in Arrow; the file is the one a pandas frame of the
    same rows gives (NaN stored as null, inf kept), and reads back the same."""
    numbers, traces = [7, 3], [_trace(3, diag=True), _trace(2, diag=False)]
    rows = []
    for number, trace in zip(numbers, traces, strict=True):
        steps = list(range(len(trace.step_loss)))
        for split, metric, at, values in (
                ("batch", "loss", steps, trace.step_loss),
                ("batch", "grad_norm", steps, trace.grad_norm),
                ("train", "loss", trace.eval_step, trace.train_loss),
                ("train", "accuracy", trace.eval_step, trace.train_acc),
                ("val", "loss", trace.eval_step, trace.val_loss),
                ("diag", "sharpness", trace.diag_step, trace.sharpness)):
            if values is not None and at is not None:
                rows += [(number, int(k), split, metric, float(v))
                         for k, v in zip(at, values, strict=True)]
    frame = pd.DataFrame(rows, columns=list(records.CURVE_COLUMNS))
    records.write_curves(tmp_path / "frame", "a", frame)
    records.write_curves(tmp_path / "table", "a", records.curves_table(numbers, traces))
    by_frame = pq.read_table(tmp_path / "frame" / records.CURVES_DIR / "a.parquet")
    by_table = pq.read_table(tmp_path / "table" / records.CURVES_DIR / "a.parquet")
    assert by_table.equals(by_frame, check_metadata=False)
    assert by_table.column("value").null_count == 2  # each trial's NaN train loss
    pd.testing.assert_frame_equal(records.read_curves(tmp_path / "table"),
                                  records.read_curves(tmp_path / "frame"), check_exact=True)
    assert records.curves_table([], []).schema == by_table.schema.remove_metadata()
    with pytest.raises(ValueError, match="lacks columns"):
        records.write_curves(tmp_path, "b", records.curves_table(numbers, traces)
                             .drop_columns(["metric"]))


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    records.atomic_write_bytes(path, b"old")

    with pytest.raises(TypeError):
        records.atomic_write_bytes(path, object())  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_trials_are_read_whole_while_another_process_replaces_them(tmp_path: Path) -> None:
    """Two invocations sharing a run directory each rewrite trials.parquet (atomically)
    and read it back for the claims; a read must see one file, never the old footer with
    the new pages (pyarrow opening the path twice: 'Page was smaller than expected')."""
    import multiprocessing
    import time

    import numpy as np

    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()

    def rewrite() -> None:
        i = 0
        while not stop.is_set():
            n = 50 + (i % 7) * 13
            records.write_trials(tmp_path, pd.DataFrame({"trial": np.arange(n), "x": 0.5}),
                                 {"i": i})
            i += 1

    records.write_trials(tmp_path, pd.DataFrame({"trial": [0], "x": [0.5]}), {"i": -1})
    writer = ctx.Process(target=rewrite)
    writer.start()
    try:
        reads, until = 0, time.monotonic() + 3
        while time.monotonic() < until:
            frame, meta = records.read_trials(tmp_path)
            assert len(frame) in {1} | {50 + k * 13 for k in range(7)}
            reads += 1
    finally:
        stop.set()
        writer.join()
    assert reads > 50
