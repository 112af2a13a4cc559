"""`python -m study.bench --peer`: argument handling and the summary (no jax needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from study import bench_peer
from study.bench import main
from study.bench_peer import BATCHES, Run, summarize, table, thread_environment


def test_a_missing_peer_python_is_one_line_and_exit_2(tmp_path) -> None:
    missing = tmp_path / "no-venv" / "bin" / "python"
    done = subprocess.run([sys.executable, "-m", "study.bench", "--peer", "--peer-python",
                           str(missing)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"python -m study.bench: peer python {missing} not found: set one up as "
        "docs/performance.md says, or name it with --peer-python"]
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_a_peer_python_without_jax_is_one_line_and_exit_2(capsys) -> None:
    """The project's own Python has no jax (it is not a dependency)."""
    pytest.importorskip("torch")
    if subprocess.run([sys.executable, "-c", "import jax, optax"],
                      capture_output=True).returncode == 0:
        pytest.skip("this Python has jax and optax")
    with pytest.raises(SystemExit) as stop:
        main(["--peer", "--peer-python", sys.executable])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"python -m study.bench: peer python {sys.executable} cannot import jax, optax and "
        "torch: ")


@pytest.mark.parametrize("argv", [["--peer", "+sweep=smoke"], ["--peer", "--limit", "4"],
                                  ["--peer", "--device", "cuda"], ["--peer", "--rounds", "0"]])
def test_peer_takes_no_workload_options(argv, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert "--peer" in capsys.readouterr().err or "--rounds" in " ".join(argv)


def test_the_peers_are_vendored_beside_their_readme() -> None:
    names = {p.name for p in bench_peer.PEERS_DIR.iterdir()}
    assert {"README.md", "common.py", "jax_optax.py", "plain_loop.py"} <= names
    checkout = bench_peer.PEERS_DIR.parents[1]  # a venv beside the checkout, not in it
    assert bench_peer.DEFAULT_PEER_PYTHON.parents[2] == checkout.parent
    assert bench_peer.DEFAULT_PEER_PYTHON.relative_to(checkout.parent) == Path(
        "peers-venv/bin/python")


def test_thread_environment_holds_every_runtime() -> None:
    assert thread_environment(None) == {}
    one = thread_environment(1)
    assert one["OMP_NUM_THREADS"] == one["MKL_NUM_THREADS"] == one["NUMBA_NUM_THREADS"] == "1"
    assert "intra_op_parallelism_threads=1" in one["XLA_FLAGS"]
    assert "XLA_FLAGS" not in thread_environment(2)


def _run(system: str, scale: float, load: float) -> Run:
    wall = {b: scale * 1000 * (i + 1) for i, b in enumerate(BATCHES)}
    return Run(system, wall, {b: v / 2 for b, v in wall.items()}, scale * 2000, scale * 1000,
               5.0, 9.0, [load, 1.0, 1.0], [load + 1, 1.0, 1.0])


def test_summary_takes_medians_and_study_over_each_peer() -> None:
    rounds = [[_run("study", s, 1.0), _run("JAX/optax", 1.0, 2.0),
               _run("plain loop", 0.1, 3.0)] for s in (2.0, 3.0, 10.0)]
    summary = summarize(rounds)
    study = summary["medians"]["study"]
    assert study["trial_steps_per_cpu_s"] == 3000.0 and study["trial_steps_per_s"] == 6000.0
    assert study["per_batch_trial_steps_per_cpu_s"]["8"] == 1500.0
    jax = summary["study_over"]["JAX/optax"]
    assert jax["per_cpu_s"] == pytest.approx(3.0) and jax["per_wall_s"] == pytest.approx(3.0)
    assert jax["per_batch_per_cpu_s"] == {b: pytest.approx(3.0) for b in BATCHES}
    assert summary["study_over"]["plain loop"]["per_cpu_s"] == pytest.approx(30.0)
    text = table(summary, rounds)
    assert "| overall | 3,000 | 1,000 | 100 | 3.00x |" in text
    assert "1-minute load average 1.00-4.00" in text
    assert "GFLOP/s" not in text  # no run measured the machine


def test_the_table_says_how_fast_the_machine_was() -> None:
    """study's runs carry the dense matmul their bench measured: the footer gives its range,
    since a slower machine moves the systems unequally."""
    result = {"populations": [{"label": f"blobs, batch {b}", "trial_steps": 100,
                               "wall_s": 1.0, "cpu_s": 2.0} for b in BATCHES],
              "batched": {"trial_steps_per_s": 400.0, "trial_steps_per_cpu_s": 200.0,
                          "cpu_s": 2.0}}
    runs = [bench_peer._study_run({**result, "matmul_gflops": g}, 3.0, ([1.0], [1.5]))
            for g in (71.4, 182.6)]
    assert [r.matmul_gflops for r in runs] == [71.4, 182.6]
    assert runs[0].per_batch_cpu == {b: 50.0 for b in BATCHES}
    rounds = [[run, _run("JAX/optax", 1.0, 1.0)] for run in runs]
    assert table(summarize(rounds), rounds).endswith(
        "; dense matmul in study's runs 71-183 GFLOP/s")
    assert bench_peer._study_run(result, 3.0, ([1.0], [1.5])).matmul_gflops is None


def test_the_table_says_what_the_arithmetic_allows() -> None:
    """study's bench gives the bound on a CPU (`bound`); the table compares its median with
    the peer's rate per CPU-second, and says nothing without it."""
    result = {"populations": [{"label": f"blobs, batch {b}", "trial_steps": 100,
                               "wall_s": 1.0, "cpu_s": 2.0} for b in BATCHES],
              "batched": {"trial_steps_per_s": 400.0, "trial_steps_per_cpu_s": 200.0,
                          "cpu_s": 2.0}}
    runs = [bench_peer._study_run({**result, "bound": {"trial_steps_per_cpu_s": b}}, 3.0,
                                  ([1.0], [1.5])) for b in (3000.0, 3500.0, 5000.0)]
    rounds = [[run, _run("JAX/optax", 1.0, 1.0)] for run in runs]  # JAX: 1,000 per CPU-s
    assert table(summarize(rounds), rounds).splitlines()[-1] == (
        "the arithmetic allows study at most 3,500 trial-steps per CPU-second (every FLOP at "
        "one core's dense matmul speed): 3.50x the JAX peer")
    plain = [[bench_peer._study_run(result, 3.0, ([1.0], [1.5])), _run("JAX/optax", 1.0, 1.0)]]
    assert "arithmetic" not in table(summarize(plain), plain)


def test_results_are_read_as_each_system_writes_them(tmp_path) -> None:
    study = tmp_path / "study.json"
    study.write_text(json.dumps({"batched": {"cpu_s": 1.5}}, indent=2) + "\n")
    assert bench_peer.read_result("study", study) == {"batched": {"cpu_s": 1.5}}
    peer = tmp_path / "jax.jsonl"
    peer.write_text('{"run": 1}\n{"run": 2}\n')
    assert bench_peer.read_result("JAX/optax", peer) == {"run": 2}


def test_the_peer_python_reports_its_versions(tmp_path) -> None:
    # A Python that finds stand-ins for jax and optax: their versions travel to the JSON
    # (the peer's speed depends on jax's version).
    import torch

    (tmp_path / "jax.py").write_text('__version__ = "9.9.1"\n')
    (tmp_path / "optax.py").write_text('__version__ = "0.0.7"\n')
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    assert bench_peer.check_peer_python(python) == {
        "jax": "9.9.1", "optax": "0.0.7", "torch": torch.__version__}
