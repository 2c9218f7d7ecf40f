"""``otfuse demo`` and ``otfuse experiment NAME``: the runs of :mod:`otfuse.experiments`."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from otfuse.cli.common import Report, UsageError, add_output, command
from otfuse.errors import OtfuseError


def add(commands) -> None:
    p = command(commands, "demo", run_demo, "fuse models on real data and show what it gains")
    p.add_argument("--data-dir", default=None, help="folder holding Fashion-MNIST's files")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run")
    add_output(p, "folder for the report (default: the demo's)", metavar="DIR", force=False)
    p = command(commands, "experiment", run_experiment, "run one of the paper's experiments")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run")
    add_output(p, "folder for the reports (default: the experiment's)", metavar="DIR", force=False)
    p.add_argument("--data-dir", default=None, help="folder holding the datasets' files")


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name in ("otfuse", "otfuse.experiments", name):
            raise OtfuseError(f"{name} is not part of this installation of otfuse") from exc
        raise


def run_demo(args: argparse.Namespace) -> Report:
    demo = _module("otfuse.experiments.demo")
    out = {"out": Path(args.output)} if args.output is not None else {}
    result = demo.main(data_dir=args.data_dir, quick=args.quick, progress=not args.quiet, **out)
    return Report("", {"command": "demo", "result": result})


def run_experiment(args: argparse.Namespace) -> Report:
    experiments = _module("otfuse.experiments")
    names = list(experiments.names())
    if args.name not in names:
        raise UsageError(f"unknown experiment '{args.name}': choose one of {', '.join(names)}")
    out = {"out": Path(args.output)} if args.output is not None else {}
    result = experiments.run_experiment(
        args.name, quick=args.quick, data_dir=args.data_dir, progress=not args.quiet, **out
    )
    return Report("", {"command": "experiment", "name": args.name, "result": result})
