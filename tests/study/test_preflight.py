"""Preflight: a trial no machine here can hold is refused before anything is written."""

from __future__ import annotations

import pytest
import torch

from study import preflight
from study.engine import planner
from study.engine.planner import estimate_trial_bytes
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
