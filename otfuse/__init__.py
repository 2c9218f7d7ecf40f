"""otfuse: fuse trained PyTorch models by aligning their neurons with optimal transport.

Singh & Jaggi, "Model Fusion via Optimal Transport" (NeurIPS 2020), generalised to any ``torch.fx``
traceable architecture, K models and different widths.

>>> result = otfuse.fuse([model_a, model_b], "paper-wts", example_input=torch.zeros(2, 1, 28, 28))
>>> fused = result.model
"""

from otfuse.baselines import PredictionEnsemble, ensemble, vanilla_average
from otfuse.config import FusionConfig, recipe_names
from otfuse.discovery import (
    NeuronSpace,
    SpaceGraph,
    discover,
    linear_rule,
    norm_rule,
    register_rule,
    registered_rules,
    unregister_rule,
)
from otfuse.errors import (
    ArchitectureMismatchError,
    CheckpointError,
    DataError,
    OtfuseError,
    TransportError,
    UnsupportedOpError,
)
from otfuse.pipeline import FusionResult, align, fuse
from otfuse.stages import STAGES
from otfuse.transport import TransportPlan

spaces = discover


def __getattr__(name: str):
    """``otfuse.hf`` (the optional Hugging Face support) on first use, without importing it
    (and ``transformers``) with the package."""
    if name == "hf":
        import importlib

        return importlib.import_module("otfuse.hf")
    raise AttributeError(f"module 'otfuse' has no attribute '{name}'")


__all__ = [
    "STAGES",
    "ArchitectureMismatchError",
    "CheckpointError",
    "DataError",
    "FusionConfig",
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
    "linear_rule",
    "norm_rule",
    "register_rule",
    "registered_rules",
    "unregister_rule",
    "recipe_names",
    "spaces",
    "vanilla_average",
]
__version__ = "0.1.0"
