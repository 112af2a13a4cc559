"""A log axis makes ticks only for what it draws (`figures.trim_log_ticks`): the same
pixels, fewer ticks made."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.ticker import LogLocator

from analysis import figures


def _figure():
    """Log panels of every kind the report draws: wide and narrow ranges (minor labels
    shown), a locator of its own, a log twin, a log x axis, a log colour bar."""
    fig, axes = figures.plt.subplots(2, 3, figsize=(9, 5))
    steps = np.arange(1, 400)
    axes[0, 0].plot(steps, 10.0 ** np.sin(steps / 40) * 3)  # 0.3 to 30
    axes[0, 0].set_yscale("log")
    axes[0, 1].plot(steps, np.linspace(0.21, 0.43, len(steps)))  # within a decade
    axes[0, 1].set_yscale("log")
    axes[0, 2].plot([1e-4, 1e-1], [1, 2])
    axes[0, 2].set_xscale("log")
    axes[0, 2].xaxis.set_major_locator(LogLocator(numticks=6))
    axes[1, 0].plot(steps, 1.0 / steps)
    axes[1, 0].set_yscale("log")
    twin = axes[1, 0].twinx()
    twin.plot(steps, steps * 1e3)
    twin.set_yscale("log")
    axes[1, 1].plot(steps, steps)  # linear: left as it is
    image = axes[1, 2].imshow(np.logspace(-3, 2, 20).reshape(4, 5), norm=LogNorm())
    fig.colorbar(image, ax=axes[1, 2])
    return fig


def _png(trim: bool) -> tuple[bytes, int]:
    fig = _figure()
    if trim:
        figures.trim_log_ticks(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=figures.DPI, metadata={"Software": None})
    made = sum(len(axis.majorTicks) + len(axis.minorTicks)
               for ax in fig.axes for axis in (ax.xaxis, ax.yaxis))
    figures.plt.close(fig)
    return buffer.getvalue(), made


def test_trimmed_log_ticks_draw_the_same_pixels_from_fewer_ticks() -> None:
    plain, made_plain = _png(trim=False)
    trimmed, made_trimmed = _png(trim=True)
    assert trimmed == plain
    assert made_trimmed < 0.8 * made_plain


def test_only_plain_log_locators_change_class() -> None:
    fig = _figure()
    linear = fig.axes[4].yaxis.get_major_locator()
    figures.trim_log_ticks(fig)
    assert type(fig.axes[0].yaxis.get_minor_locator()) is figures.DrawnLogLocator
    assert type(fig.axes[2].xaxis.get_major_locator()) is figures.DrawnLogLocator
    assert fig.axes[4].yaxis.get_major_locator() is linear
    assert type(linear) is not figures.DrawnLogLocator
    figures.plt.close(fig)


def test_the_report_figures_go_through_the_trim(monkeypatch) -> None:
    trimmed = []
    real = figures.trim_log_ticks
    monkeypatch.setattr(figures, "trim_log_ticks", lambda fig: trimmed.append(real(fig)))
    fig = _figure()
    assert figures.figure_to_data_uri(fig).startswith("data:image/png;base64,")
    assert len(trimmed) == 1
