"""End to end through the real CLI (`python -m study` in a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from study import records

ROOT = Path(__file__).resolve().parents[2]


def study_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "study", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    done = study_cli("+sweep=smoke", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    return run_dir, done


def test_smoke_sweep_writes_every_file_of_the_run_directory(smoke_run) -> None:
    run_dir, done = smoke_run
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml",
                 records.JOURNAL, records.TRIALS, records.ENV, records.REPORT):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / records.CURVES_DIR).glob("*.parquet"))
    assert f"report: {run_dir / records.REPORT}" in done.stdout


def test_smoke_trials_table_has_one_row_per_point_and_seed(smoke_run) -> None:
    run_dir, _ = smoke_run
    trials, meta = records.read_trials(run_dir)
    assert len(trials) == 2 * 2 * 2 * 2
    assert meta["sweep"] == "smoke" and meta["seeds"] == [0, 1]
    points = set(zip(trials["task"], trials["optimizer.lr"], trials["train.batch_size"],
                     trials["seed"], strict=True))
    assert len(points) == 16
    # lr=10 diverges, the sweep goes on and the other trials train.
    assert (trials["status"] == "diverged").any()
    assert (trials["status"] == "converged").any()
    assert trials["objective"].notna().all()
    assert trials["val_loss_final"].notna().all()
    curves = records.read_curves(run_dir, trials["trial"])
    assert set(curves["trial"]) == set(trials["trial"])


def test_smoke_storage_is_a_real_optuna_journal(smoke_run) -> None:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    run_dir, _ = smoke_run
    storage = JournalStorage(JournalFileBackend(str(run_dir / records.JOURNAL)))
    study = optuna.load_study(study_name="smoke", storage=storage)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 16
    assert {t.user_attrs["status"] for t in complete} >= {"converged", "diverged"}
    assert set(complete[0].params) == {"task", "optimizer.lr", "train.batch_size", "seed"}


def test_report_mentions_each_task(smoke_run) -> None:
    run_dir, _ = smoke_run
    html = (run_dir / records.REPORT).read_text()
    assert "teacher_mlp" in html and "blobs" in html


def test_resuming_a_finished_sweep_trains_nothing(smoke_run) -> None:
    run_dir, _ = smoke_run
    before = records.read_trials(run_dir)[0]
    again = study_cli("+sweep=smoke", f"hydra.run.dir={run_dir}", "report=false")
    assert again.returncode == 0, again.stderr
    assert "0 trials trained, 16 already done" in again.stdout
    after = records.read_trials(run_dir)[0]
    assert sorted(after["trial"]) == sorted(before["trial"])


def test_resuming_with_a_changed_config_is_refused_and_changes_nothing(smoke_run) -> None:
    run_dir, _ = smoke_run
    config_before = (run_dir / ".hydra" / "config.yaml").read_text()
    done = study_cli("+sweep=smoke", f"hydra.run.dir={run_dir}", "train.epochs=4")
    assert done.returncode == 2
    assert "train.epochs (was 3, now 4)" in done.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config_before


def test_single_configuration_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "one"
    done = study_cli("optimizer=adam", "optimizer.lr=0.3", "model.activation=sigmoid",
                     "train.epochs=2", f"hydra.run.dir={run_dir}", "progress=false")
    assert done.returncode == 0, done.stderr
    trials, meta = records.read_trials(run_dir)
    assert len(trials) == 1 and meta["sweep"] is None
    row = trials.iloc[0]
    assert row["optimizer"] == "adam" and row["optimizer.lr"] == 0.3
    assert row["model.activation"] == "sigmoid"
    assert (run_dir / records.REPORT).is_file()


def test_hydra_cfg_flag_prints_the_composed_sweep() -> None:
    done = study_cli("+sweep=lr_batch", "--cfg", "job")
    assert done.returncode == 0, done.stderr
    assert "name: lr_batch" in done.stdout and "logspace" in done.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+optimizer.lrr=0.1", "optimizer.lrr: unknown key"),
        ("optimizer.lr=-0.1", "optimizer.lr is out of range"),
        ("train.batch_size=-8", "train.batch_size must be >= 1"),
        ("optimizer=adamm", "Could not find 'optimizer/adamm'"),
    ],
)
def test_bad_overrides_exit_non_zero_with_one_clear_error_and_write_nothing(
    tmp_path: Path, override: str, message: str
) -> None:
    run_dir = tmp_path / "bad"
    done = study_cli(override, f"hydra.run.dir={run_dir}")
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not run_dir.exists()
