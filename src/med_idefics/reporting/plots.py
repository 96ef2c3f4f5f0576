"""Report figures rendered to PNG bytes (matplotlib, Agg backend): grouped bars with interval error bars, and
curves with interval bands. Callers pass plain numbers and write the bytes where they like; a missing estimate is a
gap, never an error."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # headless: DVC stages and CI have no display

import matplotlib.pyplot as plt  # the backend must be chosen first
import numpy as np

DPI = 120


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95 % interval; any part may be None (not evaluated, or no questions of that type)."""

    value: float | None
    low: float | None = None
    high: float | None = None


def to_png(figure) -> bytes:
    """Render ``figure`` as PNG bytes and close it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _error(estimate: Estimate) -> tuple[float, float]:
    """Asymmetric error-bar lengths; zero where the interval is unknown."""
    if estimate.value is None or estimate.low is None or estimate.high is None:
        return 0.0, 0.0
    return max(estimate.value - estimate.low, 0.0), max(estimate.high - estimate.value, 0.0)


def grouped_bars(panels: Mapping[str, Mapping[str, Mapping[str, Estimate]]], title: str) -> bytes:
    """One panel per key of ``panels`` (e.g. a suite); inside it, one group per metric and one bar per series
    (e.g. a variant), with the 95 % interval as an error bar. Panels with nothing to draw say so."""
    series = list(dict.fromkeys(name for groups in panels.values() for bars in groups.values() for name in bars))
    columns = min(len(panels), 3) or 1
    rows = max(-(-len(panels) // columns), 1)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.6 * rows), squeeze=False)
    for ax, (panel, groups) in zip(axes.flat, panels.items(), strict=False):
        ax.set_title(panel)
        ax.set_ylim(0, 1.05)
        labels = list(groups)
        x = np.arange(len(labels))
        by_series = {name: [bars.get(name, Estimate(None)) for bars in groups.values()] for name in series}
        shown = [name for name in series if any(e.value is not None for e in by_series[name])]  # bars to draw here
        width = 0.8 / max(len(shown), 1)
        for position, name in enumerate(shown):
            estimates = by_series[name]
            present = [i for i, e in enumerate(estimates) if e.value is not None]
            errors = np.array([_error(estimates[i]) for i in present]).T
            ax.bar(
                x[present] + (position - (len(shown) - 1) / 2) * width,
                [estimates[i].value for i in present],
                width,
                yerr=errors,
                capsize=2,
                label=name,
                color=f"C{series.index(name)}",  # a series keeps its colour across panels
            )
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
        if not shown:
            ax.text(0.5, 0.5, "not evaluated", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    if not panels:
        axes.flat[0].text(0.5, 0.5, "nothing to plot", ha="center", va="center", color="gray")
    handles = [plt.Rectangle((0, 0), 1, 1, color=f"C{i}") for i in range(len(series))]
    if handles:
        figure.legend(handles, series, loc="upper center", ncol=min(len(series), 6), bbox_to_anchor=(0.5, 1.0))
    figure.suptitle(title, y=1.06 if handles else 1.0)
    figure.tight_layout()
    return to_png(figure)


def curves_figure(
    lines: Mapping[str, Sequence[tuple[float, Estimate]]],
    title: str,
    xlabel: str,
    ylabel: str,
    references: Mapping[str, Mapping[str, Estimate]] | None = None,
    empty_message: str = "no points to plot",
    x_labels: Mapping[float, str] | None = None,
):
    """One line per key of ``lines`` through its (x, estimate) points with a shaded 95 % band. ``references[line]``
    adds horizontal lines in that line's colour, one dash style per reference name (e.g. other variants' values).
    The x axis shows every point: logarithmic beyond 0 when the points span 10x or more, with 0 still on it
    (symmetric log, linear up to the smallest positive x), a tick at each point (``x_labels`` names some). With no
    points at all the figure carries ``empty_message`` instead. Returns the matplotlib figure (the caller closes it)."""
    figure, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = sorted({x for points in lines.values() for x, e in points if e.value is not None})
    references = references or {}
    reference_names = dict.fromkeys(name for per_line in references.values() for name in per_line)
    styles = dict(zip(reference_names, ("--", ":", "-."), strict=False))
    for index, (name, points) in enumerate(lines.items()):
        points = sorted((x, e) for x, e in points if e.value is not None)
        if points:
            x = np.array([p[0] for p in points], dtype=float)
            ax.plot(x, [p[1].value for p in points], marker="o", color=f"C{index}", label=name)
            bands = [(xi, e.low, e.high) for xi, (_, e) in zip(x, points, strict=True) if e.low is not None]
            if bands:
                bx, low, high = (np.array(column, dtype=float) for column in zip(*bands, strict=True))
                ax.fill_between(bx, low, high, color=f"C{index}", alpha=0.2)
        for reference, estimate in references.get(name, {}).items():
            if estimate.value is not None and reference in styles:
                label = f"{name}: {reference}"
                ax.axhline(estimate.value, linestyle=styles[reference], linewidth=1, color=f"C{index}", label=label)
    if not xs:
        ax.text(0.5, 0.5, empty_message, ha="center", va="center", transform=ax.transAxes, wrap=True, color="gray")
    else:
        _x_axis(ax, xs, x_labels or {})
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    figure.tight_layout()
    return figure


def _x_axis(ax, xs: Sequence[float], labels: Mapping[float, str]) -> None:
    """Scale and ticks that show every x: log for a wide positive span; symmetric log when 0 is among a wide span (a
    log axis cannot place 0); linear otherwise. Margins keep the end points off the frame."""
    positive = [x for x in xs if x > 0]
    low, high = min(xs), max(xs)
    if positive and low >= 0 and high / min(positive) >= 10:
        if low == 0:
            ax.set_xscale("symlog", linthresh=min(positive), linscale=1.0)
            ax.set_xlim(-0.25 * min(positive), high * 1.4)
        else:
            ax.set_xscale("log")
            ax.set_xlim(low / 1.4, high * 1.4)
    else:
        margin = 0.05 * (high - low) or 1.0
        ax.set_xlim(low - margin, high + margin)
    ax.set_xticks(list(xs), [labels.get(x, f"{x:,g}") for x in xs], fontsize=8)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
