"""``otfuse fuse CKPT CKPT ... -o OUT``: fuse checkpoints with :func:`otfuse.fuse`.

The fusion options are :class:`otfuse.FusionConfig`'s fields (flags and ``--config`` keys, see
:mod:`otfuse.cli.options`). Writes OUT and OUT.json: the config that ran, the inputs' SHA-256, the
data, costs, the library's timings and the command's own (loading, evaluation, writing).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

import otfuse
from otfuse.checkpoints import FORMATS, LoadedModel, architecture_record, save_model
from otfuse.cli import hf as hf_dirs
from otfuse.cli import models, options
from otfuse.cli.common import (
    Report,
    Stopwatch,
    UsageError,
    add_device,
    add_output,
    command,
    format_shape,
    parse_device,
)
from otfuse.cli.report import fuse_text
from otfuse.cli.sources import DataSource, add_data
from otfuse.config import FusionConfig
from otfuse.data import Dataset
from otfuse.errors import OtfuseError
from otfuse.training import evaluate


def add(commands) -> None:
    p = command(commands, "fuse", run, "fuse two or more checkpoints into one model")
    p.add_argument(
        "checkpoints", nargs="*", metavar="CKPT",
        help="two or more checkpoints, or Hugging Face model directories (see otfuse.cli.hf)",
    )  # fmt: skip
    models.add_arch(p, per_checkpoint=True)
    add_output(p, "the fused checkpoint (and OUT.json with the config and results)")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: from OUT's suffix")
    add_data(p, required=False, split="train")
    p.add_argument(
        "--eval",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="evaluate the parents, the baselines and the fused model (a named dataset's test "
        "split, or own inputs with labels)",
    )
    p.add_argument(
        "--config", default=None, metavar="FILE.yaml", help="fusion options; flags override"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved options, exit")
    add_device(p)
    hf_dirs.add_options(p)
    options.add_fusion_options(p)


def run(args: argparse.Namespace) -> Report:
    if hf_dirs.wanted(args):  # Hugging Face model directories: otfuse.cli.hf
        return hf_dirs.run(args)
    watch = Stopwatch()
    data = DataSource.from_args(args, split_role="fuse")
    config, given = options.resolve_config(args, data is not None)
    if args.print_config:
        return Report(options.config_yaml(config, given), {"config": config.to_dict()})
    check_usage(args, config, given, data)
    device = parse_device(args.device)
    out = models.check_output(args.output, args.force, args.format)
    archs = models.archs_for(args.arch, len(args.checkpoints))
    with watch("data"):
        inputs = data.fusion_inputs() if data is not None else None
        test_set = data.eval_set("--eval") if data is not None and args.eval else None
    with watch("load"):
        defaults = data.model_defaults() if data is not None else {}
        loaded = models.load_models(args.checkpoints, archs, defaults)
        in_shape = check_inputs(loaded, args.in_shape, data, test_set)
    models.check_same_parameters(loaded)
    for item in loaded:  # the fusion runs where the models are (otfuse.fuse moves the data there)
        item.model.to(device)
    with watch("fusion"), models.naming(loaded):
        example = torch.zeros(2, *in_shape) if data is None else None
        result = otfuse.fuse(
            [item.model for item in loaded],
            config,
            data=inputs,
            example_input=example,
            progress=not args.quiet,
        )
    evaluation = None
    if test_set is not None:
        with watch("evaluation"):
            evaluation = evaluate_fusion(loaded, result, test_set, data)
    metadata = fuse_metadata(config, given, loaded, result, data, in_shape, evaluation)
    metadata["command_seconds"] = watch.seconds()  # the file's: up to writing it
    with watch("writing"):
        save_model(out, result.model, metadata, format=args.format, overwrite=args.force)
    metadata["command_seconds"] = watch.seconds()
    names = [models.name(item) for item in loaded]
    payload = {"output": str(out), "metadata_file": f"{out}.json", **metadata}
    return Report(fuse_text(names, result, metadata), payload, [f"wrote {out} and {out}.json"])


def check_usage(
    args: argparse.Namespace, config: FusionConfig, given: dict, data: DataSource | None
) -> None:
    k = len(args.checkpoints)
    if k < 2:
        raise UsageError(f"fusion needs at least two checkpoints, got {k}")
    if config.weights is not None and len(config.weights) != k:
        raise UsageError(
            f"--weights has {len(config.weights)} numbers for {k} checkpoints; give one each"
        )
    if not 0 <= config.anchor < k:
        raise UsageError(f"--anchor must be an index in 0..{k - 1}, got {config.anchor}")
    if data is not None:
        return
    if args.eval:
        raise UsageError("--eval needs data: pass --data (e.g. fashion-mnist, or a tensor file)")
    if config.synthesize:
        return  # otfuse.fuse synthesises the inputs from the models
    needs = "mode acts" if config.mode == "acts" else None
    if needs is None and config.stages:
        needs = f"stages {','.join(config.stages)}"
    if needs is not None:
        source = f" (from recipe '{config.recipe}')" if not {"mode", "stages"} & set(given) else ""
        raise UsageError(
            f"{needs}{source} needs data: pass --data (e.g. fashion-mnist, or a tensor file), "
            "or --synthesize N to synthesise N inputs from the models"
        )


def check_inputs(
    loaded: Sequence[LoadedModel],
    given: Sequence[int] | None,
    data: DataSource | None,
    test_set: Dataset | None,
) -> tuple[int, ...]:
    """The input shape, after a trial forward pass of every model on it (one-line errors)."""
    if data is None:
        shape = models.need_in_shape(models.in_shape_of(loaded, given))
        models.check_accepts(loaded, torch.zeros(2, *shape), "inputs", hint=_hint(given))
        return shape
    shape = data.input_shape()
    if given is not None and tuple(given) != tuple(shape):
        raise UsageError(
            f"--in-shape {format_shape(given)} does not match {data.what()}, of shape "
            f"{format_shape(shape)}; leave --in-shape out"
        )
    models.check_accepts(
        loaded, data.first_inputs(), data.what(), hint="check --arch and --data",
        num_classes=data.num_classes(),
    )  # fmt: skip
    if test_set is not None:
        labels = test_set.labels
        models.check_accepts(
            loaded, test_set.images, data.what(), hint="check --arch and --data",
            min_classes=int(labels.max()) + 1 if len(labels) else None,
        )  # fmt: skip
    return tuple(shape)


def _hint(given: Sequence[int] | None) -> str:
    return "check --in-shape" if given is not None else "check --arch, or pass --in-shape"


def evaluate_fusion(
    loaded: Sequence[LoadedModel], result, test_set: Dataset, data: DataSource
) -> dict[str, Any]:
    """Accuracy and loss of each parent, the prediction ensemble, vanilla averaging and the fusion."""
    parents = [item.model for item in loaded]
    rows = [(models.name(item), item.model) for item in loaded]
    rows.append(("ensemble", otfuse.ensemble(parents, result.weights)))
    try:
        rows.append(("vanilla average", otfuse.vanilla_average(parents, result.weights)))
    except OtfuseError:
        pass  # different widths: no one-to-one average
    rows.append(("OT fusion", result.model))
    scores = []
    for label, model in rows:
        s = evaluate(model, test_set)
        scores.append({"model": label, "accuracy": s.accuracy, "loss": s.loss})
    if data.is_named:
        where = f"{test_set.name} {test_set.split} split"
    else:
        where = f"{data.text}, the inputs fusion used"
    return {"where": where, "data": data.describe("eval"), "rows": scores}


def fuse_metadata(
    config: FusionConfig,
    given: dict,
    loaded: Sequence[LoadedModel],
    result,
    data: DataSource | None,
    in_shape: Sequence[int],
    evaluation: dict | None,
) -> dict[str, Any]:
    anchor = loaded[result.anchor]
    ran = result.config if result.config is not None else config
    metadata = {
        "otfuse_version": otfuse.__version__,
        "command": "fuse",
        "arch": architecture_record(anchor.model, anchor.architecture, in_shape=in_shape),
        "checkpoints": [
            {
                "path": models.name(item),
                "sha256": item.checkpoint.sha256,
                "arch": architecture_record(item.model, item.architecture, in_shape=in_shape),
            }
            for item in loaded
        ],
        "data": data.describe("fuse") if data is not None else None,
        "inputs": result.inputs,
        "sample": _sample_size(data, ran),
        "given": {k: list(v) if isinstance(v, tuple) else v for k, v in given.items()},
        "config": ran.to_dict(),
        "options": _options(ran),
        "selection": dict(result.selection),
        "selected": result.selected,
        "weights": list(result.weights),
        "anchor": result.anchor,
        "costs": result.costs(),
        "seconds": result.seconds,
        "timings": dict(result.timings),
    }
    if evaluation is not None:
        metadata["evaluation"] = evaluation
    return metadata


def _sample_size(data: DataSource | None, config: FusionConfig) -> int | None:
    if data is None:
        return None
    inputs = data.fusion_inputs()
    return min(config.num_samples, len(inputs))


def _options(config: FusionConfig) -> dict[str, Any]:
    """The options that ran, for the text (the recipe, weights and anchor have lines of their own)."""
    skip = {"recipe", "weights", "anchor"}
    return {n: getattr(config, n) for n in options.option_names() if n not in skip}
