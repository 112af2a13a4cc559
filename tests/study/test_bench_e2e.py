"""study.bench_e2e: stages from a run directory's file times, and the real command."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from study import bench_e2e
from study.bench_e2e import STAGES, medians, stages

REPO = Path(__file__).resolve().parents[2]


def _touch(path: Path, at: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    os.utime(path, (at, at))


def test_stages_are_the_gaps_between_the_files_written(tmp_path) -> None:
    t0 = 1_000.0
    _touch(tmp_path / ".hydra" / "config.yaml", t0 + 4.0)
    _touch(tmp_path / "curves" / "trials-000000-000116.parquet", t0 + 6.5)
    _touch(tmp_path / "curves" / "trials-000117-000233.parquet", t0 + 9.0)
    _touch(tmp_path / "env.json", t0 + 10.5)
    _touch(tmp_path / "report.html", t0 + 17.0)
    assert stages(tmp_path, t0, t0 + 17.25) == {
        "start_up": 4.0, "training": 5.0, "results": 1.5, "report": 6.5, "exit": 0.25}


def test_a_run_without_report_or_training_leaves_those_stages_empty(tmp_path) -> None:
    t0 = 50.0
    _touch(tmp_path / ".hydra" / "config.yaml", t0 + 3.0)
    _touch(tmp_path / "env.json", t0 + 3.5)
    got = stages(tmp_path, t0, t0 + 4.0)
    assert got == {"start_up": 3.0, "training": None, "results": 0.5, "report": None,
                   "exit": 0.5}
    assert sum(v for v in got.values() if v is not None) == pytest.approx(4.0)


def test_medians_skip_the_empty_stages() -> None:
    rounds = [{"wall_s": w, "cpu_s": 2 * w,
               "stages_s": {s: (None if s == "report" else w / 5) for s in STAGES}}
              for w in (10.0, 12.0, 11.0)]
    got = medians(rounds)
    assert got["wall_s"] == 11.0 and got["cpu_s"] == 22.0
    assert got["stages_s"] == {"start_up": 2.2, "training": 2.2, "results": 2.2,
                               "report": None, "exit": 2.2}


def test_a_refused_command_is_one_error_line_and_its_exit_status(capsys) -> None:
    """The command's bad input (exit 2) is the bench's bad input too."""
    with pytest.raises(SystemExit) as stop:
        bench_e2e.main(["+sweep=smoke", "train.epochs=0", "--rounds", "1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: python -m study exited with 2: "
                   "error: train.epochs must be >= 1, got 0"]


def test_against_must_be_a_checkout(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        bench_e2e.main(["--against", str(tmp_path)])
    assert stop.value.code == 2
    assert "is not a checkout of study" in capsys.readouterr().err


@pytest.mark.parametrize("warm_up", [True, False])
def test_each_side_warms_up_once_untimed_before_the_rounds(monkeypatch, warm_up: bool) -> None:
    calls = []

    def fake_run(overrides, checkout):
        calls.append(checkout)
        return {"wall_s": 10.0 + len(calls), "cpu_s": 1.0, "load_avg": [0.0, 0.0, 0.0],
                "stages_s": dict.fromkeys(STAGES, 1.0)}

    monkeypatch.setattr(bench_e2e, "run_once", fake_run)
    result = bench_e2e.main(["+sweep=smoke", "--rounds", "2", "--against", str(REPO),
                             *([] if warm_up else ["--no-warm-up"])])
    alternating = [None, REPO, None, REPO]
    assert calls == ([None, REPO] if warm_up else []) + alternating
    assert [r["wall_s"] for r in result["rounds"]["this"]] == (
        [13.0, 15.0] if warm_up else [11.0, 13.0])
    if warm_up:
        assert result["warm_up_s"] == {"this": 11.0, "against": 12.0}
    else:
        assert "warm_up_s" not in result


@pytest.mark.slow
def test_the_real_command_against_a_checkout_stage_by_stage(tmp_path) -> None:
    """Both sides run the smoke sweep; the stages cover the round's wall time."""
    out = tmp_path / "e2e.json"
    result = bench_e2e.main(["+sweep=smoke", "report=false", "--rounds", "1", "--no-warm-up",
                             "--against", str(REPO), "--out", str(out)])
    assert out.is_file()
    for side in ("this", "against"):
        (row,) = result["rounds"][side]
        parts = row["stages_s"]
        assert parts["report"] is None
        assert all(parts[s] is not None and parts[s] >= 0 for s in STAGES if s != "report")
        assert sum(v for v in parts.values() if v is not None) == pytest.approx(
            row["wall_s"], abs=0.05)
        assert row["cpu_s"] > 0 and len(row["load_avg"]) == 3
