"""`python -m study [+sweep=NAME] [overrides]`: compose, validate, dispatch. Nothing else.

Without a sweep it trains the one composed configuration; with `+sweep=NAME` it expands
conf/sweep/NAME.yaml. Either way the run directory gets the same files (docs/design.md);
`study.run` does the work; `study.cli` checks the command line before Hydra sees it.
Exit codes: 2 for bad input (a bad config, a file that is not YAML, an error Hydra reports
while composing), 3 for bad state (a corrupt journal, another version's run, an unreachable
database, a full or read-only disk), each with one `error:` line on stderr; 130 when
stopped by Ctrl-C.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn, TextIO

NOT_STARTED = "interrupted before the run started; nothing was stored"


def _interrupted_at_start(signum: int, frame: object) -> None:
    # Ctrl-C while the command starts (the imports below, Hydra's composition): no run
    # exists yet, and the traceback of an import says nothing to a user. Written to the
    # real stderr: until Hydra calls `main`, sys.stderr holds what Hydra writes.
    os.write(2, (NOT_STARTED + "\n").encode())
    os._exit(130)


class _Stdout:
    """sys.stdout that goes on without a reader: a closed pipe (`| head`, `| true`) sends
    what is left to /dev/null instead of ending the run before its claims and report (the
    run's results are its files; stdout only tells about them)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_null()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_null()

    def _to_null(self) -> None:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, self._stream.fileno())
        os.close(null)

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def _terminated(signum: int, frame: object) -> None:
    # SIGTERM (kill, SLURM) outside training ends the command as Ctrl-C does: one line, the
    # forked processes ended, a directory of nothing but logs removed.
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _interrupted_at_start)
    signal.signal(signal.SIGTERM, _interrupted_at_start)
    sys.stdout = _Stdout(sys.stdout)  # before Hydra's logging takes it

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from study import cli, heap, records, storage  # noqa: E402
from study.analyst import Analyst  # noqa: E402
from study.compositions import Ahead  # noqa: E402
from study.process_exit import exit_now  # noqa: E402
from study.schema import ConfigError, register  # noqa: E402

register()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here: `_interrupted`
    signal.signal(signal.SIGTERM, _terminated)
    cli.release_stderr()
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    fresh = not any((run_dir / name).exists() for name in
                    (records.JOURNAL, records.TRIALS, records.CURVES_DIR, records.ENV))
    overrides, choices = list(hc.overrides.task), dict(hc.runtime.choices)
    multirun = hc.mode == RunMode.MULTIRUN
    end = _exit_multirun if multirun else sys.exit
    _mask_logs()
    with contextlib.suppress(Exception):  # an unresolvable value: validate() names it
        storage.register_url(OmegaConf.select(cfg, "storage.url", default=None))
    compose = functools.partial(_compose, search_path=cli.search_path_overrides(hc.overrides.hydra))
    # Forked before torch is imported: they import the analysis libraries and compose the
    # grid's configurations meanwhile.
    analyst = Analyst.start() if _analyses(cfg) else None
    ahead = Ahead.start(cfg, compose, overrides)
    try:
        if multirun:
            _mask_file(Path(hc.sweep.dir) / "multirun.yaml")
        # Imported once Hydra has composed the config: a mistyped command line is refused
        # without waiting for torch, numba and the engine. torch gives its loggers their
        # levels at the end of its import; one interrupted before that (Ctrl-C) logged its
        # exit-time statistics at Hydra's INFO level.
        logging.getLogger("torch").setLevel(logging.WARNING)
        from study.config import validate
        from study.plan import expand
        from study.run import check_objective, execute

        heap.settle()  # the imports are done: collect from here, over what comes next

        typed = validate(cfg)
        plan = expand(cfg, compose, overrides, choices, typed=typed,
                      ready=ahead.take() if ahead is not None else None)
        check_objective(typed.objective.metric, plan)
        status = execute(cfg, typed, plan, run_dir, overrides, hc, analyst)
    except ConfigError as err:
        print(f"error: {cli.one_line(storage.mask_url(str(err)))}", file=sys.stderr)
        if fresh:
            _remove_if_only_logs(run_dir)
        end(2)
    except (records.RecordError, storage.StorageError) as err:
        # Bad state (a corrupt journal, another version's run, an unreachable database):
        # nothing of the run directory was changed.
        print(f"error: {cli.one_line(storage.mask_url(str(err)))}", file=sys.stderr)
        if fresh:
            _remove_if_only_logs(run_dir)
        end(3)
    except KeyboardInterrupt as err:
        # Ctrl-C outside training (which stops between populations on its own): before the
        # run was stored, as it was stored (the error says how to start it), or while its
        # claims and report were made.
        print(storage.mask_url(str(err)) or _interrupted(run_dir), file=sys.stderr)
        if fresh:
            _remove_if_only_logs(run_dir)
        end(130)
    except OSError as err:
        # The run directory cannot be written (a full disk, a read-only filesystem): what
        # is stored is whole (atomic writes, a repairable journal tail); a resume finishes.
        print(f"error: {storage.mask_url(_os_error_message(err, run_dir))}", file=sys.stderr)
        if fresh:
            _remove_if_only_logs(run_dir)
        end(3)
    finally:
        if ahead is not None:
            ahead.close()
        if analyst is not None:
            analyst.close()
    if status:
        end(status)


def _analyses(cfg: DictConfig) -> bool:
    """Whether the run ends with analysis work (a report, a sweep's claims), as far as the
    unvalidated config tells."""
    with contextlib.suppress(Exception):
        return bool(OmegaConf.select(cfg, "report", default=True)) or (
            OmegaConf.select(cfg, "sweep", default=None) is not None)
    return False


def _interrupted(run_dir: Path) -> str:
    """One line for Ctrl-C outside training: what is stored and how to finish."""
    resume = records.resume_command(run_dir)
    if resume is None:
        return NOT_STARTED
    return f"interrupted; nothing stored is lost. Finish with: {resume}"


def _os_error_message(err: OSError, run_dir: Path) -> str:
    """One line for an OSError of the run directory: the path, the reason and, for a full
    disk, the space left and how to finish."""
    path = err.filename or run_dir
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(run_dir).free
        except OSError:
            free = 0
        needed = getattr(err, "needed_bytes", None)
        return (f"cannot write {path}: {reason} ({free:,} bytes free"
                + (f", {needed:,} needed" if needed else "")
                + f"); free some space, then run the same command with "
                f"hydra.run.dir={run_dir} to finish (nothing stored is lost)")
    return f"cannot write {path}: {reason}"


class _MaskingFilter(logging.Filter):
    """Mask URL passwords in every log record, whoever logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = storage.mask_url(message)
        if masked != message:
            record.msg, record.args = masked, ()
        return True


def _mask_logs() -> None:
    """Mask passwords on every handler Hydra configured (console and the run's log file);
    a handler that cannot write (a full disk) drops the record instead of printing a
    traceback."""
    logging.raiseExceptions = False
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _MaskingFilter) for f in handler.filters):
            handler.addFilter(_MaskingFilter())


def _mask_file(path: Path) -> None:
    """Rewrite `path` with its passwords masked (Hydra's multirun.yaml holds the composed
    config, a password written into a config file included)."""
    try:
        text = path.read_text()
    except OSError:
        return
    masked = storage.mask_url(text)
    if masked != text:
        records.atomic_write_bytes(path, masked.encode())


class JobFailed(RuntimeError):
    """A job of a multirun ended with a non-zero exit status (the status is `.status`)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the study job ended with exit status {status} (see its stderr)")
        self.status = status


def _exit_multirun(status: int) -> NoReturn:
    """End a launcher's job with an exception, not SystemExit: a launcher records an
    exception as the job's failure (submitit pickles it for the submitting process), while
    SystemExit escapes it, and submitit is then left to ask SLURM's accounting."""
    raise JobFailed(status) from None  # not chained to the error its stderr line named


def _compose(extra: Sequence[str], search_path: Sequence[str] = ()) -> DictConfig:
    """The config composed again with `extra` overrides (plan.expand's group axes) and the
    invocation's `search_path` overrides; a composition error (an option file that is not
    valid YAML, a missing option) is a ConfigError."""
    try:
        return hydra.compose("config", overrides=[*search_path, *extra])
    except Exception as err:
        raise ConfigError(cli.composition_error(err)) from None


def _remove_if_only_logs(run_dir: Path) -> None:
    """Remove a run directory this invocation created if it holds nothing but logs."""
    if run_dir.is_dir() and all(p.suffix == ".log" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def run(argv: list[str] | None = None) -> None:
    """The command line: check what must be checked before Hydra sees it, then `main`.

    An error Hydra reports before `main` runs (an unknown option, a value of the wrong
    type, a malformed override) is printed as one `error:` line, exit status 2 (not with
    `--multirun`: a launcher may wait for hours, and its own messages must show).
    """
    argv = sys.argv if argv is None else argv
    heap.hold()  # until the imports are done (study.heap)
    storage.register_url(os.environ.get(cli.URL_VARIABLE))
    try:
        cli.check_yaml_files(argv[1:])
        cli.check_sweep_keys(argv[1:])
        if not {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info"} & set(argv[1:]):
            cli.check_writable(argv[1:])
    except cli.CommandLineError as err:
        print(f"error: {storage.mask_url(str(err))}", file=sys.stderr)
        sys.exit(err.status)
    cli.hide_url_arguments(argv)
    new_dirs = cli.missing_dirs(argv[1:])
    if not {"--multirun", "-m"} & set(argv[1:]):  # a launcher's jobs report their own
        sys.stderr = cli.HeldStderr(sys.stderr)
    status: int | str | None = 0
    try:
        main()
    except SystemExit as stop:
        status = stop.code
        held = sys.stderr
        if isinstance(held, cli.HeldStderr):  # Hydra stopped before calling main
            sys.stderr = held.real
            message = cli.hydra_error(held)
            if status in (0, None) or message is None:
                sys.stderr.write(held.getvalue())
            else:
                print(f"error: {message}", file=sys.stderr)
                status = 2
    except Exception as err:
        cli.remove_empty(new_dirs)
        held = sys.stderr
        if not isinstance(held, cli.HeldStderr):  # raised in main, or a launcher's job
            raise
        # Hydra failed after composing, before calling main: resolving its own keys
        # (hydra.run.dir's ${oc.env:...}, or a sweep.name new_run_dir refuses)
        sys.stderr = held.real
        print(f"error: {storage.mask_url(cli.resolution_error(err))}", file=sys.stderr)
        status = 2
    except BaseException:
        cli.remove_empty(new_dirs)
        raise
    finally:
        cli.release_stderr()
    if status not in (0, None):
        cli.remove_empty(new_dirs)  # refused: no directory left that this command created
    exit_now(status)  # everything is written: skip the interpreter's teardown


if __name__ == "__main__":
    run()
