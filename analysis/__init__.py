"""`analysis`: rebuild a study run's report from its run directory (files only, no torch).

    python -m analysis RUN_DIR      # writes RUN_DIR/report.html and prints its path
"""

from __future__ import annotations

from analysis.report import build_report

__all__ = ["build_report"]
