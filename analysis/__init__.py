"""`analysis`: rebuild a study run's report from its run directory (files only, no torch).

    python -m analysis RUN_DIR      # scores the claims, writes RUN_DIR/report.html

`build_report` is imported on first use: the run scores claims through `analysis.claims`
without loading the plotting stack.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_report"]


def __getattr__(name: str) -> Any:
    if name == "build_report":
        from analysis.report import build_report

        return build_report
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
