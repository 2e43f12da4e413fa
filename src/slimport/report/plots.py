"""Plots for reports, drawn by matplotlib (the optional extra `report`) as SVG text.

matplotlib is imported when a plot is drawn, never at import time, with the Agg backend (no
display needed); SVG text keeps the HTML report one self-contained file."""

from __future__ import annotations

import io
from collections.abc import Sequence

from slimport.errors import SlimportError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SlimportError(
            "plots need matplotlib, which is not installed",
            hint="pip install 'slimport[report]' (or pip install matplotlib)",
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _svg(fig) -> str:
    plt = _pyplot()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _finish(fig, ax, xlabel: str, ylabel: str, title: str) -> str:
    """Labels, legend and grid of a one-axes plot, then its SVG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _svg(fig)


def stacked_bars(
    labels: Sequence[str],
    stacks: dict[str, Sequence[float]],
    ylabel: str,
    title: str = "",
) -> str:
    """One bar per label, stacked from `stacks` (segment name -> one value per label); SVG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 3.6))
    bottom = [0.0] * len(labels)
    for name, values in stacks.items():
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(axis="y", alpha=0.3)
    return _svg(fig)


def series(
    x: Sequence,
    lines: dict[str, Sequence[float]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    log_y: bool = False,
    threshold: float | None = None,
) -> str:
    """Line plot of one or more series over x (e.g. per-layer max |Δ|), with an optional
    horizontal threshold line (e.g. the tolerance); SVG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, values in lines.items():
        ax.plot(list(x), list(values), marker="o", markersize=3, label=name)
    if threshold is not None:
        ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"{threshold:g}")
    if log_y:
        ax.set_yscale("symlog", linthresh=1e-12)
    return _finish(fig, ax, xlabel, ylabel, title)


def bars(
    labels: Sequence[str],
    values: Sequence[float],
    xlabel: str,
    title: str = "",
    colors: Sequence[str] | None = None,
    errors: Sequence[float] | None = None,
) -> str:
    """Horizontal bars, one per label, top to bottom in the given order (a ranking), with optional
    error bars; SVG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, max(2.5, 0.28 * len(labels) + 1)))
    y = list(range(len(labels)))[::-1]
    ax.barh(y, list(values), color=colors, xerr=errors)
    ax.set_yticks(y, list(labels), fontsize="small")
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return _svg(fig)


def histograms(
    panels: dict[str, dict[str, Sequence[float]]], xlabel: str, bins: int = 80, title: str = ""
) -> str:
    """One panel per name, each overlaying its distributions (e.g. fp32 vs quantized weights)
    as step histograms on a log count axis; SVG."""
    import numpy as np

    plt = _pyplot()
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.2), squeeze=False)
    for ax, (name, dists) in zip(axes[0], panels.items(), strict=False):
        lo = min(float(np.min(v)) for v in dists.values())
        hi = max(float(np.max(v)) for v in dists.values())
        edges = np.linspace(lo, hi, bins + 1)
        for label, v in dists.items():
            ax.hist(np.asarray(v), bins=edges, histtype="step", label=label, linewidth=1.2)
        ax.set_yscale("log")
        ax.set_title(name, fontsize="small")
        ax.set_xlabel(xlabel)
        ax.legend(fontsize="x-small")
    if title:
        fig.suptitle(title)
    return _svg(fig)


def pareto(
    points: Sequence[tuple[float, float, str]],
    xlabel: str,
    ylabel: str,
    chosen: tuple[float, float] | None = None,
    limit: float | None = None,
    title: str = "",
) -> str:
    """Scatter of (x, y, label) points with their lower-left front as a line (smaller x and y
    are better), the chosen point ringed and an optional horizontal limit; SVG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    ax.scatter(xs, ys, s=22, zorder=3, label="recipes scored")
    front, best = [], float("inf")
    for x, y, _ in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    if len(front) > 1:
        ax.plot(*zip(*front, strict=True), linestyle="-", linewidth=1, color="C2", label="front")
    if chosen is not None:
        ax.scatter([chosen[0]], [chosen[1]], s=160, facecolors="none", edgecolors="C3",
                   linewidths=2, zorder=4, label="chosen")  # fmt: skip
    if limit is not None:
        ax.axhline(limit, color="red", linestyle="--", linewidth=1, label="budget")
    return _finish(fig, ax, xlabel, ylabel, title)
