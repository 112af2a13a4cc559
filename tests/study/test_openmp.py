"""Importing `study` makes idle OpenMP threads sleep, unless the user chose a policy."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from study.environment import device_info

_PROBE = ("import os, study, torch; torch.ones(4096).sum(); "
          "print(os.environ.get('OMP_WAIT_POLICY'))")


def _probe(env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env},
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.strip()


def test_importing_study_sets_a_passive_wait_policy_before_torch_loads() -> None:
    assert _probe({}) == "PASSIVE"


def test_a_policy_in_the_environment_is_kept() -> None:
    assert _probe({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"


def test_env_json_records_the_policy() -> None:
    assert device_info(torch.device("cpu"))["omp_wait_policy"] == os.environ.get(
        "OMP_WAIT_POLICY")
