"""Bad input and faults through the real CLI: nothing lost, nothing leaked, one line.

Each test is one case of issue 14: bad input exits 2, bad state 3, with one line on stderr
and no traceback; nothing is half-written, no run's data is lost, and no file under the run
or sweep directory, no line on stdout or stderr, holds a database password.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from study import records, storage

ROOT = Path(__file__).resolve().parents[2]
TINY = ("+sweep=smoke", "train.epochs=1", "model.width=8", "report=false", "progress=false")
# A base64-style password with every character mask_url used to miss.
ODD_PASSWORD = "Ab+1/q2== z9"
# The fast suite keeps one case of each kind; the others (a CLI run each, 5-15 s) are slow.
SLOW = pytest.mark.slow


def one_line_error(done: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """Assert that `done` exited with `code` and one `error:` line holding `fragments`."""
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of `run_dir` but the logs, with its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.suffix != ".log"}


def files_holding(root: Path, secret: str) -> list[str]:
    """The files under `root` whose bytes contain `secret`."""
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.fixture
def tiny_run(tiny_baseline: Path) -> Path:
    """A finished tiny smoke sweep (conftest's, shared: copy it before changing it)."""
    return tiny_baseline


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


# --------------------------------------------------------------- 1, 2: one run per directory
@pytest.mark.parametrize("other", [
    pytest.param(("+sweep=lr_batch",), id="another_sweep", marks=SLOW),
    pytest.param(("storage.study_name=other",), id="another_study_name")])
def test_another_study_in_a_run_directory_is_refused_before_anything_is_written(
        tiny_run: Path, tmp_path: Path, study_cli, other: tuple[str, ...]) -> None:
    run_dir = copy_run(tiny_run, tmp_path)
    before = snapshot(run_dir)
    extra = ("progress=false", "report=false") if other[0].startswith("+sweep") else TINY[1:]
    base = () if other[0].startswith("+sweep") else TINY[:1]
    done = study_cli(*base, *other, *extra, f"hydra.run.dir={run_dir}")
    one_line_error(done, 2, f"{run_dir} holds the study 'smoke'", "use a new run directory")
    assert snapshot(run_dir) == before


@SLOW
def test_a_run_directory_of_another_storage_is_refused(tiny_run: Path, tmp_path: Path,
                                                       study_cli) -> None:
    run_dir = copy_run(tiny_run, tmp_path)
    before = snapshot(run_dir)
    done = study_cli(*TINY, "storage=rdb", f"storage.url=sqlite:///{tmp_path / 'x.db'}",
                     f"hydra.run.dir={run_dir}")
    one_line_error(done, 2, "holds a study stored in study.journal")
    assert snapshot(run_dir) == before and not (tmp_path / "x.db").exists()


@SLOW
def test_a_new_run_never_lands_in_an_existing_stamped_directory(tmp_path: Path) -> None:
    # Directories stamped with this second and the next ones are taken by other runs.
    taken = tmp_path / "outputs" / "smoke"
    now = datetime.now()
    for second in range(30):
        stamp = (now + timedelta(seconds=second)).strftime("%Y-%m-%d_%H-%M-%S")
        (taken / stamp).mkdir(parents=True)
        (taken / stamp / records.ENV).write_text('{"command": "another run"}')
    before = snapshot(taken)
    done = subprocess.run([sys.executable, "-m", "study", *TINY], cwd=tmp_path, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert {k: v for k, v in snapshot(taken).items()
            if not k.split("/")[0].endswith("_2")} == before
    new = [p for p in taken.iterdir() if p.name.endswith("_2")]
    assert len(new) == 1 and len(records.read_trials(new[0])[0]) == 16


@SLOW
def test_two_runs_started_at_once_get_two_directories(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "study", *TINY], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    dirs = sorted((tmp_path / "outputs" / "smoke").iterdir())
    assert len(dirs) == 2
    for run_dir in dirs:
        assert len(records.read_trials(run_dir)[0]) == 16
        assert len(json.loads((run_dir / records.ENV).read_text())["invocations"]) == 1


@SLOW
@pytest.mark.parametrize("workers", [1, 2])
def test_invocations_sharing_a_run_directory_on_purpose_are_all_recorded(
        tmp_path: Path, workers: int) -> None:
    """Each invocation counts what it trained (with workers it counted the storage's new
    trials, the other invocation's too: [704, 936] for a sweep of 936)."""
    run_dir = tmp_path / "shared"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "study", *TINY, f"workers={workers}",
                               f"hydra.run.dir={run_dir}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    invocations = json.loads((run_dir / records.ENV).read_text())["invocations"]
    assert len(invocations) == 2
    assert sum(i["trials_trained"] for i in invocations) == 16


@SLOW
def test_a_resume_on_another_engine_keeps_the_record_of_what_trained(tiny_run: Path,
                                                                     tmp_path: Path,
                                                                     study_cli) -> None:
    """env.json said `engine: reference` after a resume that trained nothing."""
    run_dir = copy_run(tiny_run, tmp_path)
    study_cli(*TINY, "engine=reference", f"hydra.run.dir={run_dir}", expect=0)
    env = json.loads((run_dir / records.ENV).read_text())
    assert env["engine"] == "batched"
    assert [(i["engine"], i["trials_trained"]) for i in env["invocations"]][-1] == (
        "reference", 0)


@SLOW
def test_an_invocation_writes_its_results_only_while_no_other_is_writing(
        tmp_path: Path) -> None:
    """Results are read from the study and written under the run directory's lock: an
    invocation that finished training waits while another holds it (say, one whose read of
    the study predates this one's last trial), so the files written last hold every trial."""
    import time

    import optuna
    from optuna.storages.journal import JournalFileBackend

    run_dir = tmp_path / "shared"
    proc = subprocess.Popen([sys.executable, "-m", "study", *TINY, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / records.ENV).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        with records.run_lock(run_dir):
            journal = optuna.storages.JournalStorage(
                JournalFileBackend(str(run_dir / records.JOURNAL)))
            while time.monotonic() < deadline and proc.poll() is None and sum(
                    t.state == optuna.trial.TrialState.COMPLETE
                    for s in journal.get_all_studies()
                    for t in journal.get_all_trials(s._study_id)) < 16:
                time.sleep(0.05)
            time.sleep(1.0)  # ample for the trials table, were it written without the lock
            assert proc.poll() is None, proc.stderr.read()
            assert not (run_dir / records.TRIALS).exists()
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        proc.kill()
    assert len(records.read_trials(run_dir)[0]) == 16


# ------------------------------------------------------------------------ 3: no password leaks
@pytest.mark.parametrize("password", [ODD_PASSWORD, "p/w", "a+b=c", "with space", "q'uo\"te",
                                      "s3cret-pw"])
def test_mask_url_masks_any_password(password: str) -> None:
    url = f"postgresql+psycopg://user:{password}@db.example:5432/study"
    for text in (url, f"storage {url}: connect failed", json.dumps({"u": url}),
                 f"- storage.url={url}\n- other"):
        masked = storage.mask_url(text)
        assert password not in masked and "user:***@db.example:5432/study" in masked


def test_a_malformed_port_is_refused_without_printing_the_password(tmp_path: Path,
                                                                  study_cli) -> None:
    run_dir = tmp_path / "run"
    url = f"postgresql://u:{ODD_PASSWORD}@127.0.0.1:54x2/db"
    done = study_cli(*TINY, "storage=postgres", f"hydra.run.dir={run_dir}",
                     env={"STUDY_STORAGE_URL": url})
    one_line_error(done, 2, "storage.url: the port '54x2'", "postgresql://u:***@127.0.0.1")
    assert "q2==" not in done.stdout + done.stderr
    assert not run_dir.exists()


@pytest.fixture(scope="module")
def odd_database(postgres) -> str:
    """A database of a role whose password is `ODD_PASSWORD`; its URL."""
    import psycopg

    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute("CREATE ROLE odd LOGIN PASSWORD 'Ab+1/q2== z9'")
        conn.execute("CREATE DATABASE odd OWNER odd")
    return f"postgresql://odd:{ODD_PASSWORD}@127.0.0.1:{postgres.port}/odd"


@SLOW
def test_a_password_given_in_the_environment_reaches_no_file_and_no_line(
        odd_database: str, tmp_path: Path, study_cli) -> None:
    run_dir = tmp_path / "run"
    done = study_cli(*TINY, "storage=postgres", f"hydra.run.dir={run_dir}",
                     env={"STUDY_STORAGE_URL": odd_database}, expect=0)
    assert len(records.read_trials(run_dir)[0]) == 16
    for fragment in (ODD_PASSWORD, "q2=="):
        assert fragment not in done.stdout + done.stderr
        assert files_holding(run_dir, fragment) == []
    assert "odd:***@127.0.0.1" in (run_dir / records.ENV).read_text()


@SLOW
def test_a_password_on_a_multirun_command_line_reaches_no_file_and_no_line(
        odd_database: str, tmp_path: Path, study_cli, monkeypatch) -> None:
    monkeypatch.delenv("STUDY_STORAGE_URL", raising=False)
    sweep_dir = tmp_path / "sweep"
    done = study_cli("--multirun", *TINY, "storage=postgres", "storage.study_name=multi",
                     f"storage.url={odd_database}", f"hydra.sweep.dir={sweep_dir}",
                     "hydra.sweep.subdir=.", expect=0)
    assert (sweep_dir / "multirun.yaml").is_file()
    assert len(records.read_trials(sweep_dir)[0]) == 16
    for fragment in (ODD_PASSWORD, "q2=="):
        assert fragment not in done.stdout + done.stderr
        assert files_holding(sweep_dir, fragment) == []
    # The password travels in the environment, never as an argument Hydra would record.
    overrides = (sweep_dir / ".hydra" / "overrides.yaml").read_text()
    assert "storage.url=" in overrides and "STUDY_STORAGE_URL" in overrides


@SLOW
def test_a_multirun_job_with_bad_input_has_its_line_and_one_traceback(tmp_path: Path,
                                                                     study_cli) -> None:
    """Hydra reports a failed job with its exception (JobFailed, documented); chained to
    the ConfigError its line already named, it printed two tracebacks."""
    done = study_cli("--multirun", "optimizer.lr=-1", f"hydra.sweep.dir={tmp_path}",
                     "progress=false", "report=false")
    assert done.returncode == 1
    assert "error: optimizer.lr is out of range: -1" in done.stderr
    assert done.stderr.count("Traceback") == 1 and "During handling" not in done.stderr


@SLOW
def test_a_password_written_into_a_config_file_is_masked_in_multirun_yaml(
        odd_database: str, tmp_path: Path, study_cli, monkeypatch) -> None:
    monkeypatch.delenv("STUDY_STORAGE_URL", raising=False)
    conf = tmp_path / "conf" / "storage"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text(
        f"defaults:\n  - postgres\n  - _self_\nurl: '{odd_database}'\nstudy_name: fromfile\n")
    sweep_dir = tmp_path / "sweep"
    done = study_cli("--multirun", "--config-dir", str(tmp_path / "conf"), *TINY,
                     "storage=mine", f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=.",
                     expect=0)
    assert "odd:***@" in (sweep_dir / "multirun.yaml").read_text()
    for fragment in (ODD_PASSWORD, "q2=="):
        assert fragment not in done.stdout + done.stderr
        assert files_holding(sweep_dir, fragment) == []


# --------------------------------------------------------------- 4, 5, 7, 13: refused inputs
@pytest.mark.parametrize(("override", "fragments"), [
    ("optimizer.lr=-1", ("optimizer.lr: optimizer.lr=-1 on the command line", "an axis of "
                         "sweep 'smoke'")),
    pytest.param("train.batch_size=0",
                 ("train.batch_size: train.batch_size=0 on the command line",), marks=SLOW),
    pytest.param("task=spirals", ("task: task=spirals on the command line",), marks=SLOW),
    pytest.param("seed=3", ("seed: seed=3 on the command line",
                            "set sweep.seeds=[...] instead"), marks=SLOW),
])
def test_a_command_line_value_a_sweep_would_replace_is_refused(
        tmp_path: Path, study_cli, override: str, fragments: tuple[str, ...]) -> None:
    run_dir = tmp_path / "run"
    done = study_cli(*TINY, override, f"hydra.run.dir={run_dir}")
    one_line_error(done, 2, *fragments)
    assert not run_dir.exists()


@SLOW
def test_resuming_a_directory_that_is_not_a_run_is_refused(tmp_path: Path, study_cli) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    done = study_cli(*TINY, f"resume={missing}")
    one_line_error(done, 2, f"resume: {missing} is not a study run directory")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("override", "fragment"), [
    ("optimizer.lr=inf", "optimizer.lr: must be a finite number, got inf"),
    ("optimizer.lr=abc", "optimizer.lr: expected a number, got 'abc'"),
    *(pytest.param(override, fragment, marks=SLOW) for override, fragment in [
        ("optimizer.lr=nan", "optimizer.lr: must be a finite number, got nan"),
        ("optimizer.lr=-inf", "optimizer.lr: must be a finite number, got -inf"),
        ("optimizer.momentum=[1]", "optimizer.momentum: expected a number, got [1]"),
        ("model.init_scale=inf", "model.init_scale: must be a finite number, got inf"),
        ("model.width=8.5", "model.width: expected an integer, got 8.5")]),
])
def test_a_value_that_is_not_a_finite_number_is_refused_naming_its_key(
        tmp_path: Path, study_cli, override: str, fragment: str) -> None:
    run_dir = tmp_path / "run"
    done = study_cli("train.epochs=1", "progress=false", "report=false", override,
                     f"hydra.run.dir={run_dir}")
    one_line_error(done, 2, fragment)
    assert not run_dir.exists()


# ------------------------------------------------------------------ 6: missing curves warned
@SLOW
def test_a_report_with_a_curves_file_missing_warns(tiny_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(tiny_run, tmp_path)
    lost = sorted((run_dir / records.CURVES_DIR).glob("*.parquet"))[0]
    numbers = set(__import__("pyarrow.parquet").parquet.read_table(lost)
                  .column("trial").to_pylist())
    lost.unlink()
    done = subprocess.run([sys.executable, "-m", "analysis", str(run_dir)], cwd=ROOT,
                          text=True, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    warning = f"analysis: warning: {len(numbers)} finished trial(s) have no curves"
    assert warning in done.stderr
    html = (run_dir / records.REPORT).read_text()
    assert f"<strong>Warning:</strong> {len(numbers)} finished trial(s) have no curves" in html


# ------------------------------------------------------- 8, 11: user code and files that fail
@SLOW
def test_a_failure_mode_that_raises_is_named_before_anything_is_written(
        tmp_path: Path, study_cli) -> None:
    (tmp_path / "boomfailures.py").write_text(
        "def explode(data, generator, factor):\n    raise RuntimeError('boom')\n")
    conf = tmp_path / "conf" / "failure"
    conf.mkdir(parents=True)
    (conf / "boom.yaml").write_text("boom:\n  _target_: boomfailures.explode\n  factor: 2\n")
    run_dir = tmp_path / "run"
    done = study_cli("--config-dir", str(tmp_path / "conf"), "failure=boom", "train.epochs=1",
                     "progress=false", f"hydra.run.dir={run_dir}",
                     env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    one_line_error(done, 2, "boom+none: boomfailures.explode raised RuntimeError: boom")
    assert not run_dir.exists()


@pytest.mark.parametrize("engine", [pytest.param("batched", marks=SLOW), "reference"])
def test_a_failure_mode_whose_labels_are_out_of_range_is_refused_before_anything_is_written(
        tmp_path: Path, study_cli, engine: str) -> None:
    # The batched CPU kernel trained on them silently; the reference engine raised
    # IndexError after the run directory was written.
    (tmp_path / "shifted.py").write_text(
        "import dataclasses\n\ndef classes(data, generator):\n"
        "    return dataclasses.replace(data, y_train=data.y_train + 10)\n")
    conf = tmp_path / "conf" / "failure"
    conf.mkdir(parents=True)
    (conf / "u_classes.yaml").write_text("classes:\n  _target_: shifted.classes\n")
    run_dir = tmp_path / "run"
    done = study_cli("--config-dir", str(tmp_path / "conf"), "failure=u_classes",
                     "task=blobs", f"engine={engine}", *TINY[1:], f"hydra.run.dir={run_dir}",
                     env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    one_line_error(done, 2, "u_classes+none: shifted.classes returned invalid data: y_train "
                            "holds class labels 10..13; the task has 4 classes, labelled 0..3")
    assert not run_dir.exists()


@pytest.mark.parametrize("where", ["selected", pytest.param("axis", marks=SLOW)])
def test_a_config_file_that_is_not_yaml_is_named_with_line_and_column(
        tmp_path: Path, study_cli, where: str) -> None:
    conf = tmp_path / "conf"
    (conf / "sweep").mkdir(parents=True)
    (conf / "optimizer").mkdir()
    broken = "_target_: study.optimizers.SGD\nlr: [0.1, 0.2\nmomentum: 0.5\n"
    if where == "selected":
        sweep = "# @package _global_\nsweep:\n  name: mine\n  axes:\n    optimizer.lr: [0.1\n"
        path = conf / "sweep" / "mine.yaml"
        path.write_text(sweep)
        line = "6:1"
    else:
        sweep = ("# @package _global_\nsweep:\n  name: mine\n  axes:\n"
                 "    optimizer: [sgd, broken]\n")
        (conf / "sweep" / "mine.yaml").write_text(sweep)
        path = conf / "optimizer" / "broken.yaml"
        path.write_text(broken)
        line = "3:9"
    run_dir = tmp_path / "run"
    done = study_cli("--config-dir", str(conf), "+sweep=mine", "train.epochs=1",
                     "progress=false", f"hydra.run.dir={run_dir}")
    one_line_error(done, 2, f"{path}:{line}: invalid YAML")
    assert not run_dir.exists()


def test_a_sweep_file_of_a_search_path_is_checked_like_one_of_a_config_dir(
        tmp_path: Path, study_cli) -> None:
    """`hydra.searchpath=[file://DIR]` is the README's other way to a user's configs: its
    invalid YAML is named with line and column (Hydra's own report lost the reason), and
    a sweep file without its package header is named by what it lacks (Hydra's report
    named `sweep.sweep`, a key of its schema)."""
    conf = tmp_path / "conf"
    (conf / "sweep").mkdir(parents=True)
    broken = conf / "sweep" / "broken.yaml"
    broken.write_text("# @package _global_\nsweep:\n  name: [unclosed\n")
    headless = conf / "sweep" / "headless.yaml"
    headless.write_text("sweep:\n  name: mine\n  seeds: [0]\n  axes:\n"
                        "    optimizer.lr: [0.1]\n")
    run_dir = tmp_path / "run"
    for name, message in [("broken", f"{broken}:4:1: invalid YAML: expected ',' or ']'"),
                          ("headless", f"{headless}: a sweep file with a sweep: node "
                                       f"starts with the line '# @package _global_'")]:
        done = study_cli(f"hydra.searchpath=[file://{conf}]", f"+sweep={name}",
                         "progress=false", f"hydra.run.dir={run_dir}")
        one_line_error(done, 2, message)
        assert not run_dir.exists()


@pytest.mark.parametrize(("overrides", "message"), [
    (["+sweep=smoke", "sweep.name=../elsewhere"], "error: sweep.name: expected a plain name "
     "(letters, digits, '.', '_', '-'; not starting with '.' or '-'), got '../elsewhere'"),
    (["hydra.run.dir=${oc.env:STUDY_TEST_UNSET_VARIABLE}"],
     "error: hydra.run.dir: \"Environment variable 'STUDY_TEST_UNSET_VARIABLE' not found\""),
])
def test_a_value_hydra_resolves_before_the_run_is_one_line_and_leaves_nothing(
        tmp_path: Path, study_cli, overrides: list[str], message: str) -> None:
    """Hydra resolves its run directory after composing and before the run starts: a sweep
    name that is a path (it would put the run outside outputs/) or an interpolation that
    cannot resolve ended in a traceback there."""
    done = study_cli(*overrides, "progress=false", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [message]
    assert list(tmp_path.iterdir()) == [] or [p.name for p in tmp_path.iterdir()] == [
        "outputs"] and not any((tmp_path / "outputs").iterdir())


def test_a_new_run_in_a_directory_of_other_files_is_refused_and_they_are_kept(
        tmp_path: Path, study_cli) -> None:
    """`hydra.run.dir=.` in a folder of one's own: the run wrote its report.html and
    env.json over the folder's."""
    own = {"report.html": "<html>my page</html>", "env.json": '{"my": "settings"}'}
    for name, text in own.items():
        (tmp_path / name).write_text(text)
    done = study_cli("hydra.run.dir=.", "progress=false", cwd=tmp_path)
    one_line_error(done, 2, f"hydra.run.dir: {tmp_path} is not a study run and holds "
                            f"env.json, report.html, which a run would write over")
    assert {name: (tmp_path / name).read_text() for name in own} == own
    assert not (tmp_path / "study.journal").exists() and not (tmp_path / ".hydra").exists()


def test_a_run_whose_storage_lost_its_study_is_refused_and_its_results_kept(
        tiny_run: Path, tmp_path: Path, study_cli) -> None:
    """A deleted journal (or a database that lost the study) with the run's env.json still
    there: another config's run was accepted and numbered its trials from 0 over the
    finished run's curves and trials.parquet."""
    run_dir = copy_run(tiny_run, tmp_path)
    (run_dir / records.JOURNAL).unlink()
    before = snapshot(run_dir)
    done = study_cli(*TINY, "train.epochs=2", f"hydra.run.dir={run_dir}")
    one_line_error(done, 3, f"{run_dir} holds a run's results (trials.parquet, curves/), but "
                            f"its storage {run_dir / records.JOURNAL} holds no study 'smoke'")
    assert snapshot(run_dir) == before and not (run_dir / records.JOURNAL).exists()


@SLOW
def test_a_resume_on_a_changed_table_file_is_refused_and_nothing_changes(
        tmp_path: Path, study_cli) -> None:
    """A changed file gives its points new trial keys: the grid trained again beside the
    old data's trials, into one trials.parquet."""
    table = tmp_path / "t.csv"
    rows = [f"{i % 7},{(i * 3) % 5},{i % 7 + 2 * ((i * 3) % 5)}" for i in range(40)]
    table.write_text("a,b,y\n" + "\n".join(rows) + "\n")
    run_dir = tmp_path / "run"
    command = ("task=table", f"task.path={table}", "task.target=y", "train.epochs=1",
               "model.width=8", f"hydra.run.dir={run_dir}", "progress=false", "report=false")
    study_cli(*command, expect=0)
    table.write_text("a,b,y\n" + "\n".join(rows[:30]) + "\n")
    before = snapshot(run_dir)
    done = study_cli(*command)
    one_line_error(done, 2, f"differing keys: data digest of {table} (was ")
    assert snapshot(run_dir) == before


@SLOW
@pytest.mark.parametrize("where", ["--config-dir", "hydra.searchpath"])
def test_the_resume_command_finds_a_sweep_of_ones_own(tmp_path: Path, study_cli,
                                                      where: str) -> None:
    """The recorded and printed resume command dropped --config-dir and hydra.searchpath:
    run as given, it could not find the sweep ("Could not find 'sweep/mine'")."""
    conf = tmp_path / "conf"
    (conf / "sweep").mkdir(parents=True)
    (conf / "sweep" / "mine.yaml").write_text(
        "# @package _global_\nsweep:\n  name: mine\n  seeds: [0]\n  axes:\n"
        "    optimizer.lr: [0.01, 0.1]\ntrain:\n  epochs: 1\nmodel:\n  width: 8\n")
    source = (f"--config-dir={conf}" if where == "--config-dir"
              else f"hydra.searchpath=[file://{conf}]")
    run_dir = tmp_path / "run"
    study_cli(source, "+sweep=mine", f"hydra.run.dir={run_dir}", "progress=false",
              "report=false", expect=0)
    resume = records.resume_command(run_dir)
    assert source in resume
    again = study_cli(*shlex.split(resume)[3:], "progress=false", "report=false", expect=0)
    assert "0 trials trained, 2 already done" in again.stdout


# ----------------------------------------------------------------------- 12, 14: stored state
@pytest.mark.parametrize(("line", "at"), [
    (b'{"op_code": 8}\n', 11),
    pytest.param(b'{"op_code": 42, "worker_id": "w"}\n', 11, marks=SLOW),
    pytest.param(b'{"op_code": 6, "worker_id": "w"}\n', -1, marks=SLOW)])
def test_a_journal_record_optuna_cannot_apply_is_refused_and_nothing_changes(
        tiny_run: Path, tmp_path: Path, study_cli, line: bytes, at: int) -> None:
    run_dir = copy_run(tiny_run, tmp_path)
    journal = run_dir / records.JOURNAL
    lines = journal.read_bytes().splitlines(keepends=True)
    number = len(lines) if at == -1 else at
    lines[number - 1] = line
    journal.write_bytes(b"".join(lines))
    before = snapshot(run_dir)
    done = study_cli(*TINY, f"hydra.run.dir={run_dir}")
    one_line_error(done, 3, f"{journal} is corrupt at line {number} (a record Optuna cannot "
                            f"apply", "nothing was changed")
    assert snapshot(run_dir) == before


@SLOW
def test_a_refused_resume_appends_nothing_to_the_journal(tiny_run: Path, tmp_path: Path,
                                                        study_cli) -> None:
    run_dir = copy_run(tiny_run, tmp_path)
    before = snapshot(run_dir)
    for _ in range(2):
        done = study_cli(*TINY, "train.epochs=2", f"hydra.run.dir={run_dir}")
        one_line_error(done, 2, "train.epochs (was 1, now 2)")
    assert snapshot(run_dir) == before


@SLOW
def test_a_corrupt_trials_table_is_rebuilt_from_the_storage(tiny_run: Path, tmp_path: Path,
                                                           study_cli) -> None:
    run_dir = copy_run(tiny_run, tmp_path)
    table = run_dir / records.TRIALS
    table.write_bytes(table.read_bytes()[:100])
    done = study_cli(*TINY, f"hydra.run.dir={run_dir}", expect=0)
    assert "0 trials trained, 16 already done" in done.stdout
    assert "it is rebuilt from the storage" in done.stdout + done.stderr
    assert table.read_bytes() != b"" and snapshot(run_dir)[records.TRIALS]
    rebuilt = records.read_trials(run_dir)[0].set_index("key").sort_index()
    original = records.read_trials(tiny_run)[0].set_index("key").sort_index()
    assert rebuilt.equals(original)


# ------------------------------------------------------------- 9, 10: a full or read-only disk
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 96 KiB tmpfs at tmp_path/disk (root only); unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@SLOW
@needs_root
def test_a_full_disk_stops_with_one_line_and_a_resume_after_freeing_space_finishes(
        small_disk: Path, tiny_run: Path, study_cli) -> None:
    run_dir = small_disk / "run"
    done = study_cli(*TINY, f"hydra.run.dir={run_dir}")
    one_line_error(done, 3, "No space left on device", "bytes free",
                   f"hydra.run.dir={run_dir} to finish")
    again = study_cli(*TINY, f"hydra.run.dir={run_dir}")  # still full
    one_line_error(again, 3, "No space left on device")
    assert [p for p in run_dir.glob("*.bak") if p.stat().st_size == 0] == []
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    study_cli(*TINY, f"hydra.run.dir={run_dir}", expect=0)
    got = records.read_trials(run_dir)[0].set_index("key").sort_index()
    want = records.read_trials(tiny_run)[0].set_index("key").sort_index()
    columns = [c for c in want.columns if c != "trial"]
    assert got[columns].equals(want[columns])
    curves = records.read_curves(run_dir).merge(got[["trial"]].reset_index(), on="trial")
    base = records.read_curves(tiny_run).merge(want[["trial"]].reset_index(), on="trial")
    order = ["key", "split", "metric", "step"]
    assert curves.drop(columns="trial").sort_values(order, ignore_index=True).equals(
        base.drop(columns="trial").sort_values(order, ignore_index=True))


@SLOW
@needs_root
@pytest.mark.parametrize("existing", [True, False], ids=["resume", "new"])
def test_a_read_only_run_directory_is_refused_in_one_line(
        tmp_path: Path, tiny_run: Path, study_cli, existing: bool) -> None:
    disk = tmp_path / "ro"
    disk.mkdir()
    if existing:
        shutil.copytree(tiny_run, disk / "run")
    subprocess.run(["mount", "--bind", str(disk), str(disk)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(disk)], check=True)
        before = snapshot(disk)
        done = study_cli(*TINY, f"hydra.run.dir={disk / 'run'}")
        one_line_error(done, 3, "Read-only file system")
        assert snapshot(disk) == before
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@SLOW
def test_two_configs_started_into_one_directory_at_once_do_not_both_train(
        tmp_path: Path) -> None:
    """The stored config was read, then written: two commands that both read before either
    wrote both trained into one study (reproduced with the write delayed, as here)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = """
import runpy, sys, time, optuna
write = optuna.Study.set_user_attr
def slowly(self, key, value):
    if key == "config":
        time.sleep(3)  # the window between reading the stored config and writing it
    return write(self, key, value)
optuna.Study.set_user_attr = slowly
sys.argv = ["study", *sys.argv[1:]]
runpy.run_module("study", run_name="__main__", alter_sys=True)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    others = [a for a in TINY if not a.startswith("train.epochs=")]
    procs = [subprocess.Popen([sys.executable, "-c", script, *others, f"train.epochs={epochs}",
                               f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for epochs in (1, 2)]
    codes = sorted(p.wait(timeout=300) for p in procs)
    errors = "".join(p.stderr.read() for p in procs)
    assert codes == [0, 2], errors
    assert "was started with a different config; differing keys: train.epochs" in errors
