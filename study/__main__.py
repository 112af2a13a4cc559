"""`python -m study [+sweep=NAME] [overrides]`: compose, validate, dispatch. Nothing else.

Without a sweep it trains the one composed configuration; with `+sweep=NAME` it expands
conf/sweep/NAME.yaml. Either way the run directory gets the same files (docs/design.md);
`study.run` does the work. Exit codes: 2 for a bad config, 3 for bad state (a corrupt
journal, another version's run, an unreachable database), 130 when stopped by Ctrl-C.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from study import records, storage
from study.config import ConfigError, register, validate
from study.grid import expand
from study.run import check_objective, execute

register()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    fresh = not any((run_dir / name).exists() for name in
                    (records.JOURNAL, records.TRIALS, records.CURVES_DIR))
    overrides, choices = list(hc.overrides.task), dict(hc.runtime.choices)
    end = _exit_multirun if hc.mode == RunMode.MULTIRUN else sys.exit
    try:
        typed = validate(cfg)
        plan = expand(cfg, _compose, overrides, choices, typed=typed)
        check_objective(typed.objective.metric, plan)
        status = execute(cfg, typed, plan, run_dir, overrides, hc)
    except ConfigError as err:
        print(f"error: {storage.mask_url(str(err))}", file=sys.stderr)
        if fresh:
            _remove_if_only_logs(run_dir)
        end(2)
    except (records.RecordError, storage.StorageError) as err:
        # Bad state (a corrupt journal, another version's run, an unreachable database):
        # nothing of the run directory was changed.
        print(f"error: {storage.mask_url(str(err))}", file=sys.stderr)
        if fresh:
            _remove_if_only_logs(run_dir)
        end(3)
    if status:
        end(status)


class JobFailed(RuntimeError):
    """A job of a multirun ended with a non-zero exit status (the status is `.status`)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the study job ended with exit status {status} (see its stderr)")
        self.status = status


def _exit_multirun(status: int) -> NoReturn:
    """End a launcher's job with an exception, not SystemExit: a launcher records an
    exception as the job's failure (submitit pickles it for the submitting process), while
    SystemExit escapes it, and submitit is then left to ask SLURM's accounting."""
    raise JobFailed(status)


def _compose(extra: Sequence[str]) -> DictConfig:
    """The config composed again with `extra` overrides (grid.expand's group axes)."""
    return hydra.compose("config", overrides=list(extra))


def _remove_if_only_logs(run_dir: Path) -> None:
    """Remove a run directory this invocation created if it holds nothing but logs."""
    if run_dir.is_dir() and all(p.suffix == ".log" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
