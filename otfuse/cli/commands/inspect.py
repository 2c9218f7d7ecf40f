"""``otfuse inspect CKPT``: the neuron spaces otfuse finds in a checkpoint's model."""

from __future__ import annotations

import argparse

import torch

import otfuse
from otfuse.checkpoints import architecture_record
from otfuse.cli import models
from otfuse.cli.common import Report, command


def add(commands) -> None:
    p = command(commands, "inspect", run, "list the neuron spaces otfuse finds")
    p.add_argument("checkpoint", metavar="CKPT")
    models.add_arch(p)


def run(args: argparse.Namespace) -> Report:
    [item] = models.load_models([args.checkpoint], models.archs_for(args.arch, 1))
    shape = models.need_in_shape(models.in_shape_of([item], args.in_shape))
    hint = "check --in-shape" if args.in_shape is not None else "check --arch, or pass --in-shape"
    example = torch.zeros(2, *shape)
    models.check_accepts([item], example, "inputs", hint=hint)
    graph = otfuse.spaces(item.model, example)
    names = graph.names()
    spaces = [
        {
            "index": s.index,
            "name": s.name,
            "size": s.size,
            "fixed": s.fixed,
            "groups": s.groups,
            "members": [
                {
                    "param": m.param,
                    "axis": m.axis,
                    "role": m.role,
                    "layout": m.layout.describe(names),
                }
                for m in s.members
            ],
        }
        for s in graph.spaces
    ]
    name = models.name(item)
    record = architecture_record(item.model, item.architecture, in_shape=shape)
    payload = {"checkpoint": name, "arch": record, "in_shape": list(shape), "spaces": spaces}
    return Report(f"{name} ({item.architecture}): {graph}", payload)
