"""`python -m study.bench_e2e`: the command line end to end, stage by stage, as JSON.

Each round runs `python -m study OVERRIDES hydra.run.dir=<a temporary directory>
progress=false` in a fresh process, as a user runs it (default: `+sweep=lr_batch`), and
times its stages from when the run wrote its files. Every file of a run directory is
written whole and then renamed into place, so its modification time is when its content
was ready:

- start-up: from the start of the process to `.hydra/config.yaml` (the imports, Hydra's
  compositions, the expansion of the grid, the checks, the storage opened);
- training: to the last curves file (every population trained and its curves written);
- results: to env.json (the last population's tells, trials.parquet);
- report: to report.html (the claims scored into claims.parquet, then the report; none with
  `report=false`);
- exit: to the end of the process.

`--against DIR` alternates every round with the checkout in DIR (run with
`PYTHONPATH=DIR`), so that a change is compared with what it changes under the same load.
Every round comes with its wall seconds, the process's CPU-seconds (user + system) and the
load averages before it.

Before the rounds, each side runs the command once untimed (`--no-warm-up` skips it): a
checkout's first run on a machine compiles the CPU kernel into numba's cache (about 20-30 s,
and numba keys that cache by the source file's path, so a fresh clone compiles again),
and that first round would otherwise time the compilation, not the command. The warm-up's
wall seconds are in the JSON (`warm_up_s`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from study import records
from study.bench import at_least, load_averages, out_path, write_json

STAGES = ("start_up", "training", "results", "report", "exit")
DEFAULT_OVERRIDES = ("+sweep=lr_batch",)


class RunFailed(RuntimeError):
    """The command exited with an error (`status`); the message is its last line on
    stderr."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def stages(run_dir: Path, started: float, ended: float) -> dict[str, float | None]:
    """Seconds per stage (`STAGES`) of a run in `run_dir` that started at `started` and
    ended at `ended` (both `time.time()`), from its files' modification times; None for a
    stage whose file is absent (no report, nothing trained)."""
    def mtime(path: Path) -> float | None:
        return path.stat().st_mtime if path.is_file() else None

    curves = [p.stat().st_mtime for p in (run_dir / records.CURVES_DIR).glob("*.parquet")]
    marks = [started, mtime(run_dir / ".hydra" / "config.yaml"), max(curves, default=None),
             mtime(run_dir / records.ENV), mtime(run_dir / records.REPORT), ended]
    out: dict[str, float | None] = {}
    last = started
    for name, mark in zip(STAGES, marks[1:], strict=True):
        out[name] = None if mark is None else round(mark - last, 3)
        last = last if mark is None else mark
    return out


def run_once(overrides: Sequence[str], checkout: Path | None) -> dict[str, Any]:
    """One end-to-end run of `python -m study OVERRIDES` (the installed package, or the
    one in `checkout`): wall seconds, CPU-seconds, load averages before, stages."""
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout),
                                                          env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="study-e2e-") as tmp:
        run_dir = Path(tmp) / "run"
        load = load_averages()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.time()
        done = subprocess.run([sys.executable, "-m", "study", *overrides,
                               f"hydra.run.dir={run_dir}", "progress=false"],
                              cwd=checkout, env=env, capture_output=True, text=True)
        ended = time.time()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
            raise RunFailed(f"python -m study exited with {done.returncode}: {last}",
                            done.returncode)
        return {"wall_s": round(ended - started, 3),
                "cpu_s": round(after.ru_utime + after.ru_stime
                               - before.ru_utime - before.ru_stime, 3),
                "load_avg": load, "stages_s": stages(run_dir, started, ended)}


def medians(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median wall and CPU seconds and median seconds per stage over `rounds`."""
    def median(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return round(statistics.median(known), 3) if known else None

    return {"wall_s": median([r["wall_s"] for r in rounds]),
            "cpu_s": median([r["cpu_s"] for r in rounds]),
            "stages_s": {s: median([r["stages_s"][s] for r in rounds]) for s in STAGES}}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m study.bench_e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", default=list(DEFAULT_OVERRIDES),
                        help="overrides of the command (default: +sweep=lr_batch)")
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--against", type=Path, default=None,
                        help="another checkout of study, run in turn with this one")
    parser.add_argument("--out", type=out_path, default=None, help="write the JSON here too")
    parser.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True,
                        help="run each side once, untimed, before the rounds (default: on)")
    args = parser.parse_intermixed_args(argv)
    if args.against is not None and not (args.against / "study" / "__main__.py").is_file():
        parser.error(f"--against: {args.against} is not a checkout of study")
    sides = {"this": None, **({"against": args.against.resolve()} if args.against else {})}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    warm_up: dict[str, float] = {}
    try:
        if args.warm_up:
            for name, checkout in sides.items():
                warm_up[name] = run_once(args.overrides, checkout)["wall_s"]
                print(json.dumps({"side": name, "warm_up_s": warm_up[name]}), file=sys.stderr)
        for index in range(args.rounds):
            for name, checkout in sides.items():
                row = run_once(args.overrides, checkout)
                rounds[name].append(row)
                print(json.dumps({"side": name, "round": index, **row}), file=sys.stderr)
    except RunFailed as err:  # its bad input (2) or bad state (3) is the bench's too
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.status if err.status in (2, 3) else 1)
    result = {"command": " ".join(["python -m study", *args.overrides]),
              **({"against": str(args.against.resolve())} if args.against else {}),
              **({"warm_up_s": warm_up} if warm_up else {}),
              "median": {name: medians(rows) for name, rows in rounds.items()},
              "rounds": rounds}
    print(json.dumps(result, indent=2))
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
