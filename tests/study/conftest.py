"""Fixtures for the scale-out tests: a throwaway PostgreSQL server and the study CLI.

The PostgreSQL fixture starts a real server (Debian's `postgresql` package, installed by
.ci/run): `initdb` in a temporary directory, `postgres` on 127.0.0.1 and a free port, as
the `postgres` user when we are root (PostgreSQL refuses to run as root). Without the
binaries or the driver the tests that need it are skipped, saying why.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PG_PASSWORD = "s3cret-pw"  # a throwaway cluster's; tests check it never reaches a file
TINY = ("+sweep=smoke", "train.epochs=1", "model.width=8", "report=false", "progress=false")


def run_study(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
              expect: int | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m study ARGS` in a subprocess (in `cwd`, the environment plus `env`), its
    output captured as text. With `expect`, assert that it exited with that code (the
    failure message is its stderr)."""
    done = subprocess.run([sys.executable, "-m", "study", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})
    if expect is not None:
        assert done.returncode == expect, done.stderr
    return done


@pytest.fixture(scope="session")
def study_cli():
    """`run_study`: the study CLI in a subprocess, for tests that cannot import this module."""
    return run_study


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


class PostgresServer:
    """A running throwaway cluster; `database()` makes a fresh database and returns its URL."""

    def __init__(self, bindir: Path, workdir: Path, port: int, as_user: list[str]) -> None:
        self.bindir, self.workdir, self.port, self._as = bindir, workdir, port, as_user
        self.password = PG_PASSWORD
        self._count = 0

    def run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=120)

    def pg_ctl(self, *args: str) -> None:
        """`pg_ctl -D <data> ARGS` as the cluster's owner."""
        self.run(str(self.bindir / "pg_ctl"), "-D", str(self.workdir / "data"), *args)

    def start(self) -> None:
        """Start the server (and wait until it accepts connections)."""
        self.pg_ctl("-l", str(self.workdir / "log"), "-w", "-o",
                    f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 "
                    "-c fsync=off -c max_connections=100", "start")

    def restart(self, pause_s: float, after: Callable[[], bool] | None = None,
                timeout: float = 300) -> None:
        """An outage: stop the server (`-m fast`: clients are disconnected), wait until
        `after()` is true if given (polled, at most `timeout` s: e.g. until a client has met
        the outage), then `pause_s` seconds, and start it again with the same options."""
        self.pg_ctl("-m", "fast", "stop")
        try:
            deadline = time.monotonic() + timeout
            while after is not None and not after() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(pause_s)
        finally:
            self.start()  # even if the test fails: the server is shared by the session

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://study:{PG_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        import psycopg

        self._count += 1
        name = f"study_test_{self._count}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    if importlib.util.find_spec("psycopg") is None:
        pytest.skip('the PostgreSQL driver is not installed: pip install -e ".[postgres]"')
    as_user: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="study-pg-"))
    if os.geteuid() == 0:  # postgres refuses to run as root
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser: cannot start postgres as a user")
        as_user = [runuser, "-u", "postgres", "--"]
        shutil.chown(workdir, "postgres")
    (workdir / "pw").write_text(PG_PASSWORD + "\n")
    if as_user:
        shutil.chown(workdir / "pw", "postgres")
    server = PostgresServer(bindir, workdir, free_port(), as_user)
    server.run(str(bindir / "initdb"), "-D", str(workdir / "data"), "-U", "study",
               "-A", "scram-sha-256", f"--pwfile={workdir / 'pw'}", "-E", "UTF8")
    server.start()
    try:
        yield server
    finally:
        server.pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_baseline(tmp_path_factory) -> Path:
    """An uninterrupted one-worker run of the tiny sweep: the reference for every metric."""
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    run_study(*TINY, f"hydra.run.dir={run_dir}", expect=0)
    return run_dir


def tally(run_dir: Path, url: str | None = None, study_name: str = "smoke") -> dict[str, int]:
    """Points of the run's study: COMPLETE trials, points lost (none COMPLETE), duplicated,
    RUNNING, and FAILED trials of points.

    A worker whose `ask` finds the queue emptied by another worker in between gets a fresh
    sampled trial with no point key; it is FAILed at once as "unused" (Optuna's `ask` has no
    "pop or nothing"). Those belong to no point and are not counted as failed.
    """
    import optuna

    from study import records, storage
    from study.journal import open_journal

    if url is None:
        backend, _ = open_journal(run_dir / records.JOURNAL)
    else:
        backend = storage.open_rdb(url)
    study = optuna.load_study(study_name=study_name, storage=backend)
    trials = study.get_trials(deepcopy=False)
    complete = [t.user_attrs["key"] for t in trials if t.state.name == "COMPLETE"]
    keys = {t.user_attrs.get("key") for t in trials} - {None}
    return {"complete": len(complete), "points": len(keys),
            "lost": len(keys - set(complete)), "duplicated": len(complete) - len(set(complete)),
            "running": sum(t.state.name == "RUNNING" for t in trials),
            "failed": sum(t.state.name == "FAIL" and "key" in t.user_attrs for t in trials)}


def assert_same_results(run_dir: Path, baseline: Path) -> None:
    """trials.parquet of `run_dir` equals the baseline's on every column but trial numbers."""
    from study import records

    got = records.read_trials(run_dir)[0].set_index("key").sort_index()
    want = records.read_trials(baseline)[0].set_index("key").sort_index()
    columns = [c for c in want.columns if c != "trial"]
    assert list(got.index) == list(want.index)
    assert sorted(got.columns) == sorted(want.columns)
    assert got[columns].equals(want[columns])


@pytest.fixture(scope="session")
def run_checks():
    """(tally, assert_same_results): helpers for tests that cannot import this module."""
    return tally, assert_same_results
