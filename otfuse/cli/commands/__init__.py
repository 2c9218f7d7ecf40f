"""One module per command; each has ``add(commands)`` (its arguments) and a handler."""

from __future__ import annotations

from otfuse.cli.commands import evaluate, experiments, fuse, inspect, interpolate, train

MODULES = (fuse, evaluate, train, inspect, interpolate, experiments)


def add_all(commands) -> None:
    for module in MODULES:
        module.add(commands)
