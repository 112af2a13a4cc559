"""Several workers on one study: every point exactly once, results equal a one-worker run."""

from __future__ import annotations

from pathlib import Path

import pytest

from study import records

TINY = ("+sweep=smoke", "train.epochs=1", "model.width=8", "report=false", "progress=false")


def test_three_journal_workers_train_every_point_once(tmp_path: Path, tiny_baseline,
                                                      run_checks, study_cli) -> None:
    tally, same_results = run_checks
    run_dir = tmp_path / "run"
    done = study_cli(*TINY, "workers=3", f"hydra.run.dir={run_dir}", expect=0)
    assert "16 trials trained, 0 already done" in done.stdout
    assert tally(run_dir) == {"complete": 16, "points": 16, "lost": 0, "duplicated": 0,
                              "running": 0, "failed": 0}
    same_results(run_dir, tiny_baseline)


@pytest.mark.slow  # 4 worker processes importing torch on 2 cores: ~30 s
def test_four_postgres_workers_train_every_point_once(tmp_path: Path, postgres, tiny_baseline,
                                                      run_checks, study_cli) -> None:
    tally, same_results = run_checks
    url = postgres.database()
    run_dir = tmp_path / "run"
    done = study_cli(*TINY, "storage=postgres", "workers=4", f"hydra.run.dir={run_dir}",
                     env={"STUDY_STORAGE_URL": url}, expect=0)
    assert "16 trials trained, 0 already done" in done.stdout
    counts = tally(run_dir, url)
    assert counts == {"complete": 16, "points": 16, "lost": 0, "duplicated": 0, "running": 0,
                      "failed": 0}
    same_results(run_dir, tiny_baseline)
    assert not (run_dir / records.JOURNAL).exists()
    # The password reaches no file of the run directory and no output.
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert postgres.password.encode() not in path.read_bytes(), path
    assert postgres.password not in done.stdout + done.stderr
    assert "***" in records.read_env(run_dir)["storage"]
