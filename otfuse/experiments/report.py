"""Writing an experiment's outputs: ``report.md``, ``results.json`` and PNG plots, each atomically.

Any experiment can use these helpers; none of them knows about a particular experiment.

* :func:`write_report` / :func:`write_results`: Markdown and JSON, written through
  :func:`otfuse.checkpoints.atomic_write_text` so a crash never leaves half a file.
* :func:`table`: a Markdown table from headers and rows of cells.
* :class:`Target`: a measured value checked against a threshold (e.g. an issue's acceptance target),
  computed from the results and printed as met or not met.
* :func:`bar_chart` / :func:`line_chart`: matplotlib figures rendered with the Agg canvas (no display,
  no pyplot state), one panel per group, saved through :func:`otfuse.checkpoints.atomic_path`.
* :func:`run_info`: how and where the run was made, for the report's header.

>>> write_results(out / "results.json", {"rows": [asdict(r) for r in rows]})
>>> bar_chart(out / "accuracy.png", {"mlpnet": {"one-shot": {"vanilla": 12.0, "OT": 80.0}}})
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from otfuse.checkpoints import atomic_path, atomic_write_text
from otfuse.jsonsafe import jsonable

__all__ = [
    "Target",
    "bar_chart",
    "fmt",
    "jsonable",
    "line_chart",
    "run_info",
    "table",
    "timed",
    "write_report",
    "write_results",
]


# --------------------------------------------------------------------------------------------------
# Text and JSON


def fmt(value: float | int | None, digits: int = 2) -> str:
    """A number for a table cell: fixed ``digits``, thousands separators for integers, '-' for None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; cells that are not strings go through :func:`fmt`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [c if isinstance(c, str) else fmt(c) for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(path: str | Path, results: Mapping[str, Any]) -> Path:
    """``results`` as indented JSON at ``path`` (atomically); returns ``path``."""
    return atomic_write_text(path, json.dumps(jsonable(results), indent=2) + "\n")


def write_report(path: str | Path, title: str, sections: Sequence[str]) -> Path:
    """A Markdown report: ``# title`` then each section (already Markdown), blank-line separated."""
    text = "\n\n".join([f"# {title}", *(s.strip() for s in sections if s.strip())]) + "\n"
    return atomic_write_text(path, text)


def run_info(command: str) -> dict[str, Any]:
    """The command that regenerates a run and the machine it ran on."""
    return {
        "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
    }


def timed(make: Any) -> tuple[Any, float]:
    """``make()`` and the wall-clock seconds it took."""
    start = time.perf_counter()
    value = make()
    return value, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# Targets


@dataclasses.dataclass(frozen=True)
class Target:
    """A measured ``value`` checked against ``threshold`` (``value >= threshold`` unless
    ``at_most``); ``value`` is None when it could not be measured (then the target is not met)."""

    name: str
    value: float | None
    threshold: float
    unit: str = ""
    at_most: bool = False

    @property
    def met(self) -> bool:
        if self.value is None or not math.isfinite(self.value):
            return False
        return self.value <= self.threshold if self.at_most else self.value >= self.threshold

    def line(self) -> str:
        """One Markdown list line, e.g. ``- MET: data recipe keeps ...: 97.10% (target >= 95%)``."""
        sign = "<=" if self.at_most else ">="
        value = "not measured" if self.value is None else f"{self.value:.2f}{self.unit}"
        status = "MET" if self.met else "NOT MET"
        return f"- {status}: {self.name}: {value} (target {sign} {self.threshold:g}{self.unit})"

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "met": self.met}


# --------------------------------------------------------------------------------------------------
# Plots

# panel title -> series name -> x label (or number) -> value
Panels = Mapping[str, Mapping[str, Mapping[Any, float]]]


def _figure(n_panels: int, panel_size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel_size[0] * n_panels, panel_size[1]), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, axes


def save_figure(fig: Any, path: str | Path, *, dpi: int = 120) -> Path:
    """Render ``fig`` to PNG at ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return Path(path)


def bar_chart(
    path: str | Path,
    panels: Panels,
    *,
    xlabel: str = "",
    title: str = "",
    references: Mapping[str, float] | None = None,
    xlim: tuple[float, float] | None = None,
) -> Path:
    """Horizontal grouped bars: one panel per key of ``panels``, one bar colour per series, one row
    per label (in order of first appearance); ``references`` draws a dashed line per panel and
    ``xlim`` fixes the value axis of every panel."""
    fig, axes = _figure(len(panels), (5.0, 0.32 * _max_labels(panels) + 1.6))
    styles = _styles(panels)
    for ax, (name, series) in zip(axes, panels.items()):
        labels = _labels(series)
        height = 0.8 / max(1, len(series))
        for j, (s_name, values) in enumerate(series.items()):
            ys = [i + (j - (len(series) - 1) / 2) * height for i in range(len(labels))]
            xs = [values.get(label, math.nan) for label in labels]
            ax.barh(ys, xs, height=height, label=s_name, color=styles[s_name][0])
        if references and name in references:
            ax.axvline(references[name], color="black", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(labels)), [str(label) for label in labels], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
        if xlim is not None:
            ax.set_xlim(*xlim)
    _legend(fig, axes)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def line_chart(
    path: str | Path, panels: Panels, *, xlabel: str = "", ylabel: str = "", title: str = ""
) -> Path:
    """One panel per key of ``panels``; one line with markers per series (the same style for a
    series in every panel), x values sorted and used as ticks."""
    fig, axes = _figure(len(panels), (5.5, 4.2))
    styles = _styles(panels)
    for ax, (name, series) in zip(axes, panels.items()):
        ticks: set = set()
        for s_name, values in series.items():
            xs = sorted(values)
            ticks.update(xs)
            color, linestyle, marker = styles[s_name]
            ys = [values[x] for x in xs]
            ax.plot(xs, ys, color=color, linestyle=linestyle, marker=marker, label=s_name)
        ax.set_xticks(sorted(ticks))
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _styles(panels: Panels) -> dict[str, tuple[str, str, str]]:
    """A (colour, line style, marker) per series name, the same in every panel."""
    names = _labels({p: dict.fromkeys(series) for p, series in panels.items()})
    lines, markers = ("-", "--", ":", "-."), "osD^v<>"
    return {
        n: (f"C{i % 10}", lines[(i // 10) % len(lines)], markers[i % len(markers)])
        for i, n in enumerate(names)
    }


def _legend(fig: Any, axes: Sequence[Any]) -> None:
    """One legend for the figure, below the panels, with every series of every panel once."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(
            list(entries.values()),
            list(entries),
            loc="outside lower center",
            ncols=min(4, len(entries)),
            fontsize=8,
        )


def _labels(series: Mapping[str, Mapping[Any, float]]) -> list[Any]:
    seen: dict[Any, None] = {}
    for values in series.values():
        seen.update(dict.fromkeys(values))
    return list(seen)


def _max_labels(panels: Panels) -> int:
    return max((len(_labels(s)) for s in panels.values()), default=1)
