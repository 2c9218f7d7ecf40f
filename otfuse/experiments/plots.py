"""Output files of the skill-transfer, widths and timing experiments: line plots, tables, JSON.

Figures are drawn with matplotlib's Agg canvas (no display, no pyplot state) and every file is
written atomically through :mod:`otfuse.checkpoints`: an interrupted run never leaves half a file.

>>> line_plot(out / "sweep.png", [Panel("all classes", [Series("OT", [0, 1], [80.0, 85.0])])])
>>> print(grid(["w_A", "OT"], [["0.0", "80.00"]]))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otfuse.checkpoints import atomic_path
from otfuse.experiments.report import table, write_report, write_results

__all__ = [
    "Panel",
    "Series",
    "describe",
    "distinct_colours",
    "grid",
    "line_plot",
    "percent",
    "write_json",
    "write_markdown",
]


@dataclass(frozen=True)
class Series:
    """One line of a panel: ``y`` against ``x`` (same length; None or NaN leaves a gap)."""

    label: str
    x: Sequence[float]
    y: Sequence[float | None]
    linestyle: str = "-"  # matplotlib line style: "-", "--", ":"
    marker: str = "o"
    color: str | None = None  # matplotlib colour ("C0", "C1", ...); None: the next of the cycle


def distinct_colours(count: int) -> list[str]:
    """``count`` colours that differ: matplotlib's cycle (C0-C9) up to ten, else tab20's."""
    if count <= 10:
        return [f"C{i}" for i in range(count)]
    from matplotlib import colormaps, colors

    tab20 = colormaps["tab20"]
    return [colors.to_hex(tab20(i % 20)) for i in range(count)]


@dataclass(frozen=True)
class Panel:
    """One set of axes: its series, plus horizontal reference lines (label -> y value)."""

    title: str
    series: Sequence[Series]
    xlabel: str = ""
    ylabel: str = ""
    references: Mapping[str, float] = field(default_factory=dict)
    loglog: bool = False  # logarithmic x and y axes


def line_plot(
    path: str | Path, panels: Sequence[Panel], *, title: str = "", panel_size=(5.5, 4.2)
) -> Path:
    """Draw ``panels`` side by side and save them as a PNG at ``path`` (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel_size[0] * len(panels), panel_size[1]), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        _draw(ax, panel)
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return Path(path)


def _draw(ax: Any, panel: Panel) -> None:
    for s in panel.series:
        y = [math.nan if v is None else v for v in s.y]
        style = {"linestyle": s.linestyle, "marker": s.marker, "color": s.color}
        ax.plot(list(s.x), y, markersize=4, label=s.label, **style)
    greys = ("black", "dimgray", "darkgray", "silver")
    for i, (label, value) in enumerate(panel.references.items()):
        style = ("--", "-.", ":")[i % 3]
        ax.axhline(value, color=greys[i % len(greys)], linestyle=style, linewidth=1, label=label)
    if panel.loglog:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        xs = sorted({x for s in panel.series for x in s.x})
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_title(panel.title)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")


def describe(arch: str, kwargs: Mapping[str, Any]) -> str:
    """``arch`` and its zoo keyword arguments: 'vgg11 (width 0.25, in_shape 1x28x28)'."""
    parts = [
        f"{k} {'x'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
        for k, v in kwargs.items()
    ]
    return f"{arch} ({', '.join(parts)})" if parts else arch


def percent(value: float | None) -> str:
    """An accuracy cell: two decimals, or '-' when there is no value."""
    return "-" if value is None else f"{value:.2f}"


# tables and files are written by the same helpers as every other experiment's
grid = table
write_json = write_results
write_markdown = write_report
