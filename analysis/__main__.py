"""`python -m analysis RUN_DIR [--claims FILE]`: score the run's claims from its files
(claims.parquet), write RUN_DIR/report.html and print its path.

Exit codes: 0 written; 2 bad input (one line on stderr naming the problem, nothing written).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from study import heap
from study.claims import ClaimError
from study.process_exit import exit_now
from study.records import RecordError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        description="Score a study run's claims and build its report.html from the run "
                    "directory's files.")
    parser.add_argument("run_dir", type=Path, help="run directory written by `python -m study`")
    parser.add_argument("--map-metric", default="val_loss_final", metavar="COLUMN",
                        help="numeric trials.parquet column that colors the stability map "
                             "(median over seeds; default: %(default)s, shown relative to "
                             "the task's initial loss), or a status (diverged, unstable, "
                             "...) to color by the share of seeds that ended so")
    parser.add_argument("--claims", type=Path, metavar="FILE",
                        help="YAML with claims to score besides the run's own (a sweep file "
                             "such as conf/sweep/NAME.yaml, a `claims:` list or a list): "
                             "one with the statement of a saved claim replaces it, the "
                             "others are added")
    args = parser.parse_args(argv)
    from analysis.claims import score_claims  # after parsing: --help stays fast
    from analysis.report import build_report
    from study.records import write_claims

    heap.settle()  # the imports are done (study.heap)
    logging.basicConfig(format="analysis: warning: %(message)s", stream=sys.stderr,
                        level=logging.WARNING)

    try:
        claims = score_claims(args.run_dir, claims_file=args.claims)
        path = build_report(args.run_dir, map_metric=args.map_metric, claims=claims)
        if claims is not None:  # after the report: bad input leaves the files as they were
            write_claims(args.run_dir, claims)
    except (RecordError, ClaimError) as err:
        print(f"analysis: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # bad state: the run directory cannot be written
        print(f"analysis: error: cannot write {err.filename or args.run_dir}: "
              f"{err.strerror or err}", file=sys.stderr)
        return 3
    print(path)
    return 0


if __name__ == "__main__":
    # Without the interpreter's teardown: Arrow's thread pools (parquet reads) can abort
    # there, intermittently ("terminate called without an active exception", status -6),
    # after everything was written and printed.
    heap.hold()
    exit_now(main())
