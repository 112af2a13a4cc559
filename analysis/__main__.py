"""`python -m analysis RUN_DIR`: write RUN_DIR/report.html and print its path.

Exit codes: 0 written; 2 bad input (one line on stderr naming the problem, nothing written).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from study.records import RecordError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        description="Build report.html for a study run directory from its files.")
    parser.add_argument("run_dir", type=Path, help="run directory written by `python -m study`")
    parser.add_argument("--map-metric", default="val_loss_final", metavar="COLUMN",
                        help="numeric trials.parquet column that colors the stability map "
                             "(median over seeds; default: %(default)s, shown relative to "
                             "the task's initial loss), or a status (diverged, unstable, "
                             "...) to color by the share of seeds that ended so")
    args = parser.parse_args(argv)
    from analysis import build_report  # after parsing: --help stays fast

    logging.basicConfig(format="analysis: warning: %(message)s", stream=sys.stderr,
                        level=logging.WARNING)

    try:
        path = build_report(args.run_dir, map_metric=args.map_metric)
    except RecordError as err:
        print(f"analysis: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
