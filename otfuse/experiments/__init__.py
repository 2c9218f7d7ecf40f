"""The paper's experiments, one command each: ``otfuse experiment NAME [--quick] [-o DIR]``.

Every experiment writes ``DIR/NAME/report.md``, ``results.json`` and its plots, and prints its table.
Experiments register themselves with :func:`register`; :func:`run_experiment` runs one by name.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from otfuse.errors import OtfuseError

# name -> module defining ``run(*, quick, out, data_dir, progress) -> dict``
_MODULES = {
    "two-models": "otfuse.experiments.two_models",
    "many-models": "otfuse.experiments.many_models",
    "skill-transfer": "otfuse.experiments.skill_transfer",
    "widths": "otfuse.experiments.widths",
    "timing": "otfuse.experiments.timing",
    "federated": "otfuse.experiments.federated",
    "transformers": "otfuse.experiments.transformers",
}


def names() -> list[str]:
    """Names of the experiments that exist in this installation."""
    return [n for n, mod in _MODULES.items() if importlib.util.find_spec(mod) is not None]


def _runner(name: str) -> Callable[..., dict]:
    if name not in names():
        raise OtfuseError(f"unknown experiment '{name}'; choose one of {', '.join(names())}")
    return importlib.import_module(_MODULES[name]).run


def run_experiment(
    name: str,
    *,
    quick: bool = False,
    out: str | Path = "runs",
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Run experiment ``name``; writes ``out/name/`` and returns its results."""
    return _runner(name)(quick=quick, out=Path(out) / name, data_dir=data_dir, progress=progress)
