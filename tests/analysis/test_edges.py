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
