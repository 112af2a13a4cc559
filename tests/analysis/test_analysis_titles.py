"""A panel's title is pinned at the top only where matplotlib would not move it: the same
pixels, and matplotlib still places every other title."""

from __future__ import annotations

from analysis import figures

OFFSET = [1e6 + 1, 1e6 + 2, 1e6 + 3]  # a linear axis shows these with an offset text


def _panel(yscale: str, values, twin: str | None = None, twin_values=OFFSET):
    fig, ax = figures.plt.subplots(figsize=(3, 2))
    ax.plot([1, 2, 3], values)
    ax.set_yscale(yscale)
    if twin:
        other = ax.twinx()
        other.plot([1, 2, 3], twin_values)
        other.set_yscale(twin)
    return fig, ax


def _pinned(*panel) -> bool:
    """Whether `set_panel_title` pins the panel's title, after checking that it gives the
    pixels of a title placed by matplotlib."""
    pngs = []
    for pin in (True, False):
        fig, ax = _panel(*panel)
        if pin:
            figures.set_panel_title(ax, "a title\non two lines", 9)
            pinned = ax._autotitlepos is False
        else:
            ax.set_title("a title\non two lines", fontsize=9)
        pngs.append(figures.figure_to_data_uri(fig))
    assert pngs[0] == pngs[1]
    return pinned


def test_a_title_is_pinned_only_where_it_would_not_move() -> None:
    assert _pinned("log", [1e-3, 1.0, 10.0])
    assert _pinned("linear", [0.1, 0.5, 0.3])  # ticks without an offset text
    assert _pinned("log", [1e-3, 1.0, 10.0], "log")
    # An offset text ("+1e6") on the panel or a twin moves a title: left to matplotlib.
    assert not _pinned("linear", OFFSET)
    assert not _pinned("log", [1e-3, 1.0, 10.0], "linear")
    fig, ax = figures.plt.subplots()
    ax.set_yticks([0, 1], ["a", "b"])  # a labelled (categorical) axis
    figures.set_panel_title(ax, "t", 9)
    assert ax._autotitlepos is False
    figures.plt.close(fig)
    fig, ax = figures.plt.subplots()
    ax.set_yticks([0, 1], ["a", "b"])
    ax.xaxis.set_ticks_position("top")  # ticks on top move a title
    figures.set_panel_title(ax, "t", 9)
    assert ax._autotitlepos is not False
    figures.plt.close(fig)
