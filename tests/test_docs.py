"""The user documentation names what the code has: every metric column and status is
defined in docs/metrics.md, every failure mode and mitigation is listed in the docs, and
every file path the docs cite exists (a rename must update the docs that point to it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from study.metrics import STATUSES, SUMMARY_METRICS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A path of the repository's code, tests or docs ending in a file name (conf/ paths in the
# docs are mostly files the reader is asked to create).
PATH = re.compile(r"(?<![\w/.])((?:study|analysis|tests|docs)/[\w./-]*\w\.(?:py|md|js|html|png))")


def test_every_metric_column_and_status_is_defined_in_docs_metrics() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text()
    missing = [name for name in (*SUMMARY_METRICS, *STATUSES) if f"`{name}`" not in text]
    assert not missing, f"docs/metrics.md does not define {missing}"


@pytest.mark.parametrize("group", ["failure", "mitigation"])
def test_every_failure_mode_and_mitigation_is_documented(group: str) -> None:
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "failures.md").read_text()
    options = sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml") if p.stem != "none")
    missing = [name for name in options if f"`{name}`" not in text]
    assert options and not missing, f"conf/{group}/ options missing from the docs: {missing}"


def test_every_path_the_docs_cite_exists() -> None:
    cited = {(doc.name, path) for doc in DOCS for path in PATH.findall(doc.read_text())}
    missing = sorted((doc, path) for doc, path in cited if not (ROOT / path).exists())
    assert cited and not missing, f"paths cited in the docs that do not exist: {missing}"
