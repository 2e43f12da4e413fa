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
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _svg(fig)
