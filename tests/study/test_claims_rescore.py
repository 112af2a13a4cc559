"""`python -m analysis RUN_DIR` scores claims from the run directory's files, including a
claim added to a copy of the sweep's YAML after the run (both CLIs in subprocesses)."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from study import records
from tests.study.conftest import ROOT, TINY

ADDED = {"statement": "A learning rate of 10 raises the share of diverged runs on blobs",
         "metric": "diverged", "where": {"task": "blobs"},
         "compare": {"axis": "optimizer.lr", "arm": 10.0, "baseline": 0.01},
         "expect": "higher"}


def run_analysis(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "analysis", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, env=dict(os.environ))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, study_cli) -> Path:
    """A smoke sweep run with report=false: trials.parquet and claims.parquet, no report."""
    run_dir = tmp_path_factory.mktemp("rescore") / "run"
    study_cli(*TINY, f"hydra.run.dir={run_dir}", expect=0)
    return run_dir


def test_rescoring_the_run_gives_the_claims_the_run_wrote(tiny_run: Path, tmp_path: Path
                                                          ) -> None:
    written = records.read_claims(tiny_run)
    assert written is not None and len(written) == 1
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    (run_dir / records.CLAIMS).unlink()  # from the trials and the saved config alone
    done = run_analysis(str(run_dir))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(run_dir / records.REPORT)
    pd.testing.assert_frame_equal(records.read_claims(run_dir), written)
    assert written.loc[0, "statement"] in (run_dir / records.REPORT).read_text()


def test_a_claim_added_to_the_sweep_yaml_after_the_run_is_scored(tiny_run: Path,
                                                                  tmp_path: Path) -> None:
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    sweep = yaml.safe_load((ROOT / "conf/sweep/smoke.yaml").read_text())
    sweep["sweep"]["claims"].append(ADDED)
    edited = tmp_path / "smoke.yaml"
    edited.write_text(yaml.safe_dump(sweep))
    done = run_analysis(str(run_dir), "--claims", str(edited))
    assert done.returncode == 0, done.stderr
    claims = records.read_claims(run_dir)
    assert list(claims["statement"]) == [records.read_claims(tiny_run).loc[0, "statement"],
                                         ADDED["statement"]]
    added = claims.iloc[1]
    trials, _ = records.read_trials(run_dir)
    blobs = trials[trials["task"] == "blobs"].assign(
        diverged=lambda t: (t["status"] == "diverged").astype(float))
    side = {lr: blobs[blobs["optimizer.lr"] == lr].set_index(["train.batch_size", "seed"])
            ["diverged"] for lr in (10.0, 0.01)}
    d = (side[10.0] - side[0.01]).to_numpy()
    assert added["effect"] == pytest.approx(d.mean()) and added["n_units"] == len(d) == 4
    # Four pairs: the sign-flip test is exact over its 16 sign patterns.
    null = np.array([(np.array(s) * d).mean() for s in itertools.product([-1, 1], repeat=4)])
    exact = min(1.0, 2 * min(np.mean(null >= d.mean() - 1e-12),
                             np.mean(null <= d.mean() + 1e-12)))
    assert added["p_value"] == pytest.approx(exact) and added["p_value"] >= 0.125
    assert added["verdict"] == "inconclusive"  # 4 pairs cannot reach q <= 0.05
    assert ADDED["statement"] in (run_dir / records.REPORT).read_text()
    # The first claim keeps its effect and interval; only its q may change (two claims now).
    first = records.read_claims(tiny_run).iloc[0]
    assert (claims.iloc[0][["effect", "ci_low", "ci_high", "p_value"]]
            == first[["effect", "ci_low", "ci_high", "p_value"]]).all()


def test_a_bad_claim_file_is_one_line_and_changes_nothing(tiny_run: Path, tmp_path: Path
                                                          ) -> None:
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    before = (run_dir / records.CLAIMS).read_bytes()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump([{**ADDED, "trend": "optimizer.lr"}]))
    done = run_analysis(str(run_dir), "--claims", str(bad))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"analysis: error: {bad}: claims[0]: give exactly one of compare or trend"]
    assert (run_dir / records.CLAIMS).read_bytes() == before
    assert not (run_dir / records.REPORT).exists()
    missing = run_analysis(str(run_dir), "--claims", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    # A value no trial of the run has (checked against the trials' own values).
    bad.write_text(yaml.safe_dump([{**ADDED, "where": {"task": "blob"}}]))
    done = run_analysis(str(run_dir), "--claims", str(bad))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"analysis: error: {bad}: claims[0].where.task: no trial has task='blob' (its values: "
        f"['blobs', 'teacher_mlp']); the claim would select nothing"]
    assert (run_dir / records.CLAIMS).read_bytes() == before
