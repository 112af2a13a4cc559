"""`python -m study.bench_search`: a sampler sweep against plain sequential Optuna, as JSON.

Both search the same space with the same sampler class, seed and budget (proposals x the
sweep's seeds), on the same data, init and batch orders:

- `study`: `study.search.run_search` (populations of proposals asked at once, trained as
  one batched computation, every run told);
- `sequential`: one `ask` at a time, each proposal's runs trained one after the other by
  the reference engine (a plain PyTorch loop), told the mean over seeds.

The best value of a search is the smallest mean over seeds of the objective among its
proposals. Repeats alternate the two (sampler seed = repeat index) so load drifts hit both;
wall and CPU seconds and the load average are reported with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import torch

from study import cli
from study.bench import at_least, out_path, write_json
from study.engine import BatchedEngine, ReferenceEngine
from study.metrics import objective_value, summarize_many
from study.metrics.curvature import stability_threshold
from study.plan import plan_for_command
from study.schema import ConfigError
from study.search import PROPOSAL, SearchPlan, make_sampler, run_search
from study.storage import open_study


def _timed(fn) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def best_of_study(study: optuna.Study) -> float:
    """The smallest mean over seeds of the told values among the study's proposals."""
    by_proposal: dict[int, list[float]] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        by_proposal.setdefault(t.user_attrs[PROPOSAL], []).append(t.value)
    return min(statistics.fmean(v) for v in by_proposal.values())


def steps_of_study(study: optuna.Study) -> int:
    """Updates the study's runs applied (a pruned run stops early)."""
    return sum(int(t.user_attrs["metrics"]["steps"]) for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                optuna.trial.TrialState.PRUNED)))


def run_batched(plan: SearchPlan, metric: str, device: torch.device) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        study = open_study(Path(tmp), None, "bench", "minimize")
        run_search(plan, study, BatchedEngine(), device, Path(tmp), metric)
        return best_of_study(study), steps_of_study(study)


def run_sequential(plan: SearchPlan, metric: str, device: torch.device) -> tuple[float, int]:
    """Plain Optuna: ask one proposal, train its seeds with the reference engine, tell."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=make_sampler(plan.sampler, plan.sampler_seed))
    engine, best, steps = ReferenceEngine(), float("inf"), 0
    for _ in range(plan.trials):
        trial = study.ask(plan.space)
        specs = [plan.build(dict(trial.params), seed).trial for seed in plan.seeds]
        traces = [engine.run([spec], device)[0] for spec in specs]
        steps += sum(len(t.step_loss) for t in traces)
        summaries = summarize_many(traces, [stability_threshold(s.optimizer) for s in specs])
        value = statistics.fmean(objective_value(s, metric) for s in summaries)
        study.tell(trial, value)
        best = min(best, value)
    return best, steps


def _plans(overrides: Sequence[str], repeat: int, pruner: str | None) -> dict[str, SearchPlan]:
    """The searches of one repeat (seed `repeat`): the batched one, which the sequential
    arm runs too, and with `pruner` the pruned one."""
    plan = plan_for_command([*overrides, f"seed={repeat}"])
    plans = {"study": plan, "sequential": plan}
    if pruner:
        plans["study+pruner"] = plan_for_command(
            [*overrides, f"seed={repeat}", f"+sweep.pruner={pruner}"])
    return plans


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m study.bench_search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", default=["+sweep=adam_search"],
                        help="Hydra overrides of the search (default: +sweep=adam_search)")
    parser.add_argument("--repeats", type=at_least(1), default=5)
    parser.add_argument("--metric", default="val_loss_final")
    parser.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads")
    parser.add_argument("--pruner", default=None,
                        help="also run the batched search with this sweep.pruner override, "
                             "e.g. '{type: successive_halving, min_resource: 2}'")
    parser.add_argument("--no-sequential", action="store_true",
                        help="skip the sequential arm (pruning comparisons only)")
    parser.add_argument("--out", type=out_path, default=None, help="write the JSON here too")
    args = parser.parse_intermixed_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    rows = []
    arms = ["study", *(["study+pruner"] if args.pruner else []),
            *([] if args.no_sequential else ["sequential"])]
    try:  # every repeat's plan before any search: a bad override is refused at once
        repeats = [_plans(args.overrides, repeat, args.pruner) for repeat in range(args.repeats)]
    except ConfigError as err:
        print(f"python -m study.bench_search: {cli.one_line(str(err))}",
              file=sys.stderr)
        raise SystemExit(2) from None
    for repeat, plans in enumerate(repeats):
        plan = plans["study"]
        for name in arms:
            fn = run_sequential if name == "sequential" else run_batched
            (best, steps), wall, cpu = _timed(
                lambda fn=fn, plan=plans[name]: fn(plan, args.metric, device))
            rows.append({"engine": name, "repeat": repeat, "best": best, "steps": steps,
                         "wall_s": wall, "cpu_s": cpu, "load_avg": os.getloadavg()})
            print(json.dumps(rows[-1]), file=sys.stderr)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["engine"] == name)

    result = {
        "command": " ".join(["python -m study.bench_search",
                             *(argv if argv is not None else sys.argv[1:])]),
        "runs_per_search": plan.total, "proposals": plan.trials,
        "population": plan.population, "sampler": plan.sampler,
        "median": {name: {k: median(name, k) for k in ("best", "steps", "wall_s", "cpu_s")}
                   for name in arms},
        "repeats": rows,
    }
    if "sequential" in arms:
        for unit in ("wall_s", "cpu_s"):
            result[f"speedup_{unit}"] = (result["median"]["sequential"][unit]
                                         / result["median"]["study"][unit])
    print(json.dumps(result, indent=2))
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
