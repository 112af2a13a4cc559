"""Importing `study` bounds how long idle OpenMP threads spin, unless the user chose a
policy."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from study.environment import device_info

_PROBE = ("import os, study, torch; torch.ones(4096).sum(); "
          "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _probe(env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in _KEYS}
    done = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env},
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.strip()


def test_importing_study_sets_a_short_spin_then_sleep_before_torch_loads() -> None:
    assert _probe({}) == "PASSIVE 1000"


def test_a_policy_in_the_environment_is_kept_and_its_spin_count_not_bounded() -> None:
    # GOMP_SPINCOUNT would override ACTIVE's endless spinning: it must stay unset.
    assert _probe({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE None"


def test_a_spin_count_in_the_environment_is_kept() -> None:
    assert _probe({"GOMP_SPINCOUNT": "0"}) == "PASSIVE 0"


def test_env_json_records_the_policy_and_spin_count() -> None:
    info = device_info(torch.device("cpu"))
    assert info["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY")
    assert info["gomp_spincount"] == os.environ.get("GOMP_SPINCOUNT")
