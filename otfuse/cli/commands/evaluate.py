"""``otfuse eval CKPT --data DATA``: accuracy and loss of a checkpoint (labels needed)."""

from __future__ import annotations

import argparse

from otfuse.cli import models
from otfuse.cli.common import (
    Report,
    Stopwatch,
    UsageError,
    add_device,
    command,
    format_shape,
    parse_device,
)
from otfuse.cli.sources import DataSource, add_data
from otfuse.training import evaluate


def add(commands) -> None:
    p = command(commands, "eval", run, "accuracy and loss of a checkpoint on labelled data")
    p.add_argument("checkpoint", metavar="CKPT")
    models.add_arch(p)
    add_data(p, required=True, split="test")
    add_device(p)


def run(args: argparse.Namespace) -> Report:
    watch = Stopwatch()
    device = parse_device(args.device)
    data = DataSource.from_args(args, split_role="eval")
    with watch("data"):
        dataset = data.eval_set("eval")
    if args.in_shape is not None and tuple(args.in_shape) != dataset.input_shape:
        raise UsageError(
            f"--in-shape {format_shape(args.in_shape)} does not match {data.what()}, of shape "
            f"{format_shape(dataset.input_shape)}; leave --in-shape out"
        )
    with watch("load"):
        [item] = models.load_models(
            [args.checkpoint], models.archs_for(args.arch, 1), data.model_defaults()
        )
        models.check_accepts(
            [item], dataset.images, data.what(), hint="check --arch and --data",
            num_classes=data.num_classes(), min_classes=int(dataset.labels.max()) + 1,
        )  # fmt: skip
    with watch("evaluation"):
        scores = evaluate(item.model.to(device), dataset)  # batches follow the model
    name = models.name(item)
    seconds = watch.seconds()
    described = {**data.describe("eval"), "examples": len(dataset)}
    payload = {
        "checkpoint": name,
        "data": described,
        "accuracy": scores.accuracy,
        "loss": scores.loss,
        "device": str(device),
        "command_seconds": seconds,
    }
    where = f"{dataset.name} {dataset.split}" if data.is_named else data.text
    text = (
        f"{name} on {where} ({len(dataset)} examples): accuracy {scores.accuracy:.2f}%, "
        f"loss {scores.loss:.4f}"
    )
    return Report(text, payload)
