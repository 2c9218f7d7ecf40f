"""``otfuse train --arch ARCH --data NAME -o OUT``: train a model on a named dataset.

A run whose loss diverges (:class:`otfuse.training.TrainingDivergedError`) writes nothing and exits
with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

import otfuse
from otfuse.checkpoints import FORMATS, architecture_record, save_model
from otfuse.cli import models
from otfuse.cli.common import (
    Report,
    UsageError,
    add_device,
    add_output,
    command,
    parse_device,
    parse_positive_float,
    parse_positive_int,
)
from otfuse.cli.sources import DataSource, add_data
from otfuse.training import TrainConfig, evaluate, seed_everything, train


def add(commands) -> None:
    p = command(commands, "train", run, "train a model on a named dataset")
    models.add_arch(p, required=True)
    add_data(p, required=True, split=None, own=False)
    add_output(p, "the trained checkpoint (and OUT.json with its metadata)")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: from OUT's suffix")
    add_device(p)
    g = p.add_argument_group("training (defaults: otfuse.training.TrainConfig's)")
    g.add_argument("--epochs", type=parse_positive_int, default=None)
    g.add_argument("--lr", type=parse_positive_float, default=None)
    g.add_argument("--batch-size", type=parse_positive_int, default=None)
    g.add_argument("--seed", type=int, default=None, help="seeds the weights and the shuffling")
    g.add_argument("--subset", type=parse_positive_int, default=None, metavar="N",
                   help="train on a seeded random subset of N examples")  # fmt: skip


def run(args: argparse.Namespace) -> Report:
    out = models.check_output(args.output, args.force, args.format)
    parse_device(args.device)  # a bad device fails before any work
    data = DataSource.from_args(args)
    if not data.is_named:
        raise UsageError(f"train takes a named dataset, not {args.data}")
    [arch] = models.archs_for(args.arch, 1)
    given = {k: getattr(args, k) for k in ("epochs", "lr", "batch_size", "seed")}
    config = TrainConfig(**{k: v for k, v in given.items() if v is not None})
    train_set, test_set = data.named("fuse"), data.named("eval")
    if args.subset is not None and args.subset < len(train_set):
        generator = torch.Generator().manual_seed(config.seed)
        train_set = train_set.subset(
            torch.randperm(len(train_set), generator=generator)[: args.subset]
        )
    seed_everything(config.seed)  # the initial weights too
    model = arch.build(data.model_defaults())
    models.check_accepts(
        [(f"--arch {arch}", model)], train_set.images, data.what(),
        hint="check --arch", num_classes=train_set.num_classes,
    )  # fmt: skip
    model.to(parse_device(args.device))  # batches follow the model
    start = time.perf_counter()
    history = train(model, train_set, config, progress=not args.quiet)
    seconds = time.perf_counter() - start
    scores = evaluate(model, test_set)
    metadata = {
        "otfuse_version": otfuse.__version__,
        "command": "train",
        "arch": architecture_record(model, arch, in_shape=train_set.input_shape),
        "data": {"name": train_set.name, "examples": len(train_set), "subset": args.subset},
        "train": dataclasses.asdict(config),
        "history": [dataclasses.asdict(e) for e in history.epochs],
        "seconds": seconds,
        "test_accuracy": scores.accuracy,
        "test_loss": scores.loss,
    }
    save_model(out, model, metadata, format=args.format, overwrite=args.force)
    text = (
        f"trained {arch} on {len(train_set)} {train_set.name} examples for {config.epochs} "
        f"epoch(s) in {seconds:.1f} s: test accuracy {scores.accuracy:.2f}%, "
        f"loss {scores.loss:.4f}"
    )
    payload = {"output": str(out), "metadata_file": f"{out}.json", **metadata}
    return Report(text, payload, [f"wrote {out} and {out}.json"])
