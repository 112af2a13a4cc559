"""The report file and the `python -m analysis` command, on the fixture run directories."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import build_report
from analysis.__main__ import main
from study.records import read_trials, write_trials

REPO = Path(__file__).resolve().parents[2]
HEADINGS = ("Findings", "Sweep", "Environment and files", "Stability map",
            "Learning-rate sensitivity", "Loss curves", "Curves by status", "Cell summary",
            "Metric tables")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "analysis", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def sweep_html(sweep_report: Path) -> str:
    return sweep_report.read_text()


def test_report_names_every_task_and_optimizer(sweep_html):
    for name in ("teacher_mlp", "blobs", "sgd", "adam", "Sweep lr_batch"):
        assert name in sweep_html


def test_report_is_self_contained(sweep_html):
    sources = re.findall(r"<img[^>]*\ssrc=\"([^\"]*)\"", sweep_html)
    # stability map, LR sensitivity, loss curves, one gallery per status (4)
    assert len(sources) == 7
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    links = re.findall(r"\b(?:src|href)\s*=\s*[\"']([^\"']*)", sweep_html)
    assert not [u for u in links if u.startswith(("http://", "https://", "//"))]
    # The SVG namespace name is an identifier the explorer's script needs, never fetched.
    text = sweep_html.replace('"http://www.w3.org/2000/svg"', "")
    assert "http://" not in text and "https://" not in text
    assert "<link" not in sweep_html
    assert "Content-Security-Policy" in sweep_html and "default-src 'none'" in sweep_html
    # Two scripts: the explorer's data (not executable) and its code, the only script the
    # policy lets run (by its hash; no inline script or eval otherwise).
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", sweep_html, re.S)
    assert [attrs for attrs, _ in scripts] == [' type="application/json" id="explorer-data"', ""]
    digest = base64.b64encode(hashlib.sha256(scripts[1][1].encode()).digest()).decode()
    policy = re.search(r'Content-Security-Policy" content="([^"]*)"', sweep_html).group(1)
    directives = [d.strip() for d in policy.split(";")]
    assert [d for d in directives if d.startswith("script-src")] == [
        f"script-src 'sha256-{digest}'"]


def test_report_sections_and_header(sweep_html):
    for heading in HEADINGS:
        assert re.search(rf"<h2[^>]*>{heading}</h2>", sweep_html), heading
    assert "0.001, 0.01, 0.1" in sweep_html and "32, full" in sweep_html
    assert "python -m study +sweep=lr_batch" in sweep_html
    assert "2 min 05.0 s" in sweep_html and "abc1234" in sweep_html
    assert "curves/pop-0.parquet" in sweep_html and "env.json" in sweep_html
    assert re.search(r"<td>diverged</td><td[^>]*>6</td>", sweep_html)
    # .hydra/config.yaml is shown escaped, inside a collapsible block.
    assert "<details>" in sweep_html and "&lt;b&gt;not bold&lt;/b&gt;" in sweep_html
    assert "<b>not bold" not in sweep_html


def test_single_configuration_renders(single_run):
    html = build_report(single_run).read_text()
    assert "Single configuration" in html
    assert "<code>optimizer.lr=0.001</code>" in html
    assert "<code>train.batch_size=full</code>" in html
    assert "fewer than two axes vary" in html
    sources = re.findall(r"<img[^>]*\ssrc=\"([^\"]*)\"", html)
    assert len(sources) == 2  # the trial's curves and its status gallery
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "the learning rate does not vary" in html
    assert "environment not recorded" in html


def test_one_axis_sweep_renders_curves_without_map(sweep_run, tmp_path):
    trials, meta = read_trials(sweep_run)
    keep = (trials["task"] == "blobs") & (trials["optimizer"] == "sgd") & (
        trials["train.batch_size"] == "32")
    write_trials(tmp_path, trials[keep], {**meta, "axes": {"optimizer.lr": [0.001, 0.01, 0.1]}})
    shutil.copytree(sweep_run / "curves", tmp_path / "curves")
    html = build_report(tmp_path).read_text()
    assert "No stability map: fewer than two axes vary" in html
    # LR sensitivity, loss curves (one panel), galleries: converged and diverged
    assert html.count("<img") == 4
    assert 'alt="Curves of diverged trials"' in html
    assert "3 values of optimizer.lr" not in html and "held fixed: nothing else varies" in html


def test_cli_prints_report_path(single_run):
    result = run_cli(str(single_run))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(single_run / "report.html")


def test_cli_missing_dir_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "nope"
    result = run_cli(str(missing))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and str(missing) in lines[0]
    assert not missing.exists()


def test_a_report_that_cannot_be_written_exits_3_with_one_line(sweep_run, tmp_path, capsys):
    run_dir = shutil.copytree(sweep_run, tmp_path / "run")
    (run_dir / "report.html").mkdir()
    assert main([str(run_dir)]) == 3
    assert capsys.readouterr().err.strip().splitlines() == [
        f"analysis: error: cannot write {run_dir / 'report.html'}: Is a directory"]


@pytest.mark.parametrize("corrupt", [False, True])
def test_not_a_run_dir_exits_2_and_writes_nothing(tmp_path, capsys, corrupt):
    if corrupt:
        (tmp_path / "trials.parquet").write_bytes(b"not parquet at all")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trials.parquet" in err[0]
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("left", ["env", "journal"])
def test_a_run_that_has_not_finished_says_so_and_how_to_finish_it(tmp_path, capsys, left):
    """A run stopped before its end (Ctrl-C, a kill, a worker still training) has no
    trials.parquet yet: the line says it has not finished and, from env.json, the command
    that finishes it."""
    resume = f"python -m study +sweep=smoke hydra.run.dir={tmp_path}"
    if left == "env":
        (tmp_path / "env.json").write_text(json.dumps({"resume_command": resume}))
    else:
        (tmp_path / "study.journal").write_text("")
    assert main([str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"analysis: error: {tmp_path}/trials.parquet not found: the run in "
                    f"{tmp_path} has not finished (its trials table is written when it ends)"
                    + (f"; finish it with: {resume}" if left == "env" else ""))
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["env.json"] if left == "env" else ["study.journal"])


def test_analysis_never_imports_torch():
    """analysis reads files (study.records) and claim specs (study.claims), holds the
    collector as study's CLI does (study.heap) and ends as it does (study.process_exit),
    nothing else."""
    code = ("import sys, analysis, analysis.__main__; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'study')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("['study', 'study.claims', 'study.heap', "
                                     "'study.process_exit', 'study.records']")


def test_empty_table_renders(tmp_path, sweep_run):
    trials, meta = read_trials(sweep_run)
    write_trials(tmp_path, trials.iloc[:0], meta)
    html = build_report(tmp_path).read_text()
    assert "0 finished trials" in html and "No finished trials" in html


def test_a_sweep_where_nothing_diverged_renders_with_two_panel_axes(sweep_run, tmp_path):
    """The LR section's panels join the axes besides task, optimizer and lr: with none
    diverged, its diverged points are no rows, where pandas' row-wise join gives a frame."""
    trials, meta = read_trials(sweep_run)
    trials = trials[trials["status"] != "diverged"].assign(
        **{"model.depth": lambda t: 1 + t["trial"] % 2})
    write_trials(tmp_path, trials, {**meta, "axes": {**meta["axes"], "model.depth": [1, 2]}})
    shutil.copytree(sweep_run / "curves", tmp_path / "curves")
    html = build_report(tmp_path).read_text()
    assert "panels: task x train.batch_size, model.depth" in html


def test_a_searchs_report_says_its_searched_key_varied(sweep_run, tmp_path):
    """A search's lr is no axis (every proposal draws its own): the report said "the
    learning rate does not vary", "held fixed: nothing else varies", and described cells
    pooling every lr as "over seeds"."""
    trials, meta = read_trials(sweep_run)
    axes = {k: v for k, v in meta["axes"].items() if k != "optimizer.lr"}
    write_trials(tmp_path, trials, {**meta, "axes": axes, "searched": ["optimizer.lr"]})
    shutil.copytree(sweep_run / "curves", tmp_path / "curves")
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", build_report(tmp_path).read_text()))
    assert "the learning rate does not vary" not in text
    assert "No learning-rate sensitivity: the learning rate was searched" in text
    assert "optimizer.lr searched: 3 values from 0.001 to 0.1" in text
    assert "searched, and different in every curve: optimizer.lr" in text
    assert "Per configuration, over seeds and over every searched value of optimizer.lr" in text
