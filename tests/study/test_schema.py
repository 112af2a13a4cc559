"""The schema Hydra composes against: its defaults, its resolvers, the run directory it
names, and that composing needs no torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from study import schema
from study.plan import plan_from_overrides
from study.schema import linspace, logspace
from study.trial import DiagnosticsSpec, TrainSpec


def test_logspace_resolver_gives_13_log_spaced_values_with_exact_ends() -> None:
    values = logspace(1e-4, 10, 13)
    assert len(values) == 13
    assert values[0] == 1e-4 and values[-1] == 10.0
    ratios = [b / a for a, b in zip(values, values[1:], strict=False)]
    assert max(ratios) / min(ratios) < 1 + 1e-5
    assert linspace(0, 1, 3) == [0.0, 0.5, 1.0]


def test_a_new_run_directory_is_made_past_those_taken(tmp_path: Path, monkeypatch) -> None:
    from datetime import datetime, timedelta

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(schema, "_NEW_RUN_DIRS", {})
    now = datetime.now()
    taken = {(now + timedelta(seconds=s)).strftime("%Y-%m-%d_%H-%M-%S") for s in range(5)}
    for stamp in taken:
        (tmp_path / "outputs" / "smoke" / stamp).mkdir(parents=True)
    made = Path(schema.new_run_dir(None, "smoke"))
    assert made.is_dir() and made.name[:-2] in taken and made.name.endswith("_2")
    assert schema.new_run_dir(None, "smoke") == str(made)  # one per process
    assert schema.new_run_dir("some/run", "smoke") == "some/run"


def _defaults(cls: type) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(("node", "spec"), [(schema.TrainConfig, TrainSpec),
                                            (schema.DiagnosticsConfig, DiagnosticsSpec)])
def test_a_schema_has_the_keys_and_defaults_of_the_spec_it_builds(node, spec) -> None:
    assert _defaults(node) == _defaults(spec)


def test_lease_defaults_are_the_storage_defaults_and_engines_are_named_once() -> None:
    from study.engine import ENGINES
    from study.lease import Lease

    storage = schema.StorageConfig()
    assert (Lease().heartbeat_s, Lease().grace_s) == (storage.heartbeat_s, storage.grace_s)
    assert schema.StudyConfig().engine in ENGINES
    for name in ENGINES:
        plan_from_overrides([f"engine={name}"])


def test_a_mistyped_command_line_is_refused_before_torch_is_imported(tmp_path: Path) -> None:
    """Hydra composes against the schema alone: an unknown option or a value of the wrong
    type is one error line, exit 2, without importing torch (about 1 s, not 4)."""
    for override in ("optimizer=adamm", "train.epochs=abc"):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "study", override,
                               f"hydra.run.dir={tmp_path / 'run'}"],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, errors
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "hydra" in imported and not {"torch", "numba"} & imported
        assert not (tmp_path / "run").exists()
