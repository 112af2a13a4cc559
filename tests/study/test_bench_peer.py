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


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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
                                  ["--peer", "--dtype", "float64"], ["--peer", "--rounds", "0"],
                                  ["--peer", "--seeds", "0"], ["--peer", "train.epochs=2"]])
def test_peer_takes_no_workload_options(argv, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--peer" in err or "--rounds" in err or "--seeds" in err


def test_every_system_trains_on_the_device_over_the_seeds(tmp_path) -> None:
    """`--peer --device cuda --seeds 30`: study, JAX (its platform pinned, its products
    float32: XLA's default on a GPU is TF32) and the plain loop all on the GPU over seeds
    0..29; on the CPU JAX is pinned to the CPU, so that a machine with a GPU compares CPUs."""
    python = Path("/peers/bin/python")
    jobs = bench_peer.commands(2, python, 1, True, tmp_path, "hand", "cuda", 30)
    assert [name for name, _, _ in jobs] == ["study", "JAX/hand", "plain loop"]
    for _, command, out in jobs:
        assert " --device cuda --seeds 30 " in " ".join(command) + " "
        assert command[command.index("--out") + 1] == str(out)
    study, jax, plain = (command for _, command, _ in jobs)
    assert study[:3] == [sys.executable, "-m", "study.bench"] and "--threads" in study
    assert jax[jax.index("--precision") + 1] == "float32"
    assert jax[jax.index("--opt") + 1] == "hand" and "--threads" in plain
    cpu = bench_peer.commands(0, python, None, False, tmp_path)
    assert [name for name, _, _ in cpu] == ["study", "JAX/optax"]
    for _, command, _ in cpu:
        assert command[command.index("--device") + 1] == "cpu"
        assert "--seeds" not in command and "--precision" not in command
        assert "--threads" not in command


def _peer_common():
    """The peers' `common` module (torch and numpy only)."""
    sys.path.insert(0, str(bench_peer.PEERS_DIR))
    try:
        import common
    finally:
        sys.path.remove(str(bench_peer.PEERS_DIR))
    return common


def test_the_peers_rebuild_the_trials_of_studys_seeds() -> None:
    """The peers' workload over seeds 0..N-1 (`common.use_seeds`) is the trials study's
    bench trains with `--seeds N`, population by population."""
    from study.plan import plan_from_overrides

    common = _peer_common()
    saved = common.SEEDS
    try:
        common.use_seeds(4)
        peers = {(t.task, t.optimizer, t.lr, t.batch, t.seed)
                 for key in common.population_order() for t in common.population_trials(*key)}
        with pytest.raises(ValueError, match="at least 1"):
            common.use_seeds(0)
    finally:
        common.SEEDS = saved
    points = plan_from_overrides(["+sweep=lr_batch", "sweep.seeds=[0,1,2,3]"]).points
    ours = {(p.trial.labels["task"], p.trial.labels["optimizer"], p.trial.optimizer.lr,
             p.trial.train.batch_size, p.trial.seed) for p in points}
    assert len(peers) == 4 * 39 * 8 and peers == ours


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


def test_the_systems_start_in_the_users_environment(monkeypatch) -> None:
    """Importing study sets an OpenMP wait policy where the user set none (study/__init__):
    the peers start without it, with the user's own variables and the thread limits."""
    import study

    monkeypatch.setattr(study, "SET_AT_IMPORT", ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    monkeypatch.setenv("STUDY_PEER_TEST", "kept")
    env = bench_peer.process_environment(1)
    assert "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env
    assert env["STUDY_PEER_TEST"] == "kept" and env["OMP_NUM_THREADS"] == "1"
    monkeypatch.setattr(study, "SET_AT_IMPORT", ())  # the user's own policy is kept
    assert bench_peer.process_environment(None)["OMP_WAIT_POLICY"] == "PASSIVE"


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


def test_a_gpus_table_compares_rates_per_wall_second() -> None:
    """On a GPU the CPU-seconds are the host thread's: the rows and ratios are per wall
    second, the overall rate per CPU-second last."""
    rounds = [[_run("study", s, 1.0), _run("JAX/optax", 1.0, 2.0)] for s in (2.0, 3.0)]
    summary = summarize(rounds)
    assert summary["study_over"]["JAX/optax"]["per_batch_per_wall_s"] == {
        b: pytest.approx(2.5) for b in BATCHES}
    lines = table(summary, rounds, "wall").splitlines()
    assert lines[2] == "| 8 | 2,500 | 1,000 | 2.50x |"
    assert lines[6] == "| overall | 5,000 | 2,000 | 2.50x |"
    assert lines[7] == "| overall, per CPU-second | 2,500 | 1,000 | 2.50x |"
    assert lines[9].startswith("trial-steps per wall second, medians of 2 interleaved rounds")
    assert table(summary, rounds).splitlines()[2] == "| 8 | 1,250 | 500 | 2.50x |"


@pytest.mark.skipif(torch_cuda(), reason="this machine has a CUDA device")
def test_a_gpu_comparison_without_a_gpu_is_one_line_and_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--peer", "device=cuda", "--peer-python", sys.executable])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "python -m study.bench: --peer on cuda needs a CUDA device; torch sees none"]


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


@pytest.mark.parametrize("task", ["blobs", "teacher_mlp"])
def test_the_peers_rebuild_studys_data_initialisation_and_batch_orders(task: str) -> None:
    """What the comparison rests on: a peer's population holds study's numbers, bit for
    bit: each trial's data draw, its initialisation and its batch order of every epoch."""
    import torch

    from study.engine.population_data import DatasetCache, PopulationData
    from study.models import init_parameters
    from study.plan import plan_from_overrides
    from study.seeds import seed_streams

    common = _peer_common()
    trials = [p.trial for p in plan_from_overrides(["+sweep=lr_batch"]).points
              if p.trial.labels["task"] == task and p.trial.train.batch_size == 8
              and p.trial.labels["optimizer"] == "adam"][::7]
    assert {t.seed for t in trials} == {0, 1, 2}
    seeds = [seed_streams(t.seed) for t in trials]
    ours = PopulationData(trials, seeds, DatasetCache(), torch.device("cpu"), torch.float32)
    peer = common.build_population(task, 8, [common.Trial(task, "adam", t.optimizer.lr, 8,
                                                          t.seed) for t in trials])
    n = common.N_TRAIN
    assert torch.equal(ours.x_eval[:, :n], peer.x_train)
    assert torch.equal(ours.x_eval[:, n:], peer.x_val)
    assert torch.equal(ours.y_eval[:, :n], peer.y_train)
    assert torch.equal(ours.y_eval[:, n:], peer.y_val)
    for trial, streams in zip(trials, seeds, strict=True):
        mine = init_parameters(trial.model, trial.task.input_dim, trial.task.output_dim,
                               torch.Generator().manual_seed(streams.init))
        theirs = common.init_parameters(task, common.seed_streams(trial.seed)["init"])
        for (w, b), (pw, pb) in zip(mine, theirs, strict=True):
            assert torch.equal(w, pw) and torch.equal(b, pb)
    rows = torch.arange(len(trials))[:, None]
    for epoch in range(common.EPOCHS):
        x, y = ours.epoch(shuffle=True)
        assert torch.equal(x, peer.x_train[rows, peer.perms[epoch]]), epoch
        assert torch.equal(y, peer.y_train[rows, peer.perms[epoch]]), epoch
