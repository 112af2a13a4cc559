"""The stability-edge section: axes chosen, open edges marked, caption from the numbers."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
from PIL import Image

from analysis.edges import edge_axes, edge_section, ordered


def _edges() -> pd.DataFrame:
    rows = []
    for task in ("teacher_mlp", "blobs"):
        for opt, scale in (("sgd", 1.0), ("adam", 0.1)):
            for bs, f in (("8", 1.0), ("32", 2.0), ("full", 4.0)):
                edge = scale * f
                rows.append({"task": task, "optimizer": opt, "train.batch_size": bs,
                             "edge": edge, "edge_high": edge * 1.15, "precision": 0.15,
                             "resolved": True, "bound": "", "rates_tried": 12,
                             "trials": 36, "seed_edge_min": edge, "seed_edge_max": edge * 1.3,
                             "grid_precision_same_cost": 1.31})
    rows[-1].update(edge_high=np.nan, precision=np.nan, bound="above high", resolved=False)
    return pd.DataFrame(rows)


def test_batch_size_is_x_optimizer_the_line_and_task_the_panel() -> None:
    assert edge_axes(_edges()) == ("train.batch_size", "optimizer", ["task"])
    assert ordered(pd.Series(["full", "32", "8", "128"])) == ["8", "32", "128", "full"]


def test_the_section_states_the_precision_reached_and_the_grid_of_the_same_cost() -> None:
    section = edge_section(_edges())
    assert section is not None
    caption = section["caption"]
    assert "at most 15% higher (median 15%)" in caption
    assert "spaced them 131% apart" in caption
    assert "Open triangles" in caption and "(1 configuration;" in caption
    png = base64.b64decode(section["image"].split(",", 1)[1])
    width, height = Image.open(io.BytesIO(png)).size
    assert width > 600 and height > 200
    assert section["table"].count("<tr") == len(_edges()) + 1


def test_no_section_without_edges() -> None:
    assert edge_section(None) is None and edge_section(pd.DataFrame()) is None


def _below_low(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    """`frame` with every configuration of `task` diverged at the lowest rate tried."""
    rows = frame["task"] == task
    return frame.assign(**{c: frame[c].where(~rows, np.nan) for c in (
        "edge", "precision", "seed_edge_min", "seed_edge_max")},
        bound=frame["bound"].where(~rows, "below low"))


def test_a_panel_where_every_configuration_diverged_at_the_lowest_rate_is_drawn_empty(
        ) -> None:
    """A log axis has no range without a finite edge (matplotlib raised); that panel says
    why it is empty, and the others are drawn."""
    section = edge_section(_below_low(_edges(), "blobs"))
    assert section["image"].startswith("data:image/png;base64,")
    assert "6 configurations diverged at the lowest rate" in section["caption"]


def test_no_figure_when_no_configuration_has_an_edge_in_range() -> None:
    section = edge_section(_below_low(_below_low(_edges(), "blobs"), "teacher_mlp"))
    assert section["image"] is None
    assert section["caption"].startswith("No configuration has an edge in the searched range")
    assert section["table"].count("<tr") == len(_edges()) + 1
