"""`study.heap`: no cyclic collection while a process imports, then the heap frozen."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.analysis.conftest import write_sweep_run

ROOT = Path(__file__).resolve().parents[2]


def _python(body: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run `body` in a fresh interpreter (the collector's state is the process's)."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, str(script), *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)


def test_hold_then_settle_freezes_the_heap_and_collects_what_comes_after(tmp_path) -> None:
    done = _python("""
        import gc, weakref
        from study import heap
        heap.hold()
        assert not gc.isenabled()
        kept = [[] for _ in range(1000)]
        heap.settle()
        assert gc.isenabled() and gc.get_freeze_count() > len(kept)

        class Node:
            pass
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made after settle: collected
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
        heap.settle()  # a second settle without a hold: nothing
        assert gc.isenabled()
        print("ok")
        """, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"


def test_settle_without_hold_changes_nothing(tmp_path) -> None:
    """A process that embeds the harness (a test, a notebook) keeps its own collector."""
    done = _python("""
        import gc
        from study import heap
        heap.settle()
        assert gc.isenabled() and gc.get_freeze_count() == 0
        gc.disable()
        heap.settle()
        assert not gc.isenabled()
        print("ok")
        """, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"


@pytest.mark.parametrize("entry", ["study", pytest.param("study.bench", marks=pytest.mark.slow),
                                   pytest.param("analysis", marks=pytest.mark.slow)])
def test_the_command_line_makes_no_full_collection_of_its_imports(tmp_path, entry) -> None:
    """`python -m study` imports Hydra, torch, numba, pandas and Optuna (`python -m
    analysis` pandas, scipy and matplotlib): 150,000 and more tracked objects, which a full
    collection visits every one of (0.1-0.4 s). From the command line's `hold` on, no
    collection visits them: none runs until they are frozen, and the ones after see only
    what was made since."""
    args = {"study": lambda: ["+sweep=smoke", f"hydra.run.dir={tmp_path / 'run'}",
                              "progress=false", "report=false"],
            "study.bench": lambda: ["+sweep=smoke", "--subset", "0", "--limit", "8",
                                    "--matmul-seconds", "0.05"],
            "analysis": lambda: [str(write_sweep_run(tmp_path / "run"))]}[entry]()
    log = tmp_path / "collections.log"
    done = _python(f"""
        import gc, os, runpy, sys
        from study import heap
        main, held, settled = os.getpid(), heap.hold, heap.settle

        def write(line):
            if os.getpid() == main:
                with open({str(log)!r}, "a") as f:
                    f.write(line + "\\n")

        def hold():
            write("hold")
            held()

        def settle():
            settled()
            write(f"settle {{len(gc.get_objects())}} {{gc.get_freeze_count()}}")

        def seen(phase, info):
            # after a full collection, the oldest generation holds what it visited
            if phase == "stop" and info["generation"] == 2:
                write(f"{{len(gc.get_objects(generation=2))}} {{gc.get_freeze_count()}}")

        heap.hold, heap.settle = hold, settle
        gc.callbacks.append(seen)
        sys.argv = [{entry!r}, *sys.argv[1:]]
        runpy.run_module({entry!r}, run_name="__main__", alter_sys=True)
        """, tmp_path, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = log.read_text().splitlines()
    held = lines.index("hold")
    settled = next(i for i, line in enumerate(lines) if line.startswith("settle"))
    assert settled == held + 1, lines  # no full collection in between
    _, tracked, frozen = lines[settled].split()
    assert int(frozen) > 150_000 and int(tracked) == 0, lines
    after = [int(line.split()[0]) for line in lines[settled + 1:]]
    assert all(visited < 60_000 for visited in after), lines
