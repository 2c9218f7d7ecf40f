"""``otfuse interpolate A B --data DATA -o DIR``: loss and accuracy along (1-t)A + tB, plain and
with B aligned to A (:func:`otfuse.align`, on the data's train split or own inputs).

Writes DIR/interpolation.csv, .png and .json. Evaluation needs labels (a named dataset's test split,
or own inputs with labels).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from torch import nn

import otfuse
from otfuse.checkpoints import atomic_write_bytes, atomic_write_text
from otfuse.cli import models, options
from otfuse.cli.common import (
    Report,
    Stopwatch,
    UsageError,
    add_device,
    add_output,
    command,
    format_shape,
    jsonable,
    parse_device,
    parse_positive_int,
)
from otfuse.cli.report import interpolation_text, paths_csv, plot_paths
from otfuse.cli.sources import DataSource, add_data
from otfuse.data import Dataset
from otfuse.interpolation import PathPoint, accuracy_drop, interpolate, loss_barrier


def add(commands) -> None:
    p = command(
        commands, "interpolate", run, "loss and accuracy along (1-t)A + tB, plain and aligned"
    )
    p.add_argument("model_a", metavar="A")
    p.add_argument("model_b", metavar="B")
    models.add_arch(p, per_checkpoint=True)
    add_data(p, required=True, split="test")
    add_output(p, "folder for interpolation.csv, .png and .json", metavar="DIR")
    p.add_argument("--steps", type=parse_positive_int, default=11, help="points on the path")
    add_device(p)
    options.add_fusion_options(p, options.ALIGNMENT_OPTIONS, "alignment (otfuse.align's options)")


def run(args: argparse.Namespace) -> Report:
    watch = Stopwatch()
    if args.output is None:
        raise UsageError("the output folder is missing: pass -o DIR")
    folder = Path(args.output)
    files = {ext: folder / f"interpolation.{ext}" for ext in ("csv", "png", "json")}
    for path in files.values():
        models.check_output(str(path), args.force)
    if args.steps < 2:
        raise UsageError("--steps must be at least 2")
    device = parse_device(args.device)
    data = DataSource.from_args(args, split_role="eval")
    with watch("data"):
        eval_set = data.eval_set("interpolate")
        align_data = data.fusion_inputs()
    if args.in_shape is not None and tuple(args.in_shape) != eval_set.input_shape:
        raise UsageError(
            f"--in-shape {format_shape(args.in_shape)} does not match {data.what()}, of shape "
            f"{format_shape(eval_set.input_shape)}; leave --in-shape out"
        )
    paths = [args.model_a, args.model_b]
    with watch("load"):
        a, b = models.load_models(paths, models.archs_for(args.arch, 2), data.model_defaults())
        models.check_accepts(
            [a, b], eval_set.images, data.what(), hint="check --arch and --data",
            num_classes=data.num_classes(), min_classes=int(eval_set.labels.max()) + 1,
        )  # fmt: skip
    models.check_same_parameters([a, b])
    for item in (a, b):  # alignment and evaluation run where the models are
        item.model.to(device)
    kwargs = options.given_options(args, options.ALIGNMENT_OPTIONS)
    progress = not args.quiet and sys.stderr.isatty()  # interpolate() draws bars only
    with watch("alignment"), models.naming([a, b]):
        aligned = otfuse.align(b.model, a.model, data=align_data, **kwargs)
    with watch("interpolation"):
        plain = _plain_path(a.model, b.model, eval_set, args.steps, progress)
        rows = interpolate(a.model, aligned, eval_set, args.steps, progress=progress)
    summary = summary_of(a, b, data, eval_set, plain, rows, kwargs)
    with watch("writing"):
        title = f"{Path(models.name(a)).name} -> {Path(models.name(b)).name}"
        png = plot_paths(plain, rows, title, _where(data, eval_set))
        atomic_write_text(files["csv"], paths_csv(plain, rows))
        atomic_write_bytes(files["png"], png)
        summary["command_seconds"] = watch.seconds()
        atomic_write_text(files["json"], json.dumps(jsonable(summary), indent=2) + "\n")
    payload = {**summary, "files": {k: str(v) for k, v in files.items()}}
    notes = [f"wrote {', '.join(str(p) for p in files.values())}"]
    if plain is None:
        notes.append(
            "the models differ in width: the aligned path ends at B transported into A's width "
            "(its units merged by the plan), not at B itself, and its barrier is measured to there"
        )
    return Report(interpolation_text(plain, rows, summary), payload, notes)


def _where(data: DataSource, eval_set: Dataset) -> str:
    return f"{eval_set.name} {eval_set.split}" if data.is_named else Path(data.text).name


def _plain_path(
    a: nn.Module, b: nn.Module, dataset: Dataset, steps: int, progress: bool
) -> list[PathPoint] | None:
    """The path to B as it is, or None when A and B have different shapes (different widths)."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        return None
    return interpolate(a, b, dataset, steps, progress=progress)


def summary_of(a, b, data: DataSource, dataset: Dataset, plain, rows, kwargs) -> dict[str, Any]:
    def path(points):
        if points is None:
            return None
        return {
            "loss_barrier": loss_barrier(points),
            "accuracy_drop": accuracy_drop(points),
            "points": [dataclasses.asdict(p) for p in points],
        }

    return {
        "otfuse_version": otfuse.__version__,
        "command": "interpolate",
        "inputs": [{"path": models.name(m), "sha256": m.checkpoint.sha256} for m in (a, b)],
        "data": {**data.describe("eval"), "examples": len(dataset)},
        "alignment_data": data.describe("fuse"),
        "alignment": kwargs,
        "plain": path(plain),
        "aligned": path(rows),
    }
