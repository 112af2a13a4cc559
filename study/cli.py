"""What `python -m study` checks and changes on its command line before Hydra sees it,
and how a refusal is printed: one line.

Hydra reports some errors itself, before the job runs, with a traceback or several lines
(a config file that is not valid YAML, a run directory it cannot write). Hydra also
records its arguments as given (multirun.yaml, a launcher's job listing), so a password in
`storage.url=...` would reach the disk: `hide_url_arguments` moves it to the environment.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import yaml

from study import storage

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
URL_VARIABLE = "STUDY_STORAGE_URL"  # conf/storage/postgres.yaml reads it


class CommandLineError(Exception):
    """The command line is refused before Hydra runs: `message`, exit `status`."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def hide_url_arguments(argv: list[str]) -> None:
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


def search_path_overrides(hydra_overrides: Sequence[str]) -> list[str]:
    """The `hydra.searchpath` overrides among Hydra's own: where a recomposition and a
    resume command must find the user's config directories too (`--config-dir` is in
    Hydra's global state and its runtime config sources; an override is not)."""
    return [o for o in hydra_overrides
            if o.lstrip("+~").partition("=")[0] == "hydra.searchpath"]


def _config_dirs(argv: Sequence[str]) -> list[Path]:
    """conf/ and the directories of `--config-dir DIR` / `-cd DIR` arguments and of
    `hydra.searchpath=[file://DIR,...]` (its `pkg://` entries are packages: left to Hydra)."""
    dirs = [CONF_DIR]
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.partition("=")[2]))
        elif arg.lstrip("+").partition("=")[0] == "hydra.searchpath":
            for entry in arg.partition("=")[2].strip("[]").split(","):
                entry = entry.strip().strip("'\"")
                if entry and "://" not in entry.removeprefix("file://"):
                    dirs.append(Path(entry.removeprefix("file://")))
    return dirs


def check_yaml_files(argv: Sequence[str]) -> None:
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
            content = yaml.load(text, Loader=get_yaml_loader())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise CommandLineError(f"{where}: invalid YAML: {problem}", 2) from None
        if path.parent.name == "sweep" and isinstance(content, dict) and "sweep" in content \
                and not re.search(r"^#\s*@package\s+_global_\s*$", text, re.MULTILINE):
            # Without the header the file's keys land under sweep: (sweep.sweep), and
            # Hydra's report names a key of its schema, not the missing line.
            raise CommandLineError(f"{path}: a sweep file with a sweep: node starts with "
                                   f"the line '# @package _global_' (README, Writing a "
                                   f"sweep)", 2)


def check_sweep_keys(argv: Sequence[str]) -> None:
    """Exit 2 with one line when an argument sets a key of `sweep` (`sweep.seeds=[0,1]`) but
    none chooses a sweep (`+sweep=NAME`): conf/config.yaml has no sweep to set it in, and
    Hydra's report is a traceback of an assertion. A command that names another primary
    config or config directory may have a sweep there, and is left to Hydra."""
    if any(arg.split("=")[0] in ("--config-name", "-cn", "--config-dir", "-cd")
           for arg in argv):
        return
    if any(re.match(r"\+{0,2}sweep=", arg) for arg in argv):
        return
    for arg in argv:
        match = re.match(r"\+{0,2}(sweep\.[^=]+)=", arg)
        if match:
            sweeps = ", ".join(sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml")))
            raise CommandLineError(f"{arg}: no sweep is chosen to set {match.group(1)} in; "
                                   f"choose one first with +sweep=NAME ({sweeps})", 2)


def check_writable(argv: Sequence[str]) -> None:
    """Exit 3 with one line when the run directory (`hydra.run.dir=`, `resume=`, else
    outputs/ in the working directory) is on a read-only filesystem or not writable:
    Hydra would fail configuring its log file, with a traceback."""
    path = _chosen_dir(argv)
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        raise CommandLineError(f"{path} is not a directory (a run directory is one)", 2)
    if not os.access(path, os.W_OK):
        reason = "Read-only file system" if _read_only(path) else "Permission denied"
        raise CommandLineError(f"cannot write {path}: {reason}", 3)


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


def composition_error(err: Exception) -> str:
    """One line for an error raised while composing a config: where a YAML file is invalid
    and why, or the first line of the message and of its cause's (Hydra's "Error merging
    override X" says why only in its cause)."""
    mark = getattr(err, "problem_mark", None)
    where = f"{mark.name}:{mark.line + 1}:{mark.column + 1}: invalid YAML: " if mark else ""
    problem = getattr(err, "problem", None) or _first_line(err)
    cause = _first_line(err.__cause__) if err.__cause__ is not None and not mark else ""
    return f"{where}{problem}" + (f"; {cause}" if cause and cause not in problem else "")


def resolution_error(err: Exception) -> str:
    """One line for an error raised while resolving a composed config's value: the key, and
    the reason without OmegaConf's "X raised while resolving interpolation:" wrapper."""
    reason = re.sub(r"^\w+ raised while resolving interpolation: ", "", _first_line(err))
    key = getattr(err, "full_key", None)
    keyed = re.match(r"[\w.]+: ", reason)  # the reason names its key already (sweep.name)
    return reason if keyed or not key else f"{key}: {reason}"


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def one_line(text: str) -> str:
    """`text` on one line: its lines joined with "; ", blank ones and indentation dropped."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


class HeldStderr(io.StringIO):
    """What is written to stderr before Hydra calls `main` (its composition errors)."""

    def __init__(self, real: TextIO) -> None:
        super().__init__()
        self.real = real


def release_stderr() -> None:
    """Give stderr back to the terminal, with what was held (warnings) written first."""
    held = sys.stderr
    if isinstance(held, HeldStderr):
        sys.stderr = held.real
        sys.stderr.write(held.getvalue())


def missing_dirs(argv: Sequence[str]) -> list[Path]:
    """The directories that do not exist yet on the way to the run directory `argv` names
    (`hydra.run.dir=`, `resume=`, else outputs/), deepest first: what Hydra may create."""
    raw = _chosen_dir(argv, normalize=False)
    missing = set()
    for depth in range(1, len(raw.parts) + 1):
        prefix = Path(*raw.parts[:depth])
        if raw.parts[depth - 1] != ".." and not prefix.exists():
            missing.add(Path(os.path.abspath(prefix)))
    return sorted(missing, key=lambda p: len(p.parts), reverse=True)


def remove_empty(dirs: Sequence[Path]) -> None:
    """Remove the empty ones of `dirs` (directories this command created), with the empty
    folders inside them."""
    for top in dirs:
        for folder, _, _ in os.walk(top, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def hydra_error(held: HeldStderr) -> str | None:
    """What Hydra wrote to stderr before the job, as one line (without its search path and
    its HYDRA_FULL_ERROR hint); None when it wrote nothing."""
    text = held.getvalue().split("Config search path:")[0]
    lines = [line for line in text.splitlines() if "HYDRA_FULL_ERROR" not in line]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        # an exception Hydra did not expect: its last line says what, the trace is noise
        lines = [line for line in lines if line.strip()][-1:]
    return one_line(storage.mask_url("\n".join(lines))) or None
