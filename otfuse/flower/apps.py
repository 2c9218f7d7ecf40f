"""Flower apps for the zoo models on a partitioned dataset: a ``ClientApp`` and a ``ServerApp``.

The module-level :data:`client_app` and :data:`server_app` read their
:class:`~otfuse.flower.settings.FederatedSettings` from Flower's ``run_config``: point a Flower
app's ``pyproject.toml`` at them (``serverapp = "otfuse.flower.apps:server_app"``) and run it with
``flwr run`` on a local-simulation federation or a real deployment, unchanged.
:func:`make_client_app` / :func:`make_server_app` bind settings in Python instead
(:func:`otfuse.flower.simulation.simulate`).

The client (``partition-id`` k of ``num-partitions``, from its node config) trains its model on its
part of the training set (:func:`otfuse.flower.partition.client_dataset`) with
:func:`otfuse.training.train` and replies with its weights, ``num-examples``, training loss and
accuracy, and its architecture (:func:`~otfuse.flower.strategy.model_record`). It starts from the
global model, except in round 1 with ``init="different"`` (its own seeded initialisation) and when
the global model's widths differ from its own (it then continues from its last local model). The
server runs :class:`~otfuse.flower.strategy.OTFusion` or
:class:`~otfuse.flower.strategy.MeteredFedAvg` for ``rounds`` rounds, evaluates the global model
on the test split after each round, and writes the final global model to ``output`` when set.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result
from torch import nn

from otfuse.checkpoints import save_model
from otfuse.flower.settings import FederatedSettings
from otfuse.flower.strategy import COUNTS_KEY, MODEL_KEY, MeteredFedAvg, OTFusion, model_record
from otfuse.training import TrainConfig, _num_threads, evaluate, train

R = TypeVar("R")

__all__ = [
    "FederatedRun",
    "build_strategy",
    "client_app",
    "make_client_app",
    "make_server_app",
    "server_app",
]

LOCAL_KEY = "local-model"  # the client's own last model, in its Context.state


# --------------------------------------------------------------------------------------------------
# Client


def _one_thread(app: Callable[..., R]) -> Callable[..., R]:
    """Run ``app`` with one torch thread (each simulated client or server shares the machine's
    cores with the others), then restore the caller's setting: in-process runs (the simulation's
    driver, tests) keep theirs."""

    @functools.wraps(app)
    def run(*args: Any, **kwargs: Any) -> R:
        with _num_threads(1):
            return app(*args, **kwargs)

    return run


def _settings(given: FederatedSettings | None, context: Context) -> FederatedSettings:
    return given if given is not None else FederatedSettings.from_run_config(context.run_config)


def _client_id(context: Context) -> tuple[int, int]:
    config = context.node_config
    return int(config.get("partition-id", 0)), int(config.get("num-partitions", 1))


def _start_model(
    msg: Message, context: Context, settings: FederatedSettings, client: int
) -> nn.Module:
    """The model client ``client`` trains this round (see the module docstring)."""
    model = settings.client_model(client)
    server_round = int(msg.content["config"].get("server-round", 1))
    if server_round == 1 and settings.init == "different":
        return model
    state = msg.content["arrays"].to_torch_state_dict()
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if {k: tuple(v.shape) for k, v in state.items()} == own:
        model.load_state_dict(state)
    elif LOCAL_KEY in context.state.array_records:
        model.load_state_dict(context.state.array_records[LOCAL_KEY].to_torch_state_dict())
    return model


def _inject(fault: str | None, model: nn.Module, settings: FederatedSettings) -> nn.Module:
    """A fault a client was told to inject (``settings.faults``), after training."""
    if fault == "nan":
        with torch.no_grad():
            next(iter(model.parameters())).fill_(math.nan)
    elif fault == "arch":
        return settings.replace(
            model="convnet" if settings.model != "convnet" else "mlpnet"
        ).global_model()
    elif fault == "slow":
        time.sleep(settings.timeout + 5.0)
    return model


@_one_thread
def client_train(msg: Message, context: Context, settings: FederatedSettings) -> Message:
    """Train this client's model on its data; reply with weights, metrics and architecture."""
    client, num_clients = _client_id(context)
    fault = settings.client_faults().get(client)
    if fault == "raise":
        raise RuntimeError(f"client {client}: injected failure")
    data = settings.client_data(client, num_clients)
    model = _start_model(msg, context, settings, client)
    server_round = int(msg.content["config"].get("server-round", 1))
    config = TrainConfig(
        epochs=settings.local_epochs, lr=settings.lr, batch_size=settings.batch_size,
        seed=settings.seed + 1 + client + 1000 * server_round, num_threads=1,
    )  # fmt: skip
    history = train(model, data, config, progress=False)
    context.state[LOCAL_KEY] = ArrayRecord(model.state_dict())
    model = _inject(fault, model, settings)
    metrics = MetricRecord({
        "train-loss": history.final.loss,
        "train-accuracy": history.final.accuracy,
        "num-examples": len(data),
    })  # fmt: skip
    if msg.content["config"].get(COUNTS_KEY):  # the server asks (targets="coverage")
        metrics[COUNTS_KEY] = torch.bincount(data.labels, minlength=data.num_classes).tolist()
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": metrics,
            MODEL_KEY: model_record(model),
        }
    )
    return Message(content=content, reply_to=msg)


@_one_thread
def client_evaluate(msg: Message, context: Context, settings: FederatedSettings) -> Message:
    """Evaluate the global model on this client's training data (loss, accuracy, examples)."""
    client, num_clients = _client_id(context)
    model = settings.global_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    data = settings.client_data(client, num_clients)
    result = evaluate(model, data)
    metrics = {
        "eval-loss": result.loss,
        "eval-accuracy": result.accuracy,
        "num-examples": len(data),
    }
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def make_client_app(settings: FederatedSettings | None = None) -> ClientApp:
    """A ClientApp with ``settings`` bound, or (None) reading them from ``run_config``."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return client_train(msg, context, _settings(settings, context))

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return client_evaluate(msg, context, _settings(settings, context))

    return app


# --------------------------------------------------------------------------------------------------
# Server


@dataclass
class FederatedRun:
    """What a ServerApp run leaves behind (filled by :func:`make_server_app`'s ``sink``)."""

    settings: FederatedSettings
    result: Result | None = None
    strategy: MeteredFedAvg | None = None
    seconds: float = 0.0
    accuracy: dict[int, float] = field(default_factory=dict)  # round -> test accuracy (%)
    train_metrics: dict[int, dict] = field(default_factory=dict)  # round -> aggregated metrics

    @property
    def reports(self) -> list:
        return getattr(self.strategy, "reports", [])


def build_strategy(settings: FederatedSettings, model: nn.Module) -> MeteredFedAvg:
    """The settings' strategy: :class:`OTFusion` (its recipe) or :class:`MeteredFedAvg`."""
    common = {
        "fraction_train": settings.fraction_train,
        "fraction_evaluate": settings.fraction_evaluate,
        "min_train_nodes": settings.min_train_nodes,
        "min_available_nodes": settings.min_available_nodes,
    }
    if settings.strategy == "fedavg":
        return MeteredFedAvg(**common)
    config = settings.fusion_config()
    reads_data = config.needs_data and not config.synthesize  # data-free never reads the sample
    data = settings.server_data() if reads_data else None
    refit_rounds = settings.refit_rounds or None  # 0: every round
    return OTFusion(
        model, config, server_data=data, guard=settings.guard, refit_rounds=refit_rounds, **common
    )


def _evaluate_fn(settings: FederatedSettings) -> Callable[[int, ArrayRecord], MetricRecord]:
    test = settings.test_data()

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = settings.global_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        result = evaluate(model, test)
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

    return evaluate_global


@_one_thread
def server_main(grid: Grid, context: Context, settings: FederatedSettings) -> FederatedRun:
    """Run ``settings.rounds`` rounds of the settings' strategy; write the final model if asked."""
    start = time.perf_counter()
    model = settings.global_model()
    strategy = build_strategy(settings, model)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=settings.rounds,
        timeout=settings.timeout,
        train_config=ConfigRecord({"local-epochs": settings.local_epochs}),
        evaluate_fn=_evaluate_fn(settings) if settings.server_eval else None,
    )
    run = FederatedRun(settings, result, strategy, time.perf_counter() - start)
    run.accuracy = {r: float(m["accuracy"]) for r, m in result.evaluate_metrics_serverapp.items()}
    run.train_metrics = {r: dict(m) for r, m in result.train_metrics_clientapp.items()}
    if settings.output and len(result.arrays):  # never a model no round could fuse
        model.load_state_dict(result.arrays.to_torch_state_dict())
        save_model(Path(settings.output), model, {"rounds": settings.rounds}, overwrite=True)
    return run


def make_server_app(
    settings: FederatedSettings | None = None, sink: Callable[[FederatedRun], None] | None = None
) -> ServerApp:
    """A ServerApp with ``settings`` bound (None: from ``run_config``); ``sink`` gets the run."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run = server_main(grid, context, _settings(settings, context))
        if sink is not None:
            sink(run)

    return app


client_app = make_client_app()
server_app = make_server_app()
