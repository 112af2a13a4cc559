"""Real-data tasks: a user's table in three formats, scikit-learn's data sets, seeded splits,
and one-line refusals of tables that cannot train."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from study.plan import plan_from_overrides
from study.schema import ConfigError
from study.tasks import SklearnData, Table

ROOT = Path(__file__).resolve().parents[3]


def _frame(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)) * [1.0, 10.0, 1000.0]
    return pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "grams": x[:, 2],
                         "price": x @ [1.0, 0.1, 0.001] + 5,
                         "kind": np.where(x[:, 0] > 0, "big", "small")})


def test_csv_parquet_and_npy_tables_give_the_same_rows_and_split(tmp_path: Path) -> None:
    frame = _frame().drop(columns="kind")
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    np.save(tmp_path / "t.npy", frame.to_numpy())
    draws = [Table(str(tmp_path / "t.csv"), "price").generate(3),
             Table(str(tmp_path / "t.parquet"), "price").generate(3),
             Table(str(tmp_path / "t.npy"), 3).generate(3)]
    for other in draws[1:]:
        for name in ("x_train", "y_train", "x_val", "y_val"):
            assert torch.equal(getattr(draws[0], name), getattr(other, name)), name
    data = draws[0]
    assert data.x_train.shape == (30, 3) and data.x_val.shape == (10, 3)  # val_fraction 0.25
    assert data.y_train.shape == (30, 1) and data.loss == "mse"
    assert data.irreducible_loss == 0.0  # no known floor: judged relative to the initial loss
    # Every row lands in exactly one split, and its target stays with its features.
    rows = torch.cat([data.x_train, data.x_val])
    assert sorted(rows[:, 0].tolist()) == sorted(frame["a"].tolist())
    y = torch.cat([data.y_train, data.y_val])[:, 0].numpy()
    np.testing.assert_allclose(y, rows.numpy() @ [1.0, 0.1, 0.001] + 5, rtol=1e-12)


def test_the_split_is_drawn_from_the_data_seed(tmp_path: Path) -> None:
    _frame().drop(columns="kind").to_csv(tmp_path / "t.csv", index=False)
    task = Table(str(tmp_path / "t.csv"), "price", val_fraction=0.5, kind="regression")
    a, again, b = task.generate(0), task.generate(0), task.generate(1)
    assert torch.equal(a.x_val, again.x_val) and not torch.equal(a.x_val, b.x_val)
    assert (task.n_train, task.n_val) == (20, 20)


def test_classification_labels_are_encoded_in_sorted_order(tmp_path: Path) -> None:
    frame = _frame()
    frame.to_csv(tmp_path / "t.csv", index=False)
    task = Table(str(tmp_path / "t.csv"), "kind", kind="classification")
    data = task.generate(0)
    assert (task.input_dim, task.output_dim, data.loss) == (4, 2, "cross_entropy")
    assert data.y_train.dtype == torch.int64
    # "big" = 0, "small" = 1, and "big" is exactly a > 0 (feature column 0).
    assert torch.equal(data.y_train == 0, data.x_train[:, 0] > 0)


@pytest.mark.parametrize(("write", "overrides", "message"), [
    (None, ["task.path={dir}/absent.csv"], "task.path: cannot read {dir}/absent.csv"),
    ("csv", ["task.target=cost"], "task.target: no column 'cost' in {dir}/t.csv (columns: a, "),
    ("csv", ["task.target=price"], "feature column 'kind' of {dir}/t.csv is not numeric"),
    ("constant", ["task.target=price"], "the target is constant (3.0): nothing to learn"),
    ("missing", ["task.target=price"], "feature 'a' has 1 missing value(s)"),
    ("csv", ["task.target=price", "task.kind=ordinal"], "task.kind must be one of"),
    ("text", ["task.target=price"], "is not a table this task reads"),
    ("csv", ["task.target=price", "task.kind=classification"], "distinct values in 40 rows"),
])
def test_tables_that_cannot_train_are_refused_in_one_line(
        tmp_path: Path, write: str | None, overrides: list[str], message: str) -> None:
    frame = _frame()
    if write == "constant":
        frame = frame.drop(columns="kind").assign(price=3.0)
    elif write == "missing":
        frame = frame.drop(columns="kind")
        frame.loc[4, "a"] = np.nan
    elif write == "csv" and "task.target=price" in overrides and len(overrides) == 2:
        frame = frame.drop(columns="kind")
    name = "t.txt" if write == "text" else "t.csv"
    if write is not None:
        frame.to_csv(tmp_path / name, index=False)
    path = [] if any(o.startswith("task.path") for o in overrides) else [
        f"task.path={tmp_path / name}"]
    with pytest.raises(ConfigError) as err:
        plan_from_overrides(["task=table", *path,
                             *(o.format(dir=tmp_path) for o in overrides)])
    text = str(err.value)
    assert message.format(dir=tmp_path) in text and "\n" not in text


@pytest.mark.parametrize("rows", [0, 1])
@pytest.mark.parametrize("suffix", ["csv", "npy"])
def test_a_table_too_short_to_split_is_refused_by_its_row_count(
        tmp_path: Path, rows: int, suffix: str) -> None:
    # Checked before the columns: a header-only CSV's columns read as text, and numpy's
    # reductions refuse an empty array with a message that names neither file nor rows.
    frame = _frame().drop(columns="kind").head(rows)
    path = tmp_path / f"t.{suffix}"
    if suffix == "csv":
        frame.to_csv(path, index=False)
    else:
        np.save(path, frame.to_numpy())
    target = "price" if suffix == "csv" else 3
    with pytest.raises(ConfigError) as err:
        plan_from_overrides(["task=table", f"task.path={path}", f"task.target={target}"])
    assert str(err.value) == (f"task.path: {path} has {rows} row(s); a training and a "
                              f"validation split need at least 2")


def test_a_missing_path_is_named() -> None:
    with pytest.raises(ConfigError, match="task.path"):
        plan_from_overrides(["task=table"])


@pytest.mark.parametrize(("name", "shape"), [("diabetes", (442, 10, 1)),
                                             ("breast_cancer", (569, 30, 2)),
                                             ("wine", (178, 13, 3)), ("digits", (1797, 64, 10))])
def test_shipped_sklearn_data_sets(name: str, shape: tuple[int, int, int]) -> None:
    pytest.importorskip("sklearn")
    (point,) = plan_from_overrides([f"task={name}"]).points
    task = point.trial.task
    assert isinstance(task, SklearnData)
    assert (task.n_train + task.n_val, task.input_dim, task.output_dim) == shape
    data = task.generate(0)
    assert data.x_train.shape == (task.n_train, shape[1])
    assert data.irreducible_loss == 0.0


@pytest.mark.slow
def test_the_cli_trains_a_csv_and_refuses_a_missing_one_in_one_line(
        tmp_path: Path, study_cli) -> None:
    from study import records

    _frame().drop(columns="kind").to_csv(tmp_path / "t.csv", index=False)
    run_dir = tmp_path / "run"
    study_cli("task=table", f"task.path={tmp_path / 't.csv'}", "task.target=price",
              "train.epochs=2", f"hydra.run.dir={run_dir}", "progress=false", "report=false",
              expect=0)
    trials = pd.read_parquet(run_dir / records.TRIALS)
    assert list(trials["irreducible_loss"]) == [0.0] and trials["status"].notna().all()
    assert trials["task.path"].iloc[0] == str(tmp_path / "t.csv")
    missing = tmp_path / "run2"
    done = study_cli("task=table", f"task.path={tmp_path / 'absent.csv'}",
                     f"hydra.run.dir={missing}", "progress=false", expect=2)
    assert done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith(f"error: task.path: cannot read {tmp_path / 'absent.csv'}")
    assert not missing.exists()


def test_a_single_feature_table_draws_without_a_warning(tmp_path: Path) -> None:
    # pandas hands a one-feature frame over as a read-only view, which torch warned about
    # when wrapping it (once per process: hence a fresh interpreter).
    frame = _frame().drop(columns="kind")[["a", "price"]]
    frame.to_csv(tmp_path / "t.csv", index=False)
    code = ("import torch\nfrom study.tasks import Table\n"
            f"data = Table({str(tmp_path / 't.csv')!r}, 'price').generate(0)\n"
            "x = torch.cat([data.x_train, data.x_val])[:, 0]\n"
            "y = torch.cat([data.y_train, data.y_val])[:, 0]\n"
            "print(json.dumps(sorted(zip(x.tolist(), y.tolist(), strict=True))))\n")
    done = subprocess.run([sys.executable, "-c", "import json\n" + code], cwd=ROOT,
                          text=True, capture_output=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    stored = pd.read_csv(tmp_path / "t.csv")
    assert json.loads(done.stdout) == sorted(
        [a, price] for a, price in zip(stored["a"], stored["price"], strict=True))


def test_a_complex_npy_table_is_refused_as_not_real(tmp_path: Path) -> None:
    # It was read with its imaginary parts dropped (numpy's ComplexWarning lines).
    values = _frame().drop(columns="kind").to_numpy()
    np.save(tmp_path / "t.npy", values + 1j * values)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigError) as err:
            plan_from_overrides(["task=table", f"task.path={tmp_path / 't.npy'}"])
    assert str(err.value) == (f"task.path: {tmp_path / 't.npy'} holds complex numbers "
                              f"(complex128); a table's values must be real")


@pytest.mark.parametrize(("column", "dtype", "message"), [
    ("kind", "string", "the target has missing values; fill or drop them"),
    ("kind", "object", "the target has missing values; fill or drop them"),
    ("a", "Float64", "feature 'a' has 1 missing value(s); fill or drop them first"),
    ("grams", "Int64", "feature 'grams' has 1 missing value(s); fill or drop them first"),
])
def test_pandas_missing_values_in_a_parquet_table_are_refused(
        tmp_path: Path, column: str, dtype: str, message: str) -> None:
    # A string target's pd.NA became a third class "<NA>"; NaN in an object target was
    # refused already.
    frame = _frame().drop(columns="price")
    frame["grams"] = frame["grams"].round()
    frame[column] = frame[column].astype(dtype)
    frame.loc[4, column] = pd.NA if dtype != "object" else np.nan
    frame.to_parquet(tmp_path / "t.parquet")
    with pytest.raises(ConfigError) as err:
        plan_from_overrides(["task=table", f"task.path={tmp_path / 't.parquet'}",
                             "task.target=kind", "task.kind=classification"])
    assert str(err.value) == f"task.path: {tmp_path / 't.parquet'}: {message}"
