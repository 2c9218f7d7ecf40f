"""otfuse: fuse trained PyTorch models by aligning their neurons with optimal transport.

Singh & Jaggi, "Model Fusion via Optimal Transport" (NeurIPS 2020), generalised to any ``torch.fx``
traceable architecture, K models and different widths.

>>> result = otfuse.fuse([model_a, model_b], mode="wts", example_input=torch.zeros(2, 1, 28, 28))
>>> fused = result.model
"""

from otfuse.alignment import AlignOptions
from otfuse.discovery import NeuronSpace, SpaceGraph, discover
from otfuse.errors import (
    ArchitectureMismatchError,
    CheckpointError,
    DataError,
    OtfuseError,
    TransportError,
    UnsupportedOpError,
)
from otfuse.fusion import FusionResult, PredictionEnsemble, align, ensemble, fuse, vanilla_average
from otfuse.transport import TransportPlan

spaces = discover

__all__ = [
    "AlignOptions",
    "ArchitectureMismatchError",
    "CheckpointError",
    "DataError",
    "FusionResult",
    "NeuronSpace",
    "OtfuseError",
    "PredictionEnsemble",
    "SpaceGraph",
    "TransportError",
    "TransportPlan",
    "UnsupportedOpError",
    "align",
    "discover",
    "ensemble",
    "fuse",
    "spaces",
    "vanilla_average",
]
__version__ = "0.1.0"
