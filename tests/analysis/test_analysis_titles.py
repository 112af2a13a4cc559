"""A panel's title is pinned at the top only where matplotlib would not move it: the same
pixels, and matplotlib still places every other title."""

from __future__ import annotations

from analysis import figures


def _titled(yscale: str, values, twin: str | None = None) -> tuple[bytes, bool]:
    """A panel titled with `set_panel_title` and the same panel titled the automatic way:
    the first's PNG and whether the two are the same pixels."""
    pngs = []
    for pinned in (True, False):
        fig, ax = figures.plt.subplots(figsize=(3, 2))
        ax.plot([1, 2, 3], values)
        ax.set_yscale(yscale)
        if twin:
            other = ax.twinx()
            other.plot([1, 2, 3], [1e6 + 1, 1e6 + 2, 1e6 + 3])
            other.set_yscale(twin)
        if pinned:
            figures.set_panel_title(ax, "a title\non two lines", 9)
        else:
            ax.set_title("a title\non two lines", fontsize=9)
        pngs.append(figures.figure_to_data_uri(fig))
    return pngs[0], pngs[0] == pngs[1]


def test_a_title_is_pinned_only_where_it_would_not_move() -> None:
    # Log or labelled y: no offset text, so pinned and automatic titles are the same pixels.
    assert _titled("log", [1e-3, 1.0, 10.0])[1]
    fig, ax = figures.plt.subplots()
    ax.set_yticks([0, 1], ["a", "b"])  # a labelled (categorical) axis
    figures.set_panel_title(ax, "t", 9)
    assert ax._autotitlepos is False
    figures.plt.close(fig)
    # A linear y axis may carry an offset text ("+1e6"), which moves the title: not pinned,
    # so matplotlib still moves it; nor where a twin's linear axis could.
    for yscale, values, twin in (("linear", [1e6 + 1, 1e6 + 2, 1e6 + 3], None),
                                 ("log", [1e-3, 1.0, 10.0], "linear")):
        fig, ax = figures.plt.subplots()
        ax.plot([1, 2, 3], values)
        ax.set_yscale(yscale)
        if twin:
            ax.twinx().set_yscale(twin)
        figures.set_panel_title(ax, "t", 9)
        assert ax._autotitlepos is not False
        figures.plt.close(fig)
    assert _titled("linear", [1e6 + 1, 1e6 + 2, 1e6 + 3])[1]
    assert _titled("log", [1e-3, 1.0, 10.0], twin="linear")[1]
