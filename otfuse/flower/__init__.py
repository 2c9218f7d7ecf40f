"""Federated fusion on Flower (``pip install 'otfuse[flower]'``): an otfuse strategy for Flower's
Message API, a ClientApp and a ServerApp for the zoo models on a partitioned dataset, and runs on
Flower's simulation engine.

* :class:`OTFusion` (:mod:`otfuse.flower.strategy`): ``FedAvg`` whose ``aggregate_train`` fuses the
  clients' models with :func:`otfuse.fuse` (weights by examples, any recipe), leaving out faulty
  clients with their reason; :class:`MeteredFedAvg`: FedAvg with the same byte counts.
* :mod:`otfuse.flower.apps`: ``client_app`` / ``server_app`` (settings from ``run_config``, for
  ``flwr run``) and :func:`make_client_app` / :func:`make_server_app` (settings bound in Python).
* :mod:`otfuse.flower.partition`: IID, Dirichlet and skill splits (no Flower needed).
* :func:`simulate` (:mod:`otfuse.flower.simulation`): the Ray-backed simulation engine.

Names that need Flower are imported on first use, so ``otfuse.flower.partition`` works without it;
without Flower they raise :class:`FlowerMissingError`.
"""

from __future__ import annotations

import importlib
import importlib.util

from otfuse.errors import OtfuseError
from otfuse.flower.partition import SCHEMES, PartitionError, client_dataset, partition

__all__ = [
    "SCHEMES",
    "FederatedRun",
    "FederatedSettings",
    "FlowerMissingError",
    "MeteredFedAvg",
    "OTFusion",
    "PartitionError",
    "RoundReport",
    "client_dataset",
    "client_replies",
    "make_client_app",
    "make_server_app",
    "partition",
    "simulate",
]


class FlowerMissingError(OtfuseError):
    """Flower is not installed."""


_LAZY = {
    "OTFusion": "otfuse.flower.strategy",
    "MeteredFedAvg": "otfuse.flower.strategy",
    "RoundReport": "otfuse.flower.strategy",
    "FederatedSettings": "otfuse.flower.settings",
    "FederatedRun": "otfuse.flower.apps",
    "make_client_app": "otfuse.flower.apps",
    "make_server_app": "otfuse.flower.apps",
    "simulate": "otfuse.flower.simulation",
    "client_replies": "otfuse.flower.simulation",
}


def require_flower() -> None:
    """Raise :class:`FlowerMissingError` (one line) unless Flower 1.42 with simulation is installed."""
    if importlib.util.find_spec("flwr") is None:
        raise FlowerMissingError(
            "federated fusion needs Flower: pip install 'otfuse[flower]' (flwr[simulation] 1.42)"
        )


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'otfuse.flower' has no attribute '{name}'")
    require_flower()
    return getattr(importlib.import_module(_LAZY[name]), name)
