"""What env.json records: how to reproduce a run and what it ran on."""

from __future__ import annotations

import os
import platform
import shlex
import socket
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

_PACKAGES = ("study", "torch", "optuna", "hydra-core", "omegaconf", "numpy", "pandas",
             "pyarrow", "matplotlib", "seaborn", "jinja2")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_commit(path: Path) -> dict[str, Any] | None:
    """HEAD commit of the repository holding `path`, and whether the tree is dirty."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(path), *args], capture_output=True,
                                  text=True, check=True, timeout=10).stdout.strip()

        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def device_info(device: torch.device) -> dict[str, Any]:
    """The device, and the numerics flags that change float32 results on it."""
    info: dict[str, Any] = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        # how long idle OpenMP threads spin before they sleep: study/__init__.py
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        info.update(cuda_device=torch.cuda.get_device_name(device),
                    cuda_version=torch.version.cuda,
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    cuda_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return info


# Overrides that say where or how to run, not what: left out of the reproduce command.
_NOT_REPRODUCED = ("resume=", "hydra.", "progress=", "report=")


def reproduce_command(overrides: list[str], sources: Sequence[str] = ()) -> str:
    """`python -m study ...` with the overrides that determine the results, after
    `sources` (`config_sources`: where the user's config groups are)."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith(_NOT_REPRODUCED)]
    return " ".join(["python -m study", *(shlex.quote(o) for o in [*sources, *kept])])


def resume_command(overrides: list[str], run_dir: Path, sources: Sequence[str] = ()) -> str:
    """`reproduce_command` into `run_dir`: what finishes the run there."""
    return f"{reproduce_command(overrides, sources)} hydra.run.dir={shlex.quote(str(run_dir))}"


def config_sources(hydra_cfg: Any) -> list[str]:
    """The arguments of the command line that told Hydra where configs are:
    `--config-dir=DIR` (absolute) and `hydra.searchpath=[...]`. Without them a resume
    command could not find a sweep or option of the user's own."""
    runtime = getattr(hydra_cfg, "runtime", None)
    dirs = [f"--config-dir={source.path}" for source in getattr(runtime, "config_sources", ())
            if source.provider == "command-line"]
    from study.cli import search_path_overrides

    return [*dirs, *search_path_overrides(
        getattr(getattr(hydra_cfg, "overrides", None), "hydra", ()))]


def describe_environment(overrides: list[str], run_dir: Path, device: torch.device,
                         engine: str, sources: Sequence[str] = ()) -> dict[str, Any]:
    """The env.json of one invocation (timing fields are added by the caller); `sources`:
    `config_sources` of its command line."""
    return {
        "command": reproduce_command(overrides, sources),
        "resume_command": resume_command(overrides, run_dir, sources),
        "argv": sys.argv,
        "cwd": str(Path.cwd()),
        "run_dir": str(run_dir),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "engine": engine,
        **device_info(device),
        "versions": versions(),
        "git": git_commit(Path(__file__).resolve().parent),
    }
