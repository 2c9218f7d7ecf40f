"""``otfuse fuse DIR DIR ... -o OUT_DIR``: fuse Hugging Face model directories (:mod:`otfuse.hf`).

When the checkpoints given to ``fuse`` are directories, each must be a Hugging Face model directory
(``config.json`` and ``model.safetensors``, as ``save_pretrained`` writes them; read without running
any of their code or fetching anything). The fused model is written the same way into OUT_DIR,
with ``otfuse.json`` beside it (the config that ran, the parents' SHA-256, costs, timings), all
atomically (a temporary directory beside OUT_DIR, renamed when complete).

The fusion flags are ``fuse``'s. The models are captured on token ids (2, ``--seq-len``) for text
models and on pixels (2, C, H, W) of the config's image size for image models, or on two rows of
``--data``: token ids (N, T) in a tensor file for text models, images as ``fuse`` reads them for
image models. ``--arch``, ``--in-shape``, ``--format`` and ``--eval`` do not apply.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from otfuse import hf
from otfuse.cli import options
from otfuse.cli.common import Report, Stopwatch, UsageError, parse_device, parse_positive_int
from otfuse.cli.report import fuse_text
from otfuse.cli.sources import DataSource
from otfuse.errors import CheckpointError


def add_options(p: argparse.ArgumentParser) -> None:
    """The flags only Hugging Face model directories use."""
    p.add_argument(
        "--seq-len",
        type=parse_positive_int,
        default=None,
        metavar="N",
        help="Hugging Face text models: tokens per example input without --data (default "
        f"{hf.DEFAULT_SEQ_LEN}, at most the model's positions)",
    )


def wanted(args: argparse.Namespace) -> bool:
    """True when the checkpoints are (or include) directories: Hugging Face models."""
    return any(Path(c).is_dir() for c in args.checkpoints)


def run(args: argparse.Namespace) -> Report:
    watch = Stopwatch()
    _check_flags(args)
    data = DataSource.from_args(args, split_role="fuse")
    config, given = options.resolve_config(args, data is not None)
    if args.print_config:
        return Report(options.config_yaml(config, given), {"config": config.to_dict()})
    from otfuse.cli.commands.fuse import check_usage

    check_usage(args, config, given, data)
    device = parse_device(args.device)
    if args.output is None:
        raise UsageError("the output is missing: pass -o OUT_DIR")
    out = hf.check_output_dir(args.output, args.force)
    hf.check_not_input(out, args.checkpoints)
    hf.require_transformers()
    with watch("load"):
        parents = [hf.load_pretrained(d) for d in args.checkpoints]
        hf.check_same_architecture(parents)
        for parent in parents:
            parent.model.to(device)
    anchor = parents[config.anchor].model
    kind = hf.input_kind(anchor)
    with watch("data"):
        inputs = _inputs(data, kind) if data is not None else None
    seq_len = args.seq_len if args.seq_len is not None else hf.DEFAULT_SEQ_LEN
    with watch("fusion"):
        result = hf.fuse_models(
            parents, config, data=inputs, seq_len=seq_len, progress=not args.quiet
        )
    example = _example_shape(anchor, inputs, seq_len)
    metadata = hf.fusion_metadata(parents, result)
    metadata.update(
        command="fuse",
        example_input={"kind": kind, "shape": example},
        data=_describe(data, kind),
        sample=min(result.config.num_samples, len(inputs)) if inputs is not None else None,
        given={k: list(v) if isinstance(v, tuple) else v for k, v in given.items()},
        options={n: getattr(result.config, n) for n in options.option_names()
                 if n not in ("recipe", "weights", "anchor")},
    )  # fmt: skip
    metadata["command_seconds"] = watch.seconds()
    with watch("writing"):
        keeper = parents[result.anchor]
        hf.save_pretrained(
            result.model, out, metadata=metadata, overwrite=args.force, dtype=keeper.dtype,
            use_cache=keeper.use_cache,
        )  # fmt: skip
    metadata["command_seconds"] = watch.seconds()
    names = [str(p.path) for p in parents]
    payload = {"output": str(out), "metadata_file": str(out / hf.METADATA_FILE), **metadata}
    note = f"wrote {out}/ ({keeper.architecture}: config.json, model.safetensors, otfuse.json)"
    return Report(fuse_text(names, result, metadata), payload, [note])


def _check_flags(args: argparse.Namespace) -> None:
    missing = [c for c in args.checkpoints if not Path(c).exists()]
    if missing:
        raise CheckpointError(
            f"{missing[0]} does not exist; give Hugging Face model directories (config.json and "
            "model.safetensors, as save_pretrained writes)"
        )
    files = [c for c in args.checkpoints if not Path(c).is_dir()]
    if files:
        raise UsageError(
            f"{files[0]} is a file but {_first_dir(args)} a directory; give Hugging Face model "
            "directories only, or checkpoint files only"
        )
    if len(args.checkpoints) < 2:
        raise UsageError(f"fusion needs at least two checkpoints, got {len(args.checkpoints)}")
    for flag, value in (
        ("--arch", args.arch),
        ("--in-shape", args.in_shape),
        ("--format", args.format),
        ("--eval", args.eval),
    ):
        if value is not None and value is not False:
            raise UsageError(
                f"{flag} does not apply to Hugging Face model directories (their config.json "
                "says the architecture); leave it out"
            )


def _first_dir(args: argparse.Namespace) -> str:
    return next(c for c in args.checkpoints if Path(c).is_dir())


def _inputs(data: DataSource, kind: str) -> Any:
    """What ``--data`` gives the fusion: token ids (N, T) read from a tensor file for text models;
    images as ``fuse`` reads them for image models."""
    if kind == "pixels":
        return data.fusion_inputs()
    if data.is_named:
        raise UsageError(
            f"--data {data.text} is a dataset of images; a text model takes token ids: give a "
            "tensor file of token ids (N, T)"
        )
    return hf.load_token_ids(data.text)


def _example_shape(model, inputs, seq_len: int) -> list[int]:
    if inputs is not None:
        images = getattr(inputs, "images", inputs)
        return [2, *images.shape[1:]]
    return list(hf.example_input(model, seq_len=seq_len).shape)


def _describe(data: DataSource | None, kind: str) -> dict[str, Any] | None:
    if data is None:
        return None
    if kind == "tokens":
        return {"path": data.text, "kind": "token ids"}
    return data.describe("fuse")


__all__ = ["add_options", "run", "wanted"]
