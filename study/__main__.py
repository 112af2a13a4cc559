"""`python -m study [+sweep=NAME] [overrides]`: compose, validate, dispatch. Nothing else.

Without a sweep it trains the one composed configuration; with `+sweep=NAME` it expands
conf/sweep/NAME.yaml. Either way the run directory gets the same files (docs/design.md);
`study.run` does the work. Exit codes: 2 for a bad config, 3 for bad state (a corrupt
journal, another version's run, an unreachable database), 130 when stopped by Ctrl-C.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn, TextIO

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from study import records, storage
from study.config import ConfigError, register, validate
from study.grid import expand
from study.run import check_objective, execute

register()
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
URL_VARIABLE = "STUDY_STORAGE_URL"  # conf/storage/postgres.yaml reads it


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    _release_stderr()
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
    try:
        if multirun:
            _mask_file(Path(hc.sweep.dir) / "multirun.yaml")
        typed = validate(cfg)
        plan = expand(cfg, _compose, overrides, choices, typed=typed)
        check_objective(typed.objective.metric, plan)
        status = execute(cfg, typed, plan, run_dir, overrides, hc)
    except ConfigError as err:
        print(f"error: {one_line(storage.mask_url(str(err)))}", file=sys.stderr)
        if fresh:
            _remove_if_only_logs(run_dir)
        end(2)
    except (records.RecordError, storage.StorageError) as err:
        # Bad state (a corrupt journal, another version's run, an unreachable database):
        # nothing of the run directory was changed.
        print(f"error: {one_line(storage.mask_url(str(err)))}", file=sys.stderr)
        if fresh:
            _remove_if_only_logs(run_dir)
        end(3)
    except OSError as err:
        # The run directory cannot be written (a full disk, a read-only filesystem): what
        # is stored is whole (atomic writes, a repairable journal tail); a resume finishes.
        print(f"error: {storage.mask_url(_os_error_message(err, run_dir))}", file=sys.stderr)
        if fresh:
            _remove_if_only_logs(run_dir)
        end(3)
    if status:
        end(status)


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
    raise JobFailed(status)


def _compose(extra: Sequence[str]) -> DictConfig:
    """The config composed again with `extra` overrides (grid.expand's group axes); a
    composition error (an option file that is not valid YAML, a missing option) is a
    ConfigError."""
    try:
        return hydra.compose("config", overrides=list(extra))
    except Exception as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{mark.name}:{mark.line + 1}:{mark.column + 1}: invalid YAML: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
        raise ConfigError(f"{where}{problem}") from None


def _remove_if_only_logs(run_dir: Path) -> None:
    """Remove a run directory this invocation created if it holds nothing but logs."""
    if run_dir.is_dir() and all(p.suffix == ".log" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def _hide_url_arguments(argv: list[str]) -> None:
    """Move a `storage.url=...` argument that holds a password into the environment, in
    place: the argument becomes `storage.url=${oc.env:STUDY_STORAGE_URL}`, so that Hydra
    never sees the password (its multirun.yaml, its launchers' job listings and its error
    messages print arguments as given) and a launcher's jobs inherit it."""
    for i, arg in enumerate(argv):
        match = re.fullmatch(r"(\+{0,2}storage\.url=)(.*)", arg, re.DOTALL)
        if not match:
            continue
        url = match.group(2)
        if len(url) >= 2 and url[0] == url[-1] and url[0] in "'\"":
            url = url[1:-1]
        if storage.url_password(url) is None:
            continue
        storage.register_url(url)
        os.environ[URL_VARIABLE] = url
        argv[i] = f"{match.group(1)}${{oc.env:{URL_VARIABLE}}}"


def _config_dirs(argv: Sequence[str]) -> list[Path]:
    """conf/ and the directories of `--config-dir DIR` / `-cd DIR` arguments."""
    dirs = [CONF_DIR]
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.partition("=")[2]))
    return dirs


def _check_yaml_files(argv: Sequence[str]) -> None:
    """Exit 2 with one line `FILE:LINE:COLUMN: invalid YAML: problem` when a config file
    this command selects (config.yaml, and the options of `group=option` arguments) is not
    valid YAML: Hydra's own report is a long traceback."""
    from omegaconf._utils import get_yaml_loader

    dirs = _config_dirs(argv)
    files = [CONF_DIR / "config.yaml"]
    for arg in argv:
        match = re.fullmatch(r"[+~]{0,2}([\w/]+)=\[?([\w/,.+-]*)\]?", arg)
        if match:
            files += [d / match.group(1) / f"{option}.yaml" for d in dirs
                      for option in match.group(2).split(",") if option]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue  # not an option file (a scalar key, a missing option: Hydra names it)
        try:
            yaml.load(text, Loader=get_yaml_loader())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            print(f"error: {where}: invalid YAML: {problem}", file=sys.stderr)
            sys.exit(2)


def _check_writable(argv: Sequence[str]) -> None:
    """Exit 3 with one line when the run directory (`hydra.run.dir=`, `resume=`, else
    outputs/ in the working directory) is on a read-only filesystem or not writable:
    Hydra would fail configuring its log file, with a traceback."""
    path = _chosen_dir(argv)
    if path.exists() and not path.is_dir():
        print(f"error: {path} is not a directory (a run directory is one)", file=sys.stderr)
        sys.exit(2)
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        print(f"error: {path} is not a directory (a run directory is one)", file=sys.stderr)
        sys.exit(2)
    if not os.access(path, os.W_OK):
        reason = "Read-only file system" if _read_only(path) else "Permission denied"
        print(f"error: cannot write {path}: {reason}", file=sys.stderr)
        sys.exit(3)


def _chosen_dir(argv: Sequence[str], normalize: bool = True) -> Path:
    """The run directory `argv` names (`hydra.run.dir=`, `resume=`; with `--multirun`,
    `hydra.sweep.dir=`), absolute (`..` resolved when `normalize`); else outputs/ (where a
    new run directory is made)."""
    keys = ("hydra.sweep.dir",) if {"--multirun", "-m"} & set(argv) else (
        "hydra.run.dir", "resume")
    chosen = [a.partition("=")[2] for a in argv if a.lstrip("+").partition("=")[0] in keys]
    path = Path(chosen[-1] if chosen else "outputs").absolute()
    return Path(os.path.abspath(path)) if normalize else path


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def one_line(text: str) -> str:
    """`text` on one line: its lines joined with "; ", blank ones and indentation dropped."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


class _HeldStderr(io.StringIO):
    """What is written to stderr before Hydra calls `main` (its composition errors)."""

    def __init__(self, real: TextIO) -> None:
        super().__init__()
        self.real = real


def _release_stderr() -> None:
    """Give stderr back to the terminal, with what was held (warnings) written first."""
    held = sys.stderr
    if isinstance(held, _HeldStderr):
        sys.stderr = held.real
        sys.stderr.write(held.getvalue())


def run(argv: list[str] | None = None) -> None:
    """The command line: check what must be checked before Hydra sees it, then `main`.

    An error Hydra reports before `main` runs (an unknown option, a value of the wrong
    type, a malformed override) is printed as one `error:` line, exit status 2.
    """
    argv = sys.argv if argv is None else argv
    storage.register_url(os.environ.get(URL_VARIABLE))
    _check_yaml_files(argv[1:])
    if not {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info"} & set(argv[1:]):
        _check_writable(argv[1:])
    _hide_url_arguments(argv)
    new_dirs = _missing_dirs(argv[1:])
    sys.stderr = _HeldStderr(sys.stderr)
    status: int | str | None = 0
    try:
        main()
    except SystemExit as stop:
        status = stop.code
        held = sys.stderr
        if isinstance(held, _HeldStderr):  # Hydra stopped before calling main
            sys.stderr = held.real
            text = held.getvalue().split("Config search path:")[0]  # Hydra's search path
            lines = [line for line in text.splitlines() if "HYDRA_FULL_ERROR" not in line]
            if status in (0, None) or not any(line.strip() for line in lines):
                sys.stderr.write(held.getvalue())
            else:
                print(f"error: {one_line(storage.mask_url(chr(10).join(lines)))}",
                      file=sys.stderr)
                status = 2
    except BaseException:
        _remove_empty(new_dirs)
        raise
    finally:
        _release_stderr()
    if status not in (0, None):
        _remove_empty(new_dirs)  # refused: no directory left that this command created
    sys.exit(status)


def _missing_dirs(argv: Sequence[str]) -> list[Path]:
    """The directories that do not exist yet on the way to the run directory `argv` names
    (`hydra.run.dir=`, `resume=`, else outputs/), deepest first: what Hydra may create."""
    raw = _chosen_dir(argv, normalize=False)
    missing = set()
    for depth in range(1, len(raw.parts) + 1):
        prefix = Path(*raw.parts[:depth])
        if raw.parts[depth - 1] != ".." and not prefix.exists():
            missing.add(Path(os.path.abspath(prefix)))
    return sorted(missing, key=lambda p: len(p.parts), reverse=True)


def _remove_empty(dirs: Sequence[Path]) -> None:
    """Remove the empty ones of `dirs` (directories this command created), with the empty
    folders inside them."""
    for top in dirs:
        for folder, _, _ in os.walk(top, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(folder)


if __name__ == "__main__":
    run()
