"""End to end through the real CLI (`python -m study` in a subprocess)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from study import records
from tests.study.conftest import ROOT, TINY


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, study_cli) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    done = study_cli("+sweep=smoke", f"hydra.run.dir={run_dir}", expect=0)
    return run_dir, done


def test_smoke_sweep_writes_every_file_of_the_run_directory(smoke_run) -> None:
    run_dir, done = smoke_run
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml",
                 records.JOURNAL, records.TRIALS, records.ENV, records.REPORT):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / records.CURVES_DIR).glob("*.parquet"))
    assert f"report: {run_dir / records.REPORT}" in done.stdout


def test_smoke_claims_are_evaluated_and_reported(smoke_run) -> None:
    run_dir, _ = smoke_run
    claims = records.read_claims(run_dir)
    assert claims is not None and len(claims) == 1
    (claim,) = claims.to_dict("records")
    assert claim["verdict"] == "supported" and claim["n_trials"] == 16
    assert claim["ci_low"] > 0
    assert claim["statement"] in (run_dir / records.REPORT).read_text()


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
    assert (trials["status"] != "diverged").any()
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
    statuses = {t.user_attrs["status"] for t in complete}
    assert "diverged" in statuses and len(statuses) > 1
    assert set(complete[0].params) == {"task", "optimizer.lr", "train.batch_size", "seed"}


def test_report_mentions_each_task(smoke_run) -> None:
    run_dir, _ = smoke_run
    html = (run_dir / records.REPORT).read_text()
    assert "teacher_mlp" in html and "blobs" in html


@pytest.mark.slow
def test_resuming_a_finished_sweep_trains_nothing(smoke_run, study_cli) -> None:
    run_dir, _ = smoke_run
    before = records.read_trials(run_dir)[0]
    again = study_cli("+sweep=smoke", f"hydra.run.dir={run_dir}", "report=false", expect=0)
    assert "0 trials trained, 16 already done" in again.stdout
    after = records.read_trials(run_dir)[0]
    assert sorted(after["trial"]) == sorted(before["trial"])


def test_resuming_with_a_changed_config_is_refused_and_changes_nothing(smoke_run,
                                                                      study_cli) -> None:
    run_dir, _ = smoke_run
    config_before = (run_dir / ".hydra" / "config.yaml").read_text()
    done = study_cli("+sweep=smoke", f"hydra.run.dir={run_dir}", "train.epochs=4", expect=2)
    assert "train.epochs (was 3, now 4)" in done.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config_before


def test_single_configuration_run(tmp_path: Path, study_cli) -> None:
    run_dir = tmp_path / "one"
    study_cli("optimizer=adam", "optimizer.lr=0.3", "model.activation=sigmoid",
              "train.epochs=2", f"hydra.run.dir={run_dir}", "progress=false", expect=0)
    trials, meta = records.read_trials(run_dir)
    assert len(trials) == 1 and meta["sweep"] is None
    row = trials.iloc[0]
    assert row["optimizer"] == "adam" and row["optimizer.lr"] == 0.3
    assert row["model.activation"] == "sigmoid"
    assert (run_dir / records.REPORT).is_file()


def test_help_introduces_study_not_hydra(study_cli) -> None:
    done = study_cli("--help", expect=0)
    assert done.stdout.startswith("python -m study: ")
    assert "__main__" not in done.stdout and "+sweep=lr_batch" in done.stdout
    assert "failure: absurd_lr" in done.stdout  # Hydra's list of groups and options stays


def test_hydra_cfg_flag_prints_the_composed_sweep(study_cli) -> None:
    done = study_cli("+sweep=lr_batch", "--cfg", "job", expect=0)
    assert "name: lr_batch" in done.stdout and "logspace" in done.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+optimizer.lrr=0.1", "optimizer.lrr: unknown key"),
        ("optimizer.lr=-0.1", "optimizer.lr is out of range"),
        ("train.batch_size=-8", "train.batch_size must be >= 1"),
        ("optimizer=adamm", "Could not find 'optimizer/adamm'"),
        ("train.epochs=1000000000", "error: train.epochs: a trial of this plan needs about "
                                    "5,006.8 GiB of memory (8,000,000,000 steps of records"),
        ("sweep.seeds=[0,1]", "error: sweep.seeds=[0,1]: no sweep is chosen to set "
                              "sweep.seeds in; choose one first with +sweep=NAME (adam_search, "),
    ],
)
def test_bad_overrides_exit_non_zero_with_one_clear_error_and_write_nothing(
    tmp_path: Path, study_cli, override: str, message: str
) -> None:
    run_dir = tmp_path / "bad"
    done = study_cli(override, f"hydra.run.dir={run_dir}")
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not run_dir.exists()


def test_a_trial_whose_data_is_not_finite_from_the_start_is_recorded_diverged_at_0(
        tmp_path: Path, study_cli) -> None:
    """NaN features from the start: the first evaluation's loss is not finite, the trial
    stops before its first step, and the run records it (it ended in a traceback)."""
    run_dir = tmp_path / "run"
    study_cli("failure=nan_features", f"hydra.run.dir={run_dir}", "report=false", expect=0)
    trials, _ = records.read_trials(run_dir)
    assert trials[["status", "divergence_step", "steps"]].values.tolist() == [
        ["diverged", 0, 0]]


def test_an_exception_hydra_did_not_expect_is_its_last_line(tmp_path: Path,
                                                            study_cli) -> None:
    """Hydra prints a traceback for an exception of its own composition it did not expect
    (here: setting a key of the sweep that the named primary config does not have, which
    `check_sweep_keys` leaves to Hydra once another config is named): one line, its last."""
    run_dir = tmp_path / "bad"
    done = study_cli("--config-name=config", "sweep.seeds=[0]", f"hydra.run.dir={run_dir}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: AssertionError: Unexpected type for root: NoneType"]
    assert not run_dir.exists()


# ------------------------------------------------------------- storage: bad input and state
def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.suffix != ".log"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["storage.url=redis://u:hunter2@127.0.0.1/0"],
         "error: storage.url: unknown URL scheme 'redis' in 'redis://u:***@127.0.0.1/0'"),
        (["storage=rdb", "storage.url=sqlite:///study.db", "workers=2"],
         "error: workers: SQLite cannot serve 2 workers (two workers can take the same "
         "trial); use storage=journal on one machine or storage=postgres"),
        (["storage=postgres"], "error: storage.url: this storage needs a database URL: export "
                               "STUDY_STORAGE_URL=postgresql://USER:PASSWORD@HOST:PORT/DB"),
    ],
)
def test_bad_storage_settings_are_refused_before_anything_is_written(
        tmp_path: Path, monkeypatch, study_cli, overrides: list[str], message: str) -> None:
    monkeypatch.delenv("STUDY_STORAGE_URL", raising=False)
    run_dir = tmp_path / "bad"
    done = study_cli("+sweep=smoke", *overrides, f"hydra.run.dir={run_dir}", expect=2)
    assert message in done.stderr
    assert "hunter2" not in done.stdout + done.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_an_unreachable_database_is_retried_then_reported(tmp_path: Path, monkeypatch,
                                                         study_cli) -> None:
    pytest.importorskip("psycopg")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("STUDY_STORAGE_URL", f"postgresql://study:hunter2@127.0.0.1:{port}/db")
    run_dir = tmp_path / "unreachable"
    done = study_cli("+sweep=smoke", "storage=postgres", "storage.retries=2",
                     f"hydra.run.dir={run_dir}", expect=3)
    assert (f"error: storage: cannot connect to postgresql://study:***@127.0.0.1:{port}/db "
            f"after 2 attempts:") in done.stderr
    assert "hunter2" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert not run_dir.exists()


def test_a_journal_corrupt_in_the_middle_is_refused_and_nothing_is_overwritten(
        smoke_run, tmp_path: Path, study_cli) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run[0], run_dir)
    journal = run_dir / records.JOURNAL
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[10] = b"garbage\n"
    journal.write_bytes(b"".join(lines))
    before = _snapshot(run_dir)
    done = study_cli("+sweep=smoke", f"hydra.run.dir={run_dir}", expect=3)
    assert (f"error: {journal} is corrupt at line 11 (JSONDecodeError: Expecting value: line 1 "
            f"column 1 (char 0)), so it cannot be repaired safely; "
            f"nothing was changed.") in done.stderr
    assert _snapshot(run_dir) == before


def test_a_run_directory_of_another_version_is_refused(smoke_run, tmp_path: Path,
                                                       study_cli) -> None:
    import json

    import pyarrow.parquet as pq

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run[0], run_dir)
    table = pq.read_table(run_dir / records.TRIALS)
    meta = {**json.loads(table.schema.metadata[b"study"]), "schema_version": 0}
    pq.write_table(table.replace_schema_metadata({b"study": json.dumps(meta).encode()}),
                   run_dir / records.TRIALS)
    before = _snapshot(run_dir)
    done = study_cli("+sweep=smoke", f"hydra.run.dir={run_dir}", expect=3)
    assert (f"error: {run_dir / records.TRIALS} has record schema version 0; this study "
            f"reads 1") in done.stderr
    assert _snapshot(run_dir) == before


@pytest.mark.slow
def test_a_journal_cut_short_is_repaired_and_the_resume_finishes(smoke_run, tmp_path: Path,
                                                                 study_cli) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run[0], run_dir)
    journal = run_dir / records.JOURNAL
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code":6,"worker_id":"w","trial_id":2')
    done = study_cli("+sweep=smoke", f"hydra.run.dir={run_dir}", "report=false", expect=0)
    assert f"repaired {journal}: removed a partial last line of 41 bytes" in (
        done.stdout + done.stderr)
    assert "0 trials trained, 16 already done" in done.stdout
    assert journal.read_bytes().startswith(whole)
    assert len(list(run_dir.glob(f"{records.JOURNAL}.*.bak"))) == 1


@pytest.mark.slow
@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_a_user_config_directory_with_a_group_axis_sweep_runs_both_documented_ways(
        tmp_path: Path, study_cli, how: str) -> None:
    """The grid composes each group option again: it must find the user's sweep and the
    user's own option (a failure mode only in that directory) either way."""
    import pandas as pd

    conf = tmp_path / "conf"
    (conf / "sweep").mkdir(parents=True)
    (conf / "failure").mkdir()
    (conf / "failure" / "heavy_outliers.yaml").write_text(
        "heavy_outliers:\n  _target_: study.failures.TargetOutliers\n  fraction: 0.2\n"
        "  magnitude: 50.0\n")
    (conf / "sweep" / "mine.yaml").write_text(
        "# @package _global_\nsweep:\n  name: mine\n  seeds: [0]\n  axes:\n"
        "    failure: [none, heavy_outliers]\n    task: [teacher_mlp, linear_regression]\n"
        "train:\n  epochs: 1\nmodel:\n  width: 8\n")
    where = (["--config-dir", str(conf)] if how == "--config-dir"
             else [f"hydra.searchpath=[file://{conf}]"])
    run_dir = tmp_path / "run"
    study_cli(*where, "+sweep=mine", f"hydra.run.dir={run_dir}", "progress=false",
              "report=false", expect=0)
    trials = pd.read_parquet(run_dir / records.TRIALS)
    assert sorted(zip(trials["failure"], trials["task"], strict=True)) == [
        ("heavy_outliers", "linear_regression"), ("heavy_outliers", "teacher_mlp"),
        ("none", "linear_regression"), ("none", "teacher_mlp")]
    assert (trials.loc[trials["failure"] == "heavy_outliers",
                       "failure.heavy_outliers.magnitude"] == 50.0).all()


# ------------------------------------------------------------------------------- Ctrl-C
def _interrupted_study(tmp_path: Path, when: str, *args: str,
                       signum: int = signal.SIGINT) -> subprocess.CompletedProcess:
    """`python -m study ARGS` in a subprocess that sends itself SIGINT (Ctrl-C) at `when`:
    "start-up" as its entry point imports Hydra, "stored" as it writes .hydra/ (its study
    stored, env.json not yet), "report" as the run hands its results to the claims and the
    report."""
    script = f"""
import builtins, os, runpy, signal, sys
sys.argv = ["study", *{list(args)!r}]
def ctrl_c():
    os.kill(os.getpid(), {int(signum)})
if {when!r} == "start-up":
    real = builtins.__import__
    def importing(name, *rest, **kwargs):
        if name == "hydra":
            builtins.__import__ = real
            ctrl_c()
        return real(name, *rest, **kwargs)
    builtins.__import__ = importing
else:
    import study.run
    name = "save_hydra_files" if {when!r} == "stored" else "analyse"
    wrapped = getattr(study.run, name)
    def interrupted(*rest, **kwargs):
        ctrl_c()
        return wrapped(*rest, **kwargs)
    setattr(study.run, name, interrupted)
runpy.run_module("study", run_name="__main__", alter_sys=True)
"""
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, text=True,
                          capture_output=True, timeout=600)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_while_starting_is_one_line_and_leaves_nothing(tmp_path: Path,
                                                              signum: int) -> None:
    """SIGTERM (kill, SLURM) too: it ended with 143, no line, and a directory of logs."""
    run_dir = tmp_path / "run"
    done = _interrupted_study(tmp_path, "start-up", *TINY, f"hydra.run.dir={run_dir}",
                              signum=signum)
    assert done.returncode == 130
    assert done.stderr.strip().splitlines() == [
        "interrupted before the run started; nothing was stored"]
    assert not run_dir.exists()


@pytest.mark.slow  # a run, interrupted, then started
def test_ctrl_c_once_the_study_is_stored_says_how_to_start_it(tmp_path: Path,
                                                              study_cli) -> None:
    """Its journal written, env.json not yet: "nothing was stored" was false, and the
    journal claims the directory (a run of another config there is refused)."""
    run_dir = tmp_path / "run"
    done = _interrupted_study(tmp_path, "stored", *TINY, f"hydra.run.dir={run_dir}")
    assert done.returncode == 130
    resume = (f"python -m study {' '.join(TINY[:3])} hydra.run.dir={run_dir}")
    assert done.stderr.strip().splitlines() == [
        f"interrupted before training started; nothing was trained. Start it with: {resume}"]
    assert (run_dir / records.JOURNAL).exists()
    again = study_cli(*TINY, f"hydra.run.dir={run_dir}", expect=0)
    assert "16 trials trained, 0 already done" in again.stdout


@pytest.mark.parametrize("signum", [signal.SIGINT,
                                    pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_ctrl_c_while_reporting_is_one_line_and_the_resume_finishes(tmp_path: Path,
                                                                    study_cli,
                                                                    signum: int) -> None:
    """SIGTERM too: it ended with 143 and no line, and the forked analyst wrote the
    claims and report after the command had ended."""
    run_dir = tmp_path / "run"
    args = (*TINY[:-2], f"hydra.run.dir={run_dir}")
    done = _interrupted_study(tmp_path, "report", *args, signum=signum)
    assert done.returncode == 130, done.stderr
    resume = f"python -m study {' '.join(args)}"
    assert done.stderr.strip().splitlines()[-1] == (
        f"interrupted; nothing stored is lost. Finish with: {resume}")
    assert "Traceback" not in done.stderr
    assert (run_dir / records.TRIALS).is_file() and not (run_dir / records.REPORT).exists()
    time.sleep(2)  # nothing left running writes it later
    assert not (run_dir / records.REPORT).exists() and not (run_dir / records.CLAIMS).exists()
    finished = study_cli(*args, expect=0)
    assert "0 trials trained" in finished.stdout and (run_dir / records.REPORT).is_file()


@pytest.mark.slow  # a whole run with its report
def test_a_closed_stdout_does_not_end_the_run_before_its_report(tmp_path: Path) -> None:
    """`python -m study ... | true`: the first line printed after the reader had gone read
    "cannot write RUN_DIR: Broken pipe", exit 3, and the claims and report were never made."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "study", "+sweep=smoke", "train.epochs=1",
                             "model.width=8", "progress=false", f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the run prints anything
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    assert proc.stderr.read() == b""
    assert (run_dir / records.CLAIMS).is_file() and (run_dir / records.REPORT).is_file()
