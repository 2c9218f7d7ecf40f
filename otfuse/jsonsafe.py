"""Values made ready for strict JSON, in one place for the command line, reports and checkpoints."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def jsonable(value: Any) -> Any:
    """A copy of ``value`` that ``json.dumps`` writes as strict JSON: dataclasses and mappings become
    dicts, tuples lists, paths strings, one-element tensors and numpy scalars numbers, non-finite
    floats ``None`` (JSON has no NaN), anything else its ``str``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif not isinstance(value, (bool, int, float, str)) and callable(getattr(value, "item", None)):
        value = value.item()  # numpy scalars
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
