"""What the commands print and write: tables, timings, the interpolation's CSV and plot."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

from otfuse.interpolation import PathPoint

CSV_COLUMNS = ("t", "plain_accuracy", "plain_loss", "aligned_accuracy", "aligned_loss")


def seconds_text(seconds: Mapping[str, float]) -> str:
    """``load 0.12 s, fusion 0.81 s, ..., total 2.30 s`` (the steps and 'other' add up to total)."""
    parts = [
        f"{k} {v:.2f} s"
        for k, v in seconds.items()
        if k != "total" and (k != "other" or v >= 0.005)
    ]
    return ", ".join(parts) + f"; total {seconds['total']:.2f} s"


def score_table(rows: Sequence[Mapping[str, Any]], where: str) -> str:
    width = max(len("model"), *(len(r["model"]) for r in rows))
    lines = [f"{'model':<{width}}  accuracy    loss   ({where})"]
    for r in rows:
        lines.append(f"{r['model']:<{width}}  {r['accuracy']:7.2f}%  {r['loss']:6.4f}")
    return "\n".join(lines)


def fuse_text(names: Sequence[str], result, metadata: Mapping[str, Any]) -> str:
    """What ``otfuse fuse`` prints: how it fused, the library's timings, costs, scores, time."""
    config = result.config
    on = {
        "data": f" on {metadata['sample']} inputs of {_data_name(metadata['data'])}",
        "synthesized": f" on {config.synthesize} synthesised inputs",
        "none": "",
    }.get(result.inputs, "")
    lines = [f"fused {len(names)} models in {result.seconds:.2f} s with recipe {config.recipe}{on}"]
    if result.timings:
        lines.append("  " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()))
    if result.selection:
        scores = "; ".join(f"{k}: {v:.4g}" for k, v in result.selection.items())
        lines.append(f"alignment chosen: {result.selected} (KL to the ensemble, {scores})")
    options = metadata["options"]
    lines.append("options: " + ", ".join(f"{k} {_value(v)}" for k, v in options.items()))
    weights = ", ".join(f"{w:.3g}" for w in result.weights)
    lines.append(f"anchor {names[result.anchor]}, weights {weights}")
    costs = [(n, c) for n, c in zip(names, metadata["costs"]) if c]
    if costs:
        lines.append("transport cost per neuron space (model -> anchor):")
        for n, c in costs:
            lines.append(f"  {n}: " + ", ".join(f"{k} {v:.4g}" for k, v in c.items()))
    if "evaluation" in metadata:
        evaluation = metadata["evaluation"]
        lines.append(score_table(evaluation["rows"], evaluation["where"]))
    lines.append(f"time: {seconds_text(metadata['command_seconds'])}")
    return "\n".join(lines)


def _data_name(data: Mapping[str, Any] | None) -> str:
    if not data:
        return "the data"
    if "name" in data:
        return f"{data['name']} {data.get('split', '')}".strip()
    return str(data.get("path"))


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


# --------------------------------------------------------------------------------------------------
# interpolate


def paths_csv(plain: list[PathPoint] | None, rows: list[PathPoint]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for i, point in enumerate(rows):
        p = plain[i] if plain is not None else None
        cells = [p.accuracy, p.loss] if p else ["", ""]
        writer.writerow([f"{point.t:.6g}", *cells, point.accuracy, point.loss])
    return buffer.getvalue()


def plot_paths(
    plain: list[PathPoint] | None, rows: list[PathPoint], title: str, where: str
) -> bytes:
    """A PNG of loss and accuracy against t for both paths (matplotlib's Agg, no display)."""
    from matplotlib.figure import Figure  # a plain Figure draws with Agg and touches no GUI

    figure = Figure(figsize=(9, 3.4), layout="constrained")
    ax_loss, ax_acc = figure.subplots(1, 2)
    for points, label, style in ((plain, "plain B", "o--"), (rows, "OT-aligned B", "o-")):
        if points is None:
            continue
        ts = [p.t for p in points]
        ax_loss.plot(ts, [p.loss for p in points], style, label=label, markersize=3)
        ax_acc.plot(ts, [p.accuracy for p in points], style, label=label, markersize=3)
    ax_loss.set(xlabel="t  ((1-t)A + tB)", ylabel=f"loss ({where})", title=title)
    ax_acc.set(xlabel="t  ((1-t)A + tB)", ylabel=f"accuracy (%, {where})")
    ax_loss.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def interpolation_text(plain, rows, summary) -> str:
    lines = ["   t   plain acc  plain loss   aligned acc  aligned loss"]
    for i, point in enumerate(rows):
        p = plain[i] if plain is not None else None
        left = f"{p.accuracy:8.2f}%  {p.loss:10.4f}" if p else f"{'-':>9}  {'-':>10}"
        lines.append(f"{point.t:4.2f}  {left}  {point.accuracy:11.2f}%  {point.loss:12.4f}")
    aligned = summary["aligned"]
    plain_text = "n/a (different widths)"
    if summary["plain"] is not None:
        plain_text = f"{summary['plain']['loss_barrier']:.4f}"
    lines.append(f"loss barrier: plain {plain_text}, aligned {aligned['loss_barrier']:.4f}")
    return "\n".join(lines)
