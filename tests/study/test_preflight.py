"""Preflight: a trial no machine here can hold is refused before anything is written."""

from __future__ import annotations

import shutil

import pytest
import torch

from study import preflight
from study.engine import planner
from study.engine.planner import estimate_trial_bytes
from study.grid import CONF_DIR
from study.plan import plan_from_overrides
from study.schema import ConfigError


def test_a_trial_larger_than_the_machine_is_refused_naming_what_makes_it_large(
        monkeypatch) -> None:
    cpu = torch.device("cpu")
    plan = plan_from_overrides(["+sweep=smoke"])
    need = max(estimate_trial_bytes(p.trial) for p in plan.points)
    monkeypatch.setattr(planner, "machine_bytes", lambda device: need)
    preflight.check_memory(plan, cpu)  # exactly fits
    monkeypatch.setattr(planner, "machine_bytes", lambda device: need - 1)
    with pytest.raises(ConfigError, match=r"^model\.width: a trial of this plan needs about "
                                          r".* GiB of memory \(\d+ steps of records, "):
        preflight.check_memory(plan, cpu)
    long = plan_from_overrides(["+sweep=smoke", "train.epochs=10000"])
    monkeypatch.setattr(planner, "machine_bytes", lambda device: need)
    with pytest.raises(ConfigError, match=r"^train\.epochs: .* \(80,000 steps of records"):
        preflight.check_memory(long, cpu)
    monkeypatch.setattr(planner, "machine_bytes", lambda device: None)  # unknown: no check
    preflight.check_memory(long, cpu)


@pytest.mark.parametrize("held", [["report.html"], ["notes.txt", "curves/trials-000000.parquet"],
                                  ["trials.parquet"], ["env.json"]])
def test_a_directory_that_is_no_run_is_refused_where_a_run_would_write_over_a_file(
        tmp_path, held) -> None:
    # A run would write over the user's files of the same names, or (a run whose journal
    # was deleted) number its trials from 0 again over the curve files it left.
    for name in held:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("the user's")
    with pytest.raises(ConfigError) as err:
        preflight.check_run_dir(tmp_path, "single", None)
    taken = [n.split("/")[0] for n in held if n != "notes.txt"]
    assert str(err.value) == (f"hydra.run.dir: {tmp_path} is not a study run and holds "
                              f"{', '.join(taken)}, which a run would write over: choose a "
                              f"new or empty directory")


def test_a_directory_of_other_files_or_a_run_is_not_refused(tmp_path) -> None:
    for name in ("__main__.log", "multirun.yaml", "notes.txt"):  # Hydra's, the user's
        (tmp_path / name).write_text("")
    (tmp_path / ".hydra").mkdir()
    preflight.check_run_dir(tmp_path, "single", None)
    (tmp_path / "env.json").write_text('{"study_name": "single", "storage": "study.journal", '
                                       '"resume_command": "python -m study"}')
    (tmp_path / "report.html").write_text("a run's")
    preflight.check_run_dir(tmp_path, "single", None)


USER_TASK = '''
import dataclasses
import torch
from study.tasks.base import Dataset

@dataclasses.dataclass(frozen=True)
class Mine:
    mode: str = "ok"
    n_train: int = 8
    n_val: int = 4
    loss = "mse"
    input_dim = 2
    output_dim = 1

    def generate(self, seed):
        x = torch.randn(12, 2, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
        y = x.sum(1, keepdim=True)
        floor = {"nan_floor": float("nan"), "negative_floor": -1.0}.get(self.mode, 0.0)
        parts = [x[:8], y[:8], x[8:], y[8:]]
        if self.mode == "list":
            parts[0] = parts[0].tolist()
        if self.mode == "rows":
            parts[0], parts[1] = x[:5], y[:5]
        if self.mode == "float32":
            parts[2] = parts[2].float()
        return Dataset(*parts, "mse", floor)
'''


@pytest.mark.parametrize(("mode", "reason"), [
    ("list", "x_train is a list, not a torch.Tensor"),
    ("rows", "x_train has shape (5, 2); the task declares (8, 2) (n_train=8, input_dim=2)"),
    ("float32", "x_val is torch.float32 on cpu; a Dataset of a mse task holds torch.float64"),
    ("nan_floor", "irreducible_loss is nan; it must be a finite number >= 0"),
    ("negative_floor", "irreducible_loss is -1.0; it must be a finite number >= 0"),
])
def test_a_user_task_whose_draw_is_not_a_dataset_it_declares_is_refused_in_one_line(
        tmp_path, monkeypatch, mode: str, reason: str) -> None:
    # A list crashed nonfinite_note with AttributeError after the run directory was
    # written; a NaN floor made every status compare against NaN (and read converged).
    (tmp_path / "mytasks.py").write_text(USER_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    shutil.copytree(CONF_DIR, tmp_path / "conf")
    (tmp_path / "conf" / "task" / "mine.yaml").write_text(
        f"_target_: mytasks.Mine\nmode: {mode}\n")
    plan = plan_from_overrides(["task=mine"], conf_dir=tmp_path / "conf")
    with pytest.raises(ConfigError) as err:
        preflight.check_data(plan)
    text = str(err.value)
    assert text.startswith("task mine: generate(seed ") and "\n" not in text
    assert f"returned invalid data: {reason}" in text
    ok = plan_from_overrides(["task=mine", "task.mode=ok"], conf_dir=tmp_path / "conf")
    preflight.check_data(ok)
