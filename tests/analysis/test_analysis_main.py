"""`python -m analysis` ends like `python -m study`: its output and exit status, then no
interpreter teardown (where Arrow's thread pools can abort a finished run)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_bad_run_dir_is_one_line_exit_2_and_no_teardown(tmp_path: Path) -> None:
    # An object whose finalizer runs only when the interpreter tears __main__'s globals
    # down: a normal exit prints "teardown", os._exit does not.
    script = textwrap.dedent(f"""
        import runpy, sys
        class Witness:
            def __del__(self):
                print("teardown", flush=True)
        witness = Witness()
        sys.argv = ["analysis", {str(tmp_path / "nope")!r}]
        runpy.run_module("analysis", run_name="__main__")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("analysis: error:")
    assert "teardown" not in done.stdout
