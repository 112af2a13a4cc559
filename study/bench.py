"""`python -m study.bench`: the batched engine against the reference engine, as JSON.

The workload is a sweep's trials (default: the flagship `+sweep=lr_batch`, 936 trials). The
batched engine trains all of them (populations from `plan_populations`); the reference
engine, one trial at a time, would take minutes, so it trains a random subset (`--subset`
trials drawn with `random.Random(--seed)`) and its time for the whole workload is
extrapolated by planned trial-steps (time / subset trial-steps * workload trial-steps).
Both engines run on the same device in the same process, after a short warm-up of each.

Rates are planned trial-steps per second (diverged trials stop early in both engines, so a
planned step is a unit of the sweep's work, not of arithmetic). The achieved fraction of the
machine's dense matmul throughput compares the batched engine's useful FLOPs (6 * weights *
batch per executed step, 2 * weights * examples per evaluation) with a dense matmul measured
in the same run.

`--peer` compares the batched engine with the JAX/optax peer and the plain PyTorch loop of
bench/peers instead, each in a process of its own (study.bench_peer).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from study import bench_peer, cli, heap
from study.engine import BatchedEngine, ReferenceEngine, Trace
from study.engine.planner import plan_populations, trial_steps
from study.plan import plan_for_command
from study.schema import ConfigError
from study.trial import TrialSpec


def matmul_gflops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Dense square matmul throughput (GFLOP/s), the machine's practical peak."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    _sync(device)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
        if reps % 8 == 0:
            _sync(device)
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def useful_flops(trial: TrialSpec, trace: Trace) -> float:
    """Multiply-adds of the steps and evaluations `trial` actually ran, times 2."""
    task = trial.task
    weights = sum(fi * fo for fi, fo in trial.model.layer_sizes(task.input_dim,
                                                                   task.output_dim))
    n_train, n_val = task.n_train, task.n_val
    batch = trial.train.resolved_batch_size(n_train)
    per_epoch = trial.train.steps_per_epoch(n_train)
    examples = 0
    for k in range(len(trace.step_loss)):  # the last batch of an epoch may be partial
        examples += batch if (k + 1) % per_epoch else n_train - (per_epoch - 1) * batch
    return 6.0 * weights * examples + 2.0 * weights * (n_train + n_val) * len(trace.eval_step)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def load_averages() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the platform has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def write_json(result: dict[str, Any], out: Path | None) -> None:
    """Write `result` as indented JSON to `out` (a bench's `--out`; nothing when None),
    its folder made if missing. A file that cannot be written ends the command with one
    line and exit 3; the caller has printed the result already, so nothing is lost."""
    if out is None:
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    except OSError as err:
        print(f"error: cannot write {out}: {err.strerror or err} (the result is printed "
              f"above)", file=sys.stderr)
        raise SystemExit(3) from None


def out_path(text: str) -> Path:
    """An argparse `type` for a bench's `--out`: refused at once (argparse's one line,
    exit 2) when it names a folder or its nearest existing folder cannot be written, not
    after minutes of measuring."""
    path = Path(text)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory")
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK) or (
            path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {text}")
    return path


def population_label(trial: TrialSpec) -> str:
    """A short name of a trial's population for the per-population figures."""
    task = trial.labels.get("task", type(trial.task).__name__)
    return f"{task}, batch {trial.train.batch_size}"


def run_batched(trials: Sequence[TrialSpec], device: torch.device, budget_bytes: int | None,
                engine: BatchedEngine | None = None
                ) -> tuple[list[Trace], float, float, list[dict[str, Any]]]:
    """Train every trial with the batched engine as a run trains it (`study.sweep`): a
    population that trains in the background (`BatchedEngine.start`) is set up while the
    one before it trains. Returns the traces, the wall time, the CPU time (all the process's
    threads), and per population (planner chunk) its label, trials, planned trial-steps,
    wall time (from its start to its traces: a population trained in the background
    overlaps the next one's set-up) and CPU time (its own: the caller's thread on its
    set-up and traces plus the kernel's threads, or the process's while it trained in
    `start`)."""
    engine = engine or BatchedEngine()
    chunks = plan_populations(trials, device, budget_bytes)
    populations: list[dict[str, Any]] = []

    def train() -> list[Trace]:
        traces: list[Trace | None] = [None] * len(trials)
        flight: list[tuple] = []  # the population under way: chunk, pending, start, cpu

        def finish() -> None:
            chunk, pending, start, cpu = flight.pop()
            mine = time.thread_time()
            for i, trace in zip(chunk, pending.result(), strict=True):
                traces[i] = trace
            _sync(device)
            members = [trials[i] for i in chunk]
            populations.append({"label": population_label(members[0]), "trials": len(chunk),
                                "trial_steps": sum(trial_steps(t) for t in members),
                                "wall_s": time.perf_counter() - start,
                                "cpu_s": cpu + time.thread_time() - mine
                                + pending.thread_cpu_s(), "rows": list(chunk)})

        for chunk in chunks:
            members = [trials[i] for i in chunk]
            background = engine.in_background(members, device)
            if flight and not background:  # trains in `start`: alone, so that its CPU is its own
                finish()
            start, mine, process = time.perf_counter(), time.thread_time(), time.process_time()
            pending = engine.start(members, device)
            cpu = (time.thread_time() - mine if background
                   else time.process_time() - process)
            if flight:
                finish()
            flight.append((chunk, pending, start, cpu))
        if flight:
            finish()
        return traces  # type: ignore[return-value]

    cpu = time.process_time()
    traces, wall = _timed(train)
    return traces, wall, time.process_time() - cpu, populations


def run_reference(sample: Sequence[int], trials: Sequence[TrialSpec], device: torch.device
                  ) -> dict[int, float]:
    """Wall time of each sampled trial trained alone by the reference engine."""
    engine, walls = ReferenceEngine(), {}
    for i in sample:
        _, walls[i] = _timed(lambda i=i: (engine.run([trials[i]], device), _sync(device)))
    return walls


def bench(overrides: Sequence[str], device: torch.device, subset: int, seed: int,
          dtype: str | None, budget_bytes: int | None, limit: int | None,
          matmul_seconds: float = 1.0, kernel: str = "auto") -> dict[str, Any]:
    if dtype is not None:
        overrides = [*overrides, f"train.dtype={dtype}"]
    trials = [p.trial for p in plan_for_command(overrides).points]
    if limit is not None:
        trials = random.Random(seed).sample(trials, min(limit, len(trials)))
    planned = sum(trial_steps(t) for t in trials)
    torch_dtype = trials[0].train.torch_dtype

    load_start = load_averages()
    warm = random.Random(seed + 1).sample(trials, min(2, len(trials)))
    if subset > 0:
        ReferenceEngine().run(warm, device)
    engine = BatchedEngine(trial_major=kernel != "layer_major")
    engine.run(warm, device)
    heap.settle()  # as a run trains: with its imports out of the collector's sight

    traces, batched_wall, batched_cpu, populations = run_batched(trials, device, budget_bytes,
                                                                 engine)
    load_batched = load_averages()
    trial_flops = [useful_flops(t, tr) for t, tr in zip(trials, traces, strict=True)]
    flops = sum(trial_flops)
    batched_rate = planned / batched_wall
    result: dict[str, Any] = {
        "device": str(device), "device_name": _device_name(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "numba_threads": _numba_threads(), "kernel": kernel,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "python": platform.python_version(), "dtype": str(torch_dtype).removeprefix("torch."),
        # other processes on the machine skew every figure: recorded, not corrected for
        "load_average_1min_at_end": None, "load_averages": {
            "start": load_start, "after_batched": load_batched, "end": None},
        "workload": {"overrides": list(overrides), "trials": len(trials),
                     "trial_steps": planned,
                     "executed_trial_steps": int(sum(len(t.step_loss) for t in traces)),
                     "gflop": flops / 1e9},
        "batched": {"trials": len(trials), "populations": len(populations),
                    "trial_steps": planned, "wall_s": batched_wall, "cpu_s": batched_cpu,
                    "cpu_per_wall": batched_cpu / batched_wall,
                    "trial_steps_per_s": batched_rate,
                    "trial_steps_per_cpu_s": planned / batched_cpu},
        "populations": populations,
    }
    sample = random.Random(seed).sample(range(len(trials)), min(subset, len(trials)))
    reference_walls = run_reference(sample, trials, device)
    if sample:  # --subset 0: the batched engine alone
        sample_steps = sum(trial_steps(trials[i]) for i in sample)
        reference_wall = sum(reference_walls.values())
        reference_rate = sample_steps / reference_wall
        result["reference"] = {
            "trials": len(sample), "subset_seed": seed, "trial_steps": sample_steps,
            "wall_s": reference_wall, "trial_steps_per_s": reference_rate,
            "extrapolated_wall_s": planned / reference_rate}
        result["ratio_batched_over_reference"] = batched_rate / reference_rate
    for population in populations:  # the ratio per population, where the subset has trials
        population["gflop"] = sum(trial_flops[i] for i in population["rows"]) / 1e9
        rows = [i for i in population.pop("rows") if i in reference_walls]
        population["reference_trials"] = len(rows)
        if rows:
            rate = (sum(trial_steps(trials[i]) for i in rows)
                    / sum(reference_walls[i] for i in rows))
            population["ratio_batched_over_reference"] = (
                population["trial_steps"] / population["wall_s"] / rate)
    peak = matmul_gflops(device, torch_dtype, matmul_seconds)
    result.update(matmul_gflops=peak, batched_gflops=flops / 1e9 / batched_wall,
                  batched_fraction_of_matmul_peak=flops / 1e9 / batched_wall / peak)
    if device.type == "cpu":
        result["bound"] = arithmetic_bound(populations, torch_dtype, matmul_seconds)
    result["load_averages"]["end"] = load_averages()
    end = result["load_averages"]["end"]
    result["load_average_1min_at_end"] = end[0] if end else None
    return result


def arithmetic_bound(populations: Sequence[dict[str, Any]], dtype: torch.dtype,
                     matmul_seconds: float) -> dict[str, Any]:
    """The most trial-steps per CPU-second the arithmetic allows on this CPU: each
    population's useful FLOPs (`gflop`) at one core's dense matmul speed, as if every
    operation ran at it. Overall and per batch size (the population labels' `batch ...`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        core = matmul_gflops(torch.device("cpu"), dtype, matmul_seconds)
    finally:
        torch.set_num_threads(threads)
    sums = bench_peer.sums_by_batch(populations, ("trial_steps", "gflop"))
    steps, gflop = (sum(v[i] for v in sums.values()) for i in (0, 1))
    return {"one_core_matmul_gflops": core,
            "trial_steps_per_cpu_s": steps / (gflop / core) if gflop else None,
            "per_batch_trial_steps_per_cpu_s": {
                b: v[0] / (v[1] / core) if v[1] else None for b, v in sums.items()}}


def _numba_threads() -> int | None:
    """The fused update's kernel threads (None without numba)."""
    try:
        import numba
    except ImportError:
        return None
    return numba.get_num_threads()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def workload_overrides(overrides: Sequence[str], device: str) -> tuple[list[str], str]:
    """(the workload's overrides, the device name) from the command line.

    `device=X` is the run's `device` setting, as in `python -m study device=cuda`: it picks
    the bench's device (over `--device`) and is not part of the workload. The workload is
    `+sweep=lr_batch` unless an override names a sweep. ValueError for a device other than
    auto, cpu or cuda.
    """
    rest = []
    for item in overrides:
        if item.startswith("device="):
            device = item.removeprefix("device=")
            if device not in ("auto", "cpu", "cuda"):
                raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
        else:
            rest.append(item)
    if not any(item.lstrip("+").startswith("sweep=") for item in rest):
        rest.insert(0, "+sweep=lr_batch")
    return rest, device


def at_least(low: float, kind: type = int):
    """An argparse `type`: a number of `kind` no smaller than `low` (argparse's one-line
    error and exit 2 otherwise)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value
    return parse


def positive_float(text: str) -> float:
    """An argparse `type`: a float above 0."""
    value = at_least(0.0, float)(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m study.bench", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("overrides", nargs="*", default=[],
                        help="config overrides of the workload (+sweep=lr_batch unless one "
                             "names a sweep); device=cpu|cuda|auto picks the device")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--subset", type=at_least(0), default=32,
                        help="trials the reference engine trains (default 32; 0: none, "
                             "the batched engine alone)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset draw")
    parser.add_argument("--dtype", choices=["float32", "float64"], default=None,
                        help="override train.dtype of the workload")
    parser.add_argument("--seeds", type=at_least(1), default=None,
                        help="train the workload over seeds 0..N-1 (sweep.seeds): N/3 times "
                             "lr_batch's populations, e.g. --seeds 30 gives 1,170 trials each")
    parser.add_argument("--budget-bytes", type=at_least(1), default=None,
                        help="memory budget of a population (default: from the device)")
    parser.add_argument("--limit", type=at_least(1), default=None,
                        help="train only this many random trials of the workload")
    parser.add_argument("--threads", type=at_least(1), default=None,
                        help="CPU threads of torch and of the fused update (with --peer: of "
                             "every system); default: one per core")
    parser.add_argument("--matmul-seconds", type=positive_float, default=1.0,
                        help="how long to measure the dense matmul peak")
    parser.add_argument("--kernel", choices=["auto", "layer_major"], default="auto",
                        help="the batched engine's CPU kernel: auto (trial-major where a "
                             "population fits it, study.engine.trial_major) or layer_major "
                             "(always one operation over all rows at a time)")
    parser.add_argument("--out", type=out_path, default=None, help="write the JSON here too")
    parser.add_argument("--peer", action="store_true",
                        help="compare with the JAX/optax peer and the plain loop (bench/peers), "
                             "each in its own process, on the lr_batch workload on the CPU "
                             "(--device cuda: on the GPU; --seeds N: over seeds 0..N-1)")
    parser.add_argument("--peer-python", type=Path, default=bench_peer.DEFAULT_PEER_PYTHON,
                        help="the Python with jax and optax that runs the peers (default: "
                             "%(default)s)")
    parser.add_argument("--rounds", type=at_least(1), default=3,
                        help="interleaved rounds of --peer (default 3)")
    parser.add_argument("--no-plain", action="store_true",
                        help="--peer without the plain loop")
    parser.add_argument("--jax-opt", choices=["optax", "hand"], default="optax",
                        help="--peer's JAX update: optax's transforms (default) or one "
                             "hand-written update for every row")
    args = parser.parse_intermixed_args(argv)  # overrides may follow options
    if args.peer:
        return peer_main(args, parser)
    overrides, device_name = _checked_overrides(args)
    if args.seeds is not None:
        overrides.append(f"sweep.seeds=[{','.join(map(str, range(args.seeds)))}]")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if device_name == "auto" and torch.cuda.is_available()
                          else "cpu" if device_name == "auto" else device_name)
    try:
        measured = bench(overrides, device, args.subset, args.seed, args.dtype,
                         args.budget_bytes, args.limit, args.matmul_seconds, args.kernel)
    except ConfigError as err:  # the workload's config: one line, exit 2
        print(f"python -m study.bench: {cli.one_line(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    result = {"command": " ".join(["python -m study.bench", *(argv if argv is not None
                                                               else sys.argv[1:])]),
              **measured}
    print(json.dumps(result, indent=2))
    write_json(result, args.out)
    return result


def _checked_overrides(args: argparse.Namespace) -> tuple[list[str], str]:
    """`workload_overrides` of the command line; bad input is one line and exit 2."""
    try:
        return workload_overrides(args.overrides, args.device)
    except ValueError as err:
        print(f"python -m study.bench: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def peer_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """`--peer`: the peer comparison's table on stdout, its JSON in `--out`."""
    heap.settle()  # this process only starts the others
    overrides, device = _checked_overrides(args)
    if overrides != ["+sweep=lr_batch"] or args.limit or args.dtype:
        parser.error("--peer runs the lr_batch workload as the peers rebuild it: it takes "
                     "no overrides (but device=), --limit or --dtype")
    if device == "cuda" and not torch.cuda.is_available():
        print("python -m study.bench: --peer on cuda needs a CUDA device; torch sees none",
              file=sys.stderr)
        raise SystemExit(2)
    try:
        result = bench_peer.compare(args.peer_python, args.rounds, args.threads,
                                    plain=not args.no_plain, jax_opt=args.jax_opt,
                                    device="cuda" if device == "cuda" else "cpu",
                                    seeds=args.seeds)
    except bench_peer.PeerError as err:
        print(f"python -m study.bench: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(result["table"])
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    heap.hold()  # until the workload is set up (study.heap)
    main()
