"""The README's SLURM recipe, run on a real (throwaway, one-node) SLURM cluster.

The fixture starts `munged`, `slurmctld` and `slurmd` from Debian's `slurm-wlm` and `munge`
packages (installed by .ci/run) in a temporary directory: their own config (`SLURM_CONF`),
key, socket, ports and spool, nothing under /etc. The test then runs the recipe as the
README writes it (Hydra's submitit launcher, N identical jobs on one PostgreSQL study and
one run directory) and checks that every grid point was trained exactly once. Skipped, with
the reason, where the binaries, root (slurmd runs as root) or the launcher are missing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from tests.study.conftest import free_port, run_study

pytestmark = pytest.mark.slow

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel")


def _config(work: Path, host: str, sock: Path) -> str:
    return "\n".join([
        "ClusterName=studytest",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={sock}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "MpiDefault=none",
        "ReturnToService=2",
        f"StateSaveLocation={work / 'state'}",
        f"SlurmdSpoolDir={work / 'spool'}",
        f"SlurmctldLogFile={work / 'slurmctld.log'}",
        f"SlurmdLogFile={work / 'slurmd.log'}",
        f"SlurmctldPidFile={work / 'slurmctld.pid'}",
        f"SlurmdPidFile={work / 'slurmd.pid'}",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory=1000 "
        "State=UNKNOWN",
        "PartitionName=study Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
        "",
    ])


@pytest.fixture(scope="module")
def slurm() -> Iterator[dict[str, str]]:
    """A running one-node cluster; yields the environment its clients need (SLURM_CONF)."""
    found = {name: shutil.which(name) for name in BINARIES}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)}): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("a throwaway slurmd must run as root")
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        pytest.skip('the submitit launcher is not installed: pip install -e ".[slurm]"')
    work = Path(tempfile.mkdtemp(prefix="study-slurm-"))  # short: a socket path is limited
    work.chmod(0o700)
    for name in ("state", "spool"):
        (work / name).mkdir()
    key, sock = work / "munge.key", work / "munge.sock"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = work / "slurm.conf"
    host = socket.gethostname().split(".")[0]  # the short name, as slurmctld compares it
    conf.write_text(_config(work, host, sock))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons: list[subprocess.Popen] = []
    try:
        subprocess.run([found["munged"], "--force", f"--key-file={key}", f"--socket={sock}",
                        f"--pid-file={work / 'munged.pid'}", f"--log-file={work / 'munged.log'}",
                        f"--seed-file={work / 'munged.seed'}"], check=True, timeout=30,
                       capture_output=True)
        # -D: in the foreground, ours to stop; slurmd told its node name (no DNS needed)
        for args in (["slurmctld"], ["slurmd", "-N", host]):
            daemons.append(subprocess.Popen([found[args[0]], *args[1:], "-D", "-f", str(conf)],
                                            env=env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            state = subprocess.run([found["sinfo"], "-h", "-o", "%T"], env=env, text=True,
                                   capture_output=True, timeout=30).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        else:
            logs = "\n".join((work / f).read_text()[-2000:] for f in ("slurmctld.log",
                                                                     "slurmd.log")
                             if (work / f).exists())
            raise RuntimeError(f"the throwaway SLURM node is {state!r}, not idle:\n{logs}")
        yield {"SLURM_CONF": str(conf)}
    finally:
        if daemons:  # let jobs end (a step's teardown needs both daemons), then stop them
            _drain(found["squeue"], found["scancel"], env)
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        subprocess.run([found["munged"], "--stop", f"--socket={sock}"], capture_output=True,
                       timeout=30)
        shutil.rmtree(work, ignore_errors=True)


def _drain(squeue: str, scancel: str, env: dict[str, str], timeout: float = 60) -> None:
    """Wait until the cluster holds no job, cancelling what is left after `timeout`/2 s."""
    deadline, cancelled = time.monotonic() + timeout, False
    while time.monotonic() < deadline:
        left = subprocess.run([squeue, "-h", "-o", "%i"], env=env, text=True,
                              capture_output=True, timeout=30).stdout.split()
        if not left:
            return
        if not cancelled and time.monotonic() > deadline - timeout / 2:
            subprocess.run([scancel, "--full", *left], env=env,
                           capture_output=True, timeout=30)
            cancelled = True
        time.sleep(0.5)


def test_the_readme_slurm_recipe_trains_every_point_once(slurm, postgres, tmp_path) -> None:
    """Two identical array jobs (the README's `progress=false,false`) on one PostgreSQL study
    and one run directory: all 16 smoke points trained once between them, one report."""
    run_dir = tmp_path / "run"
    done = run_study(
        "--multirun", "+sweep=smoke", "train.epochs=2", "model.width=8", "storage=postgres",
        "storage.study_name=slurm_1", "hydra/launcher=submitit_slurm",
        f"hydra.sweep.dir={run_dir}", "hydra.sweep.subdir=.", "hydra.launcher.timeout_min=10",
        "progress=false,false", cwd=tmp_path,
        env={**slurm, "STUDY_STORAGE_URL": postgres.database()}, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    # Each job's own output (submitit keeps it per job) says how many it trained.
    outputs = sorted(run_dir.glob(".submitit/*_*/*_log.out"))
    assert len(outputs) == 2, outputs
    trained = [int(m.group(1)) for out in outputs
               for m in [re.search(r"(\d+) trials? trained", out.read_text())] if m]
    assert len(trained) == 2 and sum(trained) == 16, trained
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert len(trials) == 16 and trials["trial"].is_unique
    assert (run_dir / "report.html").exists()


def test_a_job_that_slurm_signals_stops_after_its_population_and_a_resume_finishes(
        slurm, postgres, tmp_path) -> None:
    """SIGTERM to one of two running jobs (what SLURM sends at a time limit, here through
    `scancel --signal=TERM`): that job stops after its population, exit 130, nothing half
    written; the other job trains on; a resume (same study, same run directory) trains
    what is left. Every point is trained exactly once in all."""
    run_dir = tmp_path / "run"
    env = {**os.environ, **slurm, "STUDY_STORAGE_URL": postgres.database()}
    common = ("+sweep=lr_batch", "sweep.seeds=[0]", "train.epochs=10", "report=false",
              "storage=postgres", "storage.study_name=slurm_2")  # 312 trials
    launcher = subprocess.Popen(
        [sys.executable, "-m", "study", "--multirun", *common, "hydra/launcher=submitit_slurm",
         f"hydra.sweep.dir={run_dir}", "hydra.sweep.subdir=.", "hydra.launcher.timeout_min=10",
         "progress=false,false"], cwd=tmp_path, env=env,
        stdout=(tmp_path / "launcher.log").open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    first = None
    while first is None and time.monotonic() < deadline and launcher.poll() is None:
        for out in sorted(run_dir.glob(".submitit/*_0/*_log.out")):
            if "with the batched engine" in out.read_text():  # job 0 is training
                first = out.parent.name
        time.sleep(0.2)
    assert first is not None, "job 0 never started training"
    subprocess.run([shutil.which("scancel"), "--signal=TERM", first], env=env,
                   check=True, timeout=30)
    launcher.wait(timeout=600)
    launched = (tmp_path / "launcher.log").read_text()
    assert launcher.returncode != 0  # one job ended with 130: the multirun says so
    logs = {p.parent.name: p.read_text() + p.with_suffix(".err").read_text()
            for p in run_dir.glob(".submitit/*_*/*_log.out")}
    assert len(logs) == 2, (logs, launched[-3000:])
    assert "stopped after" in logs[first] and "nothing is lost" in logs[first], logs[first]
    resumed = run_study(*common, f"hydra.run.dir={run_dir}", "progress=false", cwd=tmp_path,
                        env={**slurm, "STUDY_STORAGE_URL": env["STUDY_STORAGE_URL"]},
                        expect=0)
    # "stopped after N trials" (the signalled job), "N trials trained" (the other, the resume)
    counts = [int(m.group(1) or m.group(2))
              for text in [*logs.values(), resumed.stdout + resumed.stderr]
              for m in re.finditer(r"stopped after (\d+) trials?|(\d+) trials? trained", text)]
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert len(trials) == 312 and trials["trial"].is_unique
    assert sum(counts) == 312, (counts, resumed.stdout[-2000:])
