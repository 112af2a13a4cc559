"""`exit_now`: what a normal exit does that can be observed, without the teardown."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def _run(body: str, tmp_path) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    root = str(Path(__file__).resolve().parents[2])  # this checkout's study, not an install's
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.mark.parametrize(("status", "code"), [(0, 0), (None, 0), (3, 3), (130, 130)])
def test_status_output_logging_and_atexit_handlers_survive(tmp_path, status, code) -> None:
    done = _run(f"""
        import atexit, logging, sys
        from pathlib import Path
        from study.process_exit import exit_now
        out = Path(sys.argv[1])
        handler = logging.FileHandler(out / "run.log")
        logging.getLogger("x").addHandler(handler)
        logging.getLogger("x").warning("logged")
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        sys.stdout.write("no newline, still buffered")
        sys.stderr.write("to stderr")
        exit_now({status!r})
        (out / "after").write_text("exit_now returned")
        """, tmp_path)
    assert done.returncode == code
    assert done.stdout == "no newline, still buffered" and done.stderr == "to stderr"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "run.log").read_text() == "logged\n"
    assert not (tmp_path / "after").exists()


def test_a_ctrl_c_during_the_clean_up_changes_nothing(tmp_path) -> None:
    """Everything is written when exit_now runs: a Ctrl-C in an atexit handler (a user's
    at the very end of a run) neither prints a traceback nor stops the other handlers."""
    done = _run("""
        import atexit, os, signal, sys, time
        from pathlib import Path
        from study.process_exit import exit_now
        out = Path(sys.argv[1])
        atexit.register(lambda: (out / "second").write_text("ran"))  # runs last
        def ctrl_c():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the signal is handled here
        atexit.register(ctrl_c)
        exit_now(0)
        """, tmp_path)
    assert done.returncode == 0 and done.stderr == ""
    assert (tmp_path / "second").read_text() == "ran"


def test_a_message_status_is_printed_with_status_1(tmp_path) -> None:
    done = _run("""
        from study.process_exit import exit_now
        exit_now("error: something")
        """, tmp_path)
    assert done.returncode == 1 and done.stderr == "error: something\n"


def test_a_live_non_daemon_thread_is_waited_for(tmp_path) -> None:
    """A normal exit joins non-daemon threads: exit_now must not cut one short."""
    done = _run("""
        import sys, threading, time
        from pathlib import Path
        from study.process_exit import exit_now
        out = Path(sys.argv[1])
        def finish():
            time.sleep(0.5)
            (out / "thread").write_text("finished")
        threading.Thread(target=finish).start()
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        exit_now(4)
        """, tmp_path)
    assert done.returncode == 4
    assert (tmp_path / "thread").read_text() == "finished"


def test_daemon_threads_do_not_hold_the_exit(tmp_path) -> None:
    """Only daemon threads alive (tqdm's monitor, a heartbeat): the process ends at once,
    skipping the teardown, so an object's finalizer never runs."""
    done = _run("""
        import sys, threading, time
        from pathlib import Path
        from study.process_exit import exit_now
        out = Path(sys.argv[1])
        class Marker:
            def __del__(self):
                (out / "finalized").write_text("teardown ran")
        keep = Marker()
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        exit_now(0)
        """, tmp_path)
    assert done.returncode == 0
    assert not (tmp_path / "finalized").exists()
