"""`python -m study.bench` on a tiny workload: the JSON has every figure, and they add up."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from study.bench import main, workload_overrides


def test_bench_smoke_writes_consistent_json(tmp_path) -> None:
    out = tmp_path / "bench.json"
    result = main(["+sweep=smoke", "train.epochs=1", "--device", "cpu", "--subset", "2",
                   "--limit", "6", "--matmul-seconds", "0.05", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["command"].startswith("python -m study.bench +sweep=smoke")
    assert result["workload"]["trials"] == result["batched"]["trials"] == 6
    assert result["reference"]["trials"] == 2
    steps = result["workload"]["trial_steps"]
    assert 0 < result["workload"]["executed_trial_steps"] <= steps
    batched, reference = result["batched"], result["reference"]
    assert abs(batched["trial_steps_per_s"] * batched["wall_s"] - steps) < 1e-6 * steps
    assert abs(result["ratio_batched_over_reference"]
               - batched["trial_steps_per_s"] / reference["trial_steps_per_s"]) < 1e-9
    assert reference["extrapolated_wall_s"] > 0 and result["matmul_gflops"] > 0
    assert 0 < result["batched_fraction_of_matmul_peak"] < 1
    populations = result["populations"]
    assert len(populations) == batched["populations"]
    assert sum(p["trials"] for p in populations) == 6
    assert sum(p["trial_steps"] for p in populations) == steps
    # a population trained in the background overlaps the next one's set-up: each one's
    # wall time within the whole, and its own CPU time a part of the whole's
    assert all(0 < p["wall_s"] <= batched["wall_s"] for p in populations)
    assert 0 < sum(p["cpu_s"] for p in populations) <= batched["cpu_s"] + 1e-3
    assert sum(p["reference_trials"] for p in populations) == 2
    for p in populations:  # a ratio exactly where the reference subset has trials
        assert ("ratio_batched_over_reference" in p) == (p["reference_trials"] > 0)
    # the bound: the populations' useful FLOPs at one core's matmul speed
    assert sum(p["gflop"] for p in populations) == pytest.approx(result["workload"]["gflop"])
    bound = result["bound"]
    core = bound["one_core_matmul_gflops"]
    assert core > 0 and torch.get_num_threads() == result["threads"]  # threads restored
    assert bound["trial_steps_per_cpu_s"] == pytest.approx(
        steps / (result["workload"]["gflop"] / core))
    for batch, rate in bound["per_batch_trial_steps_per_cpu_s"].items():
        mine = [p for p in populations if p["label"].endswith(f"batch {batch}")]
        assert rate == pytest.approx(sum(p["trial_steps"] for p in mine)
                                     / (sum(p["gflop"] for p in mine) / core))


def test_device_override_and_default_workload() -> None:
    """`python -m study.bench device=cuda` means the device (as for `python -m study`), and
    the workload stays lr_batch unless a sweep is named."""
    assert workload_overrides(["device=cuda"], "auto") == (["+sweep=lr_batch"], "cuda")
    assert workload_overrides([], "cpu") == (["+sweep=lr_batch"], "cpu")
    assert workload_overrides(["+sweep=smoke", "train.epochs=1", "device=cpu"], "cuda") == (
        ["+sweep=smoke", "train.epochs=1"], "cpu")
    assert workload_overrides(["train.epochs=2"], "auto") == (
        ["+sweep=lr_batch", "train.epochs=2"], "auto")
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda, got 'tpu'"):
        workload_overrides(["device=tpu"], "auto")


@pytest.mark.parametrize("argv", [["device=tpu"], ["--peer", "device=tpu"]])
def test_a_bad_device_is_one_line_and_exit_2(argv, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "python -m study.bench: device must be auto, cpu or cuda, got 'tpu'"]


@pytest.mark.parametrize("module, argv, message", [
    ("bench", ["+sweep=no_such_sweep"], "In 'config': Could not find 'sweep/no_such_sweep'"),
    ("bench", ["+sweep=smoke", "train.epochs=abc"],
     "Error merging override train.epochs=abc; Value 'abc' of type 'str' could not be "
     "converted to Integer"),
    ("bench", ["+sweep=smoke", "train.epochs=0"], "train.epochs"),
    ("bench_search", ["+sweep=no_such_sweep"], "Could not find 'sweep/no_such_sweep'"),
    ("bench_search", ["train.epochs=abc"], "Error merging override train.epochs=abc; "),
])
def test_a_workload_that_does_not_compose_is_one_line_and_exit_2(module, argv, message,
                                                                 capsys) -> None:
    """A bad override of the benches' workload is refused before anything is measured:
    one line naming it, exit 2, no traceback."""
    run = importlib.import_module(f"study.{module}").main
    with pytest.raises(SystemExit) as stop:
        run(argv)
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"python -m study.{module}: ") and message in line


@pytest.mark.parametrize("module, option, message", [
    ("bench", "--limit=0", "argument --limit: must be at least 1, got 0"),
    ("bench", "--threads=0", "argument --threads: must be at least 1, got 0"),
    ("bench", "--threads=1.5", "argument --threads: not a number: '1.5'"),
    ("bench", "--matmul-seconds=0", "argument --matmul-seconds: must be above 0, got 0"),
    ("bench", "--budget-bytes=-5", "argument --budget-bytes: must be at least 1, got -5"),
    ("bench_search", "--repeats=0", "argument --repeats: must be at least 1, got 0"),
    ("bench_search", "--threads=-1", "argument --threads: must be at least 1, got -1"),
])
def test_a_bad_number_is_refused_by_the_parser(module, option, message, capsys) -> None:
    run = importlib.import_module(f"study.{module}").main
    with pytest.raises(SystemExit) as stop:
        run(["+sweep=smoke", option])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"python -m study.{module}: error: {message}")


@pytest.mark.parametrize("module", ["bench", "bench_search", "bench_e2e"])
def test_an_out_that_cannot_be_written_is_refused_before_measuring(module, tmp_path,
                                                                   capsys) -> None:
    run = importlib.import_module(f"study.{module}").main
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out, message in ((tmp_path, f"{tmp_path} is a directory"),
                         (a_file / "x.json", f"cannot write {a_file / 'x.json'}")):
        with pytest.raises(SystemExit) as stop:
            run(["+sweep=smoke", "--out", str(out)])
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"python -m study.{module}: error: argument --out: {message}")


def test_an_out_that_fails_when_written_is_one_line_after_the_result(tmp_path, monkeypatch,
                                                                      capsys) -> None:
    """The disk fills while measuring: the result printed, one line, exit 3."""
    from study.bench import write_json

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(SystemExit) as stop:
        write_json({"x": 1}, tmp_path / "deep" / "out.json")
    assert stop.value.code == 3
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: cannot write {tmp_path / 'deep' / 'out.json'}: No space left on device "
        f"(the result is printed above)"]


def test_seeds_widens_every_population(tmp_path) -> None:
    """`--seeds N` trains the workload over seeds 0..N-1: the same populations, N/2 times
    the trials of smoke's two seeds (and options may come before the overrides)."""
    result = main(["--device", "cpu", "--seeds", "4", "--subset", "1", "+sweep=smoke",
                   "train.epochs=1", "--matmul-seconds", "0.05"])
    assert result["workload"]["overrides"][-1] == "sweep.seeds=[0,1,2,3]"
    assert result["workload"]["trials"] == 32
    assert [p["trials"] for p in result["populations"]] == [8, 8, 8, 8]
    with pytest.raises(SystemExit):
        main(["--seeds", "0", "+sweep=smoke"])
    with pytest.raises(SystemExit):
        main(["--subset", "-1", "+sweep=smoke"])


def test_threads_holds_torch_and_the_fused_update_and_subset_0_skips_the_reference() -> None:
    """`--threads 1` runs one thread: torch's and the fused update's pools both stay at one
    after the populations are built; `--subset 0` times the batched engine alone."""
    before = torch.get_num_threads()
    try:
        result = main(["+sweep=smoke", "train.epochs=1", "--device", "cpu", "--subset", "0",
                       "--limit", "4", "--threads", "1", "--matmul-seconds", "0.05"])
    finally:
        torch.set_num_threads(before)
    assert result["threads"] == 1 and result["numba_threads"] == 1
    assert "reference" not in result and "ratio_batched_over_reference" not in result
    batched = result["batched"]
    assert batched["cpu_s"] > 0
    assert batched["trial_steps_per_cpu_s"] * batched["cpu_s"] == pytest.approx(
        batched["trial_steps"])
    assert len(result["load_averages"]["start"]) == 3


def test_kernel_picks_the_cpu_path_and_is_recorded(monkeypatch) -> None:
    """`--kernel layer_major` trains every population on the layer-major path (the
    trial-major kernel never runs), the default takes the kernel; the JSON says which."""
    from study.engine import trial_major

    args = ["+sweep=smoke", "train.epochs=1", "--device", "cpu", "--subset", "0", "--limit",
            "4", "--matmul-seconds", "0.05"]
    calls = []
    launch = trial_major.Kernel._launch
    monkeypatch.setattr(trial_major.Kernel, "_launch",
                        lambda self, *a, **k: (calls.append(a), launch(self, *a, **k))[1])
    assert main([*args, "--kernel", "layer_major"])["kernel"] == "layer_major"
    assert calls == []
    assert main(args)["kernel"] == "auto"
    assert calls
    with pytest.raises(SystemExit):
        main([*args, "--kernel", "fast"])
