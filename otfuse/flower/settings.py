"""The settings of a federated run, one frozen dataclass read from Flower's ``run_config``.

Every field is a key of the app's ``[tool.flwr.app.config]`` table (and of ``flwr run
--run-config``), with dashes for underscores: ``local-epochs = 5``, ``partition = "dirichlet"``.
The same settings drive the ``ClientApp`` and the ``ServerApp``, on the simulation engine or on a
real deployment.

>>> settings = FederatedSettings(partition="dirichlet", alpha=0.5, rounds=3)
>>> FederatedSettings.from_run_config({"local-epochs": 5, "strategy": "fedavg"})
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from otfuse import zoo
from otfuse.config import FusionConfig, Targets
from otfuse.data import Dataset, load_dataset
from otfuse.errors import OtfuseError
from otfuse.flower.partition import SCHEMES, client_dataset

__all__ = ["FAULTS", "FederatedSettings", "SettingsError"]

FAULTS = ("raise", "nan", "arch", "slow")  # faults a client can be told to inject (tests, drills)
STRATEGIES = ("otfuse", "fedavg")
INITS = ("common", "different")


class SettingsError(OtfuseError):
    """A federated run's setting has a value it cannot take."""


@dataclass(frozen=True)
class FederatedSettings:
    """What a federated run does; see the module docstring for the ``run_config`` keys."""

    # -- model and data --
    model: str = "mlpnet"  # zoo model of the global model
    width: float = 1.0  # its width multiplier
    client_widths: str = ""  # comma-separated widths cycled over clients ("1,0.5"); "": all `width`
    dataset: str = "fashion-mnist"  # read from local IDX files
    data_dir: str = ""  # folder of the IDX files ("": the default / $OTFUSE_DATA_DIR)
    limit: int = 0  # keep the first `limit` training examples (0: all)
    partition: str = "dirichlet"  # iid, dirichlet or skill
    alpha: float = 0.5  # Dirichlet concentration
    partition_seed: int = 0
    # -- local training --
    local_epochs: int = 1
    lr: float = 0.05
    batch_size: int = 64
    seed: int = 0  # seeds the global model; client k's own initialisation uses seed + 1 + k
    init: str = "common"  # round 1 starts from the global model (common) or each client's own
    # -- server --
    strategy: str = "otfuse"  # otfuse or fedavg
    recipe: str = "data-free"  # otfuse recipe
    # refit's class-score targets: average, ensemble, confident or coverage (from the class counts
    # each client reports)
    targets: str = "average"
    synthesize: int = 0  # data-free: inputs to synthesise (0: the recipe's)
    server_samples: int = 0  # unlabeled training images the server holds for the data recipe
    guard: bool = True  # keep FedAvg's average when it is closer to the clients' ensemble
    refit_rounds: int = 1  # refit only in the first N rounds (0: every round)
    rounds: int = 3
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0  # client-side evaluation of the global model on local data
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    timeout: float = 3600.0  # seconds the server waits for a round's replies
    server_eval: bool = True  # evaluate the global model on the test split after every round
    output: str = ""  # write the final global model here (safetensors), if set
    faults: str = ""  # "k:kind,...": client k injects a fault (raise, nan, arch, slow)

    def __post_init__(self) -> None:
        _check_choice("partition", self.partition, SCHEMES)
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("init", self.init, INITS)
        _check_choice("targets", self.targets, typing.get_args(Targets))
        if self.strategy == "otfuse":
            config = self.fusion_config()  # an unknown recipe fails here, not in round 1
            if config.needs_data and not config.synthesize and not self.server_samples:
                raise SettingsError(
                    f"recipe '{self.recipe}' reads data: set server-samples (e.g. 400)"
                )
        for name in ("local_epochs", "rounds", "batch_size"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name.replace('_', '-')} must be at least 1")
        if self.refit_rounds < 0:
            raise SettingsError("refit-rounds must be 0 (every round) or more")
        self.client_faults()
        self.widths()

    # -- run_config ------------------------------------------------------------------------------
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederatedSettings:
        """Settings from Flower's ``run_config`` (dashed keys; unknown keys are an error)."""
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in hints:
                raise SettingsError(f"unknown run-config key '{key}'")
            values[name] = _coerce(key, value, hints[name])
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """The settings as ``run_config`` values (dashed keys)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> FederatedSettings:
        return dataclasses.replace(self, **changes)

    # -- what the apps build -------------------------------------------------------------------------
    def widths(self) -> list[float]:
        """The width of each client's model, cycled over client ids."""
        if not self.client_widths.strip():
            return [self.width]
        try:
            widths = [float(w) for w in self.client_widths.split(",")]
        except ValueError:
            raise SettingsError(
                f"client-widths must be numbers, not '{self.client_widths}'"
            ) from None
        if any(not w > 0 for w in widths):
            raise SettingsError("client-widths must be positive")
        return widths

    def client_faults(self) -> dict[int, str]:
        """Client id -> the fault it injects, from ``faults``."""
        out = {}
        for item in filter(None, (s.strip() for s in self.faults.split(","))):
            client, _, kind = item.partition(":")
            if not client.strip().isdigit() or kind.strip() not in FAULTS:
                raise SettingsError(
                    f"faults must look like '1:nan,2:raise' with kinds {', '.join(FAULTS)}"
                )
            out[int(client)] = kind.strip()
        return out

    def global_model(self) -> nn.Module:
        """The initial global model (seeded with ``seed``)."""
        torch.manual_seed(self.seed)
        return self._model(self.width)

    def client_model(self, client: int) -> nn.Module:
        """Client ``client``'s model, initialised from its own seed (``seed + 1 + client``)."""
        widths = self.widths()
        torch.manual_seed(self.seed + 1 + client)
        return self._model(widths[client % len(widths)])

    def _model(self, width: float) -> nn.Module:
        shape = load_dataset(self.dataset, "test", self.data_or_none).input_shape
        return zoo.create(self.model, width=width, in_shape=tuple(shape))

    @property
    def data_or_none(self) -> str | None:
        return self.data_dir or None

    def client_data(self, client: int, num_clients: int) -> Dataset:
        """Client ``client``'s training examples."""
        return client_dataset(
            client, num_clients, self.partition, alpha=self.alpha, seed=self.partition_seed,
            dataset=self.dataset, data_dir=self.data_or_none, limit=self.limit or None,
        )  # fmt: skip

    def test_data(self) -> Dataset:
        return load_dataset(self.dataset, "test", self.data_or_none)

    def server_data(self) -> torch.Tensor | None:
        """``server_samples`` unlabeled training images (seeded), or None."""
        if not self.server_samples:
            return None
        train = load_dataset(self.dataset, "train", self.data_or_none)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed + 7))
        return train.images[order[: self.server_samples]]

    def fusion_config(self) -> FusionConfig:
        """The otfuse recipe with the settings' targets (and, for ``data-free``, ``synthesize``)."""
        config = FusionConfig.from_recipe(self.recipe).replace(targets=self.targets)
        if self.synthesize and config.synthesize:
            config = config.replace(synthesize=self.synthesize)
        return config


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SettingsError(f"unknown {name} '{value}'; choose one of {', '.join(allowed)}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` as the field's type (run_config values are bool, int, float or str)."""
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
    elif hint is int and not isinstance(value, bool):
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
    elif hint is float and not isinstance(value, bool) and isinstance(value, (int, float)):
        return float(value)
    elif hint is str:
        return str(value)
    raise SettingsError(f"run-config key '{key}' must be {hint.__name__}, not {value!r}")
