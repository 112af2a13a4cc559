"""Shared fixtures: small real configs composed from conf/ (no mocks)."""

from __future__ import annotations

import pytest

from study.grid import SweepPlan
from study.plan import plan_from_overrides


@pytest.fixture(scope="session")
def smoke_plan() -> SweepPlan:
    return plan_from_overrides(["+sweep=smoke"])
