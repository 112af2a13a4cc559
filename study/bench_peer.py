"""`python -m study.bench --peer`: study's batched engine against the JAX/optax peer and the
plain PyTorch loop, each in a process of its own, on the lr_batch workload.

The peers (bench/peers/, with their README) rebuild the workload without `study`: the same
trials, seeds, data, initialisation and batch orders. They need jax and optax, which the
project does not depend on, so they run under another Python (`--peer-python`, a venv set
up as docs/performance.md says). Rounds are interleaved (study, JAX, plain loop, with the
order rotated every round) so that load drifts reach every system; each figure is the
median over rounds.

On a GPU (`--device cuda`) every system trains there (JAX with float32 products, as study
and the plain loop multiply: XLA's default on a GPU is TF32), usually over more seeds
(`--seeds`: populations of 39 x N trials, as a GPU wants them), and the table compares rates
per wall second: a process's CPU-seconds there are its host thread's, not the work's.

Rates are planned trial-steps per second of wall time and per CPU-second (all of a
process's threads) of the timed work: study's batched training (`python -m study.bench
--subset 0`), the peer's timed runs (its compilation excluded, as the peer reports it), the
plain loop's subset extrapolated by planned trial-steps. Per batch size, a peer's
CPU-second rate is its wall rate divided by its whole run's CPU per wall second. Load
averages are read before and after every process: the machine may be shared, and nothing
here corrects for that.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import study

BATCHES = ("8", "32", "128", "full")
PEERS_DIR = Path(__file__).resolve().parents[1] / "bench" / "peers"
# A venv beside the checkout (docs/performance.md): the peers' jax must not enter the
# project's own environment.
DEFAULT_PEER_PYTHON = Path(__file__).resolve().parents[2] / "peers-venv" / "bin" / "python"


class PeerError(Exception):
    """The peer comparison cannot run: one line for the user."""


@dataclass(frozen=True)
class Run:
    """One system's figures of one round."""

    system: str
    per_batch_wall: dict[str, float]  # trial-steps per wall second, by batch size
    per_batch_cpu: dict[str, float]  # trial-steps per CPU-second, by batch size
    wall_rate: float
    cpu_rate: float
    cpu_s: float  # CPU-seconds of the workload (the plain loop's extrapolated from its subset)
    process_cpu_s: float  # CPU-seconds of the whole process (start-up, compilation)
    load_before: list[float]
    load_after: list[float]
    # The dense matmul GFLOP/s that study's bench measured in its run (None for a peer):
    # how fast the machine was in that round.
    matmul_gflops: float | None = None
    # The most trial-steps per CPU-second the arithmetic allows (`study.bench.arithmetic_bound`,
    # study's runs only).
    bound_per_cpu_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_peer_python(python: Path) -> dict[str, str]:
    """The versions of jax, optax and torch under `python` (the peer's speed depends on
    jax's); PeerError unless it runs and has them."""
    if not PEERS_DIR.is_dir():
        raise PeerError(f"{PEERS_DIR} not found: --peer runs from a checkout of the "
                        "repository")
    if not python.exists():
        raise PeerError(f"peer python {python} not found: set one up as docs/performance.md "
                        "says, or name it with --peer-python")
    probe = subprocess.run(
        [str(python), "-c", "import json, jax, optax, torch; print(json.dumps({m.__name__: "
         "m.__version__ for m in (jax, optax, torch)}))"],
        capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise PeerError(f"peer python {python} cannot import jax, optax and torch: {last}")
    return json.loads(probe.stdout.strip().splitlines()[-1])


def thread_environment(threads: int | None) -> dict[str, str]:
    """Environment that holds a peer to `threads` threads (None: its own defaults)."""
    if threads is None:
        return {}
    env = {name: str(threads) for name in
           ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
    if threads == 1:  # XLA's CPU client sizes its pools by the cores unless told
        env["XLA_FLAGS"] = ("--xla_cpu_multi_thread_eigen=false "
                            "intra_op_parallelism_threads=1")
    return env


def process_environment(threads: int | None) -> dict[str, str]:
    """The environment every system starts in: the user's (less what importing `study` set:
    its OpenMP wait policy is study's choice, not the peers'), held to `threads` threads."""
    return {**{k: v for k, v in os.environ.items() if k not in study.SET_AT_IMPORT},
            **thread_environment(threads)}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(command: Sequence[str], env: dict[str, str]) -> tuple[float, list[float],
                                                                 list[float]]:
    """Run `command` to completion: its CPU-seconds (its own children included, one command
    at a time), and the load averages before and after it."""
    before, cpu = _load(), _children_cpu()
    process = subprocess.run(list(command), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cpu, after = _children_cpu() - cpu, _load()
    if process.returncode != 0:
        last = (process.stderr.strip().splitlines() or ["no output"])[-1]
        name = Path(command[1]).name if command[1] != "-m" else command[2]
        raise PeerError(f"{name} failed (exit {process.returncode}): {last}")
    return cpu, before, after


def _peer_run(system: str, result: dict[str, Any], process_cpu: float,
              loads: tuple[list[float], list[float]]) -> Run:
    per_wall = {str(k): float(v) for k, v in result["per_batch_trial_steps_per_s"].items()}
    share = float(result["cpu_per_wall"])
    wall_rate = float(result["trial_steps_per_s"])
    return Run(system, per_wall, {k: v / share for k, v in per_wall.items()}, wall_rate,
               wall_rate / share, float(result["workload_wall_s"]) * share, process_cpu,
               *loads)


def sums_by_batch(populations: Sequence[dict[str, Any]], keys: Sequence[str]
                  ) -> dict[str, list[float]]:
    """Per batch size (a population label's `batch ...`, `study.bench.population_label`),
    the sums of the populations' `keys`, in that order."""
    sums: dict[str, list[float]] = {}
    for population in populations:
        acc = sums.setdefault(population["label"].rsplit("batch ", 1)[1], [0.0] * len(keys))
        for i, key in enumerate(keys):
            acc[i] += population[key]
    return sums


def _study_run(result: dict[str, Any], process_cpu: float,
               loads: tuple[list[float], list[float]]) -> Run:
    sums = sums_by_batch(result["populations"], ("trial_steps", "wall_s", "cpu_s"))
    batched = result["batched"]
    return Run("study", {k: v[0] / v[1] for k, v in sums.items()},
               {k: v[0] / v[2] for k, v in sums.items()}, batched["trial_steps_per_s"],
               batched["trial_steps_per_cpu_s"], batched["cpu_s"], process_cpu, *loads,
               matmul_gflops=result.get("matmul_gflops"),
               bound_per_cpu_s=(result.get("bound") or {}).get("trial_steps_per_cpu_s"))


def read_result(system: str, path: Path) -> dict[str, Any]:
    """The JSON a system wrote: study's bench writes one indented document, a peer appends
    one line per run (the last is this run's)."""
    text = path.read_text()
    return json.loads(text if system == "study" else text.strip().splitlines()[-1])


def commands(index: int, python: Path, threads: int | None, plain: bool, workdir: Path,
             jax_opt: str = "optax", device: str = "cpu", seeds: int | None = None
             ) -> list[tuple[str, list[str], Path]]:
    """Each system's command line of round `index` and the file it writes, in the order
    study, JAX, plain loop. Every system trains on `device` (JAX's platform pinned to it, so
    that a CPU comparison stays on the CPU of a machine with a GPU) over seeds 0..`seeds`-1
    (None: the workload's 3)."""
    workload = ["--device", device] + ([] if seeds is None else ["--seeds", str(seeds)])
    threading = [] if threads is None else ["--threads", str(threads)]
    study_out = workdir / f"study-{index}.json"
    jax_out, plain_out = workdir / f"jax-{index}.jsonl", workdir / f"plain-{index}.jsonl"
    jax_cmd = [str(python), str(PEERS_DIR / "jax_optax.py"), "--opt", jax_opt, *workload,
               "--out", str(jax_out)]
    if device == "cuda":  # XLA's default there is TF32; study's products are float32
        jax_cmd += ["--precision", "float32"]
    jobs = [("study", [sys.executable, "-m", "study.bench", *workload, "--subset", "0",
                       "--matmul-seconds", "0.1", *threading, "--out", str(study_out)],
             study_out),
            (f"JAX/{jax_opt}", jax_cmd, jax_out)]
    if plain:
        jobs.append(("plain loop", [str(python), str(PEERS_DIR / "plain_loop.py"), *workload,
                                    *threading, "--out", str(plain_out)], plain_out))
    return jobs


def run_round(index: int, python: Path, threads: int | None, plain: bool,
              workdir: Path, jax_opt: str = "optax", device: str = "cpu",
              seeds: int | None = None) -> list[Run]:
    """One round: each system once (`commands`), the order rotated by `index`. `jax_opt`:
    the peer's update (`optax`, or `hand`: one hand-written update for every row)."""
    env = process_environment(threads)
    jobs = commands(index, python, threads, plain, workdir, jax_opt, device, seeds)
    shift = index % len(jobs)
    runs = []
    for system, command, out in jobs[shift:] + jobs[:shift]:
        cpu, before, after = _run(command, env)
        result = read_result(system, out)
        runs.append(_study_run(result, cpu, (before, after)) if system == "study"
                    else _peer_run(system, result, cpu, (before, after)))
    order = {system: i for i, (system, _, _) in enumerate(jobs)}
    return sorted(runs, key=lambda r: order[r.system])


def summarize(rounds: list[list[Run]]) -> dict[str, Any]:
    """Medians over rounds of every system's rates, and study's ratios to each peer."""
    systems = [r.system for r in rounds[0]]
    medians: dict[str, dict[str, Any]] = {}
    for system in systems:
        runs = [r for one in rounds for r in one if r.system == system]
        medians[system] = {
            "trial_steps_per_s": statistics.median(r.wall_rate for r in runs),
            "trial_steps_per_cpu_s": statistics.median(r.cpu_rate for r in runs),
            "cpu_s": statistics.median(r.cpu_s for r in runs),
            "per_batch_trial_steps_per_s": {
                b: statistics.median(r.per_batch_wall[b] for r in runs) for b in BATCHES},
            "per_batch_trial_steps_per_cpu_s": {
                b: statistics.median(r.per_batch_cpu[b] for r in runs) for b in BATCHES}}
    study = medians["study"]
    ratios = {}
    for system in systems[1:]:
        peer = medians[system]
        ratios[system] = {
            "per_cpu_s": study["trial_steps_per_cpu_s"] / peer["trial_steps_per_cpu_s"],
            "per_wall_s": study["trial_steps_per_s"] / peer["trial_steps_per_s"],
            "per_batch_per_cpu_s": {
                b: study["per_batch_trial_steps_per_cpu_s"][b]
                / peer["per_batch_trial_steps_per_cpu_s"][b] for b in BATCHES},
            "per_batch_per_wall_s": {
                b: study["per_batch_trial_steps_per_s"][b]
                / peer["per_batch_trial_steps_per_s"][b] for b in BATCHES}}
    return {"medians": medians, "study_over": ratios}


def table(summary: dict[str, Any], rounds: list[list[Run]], per: str = "cpu") -> str:
    """The comparison as a Markdown table of medians: trial-steps per CPU-second (`per`
    "cpu", a CPU's comparison) or per wall second (`per` "wall", a GPU's), with the other
    overall rate in the last row."""
    medians = summary["medians"]
    systems = list(medians)
    jax = next((v for k, v in summary["study_over"].items() if k.startswith("JAX")), None)
    # (suffix of the rates, suffix of the ratios, the unit's name)
    cpu, wall = ("cpu_s", "cpu_s", "CPU-second"), ("s", "wall_s", "wall second")
    main, other = (cpu, wall) if per == "cpu" else (wall, cpu)
    lines = ["| batch | " + " | ".join(systems) + " | study / JAX |",
             "|---|" + "---|" * (len(systems) + 1)]
    for b in BATCHES:
        cells = [f"{medians[s][f'per_batch_trial_steps_per_{main[0]}'][b]:,.0f}"
                 for s in systems]
        lines.append(f"| {b} | " + " | ".join(cells)
                     + (f" | {jax[f'per_batch_per_{main[1]}'][b]:.2f}x |" if jax else " | - |"))
    for (rate, ratio, _), label in ((main, "overall"), (other, f"overall, per {other[2]}")):
        cells = [f"{medians[s][f'trial_steps_per_{rate}']:,.0f}" for s in systems]
        lines.append(f"| {label} | " + " | ".join(cells)
                     + (f" | {jax[f'per_{ratio}']:.2f}x |" if jax else " | - |"))
    loads = [x for one in rounds for r in one for x in (r.load_before[0], r.load_after[0])]
    lines.append("")
    lines.append(f"trial-steps per {main[2]}, medians of {len(rounds)} interleaved rounds; "
                 f"1-minute load average {min(loads):.2f}-{max(loads):.2f}")
    speeds = [r.matmul_gflops for one in rounds for r in one if r.matmul_gflops is not None]
    if speeds:  # a shared machine's speed moves the systems unequally: say what it was
        lines[-1] += (f"; dense matmul in study's runs {min(speeds):.0f}-{max(speeds):.0f} "
                      "GFLOP/s")
    bounds = [r.bound_per_cpu_s for one in rounds for r in one if r.bound_per_cpu_s]
    if bounds and jax:
        peer = next(m for k, m in medians.items() if k.startswith("JAX"))
        lines.append(f"the arithmetic allows study at most {statistics.median(bounds):,.0f} "
                     "trial-steps per CPU-second (every FLOP at one core's dense matmul "
                     f"speed): {statistics.median(bounds) / peer['trial_steps_per_cpu_s']:.2f}x "
                     "the JAX peer")
    return "\n".join(lines)


def compare(python: Path, rounds: int, threads: int | None, plain: bool = True,
            jax_opt: str = "optax", device: str = "cpu", seeds: int | None = None
            ) -> dict[str, Any]:
    """Run the interleaved rounds on `device` over seeds 0..`seeds`-1 (None: 3); the JSON
    of every round and the summary."""
    versions = check_peer_python(python)
    with tempfile.TemporaryDirectory(prefix="study-peer-") as tmp:
        done = [run_round(i, python, threads, plain, Path(tmp), jax_opt, device, seeds)
                for i in range(rounds)]
    summary = summarize(done)
    where = f"; device {device}" + ("" if seeds is None else f", seeds 0..{seeds - 1}")
    return {"peer_python": str(python), "peer_versions": versions, "threads": threads,
            "rounds": rounds, "jax_opt": jax_opt, "device": device, "seeds": seeds,
            "runs": [[r.as_dict() for r in one] for one in done], **summary,
            "table": table(summary, done, "wall" if device == "cuda" else "cpu") + where
            + "; peer: " + ", ".join(f"{name} {version}" for name, version in versions.items())}
