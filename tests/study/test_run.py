"""study.run: the progress bar and the console's log lines."""

from __future__ import annotations

import contextlib
import logging
import sys

from study.run import ProgressBar


@contextlib.contextmanager
def _console():
    """A console log handler on the root logger, as Hydra's, writing to sys.stderr as it
    is now (the test's captured stream)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_a_log_line_prints_above_the_bar_not_into_it(capsys) -> None:
    with _console():
        bar = ProgressBar(True, 4, "sweep")
        bar(1, 4)
        with bar.logs_above():
            logging.getLogger("study.engine").info("compiling the CPU kernel")
        bar(2, 4)
        bar.close()
    err = capsys.readouterr().err
    # The bar's line is cleared first: the message starts a line of its own, and the bar
    # is drawn again below it.
    assert "\rcompiling the CPU kernel\n" in err
    assert err.index("compiling") < err.rindex("2/4")


def test_without_a_bar_log_lines_are_left_alone(capsys) -> None:
    with _console():
        bar = ProgressBar(False, 4, "sweep")
        with bar.logs_above():
            logging.getLogger("study.engine").info("compiling the CPU kernel")
        bar.close()
    assert capsys.readouterr().err == "compiling the CPU kernel\n"
